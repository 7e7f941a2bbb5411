//! `rewind verify`: replays a tape with the module that recorded it and
//! checks every event's result against the digests recorded live. Any
//! mismatch is nondeterminism (or a tampered tape), reported at the first
//! event where it appears.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::pipeline::{EventRecord, Progress, RunConfig, RunError};
use crate::replay::ReplayProgress;
use crate::runtime::RuntimeConfig;
use crate::tape::{EventResult, Frame, Outcome, RunInfo, TapeError, TapeEvent, TapeReader};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    #[error(transparent)]
    Tape(#[from] TapeError),
    #[error(transparent)]
    Run(#[from] Box<RunError>),
    #[error("tape {path}: {message}")]
    Unverifiable { path: PathBuf, message: String },
}

/// Where a replay first differs from the recording.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    pub event: TapeEvent,
    pub recorded: EventResult,
    pub replayed: EventResult,
}

impl Mismatch {
    /// What differs, in words.
    pub fn describe(&self) -> String {
        let (r, p) = (&self.recorded, &self.replayed);
        let mut parts = Vec::new();
        if r.outcome != p.outcome {
            parts.push(format!(
                "outcome: recorded {}, replayed {}",
                outcome(&r.outcome),
                outcome(&p.outcome)
            ));
        }
        if (r.rows, r.rows_digest) != (p.rows, p.rows_digest) {
            parts.push(format!(
                "rows written: recorded {} (digest {}), replayed {} (digest {})",
                r.rows,
                &hex::encode(r.rows_digest)[..12],
                p.rows,
                &hex::encode(p.rows_digest)[..12]
            ));
        }
        if (r.outputs, r.outputs_digest) != (p.outputs, p.outputs_digest) {
            parts.push(format!(
                "outputs: recorded {} (digest {}), replayed {} (digest {})",
                r.outputs,
                &hex::encode(r.outputs_digest)[..12],
                p.outputs,
                &hex::encode(p.outputs_digest)[..12]
            ));
        }
        format!(
            "seq {} ({}): {}",
            self.event.seq,
            self.event.position,
            parts.join("; ")
        )
    }
}

fn outcome(o: &Outcome) -> String {
    match o {
        Outcome::Applied => "applied".into(),
        Outcome::Duplicate => "duplicate".into(),
        Outcome::DeadLetter { class, message } => format!("dead letter ({class}: {message})"),
    }
}

/// What a verification found.
#[derive(Debug, Clone)]
pub struct Verified {
    pub events: u64,
    pub first_mismatch: Option<Mismatch>,
    /// Why the processor's compiled form could not be cached, if it could
    /// not (every verify compiles it again).
    pub cache_error: Option<String>,
}

/// Compares committed results with the tape's, in order.
struct Checker<'a> {
    reader: Mutex<TapeReader>,
    state: Mutex<Checked>,
    /// The digest of the module replaying, and its file (for messages).
    module: String,
    processor: &'a Path,
    /// The run whose settings (fuel, memory cap, dedup header) it replays
    /// with: the first.
    recorded: RunInfo,
    progress: &'a dyn ReplayProgress,
}

#[derive(Default)]
struct Checked {
    events: u64,
    first: Option<Mismatch>,
    error: Option<VerifyError>,
}

impl Checker<'_> {
    /// The next recorded event; a run frame of another module is an error
    /// (its events cannot be reproduced by this one).
    fn next_recorded(&self, reader: &mut TapeReader) -> Result<Option<TapeEvent>, VerifyError> {
        loop {
            match reader.next_frame()? {
                None => return Ok(None),
                Some(Frame::Event(event)) => return Ok(Some(*event)),
                Some(Frame::Run(run)) if run.module_digest != self.module => {
                    return Err(VerifyError::Unverifiable {
                        path: reader.path().to_owned(),
                        message: format!(
                            "events from seq {} were recorded by module {}, not {} ({}); \
                             verify with the module that recorded them",
                            run.first_seq,
                            run.module_digest,
                            self.module,
                            self.processor.display()
                        ),
                    });
                }
                Some(Frame::Run(run)) if !run.same_settings(&self.recorded) => {
                    return Err(VerifyError::Unverifiable {
                        path: reader.path().to_owned(),
                        message: format!(
                            "events from seq {} were recorded with {}, earlier ones with {}; \
                             verify replays a tape with the settings it was recorded with, one \
                             set of them",
                            run.first_seq,
                            run.settings(),
                            self.recorded.settings()
                        ),
                    });
                }
                Some(Frame::Run(_)) => {}
            }
        }
    }
}

impl Progress for Checker<'_> {
    fn start(&self, total_bytes: Option<u64>) {
        self.progress.start(total_bytes);
    }
    fn advance(&self, bytes: u64, _events: u64) {
        self.progress.read(bytes);
    }
    fn observe(&self) -> Option<bool> {
        Some(false)
    }
    fn committed(&self, events: Vec<EventRecord>) {
        let mut reader = self.reader.lock().unwrap_or_else(|e| e.into_inner());
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        for replayed in events {
            if state.first.is_some() || state.error.is_some() {
                return;
            }
            let recorded = match self.next_recorded(&mut reader) {
                Ok(Some(e)) => e,
                Ok(None) => return,
                Err(e) => {
                    state.error = Some(e);
                    return;
                }
            };
            state.events += 1;
            let (Some(r), p) = (recorded.result.clone(), replayed.result) else {
                continue;
            };
            if r != p {
                let mut event = recorded;
                event.result = None;
                state.first = Some(Mismatch {
                    event,
                    recorded: r,
                    replayed: p,
                });
            }
        }
        self.progress.compared(state.events);
    }
    fn should_stop(&self) -> bool {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.first.is_some() || state.error.is_some()
    }
}

/// Replays `tape` with `processor` into a fresh state DB at `work` and
/// compares every event's result with the recorded one. Fuel and the memory
/// cap are the ones the tape was recorded with (those of `runtime` are not
/// used): with others, an event near a limit would end differently.
pub fn verify(
    tape: &Path,
    processor: &Path,
    runtime: &RuntimeConfig,
    work: &Path,
) -> Result<Verified, VerifyError> {
    verify_with_progress(tape, processor, runtime, work, &())
}

/// [`verify`], telling `progress` how far through the tape it is and how
/// many events it has checked.
pub fn verify_with_progress(
    tape: &Path,
    processor: &Path,
    runtime: &RuntimeConfig,
    work: &Path,
    progress: &dyn ReplayProgress,
) -> Result<Verified, VerifyError> {
    let unverifiable = |message: String| VerifyError::Unverifiable {
        path: tape.to_owned(),
        message,
    };
    // The tape must have been recorded from the start, with results: its
    // first event says so.
    let mut reader = TapeReader::open(tape)?;
    let mut with_results = false;
    let mut recorded = None;
    while let Some(frame) = reader.next_frame()? {
        match frame {
            Frame::Run(run) => {
                recorded.get_or_insert(run);
            }
            Frame::Event(e) => {
                with_results = e.result.is_some();
                if e.seq != 0 {
                    return Err(unverifiable(format!(
                        "its recording starts at seq {}, after events it does not hold; \
                         verify replays from an empty state",
                        e.seq
                    )));
                }
                break;
            }
        }
    }
    if !with_results {
        return Err(unverifiable(
            "it holds no recorded results (an imported tape?); record one with `rewind run --tape`"
                .into(),
        ));
    }
    let Some(recorded) = recorded else {
        return Err(unverifiable(
            "no run recorded it (an imported tape?); record one with `rewind run --tape`".into(),
        ));
    };
    let runtime = RuntimeConfig {
        fuel: recorded.fuel,
        memory_bytes: usize::try_from(recorded.memory_bytes).unwrap_or(usize::MAX),
        ..runtime.clone()
    };
    let module = crate::runtime::Runtime::new(runtime.clone())
        .and_then(|rt| rt.load(processor).map(|m| m.digest().to_owned()))
        .map_err(|e| Box::new(RunError::from(e)))?;
    crate::state::remove_db_files(work);
    let mut config = RunConfig::new(processor, tape, work);
    config.runtime = runtime.clone();
    config.dedup_header = recorded.dedup_header.clone();
    // The outputs are checked against their digests, never delivered.
    config.queue_outputs = false;
    // The state is made afresh by every verify.
    config.scratch = true;
    let checker = Checker {
        reader: Mutex::new(TapeReader::open(tape)?),
        state: Mutex::new(Checked::default()),
        module,
        processor,
        recorded,
        progress,
    };
    let run = crate::run(&config, &checker);
    let state = checker
        .state
        .into_inner()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(error) = state.error {
        return Err(error);
    }
    let summary = run.map_err(Box::new)?;
    Ok(Verified {
        events: state.events,
        first_mismatch: state.first,
        cache_error: summary.load.cache_error,
    })
}
