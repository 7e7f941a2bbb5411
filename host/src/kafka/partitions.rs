//! The partition workers of a Kafka run and the rebalance callback that
//! opens and closes them.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, sync_channel};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use super::{KafkaConfig, KafkaRunError, KafkaSink, state_path, tape_path};
use crate::event::{Event, Header, Position};
use crate::pipeline::{Progress, RunError, RunSummary, run_source};
use crate::runtime::{Module, Runtime};
use crate::source::{InputError, Polled, Record, Source, Wait};
use crate::state::{Offsets, StateDb};

/// Chunks of records queued per partition before the consumer waits for
/// its worker.
const QUEUE: usize = 16;

/// Records handed to a worker at once: one wake-up per chunk, not per record.
const CHUNK: usize = 256;

/// How long a newly assigned partition waits for its previous owner (another
/// process sharing the state directory) to let go of its state DB.
const LOCK_WAIT: Duration = Duration::from_secs(120);

/// A partition's run on its own thread.
struct Worker {
    /// Dropping it ends the run's input: the run commits and returns.
    queue: SyncSender<Vec<Record>>,
    thread: JoinHandle<Result<RunSummary, RunError>>,
}

/// What the consumer thread and its rebalance callback share.
pub(super) struct Shared {
    config: KafkaConfig,
    runtime: Arc<Runtime>,
    module: Arc<Module>,
    workers: Mutex<BTreeMap<i32, Worker>>,
    /// Records consumed and not yet handed to their worker, by partition.
    pending: Mutex<BTreeMap<i32, Vec<Record>>>,
    /// Next offset per (topic, partition): where consumption stands, for
    /// `exit_at_end`.
    positions: Mutex<BTreeMap<(String, i32), i64>>,
    /// Offsets the workers committed, not yet committed to the group.
    committed: Arc<Mutex<Offsets>>,
    finished: Mutex<Vec<(i32, RunSummary)>>,
    failure: Mutex<Option<KafkaRunError>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    pub(super) fn new(config: KafkaConfig, runtime: Runtime, module: Module) -> Shared {
        Shared {
            config,
            runtime: Arc::new(runtime),
            module: Arc::new(module),
            workers: Mutex::default(),
            pending: Mutex::default(),
            positions: Mutex::default(),
            committed: Arc::default(),
            finished: Mutex::default(),
            failure: Mutex::default(),
        }
    }

    /// Hands a consumed record to its partition's worker (waiting while
    /// the worker's queue is full).
    pub(super) fn dispatch(&self, record: Record) {
        let position = &record.position;
        let expected = lock(&self.positions).insert(
            (position.stream.clone(), position.partition),
            position.offset.saturating_add(1),
        );
        if let Some(expected) = expected.filter(|&e| position.offset > e) {
            // Compaction, retention or transaction markers leave gaps too,
            // but a gap is worth a line: it may be records a broker skipped.
            eprintln!(
                "{}/{}: offsets {expected}..{} were not delivered (compacted, deleted by \
                 retention, transaction markers, or skipped by the broker)",
                position.stream,
                position.partition,
                position.offset - 1
            );
        }
        let partition = position.partition;
        let mut pending = lock(&self.pending);
        let chunk = pending.entry(partition).or_default();
        chunk.push(record);
        if chunk.len() >= CHUNK {
            let chunk = std::mem::take(chunk);
            drop(pending);
            self.send(partition, chunk);
        }
    }

    /// Hands every partition's buffered records to its worker. Called when
    /// the consumer has nothing more at once, and before partitions close.
    pub(super) fn flush(&self) {
        let pending = std::mem::take(&mut *lock(&self.pending));
        for (partition, chunk) in pending {
            if !chunk.is_empty() {
                self.send(partition, chunk);
            }
        }
    }

    fn send(&self, partition: i32, chunk: Vec<Record>) {
        let workers = lock(&self.workers);
        let sent = match workers.get(&partition) {
            Some(worker) => worker.queue.send(chunk).is_ok(),
            None => false,
        };
        drop(workers);
        if !sent {
            // The worker stopped: its result says why.
            self.close(partition);
            self.fail(KafkaRunError::Worker {
                partition,
                message: "the partition's run stopped unexpectedly".into(),
            });
        }
    }

    pub(super) fn position(&self, topic: &str, partition: i32) -> Option<i64> {
        lock(&self.positions)
            .get(&(topic.to_owned(), partition))
            .copied()
    }

    pub(super) fn take_committed(&self) -> Offsets {
        std::mem::take(&mut *lock(&self.committed))
    }

    pub(super) fn take_failure(&self) -> Option<KafkaRunError> {
        lock(&self.failure).take()
    }

    pub(super) fn take_finished(&self) -> Vec<(i32, RunSummary)> {
        std::mem::take(&mut *lock(&self.finished))
    }

    fn fail(&self, error: KafkaRunError) {
        lock(&self.failure).get_or_insert(error);
    }

    /// Starts workers for the partition numbers in `list` and sets each
    /// topic-partition's start to the offset stored in its state DB.
    fn assign(&self, list: &mut TopicPartitionList) {
        let assigned: Vec<(String, i32)> = list
            .elements()
            .iter()
            .map(|e| (e.topic().to_owned(), e.partition()))
            .collect();
        let mut starts = Offsets::new();
        for &(_, partition) in &assigned {
            if lock(&self.workers).contains_key(&partition) {
                continue;
            }
            match self.start(partition) {
                Ok((worker, stored)) => {
                    lock(&self.workers).insert(partition, worker);
                    starts.extend(stored);
                }
                Err(error) => self.fail(error),
            }
        }
        let mut positions = lock(&self.positions);
        for (topic, partition) in assigned {
            let key = (topic, partition);
            let stored = starts.get(&key).copied();
            let offset = stored.map_or(Offset::Beginning, Offset::Offset);
            if !self.config.quiet {
                eprintln!(
                    "{}/{}: assigned; consuming from {}",
                    key.0,
                    key.1,
                    match stored {
                        Some(next) => format!("offset {next} (stored in the state)"),
                        None => "the beginning (no state yet)".to_owned(),
                    }
                );
            }
            match stored {
                Some(next) => positions.insert(key.clone(), next),
                None => positions.remove(&key),
            };
            let _ = list.set_partition_offset(&key.0, key.1, offset);
        }
    }

    /// Opens partition `partition`'s state DB and starts its run.
    fn start(&self, partition: i32) -> Result<(Worker, Offsets), KafkaRunError> {
        let config = &self.config;
        let state = state_path(&config.state_dir, partition);
        let dir_err = |source| KafkaRunError::Dir {
            dir: config.state_dir.clone(),
            source,
        };
        let lock_file = lock_partition(&config.state_dir, partition).map_err(dir_err)?;
        let run_err = |source: RunError| KafkaRunError::Partition {
            partition,
            state: state.clone(),
            source: Box::new(source),
        };
        let stored = StateDb::open(&state)
            .and_then(|db| db.offsets())
            .map_err(|e| run_err(e.into()))?;
        let mut run = config.run.clone();
        run.input = PathBuf::from(format!("kafka:{}/partition-{partition}", config.group));
        run.state = state.clone();
        run.output = None;
        run.tape = config.tape_dir.as_deref().map(|d| tape_path(d, partition));
        run.dead_letter_outputs = config.dlq_topic.is_some();
        let sink = KafkaSink::new(
            &config.brokers,
            &config.settings,
            config.output_topic.clone(),
            config.dlq_topic.clone(),
        )
        .map_err(|e| run_err(e.into()))?;
        let (queue, received) = sync_channel(QUEUE);
        let (runtime, module) = (Arc::clone(&self.runtime), Arc::clone(&self.module));
        let progress = WorkerProgress {
            committed: Arc::clone(&self.committed),
        };
        let thread = std::thread::Builder::new()
            .name(format!("partition-{partition}"))
            .stack_size(crate::runtime::GUEST_THREAD_STACK)
            .spawn(move || {
                // Held until the run has committed and closed its state DB.
                let _lock = lock_file;
                let mut source = ChannelSource {
                    chunks: received,
                    chunk: Vec::new().into_iter(),
                };
                run_source(
                    &run,
                    &runtime,
                    &module,
                    &mut source,
                    Some(Box::new(sink)),
                    &progress,
                )
            })
            .map_err(dir_err)?;
        Ok((Worker { queue, thread }, stored))
    }

    /// Ends partition `partition`'s run: it processes what is queued,
    /// commits and closes its state DB.
    fn close(&self, partition: i32) {
        let chunk = lock(&self.pending).remove(&partition);
        if let Some(chunk) = chunk.filter(|c| !c.is_empty()) {
            self.send(partition, chunk);
        }
        let Some(worker) = lock(&self.workers).remove(&partition) else {
            return;
        };
        drop(worker.queue);
        let state = state_path(&self.config.state_dir, partition);
        match worker.thread.join() {
            Ok(Ok(summary)) => {
                if !self.config.quiet {
                    eprintln!(
                        "partition {partition}: closed after {} events, committed",
                        summary.consumed
                    );
                }
                lock(&self.finished).push((partition, summary));
            }
            Ok(Err(source)) => self.fail(KafkaRunError::Partition {
                partition,
                state,
                source: Box::new(source),
            }),
            Err(_) => self.fail(KafkaRunError::Worker {
                partition,
                message: "the partition's run panicked".into(),
            }),
        }
    }

    fn revoke(&self, list: &TopicPartitionList) {
        let mut partitions: Vec<i32> = list.elements().iter().map(|e| e.partition()).collect();
        partitions.sort_unstable();
        partitions.dedup();
        for partition in partitions {
            self.close(partition);
        }
    }

    /// Ends every partition's run.
    pub(super) fn close_all(&self) {
        let partitions: Vec<i32> = lock(&self.workers).keys().copied().collect();
        for partition in partitions {
            self.close(partition);
        }
    }
}

/// Takes the exclusive lock of a partition's state DB, waiting for a
/// previous owner to release it.
fn lock_partition(dir: &Path, partition: i32) -> std::io::Result<File> {
    let path = dir.join(format!("partition-{partition}.lock"));
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)?;
    let started = Instant::now();
    let mut said = false;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(std::fs::TryLockError::WouldBlock) => {
                if started.elapsed() > LOCK_WAIT {
                    return Err(std::io::Error::other(format!(
                        "{} is still locked by another process after {}s; \
                         is another rewind run stuck on this partition?",
                        path.display(),
                        LOCK_WAIT.as_secs()
                    )));
                }
                if !said {
                    eprintln!(
                        "partition {partition}: waiting for the previous owner to release {}",
                        path.display()
                    );
                    said = true;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(std::fs::TryLockError::Error(error)) => return Err(error),
        }
    }
}

/// A worker's progress: reports committed offsets for the group commit.
struct WorkerProgress {
    committed: Arc<Mutex<Offsets>>,
}

impl Progress for WorkerProgress {
    fn batch_committed(&self, offsets: &Offsets) {
        lock(&self.committed).extend(offsets.iter().map(|(k, v)| (k.clone(), *v)));
    }
}

/// A partition's records, as the consumer thread routes them (in chunks).
struct ChannelSource {
    chunks: Receiver<Vec<Record>>,
    chunk: std::vec::IntoIter<Record>,
}

impl Source for ChannelSource {
    fn next_record(&mut self) -> Result<Option<Record>, InputError> {
        loop {
            if let Some(record) = self.chunk.next() {
                return Ok(Some(record));
            }
            match self.chunks.recv() {
                Ok(chunk) => self.chunk = chunk.into_iter(),
                Err(_) => return Ok(None),
            }
        }
    }
    fn poll(&mut self, wait: Wait) -> Result<Polled, InputError> {
        loop {
            if let Some(record) = self.chunk.next() {
                return Ok(Polled::Record(record));
            }
            // Between chunks, an open batch that is due commits first, even
            // if more records wait: a stream that is never idle (a steady
            // trickle) would otherwise commit only at epoch boundaries, far
            // later than `--batch-ms`. The run treats it as an idle commit.
            if wait.due.is_some_and(|due| Instant::now() >= due) {
                return Ok(Polled::Idle);
            }
            match self.chunks.recv_timeout(wait.remaining()) {
                Ok(chunk) => self.chunk = chunk.into_iter(),
                Err(RecvTimeoutError::Timeout) => return Ok(Polled::Idle),
                Err(RecvTimeoutError::Disconnected) => return Ok(Polled::End),
            }
        }
    }
    fn size(&self) -> Option<u64> {
        None
    }
    fn bytes_read(&self) -> u64 {
        0
    }
}

/// A consumed Kafka message as a record. Every message decodes: its bytes
/// are the processor's to judge. Its raw bytes are its payload.
pub(super) fn to_record(message: &BorrowedMessage<'_>) -> Record {
    let position = Position {
        stream: message.topic().to_owned(),
        partition: message.partition(),
        offset: message.offset(),
    };
    let headers = message
        .headers()
        .map(|headers| {
            headers
                .iter()
                .map(|h| Header {
                    name: h.key.to_owned(),
                    value: h.value.map(<[u8]>::to_vec),
                })
                .collect()
        })
        .unwrap_or_default();
    Record::decoded(
        Event {
            position,
            key: message.key().map(<[u8]>::to_vec),
            payload: message.payload().map(<[u8]>::to_vec),
            headers,
            timestamp_ms: message.timestamp().to_millis(),
        },
        None,
    )
}

/// The consumer's context: opens partitions on assignment and closes them
/// (committed) on revocation, inside the rebalance.
pub(super) struct Context {
    shared: Arc<Shared>,
}

impl Context {
    pub(super) fn new(shared: Arc<Shared>) -> Context {
        Context { shared }
    }
}

impl ClientContext for Context {}

impl ConsumerContext for Context {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        list: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        let result = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                self.shared.assign(list);
                if cooperative {
                    consumer.incremental_assign(list)
                } else {
                    consumer.assign(list)
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.shared.revoke(list);
                if cooperative {
                    consumer.incremental_unassign(list)
                } else {
                    consumer.unassign()
                }
            }
            other => {
                eprintln!("kafka: rebalance failed ({other:?}); giving up the assignment");
                self.shared.close_all();
                consumer.unassign()
            }
        };
        if let Err(error) = result {
            self.shared.fail(KafkaRunError::Kafka {
                brokers: self.shared.config.brokers.clone(),
                message: format!("rebalance: {error}"),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Position;

    fn record(offset: i64) -> Record {
        Record::malformed(
            Position {
                stream: "t".into(),
                partition: 0,
                offset,
            },
            Vec::new(),
            "raw".into(),
        )
    }

    #[test]
    fn a_due_batch_commits_between_chunks_even_with_records_waiting() {
        let (tx, chunks) = sync_channel(4);
        let mut source = ChannelSource {
            chunks,
            chunk: Vec::new().into_iter(),
        };
        tx.send(vec![record(0), record(1)]).unwrap();
        tx.send(vec![record(2)]).unwrap();
        let open = |due| Wait {
            due,
            most: Duration::from_millis(10),
        };
        let offset = |polled| match polled {
            Polled::Record(record) => record.position.offset,
            other => panic!("expected a record, got {other:?}"),
        };
        // Not due: records as they come.
        assert_eq!(offset(source.poll(open(None)).unwrap()), 0);
        // Due in the middle of a chunk: the chunk is finished first.
        let past = Some(Instant::now());
        assert_eq!(offset(source.poll(open(past)).unwrap()), 1);
        // Due at a chunk boundary: commit before the next chunk, although
        // it is waiting.
        assert!(matches!(source.poll(open(past)).unwrap(), Polled::Idle));
        // Once committed (no batch open), the waiting chunk comes.
        assert_eq!(offset(source.poll(open(None)).unwrap()), 2);
        assert!(matches!(source.poll(open(None)).unwrap(), Polled::Idle));
        drop(tx);
        assert!(matches!(source.poll(open(None)).unwrap(), Polled::End));
    }
}
