//! The live run: source → processor → state, batched, then sink.
//!
//! Events run inside a batch transaction (each in a savepoint of its own once
//! one has failed: see `batch`). A batch commits its state writes, input
//! offsets, outputs (the outbox) and dead letters together, so a crash at
//! any point loses nothing and applies nothing twice:
//! on restart the run resumes after the committed offsets, and the sink
//! delivers whatever is still in the outbox.

mod batch;

use batch::Run;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::event::Position;
use crate::runtime::{
    HostFault, Instance, LoadError, LoadStats, Module, Rejection, Runtime, RuntimeConfig,
};

/// Events per instance epoch. An epoch starts at every multiple of this
/// many consumed records (by seq): the processor gets a fresh instance there,
/// and batches commit only there. What a guest keeps in memory between events
/// therefore depends on the input alone, never on batch sizes, restarts or
/// timing. It is part of the host configuration results depend on (for a
/// processor that keeps state in memory between events; one that keeps it
/// in its database, as it should, gets the same results with any epoch).
///
/// 256: a fresh payments instance costs ~95,000 instructions to make and
/// drop, and starts in memory cold in the cache. 256-event epochs ran a
/// payments run 6-7% faster than 64-event ones; 1024 was no faster than 256.
/// Batches commit only at epoch boundaries, so this is also the smallest
/// batch but for idle commits.
pub const INSTANCE_EPOCH: u64 = 256;
/// Events per batch unless configured. Every commit writes each page the
/// batch dirtied to the WAL once, so larger batches write less per event
/// (1M payments events: 10,000 per batch is 15% faster than 1,000); the time
/// bound keeps outputs of a slow stream from waiting.
pub const DEFAULT_BATCH_SIZE: usize = 10_000;
/// Milliseconds after which a batch commits even if it is not full.
pub const DEFAULT_BATCH_MS: u64 = 500;

/// The outbox stream of dead letters queued as outputs (see
/// [`RunConfig::dead_letter_outputs`]). Processors cannot emit to it: a
/// stream name is a Kafka topic name, which never starts with `!`.
pub const DLQ_STREAM: &str = "!dlq";
use crate::event::Output;
use crate::sink::{FileSink, Sink, SinkError};
use crate::source::{InputError, Record, Source};
use crate::state::{ChangeLog, DeadLetter, EventChanges, Offsets, OutboxRow, StateDb, StateError};
use crate::tape::{EventResult, Outcome, RunInfo, TapeError, TapeWriter};

/// What to do when a processor fails on an event (invalid input is always
/// dead-lettered).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ErrorPolicy {
    /// Dead-letter the event and go on.
    #[default]
    Dlq,
    /// Stop, keeping what the last batch commit kept; rerunning retries from there.
    Halt,
}

/// What one consumed record came to, for observers. The record's contents
/// are not copied here (a replay compares millions of these, and only
/// reports the contents of its first divergence, read back from its tape).
#[derive(Debug, Clone)]
pub struct EventRecord {
    pub seq: u64,
    pub position: Position,
    /// Its outcome, counts and (when computed) digests.
    pub result: EventResult,
    /// The row changes, in order, when kept.
    pub changes: ChangeLog,
    pub outputs: Vec<Output>,
}

/// Everything a run needs.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub processor: PathBuf,
    pub input: PathBuf,
    pub state: PathBuf,
    pub output: Option<PathBuf>,
    /// Record every consumed record, with its result, onto this tape.
    pub tape: Option<PathBuf>,
    /// Stop after the record with this seq.
    pub until_seq: Option<u64>,
    /// The state DB's page cache, in MiB (default 64).
    pub cache_mib: Option<u32>,
    /// The state DB is scratch, made afresh for this run and not continued
    /// after a crash (a replay's side): see [`StateDb::make_scratch`].
    pub scratch: bool,
    /// Stream name for bare lines (default: the input file's stem).
    pub stream: Option<String>,
    pub batch_size: usize,
    pub batch_time: Duration,
    pub on_error: ErrorPolicy,
    pub runtime: RuntimeConfig,
    /// Accept a state DB last written by another module version.
    pub allow_module_change: bool,
    /// Also queue every dead letter in the outbox, as an output on
    /// [`DLQ_STREAM`] carrying the raw key and payload and `rewind.*`
    /// headers saying what failed and where (the Kafka runner's
    /// `--dlq-topic`).
    pub dead_letter_outputs: bool,
    /// Queue outputs in the outbox for delivery (the default). Off, outputs
    /// are only counted and shown to the [`Progress`] observer: a replay's
    /// state DBs are scratch copies whose outputs go nowhere.
    pub queue_outputs: bool,
    /// Skip an event whose value of this header was seen before (re-produced
    /// data); `None` turns deduplication off. Defaults to `rewind-id`, the
    /// idempotency id rewind puts on its own outputs.
    pub dedup_header: Option<String>,
}

impl RunConfig {
    pub fn new(processor: &Path, input: &Path, state: &Path) -> Self {
        RunConfig {
            processor: processor.to_owned(),
            input: input.to_owned(),
            state: state.to_owned(),
            output: None,
            tape: None,
            until_seq: None,
            cache_mib: None,
            scratch: false,
            stream: None,
            batch_size: DEFAULT_BATCH_SIZE,
            batch_time: Duration::from_millis(DEFAULT_BATCH_MS),
            on_error: ErrorPolicy::Dlq,
            runtime: RuntimeConfig::default(),
            allow_module_change: false,
            dead_letter_outputs: false,
            queue_outputs: true,
            dedup_header: Some(crate::sink::ID_HEADER.to_owned()),
        }
    }
}

/// Receives progress; the CLI draws a bar, tests ignore it.
pub trait Progress {
    fn start(&self, _total_bytes: Option<u64>) {}
    fn advance(&self, _bytes: u64, _events: u64) {}
    fn guest_log(&self, _position: &Position, _line: &str) {}
    fn finish(&self) {}
    /// Whether this progress wants every event's result at commit
    /// ([`Progress::committed`]): `Some(true)` with every row change and
    /// output in full (and the results' digests zero, unless the run also
    /// records a tape), `Some(false)` with digests only.
    fn observe(&self) -> Option<bool> {
        None
    }
    /// The results of a committed batch, in seq order (only if observed).
    fn committed(&self, _events: Vec<EventRecord>) {}
    /// A batch committed; `offsets` are the next offsets to consume.
    fn batch_committed(&self, _offsets: &Offsets) {}
    /// Asked at every instance-epoch boundary: `true` commits and stops the
    /// run there (a rerun continues from it).
    fn should_stop(&self) -> bool {
        false
    }
}

impl Progress for () {}

/// What a run did.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub module_digest: String,
    pub load: LoadStats,
    /// Records consumed by this run (not counting those already consumed earlier).
    pub consumed: u64,
    pub applied: u64,
    pub dead_lettered: u64,
    /// Records skipped because an earlier run already consumed them.
    pub skipped: u64,
    /// Events skipped because their event id (the dedup header) was seen before.
    pub duplicates: u64,
    pub outputs: u64,
    /// Batches rolled back and run again with a savepoint per event because
    /// an event failed after it may have written (see `pipeline/batch.rs`).
    pub redone_batches: u64,
    pub elapsed: Duration,
    /// The run stopped early because [`Progress::should_stop`] asked it to.
    pub interrupted: bool,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Input(#[from] InputError),
    #[error(transparent)]
    Tape(#[from] TapeError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error("processor {path}: init failed ({class}): {message}; nothing was written", class = rejection.class, message = rejection.message)]
    Init { path: PathBuf, rejection: Rejection },
    #[error(
        "state DB {state} was written by module {recorded}, not {module}; \
         use a new --state, or pass --allow-module-change to continue it with this version"
    )]
    ModuleChanged {
        state: PathBuf,
        recorded: String,
        module: String,
    },
    #[error(
        "halted at {position} ({class}): {message}; everything up to the last committed \
         batch is kept; fix the processor and rerun, or use --on-error dlq",
        class = rejection.class, message = rejection.message
    )]
    Halted {
        position: Position,
        rejection: Rejection,
    },
    #[error("while processing {position}: {source}")]
    Host {
        position: Position,
        #[source]
        source: Box<StateError>,
    },
    #[error(
        "could not run {position}: {message}; nothing of the batch in progress was \
         committed, rerun to continue"
    )]
    Instances { position: Position, message: String },
    #[error(
        "processor SQL stopped at {position}, nothing of the batch in progress committed: \
         {message}"
    )]
    SqlStopped { position: Position, message: String },
}

impl RunError {
    /// The run's error for a host fault while processing `position`.
    pub(crate) fn host(state: &Path, position: &Position, fault: HostFault) -> RunError {
        match fault {
            HostFault::State(source) => RunError::Host {
                position: position.clone(),
                source: Box::new(StateError::from_sqlite(state, source)),
            },
            fault @ HostFault::Instances { .. } => RunError::Instances {
                position: position.clone(),
                message: fault.to_string(),
            },
            fault @ (HostFault::SqlStalled { .. } | HostFault::SqlMemory { .. }) => {
                RunError::SqlStopped {
                    position: position.clone(),
                    message: fault.to_string(),
                }
            }
        }
    }
}

/// Runs a processor over a file into a state DB (and optionally an output file).
pub fn run(config: &RunConfig, progress: &dyn Progress) -> Result<RunSummary, RunError> {
    let runtime = Runtime::new(config.runtime.clone())?;
    let module = runtime.load(&config.processor)?;
    run_loaded(config, &runtime, &module, progress)
}

/// [`run`] with the processor already loaded (`config.processor` is not
/// read): runs sharing a runtime compile each module once.
pub fn run_loaded(
    config: &RunConfig,
    runtime: &Runtime,
    module: &Module,
    progress: &dyn Progress,
) -> Result<RunSummary, RunError> {
    let mut source = crate::source::open(&config.input, config.stream.as_deref())?;
    run_source(config, runtime, module, source.as_mut(), None, progress)
}

/// Runs a loaded processor over `source` into `config.state`. Outputs go to
/// `config.output` when set, else to `sink` when given, else they wait in
/// the outbox. The Kafka runner calls this once per partition.
pub fn run_source(
    config: &RunConfig,
    runtime: &Runtime,
    module: &Module,
    source: &mut dyn Source,
    sink: Option<Box<dyn Sink>>,
    progress: &dyn Progress,
) -> Result<RunSummary, RunError> {
    let started = Instant::now();
    let state_existed = config.state.exists();
    let new_file = |path: &Option<PathBuf>| path.as_ref().filter(|p| !p.exists()).cloned();
    let made = [new_file(&config.tape), new_file(&config.output)];
    let mut db = StateDb::open(&config.state)?;
    if config.scratch {
        db.make_scratch()?;
    }
    if let Some(limit) = config.runtime.sql_stall {
        db.watch_stalls(limit)?;
    }
    // Until the first event, a state DB this run made is removed on any
    // error (a failing `init`, a tape or output that cannot be opened), and
    // with it the tape and output files it made (the state records its
    // claim on them): a rerun with the right arguments then starts as this
    // one did, with any module.
    let start = move || -> Result<Run<'_>, RunError> {
        let mut db = prepare(runtime, module, db, config)?;
        if !config.scratch {
            db.checkpoint_in_background()?;
        }
        if let Some(mib) = config.cache_mib {
            db.set_cache_mib(mib)?;
        }
        let observe = progress.observe();
        // Digests go onto a tape and to `verify`; a replay compares the changes
        // and outputs themselves, which is cheaper than hashing them.
        let digests = config.tape.is_some() || observe == Some(false);
        if let Some(keep) = observe {
            db.capture_changes(keep, digests);
        }
        let tape = match &config.tape {
            None => None,
            Some(path) => {
                if std::fs::canonicalize(path).ok() == std::fs::canonicalize(&config.input).ok()
                    && path.exists()
                {
                    return Err(TapeError::Mismatch {
                        path: path.clone(),
                        message: "it is also the --input; record onto another tape".into(),
                    }
                    .into());
                }
                let mark = db.tape_mark()?;
                let mut tape = TapeWriter::open(path, mark.as_ref())?;
                if mark.is_none() {
                    // Claim the tape before any frame reaches it: a crash after a
                    // frame but before the first commit then finds the mark and
                    // cuts the frame, instead of finding a tape it cannot place.
                    db.begin()?;
                    db.set_tape_mark(&tape.mark())?;
                    db.commit()?;
                }
                if observe.is_none() {
                    db.capture_changes(false, digests);
                }
                let info = RunInfo {
                    first_seq: db.meta_u64("next_seq")?,
                    module_digest: module.digest().to_owned(),
                    fuel: config.runtime.fuel,
                    memory_bytes: config.runtime.memory_bytes as u64,
                    dedup_header: config.dedup_header.clone(),
                };
                tape.run(&info);
                Some((tape, info))
            }
        };

        let (tape, run_info) = tape.unzip();
        let mut run = Run {
            instance: runtime.instance(module),
            module,
            config,
            progress,
            offsets: db.offsets()?,
            next_seq: db.meta_u64("next_seq")?,
            sink: None,
            tape,
            run_info,
            break_pending: false,
            sent_through: None,
            observed: observe.map(|_| Vec::new()),
            summary: RunSummary {
                module_digest: module.digest().to_owned(),
                load: module.stats(),
                consumed: 0,
                applied: 0,
                dead_lettered: 0,
                skipped: 0,
                duplicates: 0,
                outputs: 0,
                redone_batches: 0,
                elapsed: Duration::ZERO,
                interrupted: false,
            },
            db: Some(Box::new(db)),
            careful: false,
            logs: Vec::new(),
            spare_records: Vec::new(),
            key: (String::new(), 0),
            digests,
        };
        if let Some(path) = &config.output {
            let claimed = run.db().meta("sink.claimed")?.is_some();
            let sink = FileSink::open(path, &run.db().sink_mark()?, claimed)?;
            if !claimed {
                // Recorded before the first write, so after a crash the bytes in
                // the file are known to be ours to cut back to the recorded mark.
                run.db().set_meta("sink.claimed", "1")?;
            }
            run.sink = Some(Box::new(sink));
        } else {
            run.sink = sink;
        }
        run.deliver(true)?;
        Ok(run)
    };
    let mut run = match start() {
        Ok(run) => run,
        Err(error) => {
            if !state_existed {
                crate::state::remove_db_files(&config.state);
                for path in made.iter().flatten() {
                    let _ = std::fs::remove_file(path);
                }
            }
            return Err(error);
        }
    };

    progress.start(source.size());
    let result = run.consume(source).and_then(|()| run.deliver(true));
    progress.finish();
    result?;
    run.summary.elapsed = started.elapsed();
    Ok(run.summary)
}

/// Checks the module against the state and runs `init` in a transaction.
fn prepare(
    runtime: &Runtime,
    module: &Module,
    db: StateDb,
    config: &RunConfig,
) -> Result<StateDb, RunError> {
    if let Some(recorded) = db.meta("module_digest")?
        && recorded != module.digest()
        && !config.allow_module_change
    {
        return Err(RunError::ModuleChanged {
            state: config.state.clone(),
            recorded,
            module: module.digest().to_owned(),
        });
    }
    db.begin()?;
    let (db, outcome) = runtime.instance(module).init(Box::new(db));
    let failure = match outcome {
        Err(fault) => Some(RunError::host(&config.state, &Position::init(), fault)),
        Ok(outcome) => outcome.result.err().map(|rejection| RunError::Init {
            path: config.processor.clone(),
            rejection,
        }),
    };
    if let Some(error) = failure {
        db.rollback()?;
        return Err(error);
    }
    db.set_meta("module_digest", module.digest())?;
    db.commit()?;
    Ok(*db)
}
