//! Background WAL checkpoints, so that a run rarely waits on `fsync`.
//!
//! SQLite's automatic checkpoint runs after the writer's `COMMIT`: it copies
//! the WAL into the database file and syncs both, and on a busy stream that
//! was a third of a run's time. Here the writer only notices, from the WAL
//! hook, that the log has grown, and a thread with its own connection copies
//! it back (a `PASSIVE` checkpoint never blocks the writer; the two cores
//! work side by side).
//!
//! The WAL starts over from its beginning only when a write transaction
//! begins with every frame copied back, which a writer that begins its next
//! batch right after each commit never sees. So once the log holds
//! [`RESTART_FRAMES`], the writer waits for the background checkpoint and
//! copies the last few frames itself: its next batch then restarts the log.
//! That bounds the WAL, and costs one short checkpoint per 64 MiB of log.
//!
//! Durability is unchanged: with `synchronous = NORMAL` a commit reaches the
//! WAL without a sync either way, and the checkpoint syncs before it writes.

use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;

use rusqlite::{Connection, OpenFlags};

/// WAL frames (pages) after a commit at which the checkpointer is woken.
const SOFT_FRAMES: i32 = 1000;
/// WAL frames at which the writer finishes a checkpoint itself, so that the
/// log restarts.
const RESTART_FRAMES: i32 = 16 * SOFT_FRAMES;

#[derive(Default)]
struct Signal {
    pending: bool,
    stop: bool,
}

#[derive(Default)]
struct Shared {
    signal: Mutex<Signal>,
    wake: Condvar,
    /// Held while checkpointing: one checkpoint at a time (a second one
    /// would fail with `SQLITE_BUSY` rather than wait).
    checkpoint: Mutex<()>,
}

impl Shared {
    fn lock_checkpoint(&self) -> std::sync::MutexGuard<'_, ()> {
        self.checkpoint
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn update(&self, f: impl FnOnce(&mut Signal)) {
        f(&mut self.signal.lock().unwrap_or_else(PoisonError::into_inner));
        self.wake.notify_one();
    }
}

/// The checkpointing thread of one database; stops when dropped.
pub struct Checkpointer {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Checkpointer {
    /// Takes over checkpoints of `writer`'s database (in WAL mode) at
    /// `path`, opened through `vfs` (SQLite's default when `None`).
    pub fn start(
        writer: &mut Connection,
        path: &Path,
        vfs: Option<&str>,
    ) -> rusqlite::Result<Checkpointer> {
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = match vfs {
            Some(vfs) => Connection::open_with_flags_and_vfs(path, flags, vfs)?,
            None => Connection::open_with_flags(path, flags)?,
        };
        conn.execute_batch("PRAGMA synchronous = NORMAL; PRAGMA busy_timeout = 0;")?;
        let shared = Arc::new(Shared::default());
        let thread = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("rewind-checkpoint".into())
                .spawn(move || checkpoint_loop(&conn, &shared))
                .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?
        };
        // Setting the hook replaces SQLite's automatic checkpoint.
        let hook_shared = Arc::clone(&shared);
        // The hook runs after the commit, without the write lock. It never
        // fails: an error would make a successful COMMIT look failed, and a
        // failed checkpoint loses nothing (the frames stay in the WAL).
        writer.wal_hook(Some(move |wal: &mut rusqlite::hooks::Wal, frames| {
            if frames >= RESTART_FRAMES {
                let _one_at_a_time = hook_shared.lock_checkpoint();
                let _ = wal.checkpoint();
            } else if frames >= SOFT_FRAMES {
                hook_shared.update(|s| s.pending = true);
            }
            Ok(())
        }))?;
        Ok(Checkpointer {
            shared,
            thread: Some(thread),
        })
    }
}

fn checkpoint_loop(conn: &Connection, shared: &Shared) {
    loop {
        {
            let mut signal = shared
                .wake
                .wait_while(
                    shared.signal.lock().unwrap_or_else(PoisonError::into_inner),
                    |s| !s.pending && !s.stop,
                )
                .unwrap_or_else(PoisonError::into_inner);
            if signal.stop {
                return;
            }
            signal.pending = false;
        }
        // A failed checkpoint loses nothing: the frames stay in the WAL and
        // the next signal retries.
        let _one_at_a_time = shared.lock_checkpoint();
        let _ = conn.wal_checkpoint_v2(None::<&str>, rusqlite::wal::CheckpointMode::PASSIVE);
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.shared.update(|s| s.stop = true);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
