//! Kafka: a consumer group whose input partitions each get their own run,
//! state DB and (optionally) tape, with outputs and dead letters produced
//! from the outbox.
//!
//! One thread polls the consumer and routes every record to the worker of
//! its partition number; a worker is an ordinary pipeline run
//! (`pipeline::run_source`) over `STATE_DIR/partition-N.db`, fed
//! through a bounded channel. Input topics must be co-partitioned (as in
//! Kafka Streams): partition N of every topic lands in the same state DB.
//!
//! The state DB is the source of truth for offsets. When partitions are
//! assigned, their DBs are opened (under an exclusive lock file, so two
//! processes sharing a state directory can never write one DB at once) and
//! the consumer is positioned at the offsets stored in them, or at the
//! beginning of the partition for a new DB. When partitions are revoked,
//! their workers drain, commit and close before the revocation completes,
//! so the next owner starts exactly after the last committed record. Offsets
//! are also committed to the group afterwards, for lag monitoring only.

mod partitions;
mod sink;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use crate::pipeline::{RunConfig, RunError, RunSummary};
use crate::runtime::{LoadError, LoadStats, Runtime};
pub use sink::KafkaSink;

use partitions::{Context, Shared};

/// Everything a Kafka run needs.
#[derive(Debug, Clone)]
pub struct KafkaConfig {
    pub brokers: String,
    /// Input topics, co-partitioned.
    pub topics: Vec<String>,
    pub group: String,
    /// One state DB per input partition number: `partition-N.db`.
    pub state_dir: PathBuf,
    /// One tape per input partition number: `partition-N.tape`.
    pub tape_dir: Option<PathBuf>,
    /// Every output goes to this topic; without it, to the topic named by
    /// the output's stream.
    pub output_topic: Option<String>,
    /// Dead letters are also produced here, with `rewind.*` headers.
    pub dlq_topic: Option<String>,
    /// librdkafka settings, as kcat's `-X key=value`; they override ours.
    pub settings: Vec<(String, String)>,
    /// Stop once every assigned partition has been consumed to its end.
    pub exit_at_end: bool,
    /// Say nothing but warnings and errors (no assignments, no closes).
    pub quiet: bool,
    /// The template of every partition's run: processor, batching, runtime,
    /// error policy, dedup. Its `input`, `state`, `tape` and `output` are
    /// set per partition.
    pub run: RunConfig,
}

/// The state DB of input partition `partition` in `dir`.
pub fn state_path(dir: &Path, partition: i32) -> PathBuf {
    dir.join(format!("partition-{partition}.db"))
}

/// The tape of input partition `partition` in `dir`.
pub fn tape_path(dir: &Path, partition: i32) -> PathBuf {
    dir.join(format!("partition-{partition}.tape"))
}

/// The state DBs of a state directory, by partition number.
pub fn state_dbs(dir: &Path) -> std::io::Result<BTreeMap<i32, PathBuf>> {
    numbered(dir, ".db")
}

/// The tapes of a tape directory, by partition number.
pub fn tapes(dir: &Path) -> std::io::Result<BTreeMap<i32, PathBuf>> {
    numbered(dir, ".tape")
}

fn numbered(dir: &Path, suffix: &str) -> std::io::Result<BTreeMap<i32, PathBuf>> {
    let mut found = BTreeMap::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(n) = name
            .to_str()
            .and_then(|n| n.strip_prefix("partition-"))
            .and_then(|n| n.strip_suffix(suffix))
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        found.insert(n, entry.path());
    }
    Ok(found)
}

/// What a Kafka run did.
#[derive(Debug, Clone)]
pub struct KafkaSummary {
    pub module_digest: String,
    pub load: LoadStats,
    /// Every partition run that ended (a partition assigned twice, after a
    /// rebalance, appears twice), in the order they ended.
    pub runs: Vec<(i32, RunSummary)>,
    pub elapsed: Duration,
    /// Stopped by the caller (Ctrl-C), not by reaching the end.
    pub interrupted: bool,
}

impl KafkaSummary {
    /// Records consumed by all partition runs.
    pub fn consumed(&self) -> u64 {
        self.runs.iter().map(|(_, s)| s.consumed).sum()
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KafkaRunError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("kafka ({brokers}): {message}")]
    Kafka { brokers: String, message: String },
    #[error("partition {partition} ({state}): {source}")]
    Partition {
        partition: i32,
        state: PathBuf,
        #[source]
        source: Box<RunError>,
    },
    #[error("state directory {dir}: {source}")]
    Dir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("partition {partition}: {message}")]
    Worker { partition: i32, message: String },
}

/// How often offsets are committed to the group (for lag monitoring).
const GROUP_COMMIT_EVERY: Duration = Duration::from_secs(1);

/// Consumes `config.topics` until `stop` is set (or, with `exit_at_end`,
/// until every assigned partition is consumed to its end).
pub fn run(config: &KafkaConfig, stop: &AtomicBool) -> Result<KafkaSummary, KafkaRunError> {
    let started = Instant::now();
    let runtime = Runtime::new(config.run.runtime.clone())?;
    let module = runtime.load(&config.run.processor)?;
    let dir_err = |dir: &Path| {
        let dir = dir.to_owned();
        move |source| KafkaRunError::Dir { dir, source }
    };
    std::fs::create_dir_all(&config.state_dir).map_err(dir_err(&config.state_dir))?;
    if let Some(dir) = &config.tape_dir {
        std::fs::create_dir_all(dir).map_err(dir_err(dir))?;
    }
    let kafka = |e: rdkafka::error::KafkaError| KafkaRunError::Kafka {
        brokers: config.brokers.clone(),
        message: e.to_string(),
    };
    let (digest, load) = (module.digest().to_owned(), module.stats());
    let shared = Arc::new(Shared::new(config.clone(), runtime, module));
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &config.brokers)
        .set("group.id", &config.group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // Partitions without state start at their beginning (see assign).
        .set("auto.offset.reset", "earliest");
    for (key, value) in &config.settings {
        client.set(key, value);
    }
    let consumer: BaseConsumer<Context> = client
        .create_with_context(Context::new(Arc::clone(&shared)))
        .map_err(kafka)?;
    let topics: Vec<&str> = config.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics).map_err(kafka)?;

    let mut last_group_commit = Instant::now();
    let mut last_error: Option<(String, Instant)> = None;
    let interrupted = loop {
        if stop.load(Ordering::Relaxed) {
            break true;
        }
        if let Some(error) = shared.take_failure() {
            shared.close_all();
            return Err(error);
        }
        // Records are handed to the workers in chunks; when the consumer
        // has nothing more at once, the partial chunks go too.
        let polled = match consumer.poll(Duration::ZERO) {
            None => {
                shared.flush();
                consumer.poll(Duration::from_millis(100))
            }
            some => some,
        };
        match polled {
            Some(Ok(message)) => {
                let record = partitions::to_record(&message);
                shared.dispatch(record);
            }
            Some(Err(error)) => {
                // The client reconnects by itself (broker restarts, network
                // trouble); say so once in a while, not per poll.
                let text = error.to_string();
                let repeat = last_error.as_ref().is_some_and(|(last, at)| {
                    *last == text && at.elapsed() < Duration::from_secs(10)
                });
                if !repeat {
                    eprintln!("kafka ({}): {text}; retrying", config.brokers);
                    last_error = Some((text, Instant::now()));
                }
            }
            None => {
                if config.exit_at_end && caught_up(&consumer, &shared) {
                    break false;
                }
            }
        }
        if last_group_commit.elapsed() >= GROUP_COMMIT_EVERY {
            commit_to_group(&consumer, &shared);
            last_group_commit = Instant::now();
        }
    };
    shared.flush();
    shared.close_all();
    commit_to_group(&consumer, &shared);
    consumer.unsubscribe();
    if let Some(error) = shared.take_failure() {
        return Err(error);
    }
    Ok(KafkaSummary {
        module_digest: digest,
        load,
        runs: shared.take_finished(),
        elapsed: started.elapsed(),
        interrupted,
    })
}

/// Whether every assigned partition has been consumed to its high watermark.
fn caught_up(consumer: &BaseConsumer<Context>, shared: &Shared) -> bool {
    let Ok(assignment) = consumer.assignment() else {
        return false;
    };
    let elements = assignment.elements();
    !elements.is_empty()
        && elements.iter().all(|e| {
            let Some((low, high)) = cached_watermarks(consumer, e.topic(), e.partition()) else {
                return false;
            };
            let next = shared.position(e.topic(), e.partition()).unwrap_or(low);
            next.max(low) >= high
        })
}

/// The watermarks of a partition as the last fetch response gave them
/// (`None` before the first). Brokers do not all answer ListOffsets the
/// way Kafka does (tansu 0.6 does not), but fetch responses carry the
/// high watermark every consumer relies on.
fn cached_watermarks(
    consumer: &BaseConsumer<Context>,
    topic: &str,
    partition: i32,
) -> Option<(i64, i64)> {
    let topic = std::ffi::CString::new(topic).ok()?;
    let (mut low, mut high) = (-1i64, -1i64);
    // SAFETY: the client pointer is valid while `consumer` lives, `topic`
    // is NUL-terminated, and librdkafka only writes the two offsets.
    let err = unsafe {
        rdkafka::bindings::rd_kafka_get_watermark_offsets(
            consumer.client().native_ptr(),
            topic.as_ptr(),
            partition,
            &mut low,
            &mut high,
        )
    };
    (err == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0)
        .then_some((low.max(0), high))
}

/// Commits the offsets the partition runs have committed to the group, so
/// that lag shows in the usual tools. Best effort: the state is the truth.
fn commit_to_group(consumer: &BaseConsumer<Context>, shared: &Shared) {
    let committed = shared.take_committed();
    if committed.is_empty() {
        return;
    }
    let mut list = TopicPartitionList::new();
    for ((topic, partition), next) in committed {
        let _ = list.add_partition_offset(&topic, partition, Offset::Offset(next));
    }
    let _ = consumer.commit(&list, CommitMode::Async);
}

/// `rewind diff` of two state directories: every partition's DBs compared,
/// one combined result (the rows in `findings`). A partition only one side has is compared with an
/// empty DB.
pub fn diff_dirs(
    old: &Path,
    new: &Path,
    ignore: &[crate::diff::Ignore],
    findings: &crate::findings::Findings,
) -> Result<crate::diff::StateDiff, Box<dyn std::error::Error + Send + Sync>> {
    let (a, b) = (state_dbs(old)?, state_dbs(new)?);
    if a.is_empty() && b.is_empty() {
        return Err(format!(
            "neither {} nor {} holds partition-N.db state DBs",
            old.display(),
            new.display()
        )
        .into());
    }
    let empty_dir = tempfile::tempdir()?;
    let empty = empty_dir.path().join("empty.db");
    rusqlite::Connection::open(&empty)?;
    // Every rule is unmatched until a partition's states match it.
    let mut total = crate::diff::StateDiff {
        unmatched: ignore.to_vec(),
        ..Default::default()
    };
    let partitions: std::collections::BTreeSet<i32> = a.keys().chain(b.keys()).copied().collect();
    for p in partitions {
        let (x, y) = (a.get(&p).unwrap_or(&empty), b.get(&p).unwrap_or(&empty));
        total.merge(crate::diff::diff_states(x, y, ignore, findings)?);
    }
    Ok(total)
}
