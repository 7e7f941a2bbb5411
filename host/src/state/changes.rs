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
use rusqlite::types::{Value as SqlValue, ValueRef};
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
fn empty_digest() -> [u8; 32] {
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
    pub(super) fn take(&self) -> EventChanges {
        let mut acc = self.acc();
        let keep = acc.kept.is_some();
        let done = std::mem::replace(&mut *acc, Acc::new(keep));
        EventChanges {
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

/// The row changes of one event.
#[derive(Debug, Clone, PartialEq)]
pub struct EventChanges {
    pub rows: u32,
    pub digest: [u8; 32],
    /// In order; empty unless kept.
    pub changes: Vec<Change>,
}

impl EventChanges {
    /// An event that changed nothing.
    pub fn none() -> EventChanges {
        EventChanges {
            rows: 0,
            digest: empty_digest(),
            changes: Vec::new(),
        }
    }
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
                let v = value_ref(value);
                hash_value(h, v);
                if keep {
                    before.push(owned(v));
                }
            }
            if op != ffi::SQLITE_DELETE && ffi::sqlite3_preupdate_new(db, i, &mut value) == 0 {
                let v = value_ref(value);
                hash_value(h, v);
                if keep {
                    after.push(owned(v));
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

/// A value SQLite handed out, borrowed (`None`: the pointer is null).
///
/// # Safety
/// `value` is null or a value SQLite handed out for the current call; the
/// result lives no longer than that call.
unsafe fn value_ref<'a>(value: *mut ffi::sqlite3_value) -> Option<ValueRef<'a>> {
    if value.is_null() {
        return None;
    }
    // SAFETY: per the function's contract.
    unsafe {
        let bytes = |data: *const u8| {
            let len = ffi::sqlite3_value_bytes(value).max(0) as usize;
            if data.is_null() || len == 0 {
                &[][..]
            } else {
                std::slice::from_raw_parts(data, len)
            }
        };
        Some(match ffi::sqlite3_value_type(value) {
            ffi::SQLITE_INTEGER => ValueRef::Integer(ffi::sqlite3_value_int64(value)),
            ffi::SQLITE_FLOAT => ValueRef::Real(ffi::sqlite3_value_double(value)),
            ffi::SQLITE_TEXT => ValueRef::Text(bytes(ffi::sqlite3_value_text(value).cast())),
            ffi::SQLITE_BLOB => ValueRef::Blob(bytes(ffi::sqlite3_value_blob(value).cast())),
            _ => ValueRef::Null,
        })
    }
}

/// An owned copy of a value.
fn owned(value: Option<ValueRef<'_>>) -> SqlValue {
    match value {
        None | Some(ValueRef::Null) => SqlValue::Null,
        Some(ValueRef::Integer(i)) => SqlValue::Integer(i),
        Some(ValueRef::Real(r)) => SqlValue::Real(r),
        Some(ValueRef::Text(t)) => SqlValue::Text(String::from_utf8_lossy(t).into_owned()),
        Some(ValueRef::Blob(b)) => SqlValue::Blob(b.to_vec()),
    }
}

/// Hashes one value: its type, then its bytes.
fn hash_value(h: &mut Sha256, value: Option<ValueRef<'_>>) {
    match value {
        None => h.update([0xff]),
        Some(ValueRef::Null) => h.update([0]),
        Some(ValueRef::Integer(i)) => {
            h.update([1]);
            h.update(i.to_le_bytes());
        }
        Some(ValueRef::Real(r)) => {
            h.update([2]);
            h.update(r.to_bits().to_le_bytes());
        }
        Some(ValueRef::Text(b)) | Some(ValueRef::Blob(b)) => {
            h.update([if matches!(value, Some(ValueRef::Text(_))) {
                3
            } else {
                4
            }]);
            h.update((b.len() as u64).to_le_bytes());
            h.update(b);
        }
    }
}
