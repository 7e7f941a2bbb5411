//! Row changes of processor tables, seen by SQLite's pre-update hook: how
//! many rows an event wrote, and a digest of what it wrote, for the tape's
//! per-event results. Host tables (`_rewind_*`) are left out.
//!
//! The bundled SQLite is compiled with `SQLITE_ENABLE_PREUPDATE_HOOK` (see
//! `.cargo/config.toml`); rusqlite's own wrapper would need libclang to
//! regenerate bindings, so the hook is registered here directly.

use std::ffi::{CStr, c_char, c_int, c_void};
use std::sync::{Mutex, PoisonError};

use rusqlite::ffi;
use rusqlite::types::Value as SqlValue;
use sha2::{Digest, Sha256};

struct Acc {
    rows: u32,
    hasher: Sha256,
    /// Every change in full, when kept (replays need them; tapes need only
    /// the digest).
    kept: Option<Vec<Change>>,
}

impl Acc {
    fn new(keep: bool) -> Acc {
        let mut hasher = Sha256::new();
        hasher.update(b"rewind-rows-v1\0");
        Acc {
            rows: 0,
            hasher,
            kept: keep.then(Vec::new),
        }
    }
}

/// One row change of a processor table.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub table: String,
    /// The row before (updates and deletes) and after (inserts and updates).
    pub before: Option<Vec<SqlValue>>,
    pub after: Option<Vec<SqlValue>>,
}

/// The digest of no changes at all.
pub fn empty_digest() -> [u8; 32] {
    Acc::new(false).hasher.finalize().into()
}

/// The registered hook and what it accumulated since the last
/// [`Changes::take`]. Drop it before its connection closes.
pub(super) struct Changes {
    db: *mut ffi::sqlite3,
    acc: *mut Mutex<Acc>,
}

// SAFETY: a `Changes` belongs to one `StateDb` and moves with its
// connection (which is `Send`); SQLite calls the hook only from the thread
// using that connection, and `acc` is behind a mutex.
unsafe impl Send for Changes {}

impl Changes {
    /// Registers the hook on `db`.
    ///
    /// # Safety
    /// `db` must stay open until the returned value is dropped.
    pub(super) unsafe fn register(db: *mut ffi::sqlite3, keep: bool) -> Changes {
        let acc = Box::into_raw(Box::new(Mutex::new(Acc::new(keep))));
        // SAFETY: `acc` lives until `drop`, which unregisters the hook first.
        unsafe {
            ffi::sqlite3_preupdate_hook(db, Some(hook), acc.cast());
        }
        Changes { db, acc }
    }

    fn acc(&self) -> std::sync::MutexGuard<'_, Acc> {
        // SAFETY: `acc` is valid while `self` is.
        unsafe { &*self.acc }
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Rows changed and their digest since the last call; starts afresh.
    pub(super) fn take(&self) -> Taken {
        let mut acc = self.acc();
        let keep = acc.kept.is_some();
        let done = std::mem::replace(&mut *acc, Acc::new(keep));
        Taken {
            rows: done.rows,
            digest: done.hasher.finalize().into(),
            changes: done.kept.unwrap_or_default(),
        }
    }

    /// Forgets the changes since the last [`Changes::take`].
    pub(super) fn reset(&self) {
        let mut acc = self.acc();
        let keep = acc.kept.is_some();
        *acc = Acc::new(keep);
    }
}

impl Drop for Changes {
    fn drop(&mut self) {
        // SAFETY: the connection is still open (the owner drops us first);
        // after unregistering, SQLite no longer holds `acc`.
        unsafe {
            ffi::sqlite3_preupdate_hook(self.db, None, std::ptr::null_mut());
            drop(Box::from_raw(self.acc));
        }
    }
}

/// What an event changed.
pub(super) struct Taken {
    pub rows: u32,
    pub digest: [u8; 32],
    /// Empty unless changes are kept.
    pub changes: Vec<Change>,
}

/// Called by SQLite before each row change. Never panics.
unsafe extern "C" fn hook(
    ctx: *mut c_void,
    db: *mut ffi::sqlite3,
    op: c_int,
    db_name: *const c_char,
    table: *const c_char,
    _old_rowid: i64,
    _new_rowid: i64,
) {
    // SAFETY: SQLite passes the context we registered and NUL-terminated
    // names valid for the call.
    let (acc, db_name, table) = unsafe {
        (
            &*(ctx as *const Mutex<Acc>),
            CStr::from_ptr(db_name).to_bytes(),
            CStr::from_ptr(table).to_bytes(),
        )
    };
    if db_name != b"main" || table.starts_with(b"_rewind_") {
        return;
    }
    let mut acc = acc.lock().unwrap_or_else(PoisonError::into_inner);
    let acc = &mut *acc;
    acc.rows = acc.rows.saturating_add(1);
    let h = &mut acc.hasher;
    h.update((table.len() as u32).to_le_bytes());
    h.update(table);
    h.update(op.to_le_bytes());
    let keep = acc.kept.is_some();
    let (mut before, mut after) = (Vec::new(), Vec::new());
    // SAFETY: inside the hook the pre-update accessors are valid for `db`.
    unsafe {
        let columns = ffi::sqlite3_preupdate_count(db);
        for i in 0..columns {
            let mut value = std::ptr::null_mut();
            if op != ffi::SQLITE_INSERT && ffi::sqlite3_preupdate_old(db, i, &mut value) == 0 {
                hash_value(h, value);
                if keep {
                    before.push(owned(value));
                }
            }
            if op != ffi::SQLITE_DELETE && ffi::sqlite3_preupdate_new(db, i, &mut value) == 0 {
                hash_value(h, value);
                if keep {
                    after.push(owned(value));
                }
            }
        }
    }
    if let Some(kept) = acc.kept.as_mut() {
        kept.push(Change {
            table: String::from_utf8_lossy(table).into_owned(),
            before: (op != ffi::SQLITE_INSERT).then_some(before),
            after: (op != ffi::SQLITE_DELETE).then_some(after),
        });
    }
}

/// An owned copy of a value SQLite handed out.
///
/// # Safety
/// As for [`hash_value`].
unsafe fn owned(value: *mut ffi::sqlite3_value) -> SqlValue {
    if value.is_null() {
        return SqlValue::Null;
    }
    // SAFETY: per the function's contract.
    unsafe {
        match ffi::sqlite3_value_type(value) {
            ffi::SQLITE_INTEGER => SqlValue::Integer(ffi::sqlite3_value_int64(value)),
            ffi::SQLITE_FLOAT => SqlValue::Real(ffi::sqlite3_value_double(value)),
            kind @ (ffi::SQLITE_TEXT | ffi::SQLITE_BLOB) => {
                let data = if kind == ffi::SQLITE_TEXT {
                    ffi::sqlite3_value_text(value).cast::<u8>()
                } else {
                    ffi::sqlite3_value_blob(value).cast::<u8>()
                };
                let len = ffi::sqlite3_value_bytes(value).max(0) as usize;
                let bytes = if data.is_null() || len == 0 {
                    Vec::new()
                } else {
                    std::slice::from_raw_parts(data, len).to_vec()
                };
                if kind == ffi::SQLITE_TEXT {
                    SqlValue::Text(String::from_utf8_lossy(&bytes).into_owned())
                } else {
                    SqlValue::Blob(bytes)
                }
            }
            _ => SqlValue::Null,
        }
    }
}

/// Hashes one value: its type, then its bytes.
///
/// # Safety
/// `value` is null or a value SQLite handed out for the current call.
unsafe fn hash_value(h: &mut Sha256, value: *mut ffi::sqlite3_value) {
    if value.is_null() {
        h.update([0xff]);
        return;
    }
    // SAFETY: per the function's contract.
    unsafe {
        match ffi::sqlite3_value_type(value) {
            ffi::SQLITE_INTEGER => {
                h.update([1]);
                h.update(ffi::sqlite3_value_int64(value).to_le_bytes());
            }
            ffi::SQLITE_FLOAT => {
                h.update([2]);
                h.update(ffi::sqlite3_value_double(value).to_bits().to_le_bytes());
            }
            kind @ (ffi::SQLITE_TEXT | ffi::SQLITE_BLOB) => {
                let data = if kind == ffi::SQLITE_TEXT {
                    ffi::sqlite3_value_text(value).cast::<u8>()
                } else {
                    ffi::sqlite3_value_blob(value).cast::<u8>()
                };
                let len = ffi::sqlite3_value_bytes(value).max(0) as usize;
                h.update([if kind == ffi::SQLITE_TEXT { 3 } else { 4 }]);
                h.update((len as u64).to_le_bytes());
                if !data.is_null() && len > 0 {
                    h.update(std::slice::from_raw_parts(data, len));
                }
            }
            _ => h.update([0]),
        }
    }
}
