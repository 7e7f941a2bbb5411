//! Stops guest SQL that stops making progress.
//!
//! Fuel bounds guest SQL by SQLite VM steps (the progress handler), and a
//! step is normally microseconds. A few built-in functions are not: `LIKE`,
//! `GLOB`, `instr`, `replace` and `trim` over large values take time in the
//! product of their arguments' lengths, all inside one step, so an input
//! that reaches such a statement could hold the run for hours while the
//! budget never moves. A thread per state DB watches the statements a guest
//! runs: when one has not reached the progress handler for the configured
//! time, it interrupts the connection and the run stops with an error
//! naming the event (see `StateDb::guest_error`).
//!
//! SQLite checks for an interrupt between steps, so a function that is
//! still running finishes first. When the statement has not returned a
//! quarter of the limit (at least a second) after the interrupt, the `rewind`
//! binary (which calls [`exit_when_stuck`]) prints the error and exits with
//! status 2, as a kill would stop it; a library caller keeps waiting.
//!
//! Stopping is the only outcome a clock may decide here: a dead letter or a
//! skipped event would depend on how fast the machine is, and so would the
//! state. A stopped run has committed nothing of its batch in progress (the
//! state DB, tape and outputs are made to survive a kill at any point), so
//! the state stays what the input and the module make it, and a rerun (with
//! a longer limit, or a fixed processor) continues from there.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicI64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::InterruptHandle;

use super::guard::Guard;
use crate::event::Position;

/// What a stall is, for the messages: the run's error and the binary's exit.
pub fn stalled_for(seconds: u64) -> String {
    format!(
        "it made no progress for {seconds} s: one step ran that long (LIKE, GLOB, instr, \
         replace and trim over large values run in a single step, which --fuel cannot meter)"
    )
}

static EXIT_WHEN_STUCK: AtomicBool = AtomicBool::new(false);

/// Makes a stalled statement that an interrupt cannot stop end the process
/// (status 2, after printing why): for the `rewind` binary.
pub fn exit_when_stuck() {
    EXIT_WHEN_STUCK.store(true, Ordering::Relaxed);
}

/// The watching thread of one state DB; stops it when dropped.
pub(super) struct StallWatch {
    limit: Duration,
    guard: Arc<Guard>,
    /// The event whose SQL runs (for the message when the process exits).
    event: Arc<Event>,
    /// Its stream as last written to `event`, on the run's thread: the
    /// stream rarely changes, and comparing here takes no lock.
    stream: RefCell<String>,
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl StallWatch {
    /// Starts watching the guest statements `guard` runs on the connection
    /// `interrupt` belongs to.
    pub(super) fn start(
        guard: Arc<Guard>,
        interrupt: InterruptHandle,
        limit: Duration,
    ) -> std::io::Result<StallWatch> {
        let event = Arc::new(Event::default());
        let watched = Arc::clone(&guard);
        let (stop, stopped) = mpsc::channel::<()>();
        let at = Arc::clone(&event);
        let grace = (limit / 4).max(Duration::from_secs(1));
        // Looks four times per limit (at most once a second), so a stall is
        // stopped within a quarter of the limit after it is reached.
        let period = (limit / 4).clamp(Duration::from_millis(5), Duration::from_secs(1));
        let thread = std::thread::Builder::new()
            .name("rewind-sql-watch".into())
            .spawn(move || {
                // The progress of the guest statement last seen, since when,
                // and when it was interrupted.
                let mut seen = None;
                let mut since = Instant::now();
                let mut interrupted: Option<Instant> = None;
                while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(period) {
                    let now = guard.guest_progress();
                    if now.is_none() || now != seen {
                        seen = now;
                        since = Instant::now();
                        interrupted = None;
                    } else if let Some(when) = interrupted {
                        if when.elapsed() >= grace && EXIT_WHEN_STUCK.load(Ordering::Relaxed) {
                            eprintln!(
                                "rewind: error: processor SQL stopped at {}, nothing of the \
                                 batch in progress committed: {}, and cannot be interrupted, so \
                                 the process exits; fix the statement, or rerun with a larger \
                                 --sql-stall-secs",
                                at.position(),
                                stalled_for(since.elapsed().as_secs())
                            );
                            std::process::exit(2);
                        }
                    } else if since.elapsed() >= limit
                        && let Some(progress) = seen
                        && guard.interrupt_if_stuck(progress, &interrupt)
                    {
                        interrupted = Some(Instant::now());
                    }
                }
            })?;
        Ok(StallWatch {
            limit,
            guard: watched,
            event,
            stream: RefCell::new(String::new()),
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Notes the event whose SQL runs next (per event: no lock unless the
    /// stream changed).
    pub(super) fn enter_event(&self, position: &Position) {
        let mut stream = self.stream.borrow_mut();
        if *stream != position.stream {
            stream.clone_from(&position.stream);
            self.event
                .stream
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone_from(&position.stream);
        }
        self.event
            .partition
            .store(position.partition, Ordering::Relaxed);
        self.event.offset.store(position.offset, Ordering::Relaxed);
    }

    /// Whether the watch interrupted a statement since the last call.
    pub(super) fn take_stalled(&self) -> bool {
        self.guard.take_stalled()
    }

    pub(super) fn limit(&self) -> Duration {
        self.limit
    }
}

/// The event whose SQL runs, shared with the watching thread.
#[derive(Default)]
struct Event {
    stream: Mutex<String>,
    partition: AtomicI32,
    offset: AtomicI64,
}

impl Event {
    fn position(&self) -> Position {
        Position {
            stream: self
                .stream
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            partition: self.partition.load(Ordering::Relaxed),
            offset: self.offset.load(Ordering::Relaxed),
        }
    }
}

impl Drop for StallWatch {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
