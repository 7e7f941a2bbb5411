//! A ceiling on the memory SQLite may hold, so guest SQL cannot exhaust the
//! machine's.
//!
//! A statement can make SQLite hold many large values at once: a sort keeps
//! every row it sorts (with `temp_store = MEMORY`, even what it spills), and
//! a row keeps all its columns, each up to the 65 MiB value limit. Forty
//! 50 MB strings sorted took 2.2 GB; a few hundred would have the kernel
//! kill the process. Fuel does not help: that is a few thousand VM steps.
//!
//! SQLite's heap limits are process-wide: past the soft limit its page
//! caches recycle pages instead of growing; past the hard limit an
//! allocation fails and the statement with it (`SQLITE_NOMEM`). Which
//! statement reaches the limit depends on what else the process holds (the
//! other side of a replay, other partitions' caches), so a guest statement
//! that does stops the run, as a stalled one does, rather than becoming a
//! dead letter.

use std::sync::Once;
use std::sync::atomic::{AtomicU64, Ordering};

/// The default ceiling: far above what real events need (a state DB's page
/// cache is 64 MiB), far below this kind of machine's memory.
pub const DEFAULT_SQL_MEMORY_MB: u64 = 4096;

static LIMIT: AtomicU64 = AtomicU64::new(0);
static DEFAULT: Once = Once::new();

/// Sets the ceiling (bytes) for the whole process; the page caches start
/// recycling at half of it.
pub fn limit_sql_memory(bytes: u64) {
    let bytes = bytes.min(i64::MAX as u64);
    LIMIT.store(bytes, Ordering::Relaxed);
    // SAFETY: plain setters of SQLite's global configuration, safe to call
    // at any time from any thread.
    unsafe {
        rusqlite::ffi::sqlite3_hard_heap_limit64(bytes as i64);
        rusqlite::ffi::sqlite3_soft_heap_limit64((bytes / 2) as i64);
    }
}

/// Applies the default ceiling unless one was set already.
pub(super) fn ensure_limit() {
    DEFAULT.call_once(|| {
        if LIMIT.load(Ordering::Relaxed) == 0 {
            limit_sql_memory(DEFAULT_SQL_MEMORY_MB << 20);
        }
    });
}

/// The ceiling in force, in MiB.
pub(super) fn limit_mib() -> u64 {
    LIMIT.load(Ordering::Relaxed) >> 20
}
