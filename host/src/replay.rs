//! Side-by-side replay: an old and a new module version process the same
//! tape on copies of the same starting state, and every event's effects are
//! compared as they happen.
//!
//! Each side is an ordinary run (`pipeline::run_source`) over the tape, in a thread
//! of its own (both share one runtime, the modules compiled up front, and one
//! read of the tape, decoded and seeded once: `source::open_shared`),
//! observing every event's result (outcome, row changes, outputs) at each
//! commit. The comparer pairs the results by seq: an event
//! diverges when its outcome or its outputs differ, or when it makes a new
//! difference in a row (one version writes it and the other not, or a
//! column equal before the event differs after it); such a row records the
//! event as a cause. An event that only carries an earlier difference along
//! (both versions add to a counter that already differs) is not a
//! divergence. At the end the two states are compared table by table
//! ([`crate::diff`]), and every differing row gets the events that caused it.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::time::Duration;

use rusqlite::types::Value;

use crate::diff::{Ignore, StateDiff, TableShape, diff_states};
use crate::event::{Output, Position};
use crate::findings::{Findings, FindingsError, Version};
use crate::pipeline::{EventRecord, Progress, RunConfig, RunError, RunSummary, run_source};
use crate::runtime::{Runtime, RuntimeConfig};
use crate::state::{Change, StateError};
use crate::tape::{Outcome, TapeEvent};

/// Events per batch on each side. A side holds a batch's results (row
/// changes included, compactly: [`crate::state::ChangeLog`]) until it
/// commits, and one more batch waits for the comparer: 4096 keeps a
/// payments replay near 72 MiB whatever the tape's length, and is ~10%
/// faster than 2048 (fewer hand-overs between the sides and the comparer).
const REPLAY_BATCH: usize = 4096;

/// Everything a replay needs.
#[derive(Debug, Clone)]
pub struct ReplayConfig {
    pub tape: PathBuf,
    pub old: PathBuf,
    pub new: PathBuf,
    /// Start both sides from a copy of this state DB instead of empty.
    pub from: Option<PathBuf>,
    /// Stop after this seq.
    pub until: Option<u64>,
    pub ignore: Vec<Ignore>,
    pub runtime: RuntimeConfig,
    /// Skip events whose value of this header was seen before (as `run`
    /// does; the tape's runs record theirs); `None`: apply every event.
    pub dedup_header: Option<String>,
    /// Where the two sides' state DBs are built (`old.db`, `new.db`).
    pub work_dir: PathBuf,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplayError {
    #[error("{side} version: {source}")]
    Side {
        side: &'static str,
        #[source]
        source: Box<RunError>,
    },
    /// A side's state DB could not grow: a replay starts afresh, so the
    /// advice differs from a run's.
    #[error(
        "{side} version: state DB {path} could not be written ({source}); make room in \
         {dir} (where a replay builds both versions' states: --keep DIR, else the \
         temporary directory, TMPDIR) and replay again",
        dir = path.parent().unwrap_or(path).display()
    )]
    Storage {
        side: &'static str,
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("--from: {0}")]
    From(#[source] crate::snapshot::SnapshotError),
    /// The tape could not be opened for the versions to read.
    #[error(transparent)]
    Input(#[from] crate::source::InputError),
    #[error(transparent)]
    Diff(#[from] crate::diff::DiffError),
    #[error(transparent)]
    Findings(#[from] FindingsError),
    /// The WebAssembly engine could not be set up.
    #[error(transparent)]
    Runtime(Box<RunError>),
    #[error("{path}: {message}")]
    Setup { path: PathBuf, message: String },
    #[error("the {side} version stopped (a thread failed)")]
    Crashed { side: &'static str },
    /// The first divergence's record could not be read back.
    #[error(
        "tape {tape}: the record at {position} is not on it any more; was the tape changed \
         during the replay?"
    )]
    Vanished { tape: PathBuf, position: Position },
    #[error(
        "tape {tape}: the versions consumed different records (seq {old} against {new}); \
         was the tape changed during the replay?"
    )]
    OutOfStep { tape: PathBuf, old: u64, new: u64 },
}

impl ReplayError {
    /// What stopped one side.
    fn side(side: &'static str, error: RunError) -> ReplayError {
        let other = |error| ReplayError::Side {
            side,
            source: Box::new(error),
        };
        match error {
            RunError::State(StateError::Storage { path, source }) => {
                ReplayError::Storage { side, path, source }
            }
            RunError::Host { position, source } => match *source {
                StateError::Storage { path, source } => ReplayError::Storage { side, path, source },
                source => other(RunError::Host {
                    position,
                    source: Box::new(source),
                }),
            },
            error => other(error),
        }
    }
}

/// What one version did with one event.
#[derive(Debug, Clone, PartialEq)]
pub struct SideEvent {
    pub outcome: Outcome,
    pub changes: Vec<Change>,
    pub outputs: Vec<Output>,
}

/// The first event whose effects differ.
#[derive(Debug, Clone, PartialEq)]
pub struct Divergence {
    pub event: TapeEvent,
    pub old: SideEvent,
    pub new: SideEvent,
}

pub use crate::findings::{DeadDiff, OutputDiff};

/// The outcome of a replay. What differs row by row, output by output and
/// dead letter by dead letter is in its [`Findings`], on disk: a replay whose
/// versions differ everywhere holds no more memory than one where they agree.
#[derive(Debug)]
pub struct Replay {
    pub old_digest: String,
    pub new_digest: String,
    pub events: u64,
    pub diverged_events: u64,
    pub first_divergence: Option<Divergence>,
    /// Schema differences and per-table counts (rows: in `findings`).
    pub state: StateDiff,
    /// Differing rows, their causes, differing outputs and dead letters.
    pub findings: Findings,
    /// Why a version's compiled form could not be cached, if it could not
    /// (every replay compiles it again).
    pub cache_errors: Vec<String>,
    /// What the operator should look at, though the replay went on.
    pub warnings: Vec<String>,
    pub old_db: PathBuf,
    pub new_db: PathBuf,
}

impl Replay {
    /// Whether the versions differ in anything the report covers.
    pub fn differs(&self) -> bool {
        self.diverged_events > 0 || !self.state.is_empty()
    }

    /// Replays another tape (another partition of the same input) into this
    /// result. Its seqs are numbered after this one's, so a combined report
    /// numbers events tape by tape, in the order replayed;
    /// `caused_by_positions` in the report stay unambiguous.
    pub fn replay_more(
        &mut self,
        config: &ReplayConfig,
        progress: &dyn ReplayProgress,
    ) -> Result<(), ReplayError> {
        let shift = self.events;
        let other = replay_into(config, &self.findings, shift, progress)?;
        // The same modules replay every tape; the states are the last tape's.
        self.old_digest = other.old_digest;
        self.new_digest = other.new_digest;
        self.old_db = other.old_db;
        self.new_db = other.new_db;
        self.events += other.events;
        self.diverged_events += other.diverged;
        if self.first_divergence.is_none() {
            self.first_divergence = other.first.map(|mut d| {
                d.event.seq += shift;
                d
            });
        }
        self.state.merge(other.state);
        for error in other.cache_errors {
            if !self.cache_errors.contains(&error) {
                self.cache_errors.push(error);
            }
        }
        self.warnings.extend(other.warnings);
        Ok(())
    }
}

/// Receives replay progress.
pub trait ReplayProgress: Sync {
    /// The tape's size in bytes, once known.
    fn start(&self, _tape_bytes: Option<u64>) {}
    /// Bytes of the tape the old version has consumed and committed.
    fn read(&self, _bytes: u64) {}
    /// Events compared so far.
    fn compared(&self, _events: u64) {}
    /// Every event is compared; the versions' final states are next.
    fn finishing(&self) {}
}

impl ReplayProgress for () {}

/// A side's run reports its committed batches into a channel (and the old
/// side its progress through the tape).
struct Side<'p> {
    tx: SyncSender<Vec<EventRecord>>,
    progress: Option<&'p dyn ReplayProgress>,
}

impl Progress for Side<'_> {
    fn start(&self, total_bytes: Option<u64>) {
        if let Some(p) = self.progress {
            p.start(total_bytes);
        }
    }
    fn advance(&self, bytes: u64, _events: u64) {
        if let Some(p) = self.progress {
            p.read(bytes);
        }
    }
    fn observe(&self) -> Option<bool> {
        Some(true)
    }
    fn committed(&self, events: Vec<EventRecord>) {
        // The comparer hanging up means it failed; the run finishes anyway.
        let _ = self.tx.send(events);
    }
}

/// Replays the tape with both versions and compares them.
pub fn replay(config: &ReplayConfig, progress: &dyn ReplayProgress) -> Result<Replay, ReplayError> {
    std::fs::create_dir_all(&config.work_dir).map_err(|e| ReplayError::Setup {
        path: config.work_dir.clone(),
        message: e.to_string(),
    })?;
    let mut replayed = Replay {
        old_digest: String::new(),
        new_digest: String::new(),
        events: 0,
        diverged_events: 0,
        first_divergence: None,
        // Every rule is unmatched until a tape's states match it.
        state: StateDiff {
            unmatched: config.ignore.clone(),
            ..StateDiff::default()
        },
        findings: Findings::create(&config.work_dir.join("findings.db"))?,
        cache_errors: Vec::new(),
        warnings: Vec::new(),
        old_db: PathBuf::new(),
        new_db: PathBuf::new(),
    };
    replayed.replay_more(config, progress)?;
    Ok(replayed)
}

/// One tape's replay, what differs added to `findings` with seqs after `shift`.
struct OneTape {
    old_digest: String,
    new_digest: String,
    events: u64,
    diverged: u64,
    first: Option<Divergence>,
    state: StateDiff,
    old_db: PathBuf,
    new_db: PathBuf,
    cache_errors: Vec<String>,
    warnings: Vec<String>,
}

fn replay_into(
    config: &ReplayConfig,
    findings: &Findings,
    shift: u64,
    progress: &dyn ReplayProgress,
) -> Result<OneTape, ReplayError> {
    let setup = |path: &Path, message: String| ReplayError::Setup {
        path: path.to_owned(),
        message,
    };
    // Each version reads the input on its own: a pipe would be split
    // between them.
    if std::fs::metadata(&config.tape).is_ok_and(|m| !m.is_file()) {
        return Err(setup(
            &config.tape,
            "not a file (a pipe?): each version reads the input on its own; pass a file".into(),
        ));
    }
    std::fs::create_dir_all(&config.work_dir)
        .map_err(|e| setup(&config.work_dir, e.to_string()))?;
    let old_db = config.work_dir.join("old.db");
    let new_db = config.work_dir.join("new.db");
    for db in [&old_db, &new_db] {
        for file in crate::state::db_files(db) {
            if file.exists() {
                std::fs::remove_file(&file).map_err(|e| setup(&file, e.to_string()))?;
            }
        }
        if let Some(from) = &config.from {
            crate::snapshot::snapshot(from, db).map_err(ReplayError::From)?;
        }
    }
    // Both versions are compiled here, one after the other, and shared
    // with the sides: two compiles at once would add their memory to the
    // replay's.
    let runtime = Runtime::new(config.runtime.clone())
        .map_err(|e| ReplayError::Runtime(Box::new(e.into())))?;
    let load = |side: &'static str, module: &Path| {
        runtime.load(module).map_err(|e| ReplayError::Side {
            side,
            source: Box::new(e.into()),
        })
    };
    let (old_module, new_module) = (load("old", &config.old)?, load("new", &config.new)?);
    let mut warnings = Vec::new();
    if let Some(from) = &config.from {
        // Both versions continue a snapshot one of them (or an earlier
        // version) wrote; one of another processor is likely the wrong file.
        if let Some(digest) = crate::state::module_digest(&old_db)
            && digest != old_module.digest()
            && digest != new_module.digest()
        {
            warnings.push(format!(
                "--from {} was written by module {digest}, which is neither --old nor --new; \
                 both continue it (is it the snapshot you meant?)",
                from.display()
            ));
        }
    }
    let runtime = &runtime;
    let side_config = |module: &Path, db: &Path| {
        let mut c = RunConfig::new(module, &config.tape, db);
        c.runtime = config.runtime.clone();
        c.dedup_header = config.dedup_header.clone();
        c.until_seq = config.until;
        // Two runs side by side: a small page cache each (8 MiB) keeps the
        // replay's memory flat and small whatever the tape's length.
        c.cache_mib = Some(8);
        // The sides are scratch copies: made afresh by every replay.
        c.scratch = true;
        // Each side holds a batch's results until it commits (see REPLAY_BATCH).
        c.batch_size = REPLAY_BATCH;
        // A snapshot was written by one of the versions; both continue it.
        c.allow_module_change = true;
        // Outputs are compared as they happen; queuing them for a delivery
        // that never comes would cost a write each.
        c.queue_outputs = false;
        c
    };
    let (old_cfg, new_cfg) = (
        side_config(&config.old, &old_db),
        side_config(&config.new, &new_db),
    );
    // One committed batch waits per side while the comparer works on the
    // previous one.
    let (old_tx, old_rx) = sync_channel(1);
    let (new_tx, new_rx) = sync_channel(1);
    // The tape is read, decoded and seeded once for both versions.
    let mut readers = crate::source::open_shared(&config.tape, None, 2)?;
    let (mut new_source, mut old_source) = (
        readers.pop().expect("two readers"),
        readers.pop().expect("two readers"),
    );
    std::thread::scope(|scope| {
        let old = std::thread::Builder::new()
            .name("rewind-old".into())
            .stack_size(crate::runtime::GUEST_THREAD_STACK)
            .spawn_scoped(scope, move || {
                let side = Side {
                    tx: old_tx,
                    progress: Some(progress),
                };
                run_source(&old_cfg, runtime, &old_module, &mut old_source, None, &side)
            })
            .map_err(|_| ReplayError::Crashed { side: "old" })?;
        let new = std::thread::Builder::new()
            .name("rewind-new".into())
            .stack_size(crate::runtime::GUEST_THREAD_STACK)
            .spawn_scoped(scope, move || {
                let side = Side {
                    tx: new_tx,
                    progress: None,
                };
                run_source(&new_cfg, runtime, &new_module, &mut new_source, None, &side)
            })
            .map_err(|_| ReplayError::Crashed { side: "new" })?;
        let compared = compare(
            &config.tape,
            (&old_rx, &new_rx),
            (&old_db, &new_db),
            &config.ignore,
            (findings, shift),
            progress,
        );
        // Unblock a side still sending (its receiver goes away).
        drop((old_rx, new_rx));
        let join = |handle: std::thread::ScopedJoinHandle<'_, Result<RunSummary, RunError>>,
                    side: &'static str| {
            handle
                .join()
                .map_err(|_| ReplayError::Crashed { side })?
                .map_err(|e| ReplayError::side(side, e))
        };
        let (old_summary, new_summary) = (join(old, "old")?, join(new, "new")?);
        let compared = compared?;
        progress.finishing();
        let state = diff_states(&old_db, &new_db, &config.ignore, findings)?;
        let cache_errors = [&old_summary, &new_summary]
            .into_iter()
            .filter_map(|s| s.load.cache_error.clone())
            .collect();
        Ok(OneTape {
            cache_errors,
            warnings,
            old_digest: old_summary.module_digest,
            new_digest: new_summary.module_digest,
            events: compared.events,
            diverged: compared.diverged,
            first: compared
                .first
                .map(|first| first.read_back(&config.tape))
                .transpose()?,
            state,
            old_db: old_db.clone(),
            new_db: new_db.clone(),
        })
    })
}

/// What the comparer counts as it goes (what differs goes to the findings).
#[derive(Default)]
struct Compared {
    events: u64,
    diverged: u64,
    first: Option<FirstDivergence>,
}

/// The first event the versions disagree on, before its record is read
/// back from the tape (the sides do not copy records for the comparer).
struct FirstDivergence {
    seq: u64,
    position: Position,
    old: SideEvent,
    new: SideEvent,
}

impl FirstDivergence {
    /// With its record as the tape (or JSONL file) holds it: the first one
    /// at its position (a run consumes a position once; a later copy on the
    /// tape is skipped as already consumed, and so is every copy when an
    /// earlier one was). Numbered as the sides consumed it (a replay from a
    /// snapshot continues the snapshot's numbering).
    fn read_back(self, tape: &Path) -> Result<Divergence, ReplayError> {
        let mut source = crate::source::open_here(tape, None)?;
        while let Some(record) = source.next_record()? {
            if record.position == self.position {
                return Ok(Divergence {
                    event: TapeEvent::from_record(self.seq, &record),
                    old: self.old,
                    new: self.new,
                });
            }
        }
        Err(ReplayError::Vanished {
            tape: tape.to_owned(),
            position: self.position,
        })
    }
}

/// Where the comparer puts what differs: the findings, and the number its
/// seqs are shifted by (the events of tapes replayed into them before).
type Keep<'a> = (&'a Findings, u64);

/// Pairs the sides' results by seq and compares them.
fn compare(
    tape: &Path,
    (old_rx, new_rx): (&Receiver<Vec<EventRecord>>, &Receiver<Vec<EventRecord>>),
    (old_db, new_db): (&Path, &Path),
    ignore: &[Ignore],
    keep: Keep<'_>,
    progress: &dyn ReplayProgress,
) -> Result<Compared, ReplayError> {
    let mut out = Compared::default();
    let (mut olds, mut news) = (VecDeque::new(), VecDeque::new());
    let mut shapes = [Shapes::new(old_db), Shapes::new(new_db)];
    let (mut old_open, mut new_open) = (true, true);
    loop {
        // Take from whichever side is behind.
        if olds.is_empty() && old_open {
            match old_rx.recv() {
                Ok(batch) => olds.extend(batch),
                Err(_) => old_open = false,
            }
            continue;
        }
        if news.is_empty() && new_open {
            match new_rx.recv() {
                Ok(batch) => news.extend(batch),
                Err(_) => new_open = false,
            }
            continue;
        }
        let (Some(a), Some(b)) = (olds.pop_front(), news.pop_front()) else {
            // One side ended: the other's results have no partner. That
            // happens only when a side failed, which its join reports.
            return Ok(out);
        };
        if a.seq != b.seq {
            return Err(ReplayError::OutOfStep {
                tape: tape.to_owned(),
                old: a.seq,
                new: b.seq,
            });
        }
        compare_event(&mut out, a, b, &mut shapes, ignore, keep)?;
        if out.events.is_multiple_of(10_000) {
            progress.compared(out.events);
        }
    }
}

fn compare_event(
    out: &mut Compared,
    a: EventRecord,
    b: EventRecord,
    shapes: &mut [Shapes; 2],
    ignore: &[Ignore],
    (findings, shift): Keep<'_>,
) -> Result<(), ReplayError> {
    let shifted = a.seq + shift;
    out.events += 1;
    let (ra, rb) = (&a.result, &b.result);
    let outcome_differs = ra.outcome != rb.outcome;
    // The sides compute no digests (see `Progress::observe`): what they
    // wrote and emitted is compared directly.
    let outputs_differ = a.outputs != b.outputs;
    let mut rows_differ = false;
    if a.changes != b.changes {
        let (ca, cb) = (a.changes.decode(), b.changes.decode());
        let [sa, sb] = shapes;
        let ia = sa.images(&ca, ignore)?;
        let ib = sb.images(&cb, ignore)?;
        for key in ia.keys().chain(ib.keys().filter(|k| !ia.contains_key(*k))) {
            // An event that only carries an earlier difference along is
            // not a divergence of its own.
            if compare_writes(ia.get(key), ib.get(key)) == Some(true) {
                if !rows_differ {
                    findings.add_position(shifted, &a.position)?;
                }
                rows_differ = true;
                findings.add_cause(key.0, &key.1, shifted)?;
            }
        }
    }
    if outputs_differ {
        findings.add_output(&OutputDiff {
            seq: shifted,
            old: a.outputs.clone(),
            new: b.outputs.clone(),
        })?;
    }
    if outcome_differs {
        let dead = |r: &EventRecord| match &r.result.outcome {
            Outcome::DeadLetter { class, message } => Some(DeadDiff {
                seq: shifted,
                stream: r.position.stream.clone(),
                partition: r.position.partition,
                offset: r.position.offset,
                class: class.clone(),
                message: message.clone(),
            }),
            _ => None,
        };
        for (side, dead) in [(Version::Old, dead(&a)), (Version::New, dead(&b))] {
            if let Some(dead) = dead {
                findings.add_dead(side, &dead)?;
            }
        }
    }
    if outcome_differs || outputs_differ || rows_differ {
        out.diverged += 1;
        if out.first.is_none() {
            let side = |r: &EventRecord| SideEvent {
                outcome: r.result.outcome.clone(),
                changes: r.changes.decode(),
                outputs: r.outputs.clone(),
            };
            out.first = Some(FirstDivergence {
                seq: a.seq,
                position: a.position.clone(),
                old: side(&a),
                new: side(&b),
            });
        }
    }
    Ok(())
}

/// A row's identity: its table and its key values, encoded.
pub type RowKey = (String, Vec<u8>);

/// Key values as bytes, each as the change log encodes it.
pub fn encode_key<'v>(values: impl IntoIterator<Item = &'v Value>) -> Vec<u8> {
    let mut out = Vec::new();
    for v in values {
        crate::state::put_value(&mut out, v.into());
    }
    out
}

/// Two writes of a row whose tables have different columns in the two
/// versions, cut to the columns both have (`None`: they have the same). A
/// column only one version has is a schema difference, reported as such,
/// as the final state diff does: not a difference of every row it is in.
fn on_common_columns<'a>(a: &Write<'a>, b: &Write<'a>) -> Option<(Write<'a>, Write<'a>)> {
    let names = |w: &Write<'a>| -> Option<Vec<&'a str>> {
        let image = w.after.as_ref().or(w.before.as_ref())?;
        Some(image.iter().map(|(c, _)| *c).collect())
    };
    let (in_a, in_b) = (names(a)?, names(b)?);
    if in_a == in_b {
        return None;
    }
    // In one order (old's), as the state diff matches columns by name.
    let common: Vec<&str> = in_a.iter().copied().filter(|c| in_b.contains(c)).collect();
    let cut = |w: &Write<'a>| {
        let cut = |image: &Option<Image<'a>>| {
            image.as_ref().map(|i| {
                common
                    .iter()
                    .filter_map(|c| i.iter().find(|(n, _)| n == c).copied())
                    .collect()
            })
        };
        Write {
            before: cut(&w.before),
            after: cut(&w.after),
        }
    };
    Some((cut(a), cut(b)))
}

/// How long reading a side's table shapes waits for the side's write lock:
/// far longer than a batch of [`REPLAY_BATCH`] events holds it.
const SHAPE_WAIT: Duration = Duration::from_secs(60);

/// The shapes of one side's tables, read through a connection of our own.
struct Shapes {
    path: PathBuf,
    conn: Option<rusqlite::Connection>,
    tables: HashMap<String, TableShape>,
}

/// A row's columns and values, borrowed from the table's shape and the
/// decoded change.
type Image<'a> = Vec<(&'a str, &'a Value)>;

/// What an event did to one row: the row before its first change and after
/// its last (`None`: absent).
#[derive(Debug, Clone, PartialEq)]
struct Write<'a> {
    before: Option<Image<'a>>,
    after: Option<Image<'a>>,
}

/// A row's identity while an event is compared: its table and key, encoded.
type WriteKey<'a> = (&'a str, Vec<u8>);

/// Per (table, key), what an event did there. Ordered: an event that
/// writes many rows looks each up in logarithmic time, and without hashing
/// the keys of the few rows most events write.
type Images<'a> = BTreeMap<WriteKey<'a>, Write<'a>>;

/// Compares what the versions did to one row in one event: `None` when it
/// is the same, else whether the event made a *new* difference (one version
/// wrote the row and the other did not, or a column that was equal before
/// the event differs after it). An event that only carries an earlier
/// difference along (a counter both versions increment) is not a cause.
fn compare_writes(a: Option<&Write<'_>>, b: Option<&Write<'_>>) -> Option<bool> {
    let (a, b) = match (a, b) {
        (None, None) => return None,
        (Some(_), None) | (None, Some(_)) => return Some(true),
        (Some(a), Some(b)) => (a, b),
    };
    if let Some((a, b)) = on_common_columns(a, b) {
        return compare_writes(Some(&a), Some(&b));
    }
    if a.after == b.after {
        return if a.before == b.before {
            None
        } else {
            Some(false)
        };
    }
    if a.before == b.before {
        return Some(true);
    }
    Some(match (&a.before, &b.before, &a.after, &b.after) {
        (Some(ba), Some(bb), Some(aa), Some(ab)) => aa.iter().zip(ab).zip(ba.iter().zip(bb)).any(
            |(((_, after_a), (_, after_b)), ((_, before_a), (_, before_b)))| {
                before_a == before_b && after_a != after_b
            },
        ),
        (before_a, before_b, after_a, after_b) => {
            before_a.is_some() == before_b.is_some() && after_a.is_some() != after_b.is_some()
        }
    })
}

impl Shapes {
    fn new(path: &Path) -> Shapes {
        Shapes {
            path: path.to_owned(),
            conn: None,
            tables: HashMap::new(),
        }
    }

    fn shape(&mut self, table: &str, width: usize) -> Result<&TableShape, ReplayError> {
        let err = |e| ReplayError::Diff(crate::diff::DiffError::reading(&self.path, e));
        let stale = self
            .tables
            .get(table)
            .is_none_or(|s| s.columns.len() != width);
        if stale {
            if self.conn.is_none() {
                let conn = rusqlite::Connection::open_with_flags(
                    &self.path,
                    rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
                )
                .map_err(err)?;
                // The side writes on meanwhile, with its rollback journal in
                // memory (`StateDb::make_scratch`): while it commits, or has
                // spilled pages of an open batch into the file, it holds the
                // file exclusively and a read waits for it (rusqlite's
                // default wait is 5 s; said here, and longer).
                conn.busy_timeout(SHAPE_WAIT).map_err(err)?;
                self.conn = Some(conn);
            }
            let conn = self.conn.as_ref().expect("opened above");
            let shape = crate::diff::shape(conn, table).map_err(err)?;
            self.tables.insert(table.to_owned(), shape);
        }
        Ok(&self.tables[table])
    }

    /// What the changes left per row key, ignored tables and columns left out.
    fn images<'a>(
        &'a mut self,
        changes: &'a [Change],
        ignore: &[Ignore],
    ) -> Result<Images<'a>, ReplayError> {
        let ignored = |table: &str| {
            ignore
                .iter()
                .any(|i| matches!(i, Ignore::Table(t) if t == table))
        };
        let width = |change: &Change| {
            change
                .after
                .as_ref()
                .or(change.before.as_ref())
                .map_or(0, Vec::len)
        };
        // Every table's shape first (read anew when it changed), then the
        // images borrowing them.
        for change in changes.iter().filter(|c| !ignored(&c.table)) {
            self.shape(&change.table, width(change))?;
        }
        let tables = &self.tables;
        let mut images = Images::new();
        for change in changes.iter().filter(|c| !ignored(&c.table)) {
            let table = change.table.as_str();
            let shape = &tables[table];
            let keep = |c: &str| {
                !ignore.iter().any(
                    |i| matches!(i, Ignore::Column { table: t, column } if t == table && column == c),
                )
            };
            let image = |row: &'a [Value]| -> Image<'a> {
                shape
                    .columns
                    .iter()
                    .zip(row)
                    .filter(|(c, _)| keep(c))
                    .map(|(c, v)| (c.as_str(), v))
                    .collect()
            };
            let key = |row: &'a [Value]| -> WriteKey<'a> {
                let encoded = if shape.key.is_empty() {
                    encode_key(image(row).into_iter().map(|(_, v)| v))
                } else {
                    encode_key(
                        shape
                            .key
                            .iter()
                            .filter_map(|k| shape.columns.iter().position(|c| c == k))
                            .filter_map(|i| row.get(i)),
                    )
                };
                (table, encoded)
            };
            if let Some(before) = &change.before {
                let write = images.entry(key(before)).or_insert_with(|| Write {
                    before: Some(image(before)),
                    after: None,
                });
                write.after = None;
            }
            if let Some(after) = &change.after {
                let write = images.entry(key(after)).or_insert(Write {
                    before: None,
                    after: None,
                });
                write.after = Some(image(after));
            }
        }
        Ok(images)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::StateDb;

    /// A side holding its scratch DB exclusively (committing, or with pages
    /// of an open batch spilled) makes reading its shapes wait, not fail.
    #[test]
    fn reading_shapes_waits_for_a_side_holding_its_db() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("side.db");
        let side = StateDb::open(&path).unwrap();
        side.make_scratch().unwrap();
        let writer = rusqlite::Connection::open(&path).unwrap();
        writer
            .execute_batch("CREATE TABLE t (k TEXT PRIMARY KEY, v); BEGIN EXCLUSIVE;")
            .unwrap();
        let held = std::time::Instant::now();
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            writer.execute_batch("COMMIT").unwrap();
        });
        let mut shapes = Shapes::new(&path);
        let shape = shapes.shape("t", 2).unwrap();
        assert_eq!(shape.key, ["k"]);
        assert!(held.elapsed() >= Duration::from_millis(300));
        release.join().unwrap();
    }
}
