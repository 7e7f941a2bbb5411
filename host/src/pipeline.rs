//! The live run: source → processor → state, batched, then sink.
//!
//! Each event runs in its own savepoint inside a batch transaction. A batch
//! commits its state writes, input offsets, outbox rows and dead letters
//! together, so a crash at any point loses nothing and applies nothing twice:
//! on restart the run resumes after the committed offsets, and the sink
//! delivers whatever is still in the outbox.

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
/// timing. It is part of the host configuration results depend on.
pub const INSTANCE_EPOCH: u64 = 64;
use crate::event::Output;
use crate::sink::{FileSink, SinkError};
use crate::source::{InputError, Record, Source};
use crate::state::{Change, DeadLetter, EventChanges, Offsets, OutboxRow, StateDb, StateError};
use crate::tape::{EventResult, Outcome, RunInfo, TapeError, TapeEvent, TapeMark, TapeWriter};

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

/// What one consumed record came to, for observers.
#[derive(Debug, Clone)]
pub struct EventRecord {
    /// The record with its seq and result (outcome, counts, digests).
    pub event: TapeEvent,
    /// The row changes, in order, when kept.
    pub changes: Vec<Change>,
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
    /// Stream name for bare lines (default: the input file's stem).
    pub stream: Option<String>,
    pub batch_size: usize,
    pub batch_time: Duration,
    pub on_error: ErrorPolicy,
    pub runtime: RuntimeConfig,
    /// Accept a state DB last written by another module version.
    pub allow_module_change: bool,
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
            stream: None,
            batch_size: 1000,
            batch_time: Duration::from_millis(500),
            on_error: ErrorPolicy::Dlq,
            runtime: RuntimeConfig::default(),
            allow_module_change: false,
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
    /// ([`Progress::committed`]): `Some(true)` with every row change in
    /// full, `Some(false)` with digests only.
    fn observe(&self) -> Option<bool> {
        None
    }
    /// The results of a committed batch, in seq order (only if observed).
    fn committed(&self, _events: Vec<EventRecord>) {}
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
    #[error("state DB {state} failed while processing {position}: {source}")]
    Host {
        state: PathBuf,
        position: Position,
        #[source]
        source: Box<rusqlite::Error>,
    },
}

/// Runs a processor over a file into a state DB (and optionally an output file).
pub fn run(config: &RunConfig, progress: &dyn Progress) -> Result<RunSummary, RunError> {
    let started = Instant::now();
    let runtime = Runtime::new(config.runtime.clone())?;
    let module = runtime.load(&config.processor)?;
    let mut source = crate::source::open(&config.input, config.stream.as_deref())?;

    let state_existed = config.state.exists();
    let db = StateDb::open(&config.state)?;
    let mut db = match prepare(&runtime, &module, db, config) {
        Ok(db) => db,
        Err(error) => {
            if !state_existed {
                remove_db_files(&config.state);
            }
            return Err(error);
        }
    };
    db.checkpoint_in_background()?;
    if let Some(mib) = config.cache_mib {
        db.set_cache_mib(mib)?;
    }
    let observe = progress.observe();
    if let Some(keep) = observe {
        db.capture_changes(keep);
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
            let mark = match (db.meta("tape.id")?, db.meta_u64("tape.bytes")?) {
                (Some(id), bytes) => Some(TapeMark { id, bytes }),
                (None, _) => None,
            };
            let mut tape = TapeWriter::open(path, mark.as_ref())?;
            if observe.is_none() {
                db.capture_changes(false);
            }
            tape.run(&RunInfo {
                first_seq: db.meta_u64("next_seq")?,
                module_digest: module.digest().to_owned(),
                fuel: config.runtime.fuel,
                memory_bytes: config.runtime.memory_bytes as u64,
            });
            Some(tape)
        }
    };

    let mut run = Run {
        instance: runtime.instance(&module),
        module: &module,
        config,
        progress,
        offsets: db.offsets()?,
        next_seq: db.meta_u64("next_seq")?,
        sink: None,
        tape,
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
            elapsed: Duration::ZERO,
            interrupted: false,
        },
        db: Some(db),
        careful: false,
        logs: Vec::new(),
    };
    if let Some(path) = &config.output {
        let claimed = run.db().meta("sink.claimed")?.is_some();
        let sink = FileSink::open(path, &run.db().sink_mark()?, claimed)?;
        if !claimed {
            // Recorded before the first write, so after a crash the bytes in
            // the file are known to be ours to cut back to the recorded mark.
            run.db().set_meta("sink.claimed", "1")?;
        }
        run.sink = Some(sink);
        run.deliver()?;
    }

    progress.start(source.size());
    let result = run.consume(source.as_mut());
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
    let (db, outcome) = runtime.instance(module).init(db);
    let failure = match outcome {
        Err(HostFault(source)) => Some(RunError::Host {
            state: config.state.clone(),
            position: Position::init(),
            source: Box::new(source),
        }),
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
    Ok(db)
}

fn remove_db_files(path: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let mut file = path.as_os_str().to_owned();
        file.push(suffix);
        let _ = std::fs::remove_file(file);
    }
}

struct Run<'a> {
    instance: Instance<'a>,
    module: &'a Module,
    config: &'a RunConfig,
    progress: &'a dyn Progress,
    offsets: Offsets,
    next_seq: u64,
    sink: Option<FileSink>,
    tape: Option<TapeWriter>,
    /// The open batch's results, when the progress observes them.
    observed: Option<Vec<EventRecord>>,
    summary: RunSummary,
    /// Moved into the guest's store during a call, hence the `Option`.
    db: Option<StateDb>,
    /// Whether events run in their own savepoints (see [`Batch`]).
    careful: bool,
    /// Guest log lines of the open batch, shown once the batch is done: a
    /// batch that is redone logs its events again.
    logs: Vec<(Position, String)>,
}

/// The open batch transaction.
///
/// A savepoint per event costs a copy of every page the event touches, so
/// events run without one until an event fails: then the batch is rolled
/// back and redone from its first record with a savepoint around each event
/// ("careful"), and the failing event alone is undone. Guests are
/// deterministic and every batch starts at an instance epoch, so the redo
/// reaches the same state; only the time differs. A batch in which an event
/// failed makes the next one careful too, so a stream full of bad events
/// pays for one redo, not one per batch.
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

/// Records a batch keeps for a redo at most; past this it turns careful.
const MAX_RETAINED_BYTES: usize = 64 << 20;

/// How an event went.
enum Processed {
    Done,
    /// It failed outside a savepoint: the batch must be redone carefully.
    Redo,
}

impl Run<'_> {
    fn db(&self) -> &StateDb {
        self.db
            .as_ref()
            .expect("the state DB is only lent out during a guest call")
    }

    fn consume(&mut self, source: &mut dyn Source) -> Result<(), RunError> {
        let mut batch: Option<Batch> = None;
        // Records to feed again, ahead of the source, after a redo.
        let mut redo = VecDeque::new();
        loop {
            let record = match redo.pop_front() {
                Some(record) => record,
                None => match source.next_record()? {
                    Some(record) => record,
                    None => break,
                },
            };
            let key = (record.position.stream.clone(), record.position.partition);
            let next = self.offsets.get(&key).copied();
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
                if let Some(open) = batch.take() {
                    self.commit_batch(open)?;
                }
                self.summary.interrupted = true;
                return Ok(());
            }
            let open = match batch.as_mut() {
                Some(open) => {
                    if boundary {
                        self.instance.recycle();
                    }
                    open
                }
                None => {
                    self.db().begin()?;
                    if let Some(tape) = self.tape.as_mut() {
                        tape.begin_batch();
                    }
                    // A fresh instance for every epoch, and for the first
                    // event of a run (which, but for an input's end, is an
                    // epoch start).
                    self.instance.recycle();
                    batch.insert(Batch {
                        records: Vec::new(),
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
            self.offsets
                .insert(key, next.unwrap_or(i64::MIN).max(offset.saturating_add(1)));
            let open = batch.as_mut().expect("the batch is open");
            open.events += 1;
            self.retain(open, record);
            // Batches end only at epoch boundaries, so a crash always resumes
            // where every run starts a fresh instance.
            let full = open.events >= self.config.batch_size
                || open.started.elapsed() >= self.config.batch_time;
            if full && self.next_seq.is_multiple_of(INSTANCE_EPOCH) {
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
                    &record.raw,
                )?;
                self.record_on_tape(seq, record, dead("malformed", reason), None);
                return Ok(Processed::Done);
            }
        };

        if let Some(id) = self.event_id(event) {
            if self.db().seen_event_id(id)? {
                // Re-produced data: consumed, counted, not applied again.
                self.summary.duplicates += 1;
                self.record_on_tape(seq, record, Outcome::Duplicate, None);
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
        let (db, outcome) = self.instance.handle(db, event);
        self.db = Some(db);
        let outcome = match outcome {
            Ok(outcome) => outcome,
            Err(HostFault(source)) => {
                return Err(RunError::Host {
                    state: self.config.state.clone(),
                    position: event.position.clone(),
                    source: Box::new(source),
                });
            }
        };
        self.logs.extend(
            outcome
                .logs
                .into_iter()
                .map(|line| (event.position.clone(), line)),
        );
        match outcome.result {
            Ok(outputs) => {
                if self.tape.is_some() || self.observed.is_some() {
                    let changes = self.db().take_changes();
                    self.record_on_tape(seq, record, Outcome::Applied, Some((changes, &outputs)));
                }
                for (n, output) in outputs.into_iter().enumerate() {
                    let row = OutboxRow {
                        seq,
                        n: n as u32,
                        id: format!("{}/{n}", event.position),
                        output,
                        timestamp_ms: event.timestamp_ms,
                    };
                    self.db().insert_outbox(&row)?;
                    self.summary.outputs += 1;
                }
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
                if !careful {
                    return Ok(Processed::Redo);
                }
                *failed = true;
                self.db().rollback_event()?;
                self.db().reset_changes();
                let outcome = dead(rejection.class, &rejection.message);
                self.record_on_tape(seq, record, outcome, None);
                let position = event.position.clone();
                self.dead_letter(
                    seq,
                    position,
                    rejection.class,
                    rejection.message,
                    Some(event),
                    &record.raw,
                )?;
            }
        }
        Ok(Processed::Done)
    }

    /// Queues `record` (consumed as `seq`) and its result on the tape, and
    /// for the observer, if the run has them. `applied` has the changes the
    /// event made and its outputs; without it the event changed nothing.
    fn record_on_tape(
        &mut self,
        seq: u64,
        record: &Record,
        outcome: Outcome,
        applied: Option<(Option<EventChanges>, &[Output])>,
    ) {
        if self.tape.is_none() && self.observed.is_none() {
            return;
        }
        let (changes, outputs) = applied.unwrap_or((None, &[]));
        let changes = changes.unwrap_or_else(|| EventChanges {
            rows: 0,
            digest: crate::state::empty_changes_digest(),
            changes: Vec::new(),
        });
        let mut event = TapeEvent::from_record(seq, record);
        event.result = Some(EventResult {
            outcome,
            rows: changes.rows,
            outputs: outputs.len() as u32,
            rows_digest: changes.digest,
            outputs_digest: crate::tape::outputs_digest(outputs),
        });
        if let Some(tape) = self.tape.as_mut() {
            tape.event(&event);
        }
        if let Some(observed) = self.observed.as_mut() {
            observed.push(EventRecord {
                event,
                changes: changes.changes,
                outputs: outputs.to_vec(),
            });
        }
    }

    /// Keeps `record` for a redo of `batch`, unless the batch is careful; a
    /// batch holding too much turns careful instead.
    fn retain(&mut self, batch: &mut Batch, record: Record) {
        if self.careful {
            return;
        }
        batch.retained_bytes += record.raw.len();
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
        Ok(())
    }

    /// Commits the batch with its offsets, then relays the outbox.
    fn commit_batch(&mut self, batch: Batch) -> Result<(), RunError> {
        // The tape's frames reach the file before the batch commits, and the
        // commit records how far they go.
        let tape = self.tape.as_mut().map(TapeWriter::flush).transpose()?;
        let db = self.db();
        if let Some(mark) = tape {
            db.set_meta("tape.id", &mark.id)?;
            db.set_meta("tape.bytes", &mark.bytes.to_string())?;
        }
        db.save_offsets(&self.offsets)?;
        db.set_meta("next_seq", &self.next_seq.to_string())?;
        db.commit()?;
        if let Some(observed) = self.observed.as_mut() {
            self.progress.committed(std::mem::take(observed));
        }
        self.careful = batch.failed;
        self.show_logs();
        self.deliver()
    }

    /// Writes pending outbox rows to the sink and removes them, committed
    /// with the sink's new mark.
    fn deliver(&mut self) -> Result<(), RunError> {
        let Some(sink) = self.sink.as_mut() else {
            return Ok(());
        };
        let db = self
            .db
            .as_ref()
            .expect("the state DB is lent out only during a call");
        loop {
            let rows = db.pending_outbox(10_000)?;
            let Some(last) = rows.last() else {
                return Ok(());
            };
            let mark = sink.write(&rows)?;
            db.ack_outbox((last.seq, last.n), &mark)?;
        }
    }
}

fn dead(class: &str, message: &str) -> Outcome {
    Outcome::DeadLetter {
        class: class.to_owned(),
        message: message.to_owned(),
    }
}
