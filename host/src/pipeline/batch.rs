//! The consuming loop of a run: batches, the redo of a batch in which an
//! event failed, dead letters, and the tape and observers fed per event.

use super::*;
use crate::event::Header;
use crate::source::{Polled, Wait};

/// A run in progress: the instance, the state DB, and where consumption stands.
pub(super) struct Run<'a> {
    pub(super) instance: Instance<'a>,
    pub(super) module: &'a Module,
    pub(super) config: &'a RunConfig,
    pub(super) progress: &'a dyn Progress,
    pub(super) offsets: Offsets,
    pub(super) next_seq: u64,
    pub(super) sink: Option<Box<dyn Sink>>,
    pub(super) tape: Option<TapeWriter>,
    /// The tape's run frame, written again where an idle commit breaks an
    /// instance epoch.
    pub(super) run_info: Option<RunInfo>,
    /// An idle commit ended the last batch mid-epoch: the next batch starts
    /// with a run frame on the tape.
    pub(super) break_pending: bool,
    /// The last outbox row handed to the sink (this run).
    pub(super) sent_through: Option<(u64, u32)>,
    /// The open batch's results, when the progress observes them.
    pub(super) observed: Option<Vec<EventRecord>>,
    pub(super) summary: RunSummary,
    /// Moved into the guest's store during a call, hence the `Option`.
    pub(super) db: Option<Box<StateDb>>,
    /// Whether events run in their own savepoints (see [`Batch`]).
    pub(super) careful: bool,
    /// Guest log lines of the open batch, shown once the batch is done: a
    /// batch that is redone logs its events again.
    pub(super) logs: Vec<(Position, String)>,
    /// The last committed batch's record list, emptied: the next batch
    /// fills it without growing it again.
    pub(super) spare_records: Vec<Record>,
    /// The current record's (stream, partition), written over for each
    /// record: looking its offset up needs no new `String` per event.
    pub(super) key: (String, i32),
    /// Whether results carry digests of their changes and outputs (see
    /// [`super::Progress::observe`]).
    pub(super) digests: bool,
}

/// The open batch transaction.
///
/// A savepoint per event costs a copy of every page the event touches, so
/// events run without one until an event fails having run a statement that
/// may write: then the batch is rolled back and redone from its first
/// record with a savepoint around each event ("careful"), and the failing
/// event alone is undone. Guests are deterministic and every batch starts
/// at an instance epoch, so the redo reaches the same state; only the time
/// differs. A batch in which an event failed makes the next one careful too,
/// so a stream full of bad events pays for one redo, not one per batch.
/// An event that fails having written nothing (the usual invalid input,
/// rejected before any write) has nothing to undo: it is dead-lettered
/// where it stands, with no redo and no careful batch after it (a careful
/// batch took twice as long: 300,000 payments events with one invalid in
/// 5,000 ran in 6.5 s against 2.8 s).
struct Batch {
    /// Records the batch has read, to feed them again on a redo (kept only
    /// while the batch is not careful).
    records: Vec<Record>,
    retained_bytes: usize,
    started: Instant,
    /// Events the batch has applied, dead-lettered or skipped.
    events: usize,
    /// Where the run stood when the batch began.
    next_seq: u64,
    offsets: Offsets,
    summary: RunSummary,
    /// An event of this batch failed.
    failed: bool,
}

/// How long a live source is waited on at most before the run looks up
/// (for a stop request, or a batch due by time).
const IDLE_WAIT: Duration = Duration::from_millis(100);

/// Records a batch keeps for a redo at most; past this it turns careful.
const MAX_RETAINED_BYTES: usize = 64 << 20;

/// How an event went.
enum Processed {
    Done,
    /// It failed outside a savepoint: the batch must be redone carefully.
    Redo,
}

impl Run<'_> {
    pub(super) fn db(&self) -> &StateDb {
        self.db
            .as_ref()
            .expect("the state DB is only lent out during a guest call")
    }

    pub(super) fn consume(&mut self, source: &mut dyn Source) -> Result<(), RunError> {
        let mut batch: Option<Batch> = None;
        // Records to feed again, ahead of the source, after a redo.
        let mut redo = VecDeque::new();
        loop {
            let record = match redo.pop_front() {
                Some(record) => record,
                None => {
                    // A live source waits no longer than the open batch may.
                    let wait = Wait {
                        // (A bound too far to represent is no bound.)
                        due: batch
                            .as_ref()
                            .and_then(|open| open.started.checked_add(self.config.batch_time)),
                        most: IDLE_WAIT,
                    };
                    match source.poll(wait)? {
                        Polled::Record(record) => record,
                        Polled::End => break,
                        Polled::Idle if self.progress.should_stop() => return self.stop(batch),
                        Polled::Idle => {
                            let due = batch
                                .as_ref()
                                .is_some_and(|b| b.started.elapsed() >= self.config.batch_time);
                            if due {
                                self.commit_idle(batch.take().expect("the batch is open"))?;
                            }
                            continue;
                        }
                    }
                }
            };
            self.key.0.clear();
            self.key.0.push_str(&record.position.stream);
            self.key.1 = record.position.partition;
            let next = self.offsets.get(&self.key).copied();
            if next.is_some_and(|next| record.position.offset < next) {
                self.summary.skipped += 1;
                if let Some(open) = batch.as_mut() {
                    self.retain(open, record);
                }
                continue;
            }
            if self
                .config
                .until_seq
                .is_some_and(|until| self.next_seq > until)
            {
                break;
            }
            let boundary = self.next_seq.is_multiple_of(INSTANCE_EPOCH);
            if boundary && self.progress.should_stop() {
                return self.stop(batch);
            }
            let open = match batch.as_mut() {
                Some(open) => {
                    if boundary || record.fresh {
                        self.instance.recycle();
                    }
                    open
                }
                None => {
                    self.db().begin()?;
                    if let Some(tape) = self.tape.as_mut() {
                        // Written before the batch's frames, so that a redo
                        // of the batch keeps it.
                        if let Some(info) = self.run_info.as_mut().filter(|_| self.break_pending) {
                            info.first_seq = self.next_seq;
                            tape.run(info);
                        }
                        tape.begin_batch();
                    }
                    self.break_pending = false;
                    // A fresh instance for every epoch, and for the first
                    // event of a run (which, but for an input's end, is an
                    // epoch start).
                    self.instance.recycle();
                    batch.insert(Batch {
                        records: std::mem::take(&mut self.spare_records),
                        retained_bytes: 0,
                        started: Instant::now(),
                        events: 0,
                        next_seq: self.next_seq,
                        offsets: self.offsets.clone(),
                        summary: self.summary.clone(),
                        failed: false,
                    })
                }
            };
            let offset = record.position.offset;
            match self.process(&record, &mut open.failed) {
                Ok(Processed::Done) => {}
                Ok(Processed::Redo) => {
                    let open = batch.take().expect("the batch is open");
                    self.db().rollback()?;
                    self.next_seq = open.next_seq;
                    self.offsets = open.offsets;
                    self.summary = open.summary;
                    self.summary.redone_batches += 1;
                    self.logs.clear();
                    if let Some(tape) = self.tape.as_mut() {
                        tape.discard();
                    }
                    if let Some(observed) = self.observed.as_mut() {
                        observed.clear();
                    }
                    self.db().reset_changes();
                    self.careful = true;
                    redo = open
                        .records
                        .into_iter()
                        .chain([record])
                        .chain(redo)
                        .collect();
                    continue;
                }
                Err(error) => {
                    // Keep what the last commit kept. The batch began at an
                    // epoch boundary, so a rerun processes it again from the
                    // same fresh instance.
                    self.show_logs();
                    self.db().rollback()?;
                    return Err(error);
                }
            }
            self.next_seq += 1;
            self.summary.consumed += 1;
            let after = next.unwrap_or(i64::MIN).max(offset.saturating_add(1));
            match self.offsets.get_mut(&self.key) {
                Some(stored) => *stored = after,
                None => {
                    self.offsets.insert(self.key.clone(), after);
                }
            }
            let open = batch.as_mut().expect("the batch is open");
            open.events += 1;
            self.retain(open, record);
            // Batches end only at epoch boundaries, so a crash always resumes
            // where every run starts a fresh instance.
            // (The clock is read only where a batch may end.)
            let full = || {
                open.events >= self.config.batch_size
                    || open.started.elapsed() >= self.config.batch_time
            };
            if self.next_seq.is_multiple_of(INSTANCE_EPOCH) && full() {
                let done = batch.take().expect("the batch is open");
                self.commit_batch(done)?;
                self.progress
                    .advance(source.bytes_read(), self.summary.consumed);
            }
        }
        if let Some(open) = batch.take() {
            self.commit_batch(open)?;
        }
        self.progress
            .advance(source.bytes_read(), self.summary.consumed);
        Ok(())
    }

    /// The event's id for deduplication, if it carries one.
    fn event_id<'e>(&self, event: &'e crate::event::Event) -> Option<&'e [u8]> {
        let name = self.config.dedup_header.as_deref()?;
        event
            .headers
            .iter()
            .find(|h| h.name == name)?
            .value
            .as_deref()
    }

    /// Processes one record inside the open batch: applies it, skips it as a
    /// duplicate, or dead-letters it. The caller counts it as consumed.
    fn process(&mut self, record: &Record, failed: &mut bool) -> Result<Processed, RunError> {
        let seq = self.next_seq;
        let event = match &record.decoded {
            Ok(event) => event,
            Err(reason) => {
                let position = record.position.clone();
                self.dead_letter(
                    seq,
                    position,
                    "malformed",
                    reason.clone(),
                    None,
                    record.raw(),
                )?;
                self.record_on_tape(
                    seq,
                    record,
                    dead("malformed", reason),
                    None,
                    &mut Vec::new(),
                );
                return Ok(Processed::Done);
            }
        };

        if let Some(id) = self.event_id(event) {
            if self.db().seen_event_id(id)? {
                // Re-produced data: consumed, counted, not applied again.
                self.summary.duplicates += 1;
                self.record_on_tape(seq, record, Outcome::Duplicate, None, &mut Vec::new());
                return Ok(Processed::Done);
            }
            self.db().record_event_id(id, seq)?;
        }

        let careful = self.careful;
        if careful {
            self.db().savepoint()?;
        }
        let db = self
            .db
            .take()
            .expect("the state DB is lent out only during a call");
        let (db, outcome) = self.instance.handle(db, event, &record.entropy());
        self.db = Some(db);
        let outcome = match outcome {
            Ok(outcome) => outcome,
            Err(fault) => {
                return Err(RunError::host(&self.config.state, &event.position, fault));
            }
        };
        self.logs.extend(
            outcome
                .logs
                .into_iter()
                .map(|line| (event.position.clone(), line)),
        );
        match outcome.result {
            Ok(mut outputs) => {
                self.summary.outputs += outputs.len() as u64;
                if self.tape.is_some() || self.observed.is_some() {
                    let changes = self.db().take_changes();
                    self.record_on_tape(seq, record, Outcome::Applied, changes, &mut outputs);
                }
                let queued = outputs.drain(..).filter(|_| self.config.queue_outputs);
                for (n, output) in queued.enumerate() {
                    let row = OutboxRow {
                        seq,
                        n: n as u32,
                        id: event.position.output_id(n),
                        output,
                        timestamp_ms: event.timestamp_ms,
                    };
                    self.db().queue_outbox(&row)?;
                }
                self.instance.reuse_outputs(outputs);
                if careful {
                    self.db().release()?;
                }
                self.summary.applied += 1;
            }
            Err(rejection) => {
                if rejection.is_failure() && self.config.on_error == ErrorPolicy::Halt {
                    return Err(RunError::Halted {
                        position: event.position.clone(),
                        rejection,
                    });
                }
                if careful {
                    *failed = true;
                    self.db().rollback_event()?;
                } else if self.db().event_wrote() {
                    return Ok(Processed::Redo);
                }
                // Failed before writing anything (a processor checking its
                // input first): there is nothing to undo, savepoint or not.
                self.db().reset_changes();
                let outcome = dead(rejection.class, &rejection.message);
                self.record_on_tape(seq, record, outcome, None, &mut Vec::new());
                let position = event.position.clone();
                self.dead_letter(
                    seq,
                    position,
                    rejection.class,
                    rejection.message,
                    Some(event),
                    record.raw(),
                )?;
            }
        }
        Ok(Processed::Done)
    }

    /// Queues `record` (consumed as `seq`) and its result on the tape, and
    /// for the observer, if the run has them: the changes the event made
    /// (`None`: it changed nothing) and its outputs. Outputs that are not
    /// queued move to the observer (leaving `outputs` empty); queued ones
    /// are copied.
    fn record_on_tape(
        &mut self,
        seq: u64,
        record: &Record,
        outcome: Outcome,
        changes: Option<EventChanges>,
        outputs: &mut Vec<Output>,
    ) {
        if self.tape.is_none() && self.observed.is_none() {
            return;
        }
        let changes = changes.unwrap_or_else(EventChanges::none);
        let (rows_digest, outputs_digest) = if self.digests {
            let outputs = crate::tape::outputs_digest(outputs.as_slice());
            (changes.digest, outputs)
        } else {
            ([0; 32], [0; 32])
        };
        let result = EventResult {
            outcome,
            rows: changes.rows,
            outputs: outputs.len() as u32,
            rows_digest,
            outputs_digest,
        };
        if let Some(tape) = self.tape.as_mut() {
            tape.record(seq, record, Some(&result));
        }
        if let Some(observed) = self.observed.as_mut() {
            let outputs = if self.config.queue_outputs {
                outputs.clone()
            } else {
                std::mem::take(outputs)
            };
            observed.push(EventRecord {
                seq,
                position: record.position.clone(),
                result,
                changes: changes.changes,
                outputs,
            });
        }
    }

    /// Keeps `record` for a redo of `batch`, unless the batch is careful; a
    /// batch holding too much turns careful instead.
    fn retain(&mut self, batch: &mut Batch, record: Record) {
        if self.careful {
            return;
        }
        batch.retained_bytes += record.raw().len();
        batch.records.push(record);
        if batch.retained_bytes > MAX_RETAINED_BYTES {
            self.careful = true;
            batch.records = Vec::new();
        }
    }

    /// Shows the guest log lines of the batch.
    fn show_logs(&mut self) {
        for (position, line) in self.logs.drain(..) {
            self.progress.guest_log(&position, &line);
        }
    }

    /// Keeps a record that could not be processed, with its raw bytes.
    fn dead_letter(
        &mut self,
        seq: u64,
        position: Position,
        class: &str,
        message: String,
        event: Option<&crate::event::Event>,
        raw: &[u8],
    ) -> Result<(), RunError> {
        let (key, payload, headers, timestamp_ms) = match event {
            Some(e) => (
                e.key.clone(),
                e.payload.clone(),
                e.headers.clone(),
                e.timestamp_ms,
            ),
            None => (None, None, Vec::new(), None),
        };
        let dead = DeadLetter {
            seq,
            position,
            module_digest: self.module.digest().to_owned(),
            error_class: class.to_owned(),
            message,
            key,
            payload,
            headers,
            timestamp_ms,
            raw: raw.to_vec(),
        };
        self.db().insert_dead_letter(&dead)?;
        self.summary.dead_lettered += 1;
        if self.config.dead_letter_outputs {
            self.db().queue_outbox(&dead_letter_output(&dead))?;
        }
        Ok(())
    }

    /// Stops the run where it stands (asked to by the progress), committed.
    fn stop(&mut self, batch: Option<Batch>) -> Result<(), RunError> {
        if let Some(open) = batch {
            self.commit_batch(open)?;
        }
        self.summary.interrupted = true;
        Ok(())
    }

    /// Commits a batch that ended mid-epoch because its source went idle.
    /// What comes next starts a fresh instance, in the live run and in every
    /// replay of its tape, which records the break as a run frame.
    fn commit_idle(&mut self, batch: Batch) -> Result<(), RunError> {
        self.break_pending = true;
        self.commit_batch(batch)?;
        self.progress.advance(0, self.summary.consumed);
        Ok(())
    }

    /// Commits the batch with its offsets, then relays the outbox.
    fn commit_batch(&mut self, batch: Batch) -> Result<(), RunError> {
        // The tape's frames reach the file before the batch commits, and the
        // commit records how far they go.
        let tape = self.tape.as_mut().map(TapeWriter::flush).transpose()?;
        let db = self.db();
        if let Some(mark) = tape {
            db.set_tape_mark(&mark)?;
        }
        db.save_offsets(&self.offsets)?;
        db.set_meta("next_seq", &self.next_seq.to_string())?;
        db.commit()?;
        self.progress.batch_committed(&self.offsets);
        if let Some(observed) = self.observed.as_mut() {
            // The next batch is about as long: growing its list from empty
            // would copy it a dozen times.
            let next = Vec::with_capacity(observed.len());
            self.progress.committed(std::mem::replace(observed, next));
        }
        self.careful = batch.failed;
        let mut records = batch.records;
        records.clear();
        self.spare_records = records;
        self.show_logs();
        self.deliver(false)
    }

    /// Sends the outbox rows not sent yet to the sink, and removes those
    /// the sink says are durable (with its mark, in one transaction).
    /// `wait`: until every row is durable (the end of a run).
    pub(super) fn deliver(&mut self, wait: bool) -> Result<(), RunError> {
        let Some(sink) = self.sink.as_mut() else {
            return Ok(());
        };
        let db = self
            .db
            .as_ref()
            .expect("the state DB is lent out only during a call");
        loop {
            let rows = db.pending_outbox(self.sent_through, 10_000)?;
            let Some(last) = rows.last().map(|r| (r.seq, r.n)) else {
                break;
            };
            sink.send(rows)?;
            self.sent_through = Some(last);
        }
        if let Some((through, mark)) = sink.durable(wait)? {
            db.ack_outbox(through, mark.as_ref())?;
        }
        Ok(())
    }
}

/// A dead letter as an outbox row for the dead-letter topic: the raw key and
/// payload unchanged, and what failed in headers named after Kafka
/// Connect's `__connect.errors.*`.
fn dead_letter_output(dead: &DeadLetter) -> OutboxRow {
    let header = |name: &str, value: String| Header {
        name: name.to_owned(),
        value: Some(value.into_bytes()),
    };
    let mut headers = dead.headers.clone();
    headers.extend([
        header("rewind.error.class", dead.error_class.clone()),
        header("rewind.error.message", dead.message.clone()),
        header("rewind.source.topic", dead.position.stream.clone()),
        header(
            "rewind.source.partition",
            dead.position.partition.to_string(),
        ),
        header("rewind.source.offset", dead.position.offset.to_string()),
        header("rewind.module", dead.module_digest.clone()),
    ]);
    // A record that could not be decoded keeps its bytes as the payload.
    let payload = match (&dead.payload, dead.key.is_none() && dead.headers.is_empty()) {
        (None, true) if !dead.raw.is_empty() => Some(dead.raw.clone()),
        (payload, _) => payload.clone(),
    };
    OutboxRow {
        seq: dead.seq,
        n: 0,
        id: format!("{}/dlq", dead.position),
        output: Output {
            stream: DLQ_STREAM.to_owned(),
            key: dead.key.clone(),
            payload,
            headers,
        },
        timestamp_ms: dead.timestamp_ms,
    }
}

fn dead(class: &str, message: &str) -> Outcome {
    Outcome::DeadLetter {
        class: class.to_owned(),
        message: message.to_owned(),
    }
}
