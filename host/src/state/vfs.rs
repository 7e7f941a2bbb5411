//! A thin SQLite VFS whose clock is the current event's timestamp.
//!
//! SQLite reads `'now'` and `CURRENT_TIMESTAMP`/`CURRENT_DATE`/`CURRENT_TIME`
//! through the VFS's `xCurrentTimeInt64`. This VFS is a copy of the default
//! one with only the two clock methods replaced, so every file operation is
//! still the platform's own. The clock reads a thread-local cell that the
//! runtime sets around guest code: the host runs a guest and its SQL on one
//! thread, and the cell is empty (real time) for the host's own statements.

use std::cell::Cell;
use std::ffi::{CStr, c_int};
use std::ptr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicPtr, Ordering};

use rusqlite::ffi;

/// The name the VFS is registered under.
pub const NAME: &str = "rewind";
const NAME_C: &CStr = c"rewind";

/// The Julian day of the Unix epoch, in milliseconds (2440587.5 days).
const UNIX_EPOCH_JULIAN_MS: i64 = 210_866_760_000_000;

thread_local! {
    static EVENT_TIME_MS: Cell<Option<i64>> = const { Cell::new(None) };
}

static DEFAULT_VFS: AtomicPtr<ffi::sqlite3_vfs> = AtomicPtr::new(ptr::null_mut());
static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();

/// While alive, SQL on this thread sees `now` as the given event time.
#[must_use]
pub struct EventClock {
    previous: Option<i64>,
}

impl EventClock {
    pub fn enter(timestamp_ms: i64) -> Self {
        let previous = EVENT_TIME_MS.with(|cell| cell.replace(Some(timestamp_ms)));
        EventClock { previous }
    }
}

impl Drop for EventClock {
    fn drop(&mut self) {
        EVENT_TIME_MS.with(|cell| cell.set(self.previous));
    }
}

/// Registers the VFS once per process (not as the default).
pub fn register() -> Result<(), String> {
    REGISTERED
        .get_or_init(|| {
            // SAFETY: `sqlite3_vfs_find` returns SQLite's static default VFS,
            // which lives for the whole process. We copy it by value, change
            // the name and the clock, and leak the copy so the pointer SQLite
            // keeps stays valid forever.
            unsafe {
                if ffi::sqlite3_initialize() != ffi::SQLITE_OK {
                    return Err("sqlite3_initialize failed".to_owned());
                }
                let default = ffi::sqlite3_vfs_find(ptr::null());
                if default.is_null() {
                    return Err("SQLite has no default VFS".to_owned());
                }
                DEFAULT_VFS.store(default, Ordering::SeqCst);
                let mut vfs = *default;
                vfs.zName = NAME_C.as_ptr();
                vfs.pNext = ptr::null_mut();
                vfs.xCurrentTime = Some(current_time);
                if vfs.iVersion >= 2 {
                    vfs.xCurrentTimeInt64 = Some(current_time_int64);
                }
                let vfs: &'static mut ffi::sqlite3_vfs = Box::leak(Box::new(vfs));
                match ffi::sqlite3_vfs_register(vfs, 0) {
                    ffi::SQLITE_OK => Ok(()),
                    rc => Err(format!("sqlite3_vfs_register failed with code {rc}")),
                }
            }
        })
        .clone()
}

unsafe extern "C" fn current_time_int64(_vfs: *mut ffi::sqlite3_vfs, out: *mut i64) -> c_int {
    match EVENT_TIME_MS.with(Cell::get) {
        Some(ms) => {
            // SAFETY: SQLite passes a valid pointer to write the time to.
            unsafe { *out = ms.saturating_add(UNIX_EPOCH_JULIAN_MS) };
            ffi::SQLITE_OK
        }
        None => {
            let default = DEFAULT_VFS.load(Ordering::SeqCst);
            // SAFETY: `default` is SQLite's static default VFS (see `register`).
            unsafe {
                match (*default).xCurrentTimeInt64 {
                    Some(real) => real(default, out),
                    None => ffi::SQLITE_ERROR,
                }
            }
        }
    }
}

unsafe extern "C" fn current_time(vfs: *mut ffi::sqlite3_vfs, out: *mut f64) -> c_int {
    let mut ms = 0i64;
    // SAFETY: forwards SQLite's own arguments; `ms` is a valid local.
    let rc = unsafe { current_time_int64(vfs, &mut ms) };
    if rc == ffi::SQLITE_OK {
        // SAFETY: SQLite passes a valid pointer to write the time to.
        unsafe { *out = ms as f64 / 86_400_000.0 };
    }
    rc
}
