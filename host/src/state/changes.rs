//! Row changes of processor tables, seen by SQLite's pre-update hook: how
//! many rows an event wrote, a digest of what it wrote (for the tape's
//! per-event results) and, when kept, the changes in full (for replays).
//! Host tables (`_rewind_*`) are left out.
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
    /// When digests are wanted (a replay compares kept changes instead).
    hasher: Option<Sha256>,
    /// Every change in full, when kept (replays need them; tapes need only
    /// the digest).
    kept: Option<ChangeLog>,
    /// The row after a change, encoded while the row before is (reused).
    after: Vec<u8>,
}

impl Acc {
    /// `capacity`: bytes to reserve for the change log, when kept.
    fn new(keep: bool, digest: bool, capacity: usize) -> Acc {
        Acc {
            rows: 0,
            hasher: digest.then(|| Sha256::new_with_prefix(DIGEST_PREFIX)),
            kept: keep.then(|| ChangeLog {
                bytes: Vec::with_capacity(capacity),
                count: 0,
            }),
            after: Vec::new(),
        }
    }

    /// A fresh accumulator like this one, which it leaves without its
    /// scratch buffer. Its log reserves half again what this one's used:
    /// events of a stream write alike, so the log rarely grows (each growth
    /// copies it), and one large event is not reserved for ever after.
    fn renew(&mut self) -> Acc {
        let used = self.kept.as_ref().map_or(0, |log| log.bytes.len());
        let mut fresh = Acc::new(self.kept.is_some(), self.hasher.is_some(), used + used / 2);
        fresh.after = std::mem::take(&mut self.after);
        fresh
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

/// Row changes in full, encoded back to back in one buffer: capturing them
/// costs no allocation per value, and they are decoded ([`ChangeLog::decode`])
/// only where a replay finds the versions' writes differ.
///
/// Per change: the table (u32 length, bytes), a byte saying which rows
/// follow (1: before, 2: after), then each row as a u32 column count and
/// its values (`put_value`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChangeLog {
    bytes: Vec<u8>,
    count: u32,
}

const HAS_BEFORE: u8 = 1;
const HAS_AFTER: u8 = 2;

impl ChangeLog {
    /// The number of changes.
    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// Whether no row changed.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Every change, in order.
    pub fn decode(&self) -> Vec<Change> {
        let mut changes = Vec::with_capacity(self.len());
        let mut r = Reader(&self.bytes);
        for _ in 0..self.count {
            let len = r.u32() as usize;
            let table = String::from_utf8_lossy(r.take(len)).into_owned();
            let rows = r.take(1).first().copied().unwrap_or_default();
            let before = (rows & HAS_BEFORE != 0).then(|| r.row());
            let after = (rows & HAS_AFTER != 0).then(|| r.row());
            changes.push(Change {
                table,
                before,
                after,
            });
        }
        changes
    }

    /// Starts a change: its table and which rows follow (the caller
    /// appends them).
    fn begin(&mut self, table: &[u8], rows: u8) {
        self.count += 1;
        self.bytes
            .extend_from_slice(&(table.len() as u32).to_le_bytes());
        self.bytes.extend_from_slice(table);
        self.bytes.push(rows);
    }
}

/// Reads what [`ChangeLog`] wrote. The log is only ever written by this
/// module, so it is well formed; a short read yields empty values rather
/// than a panic.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.0.len());
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        head
    }

    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take(4).try_into().unwrap_or_default())
    }

    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take(8).try_into().unwrap_or_default())
    }

    fn row(&mut self) -> Vec<SqlValue> {
        let width = self.u32() as usize;
        let mut row = Vec::with_capacity(width.min(self.0.len()));
        for _ in 0..width {
            if self.0.is_empty() {
                break;
            }
            let tag = self.take(1).first().copied().unwrap_or_default();
            row.push(match tag {
                1 => SqlValue::Integer(self.u64() as i64),
                2 => SqlValue::Real(f64::from_bits(self.u64())),
                3 => {
                    let len = self.u64() as usize;
                    SqlValue::Text(String::from_utf8_lossy(self.take(len)).into_owned())
                }
                4 => {
                    let len = self.u64() as usize;
                    SqlValue::Blob(self.take(len).to_vec())
                }
                _ => SqlValue::Null,
            });
        }
        row
    }
}

/// What a row digest's byte stream starts with.
const DIGEST_PREFIX: &[u8] = b"rewind-rows-v1\0";

/// The digest of no changes at all.
fn empty_digest() -> [u8; 32] {
    Sha256::new_with_prefix(DIGEST_PREFIX).finalize().into()
}

/// The registered hook and what it accumulated since the last
/// [`Changes::take`]. Drop it before its connection closes.
pub(super) struct Changes {
    db: *mut ffi::sqlite3,
    hooked: *mut Hooked,
}

/// What the hook is registered with.
struct Hooked {
    /// The database stores text as UTF-8 (as every state DB rewind makes
    /// does): a text value's bytes can be read as they are stored.
    utf8: bool,
    acc: Mutex<Acc>,
}

// SAFETY: a `Changes` belongs to one `StateDb` and moves with its
// connection (which is `Send`); SQLite calls the hook only from the thread
// using that connection, and `acc` is behind a mutex.
unsafe impl Send for Changes {}

impl Changes {
    /// Registers the hook on `db`: `keep` the changes in full, and/or
    /// `digest` them. `utf8`: the database's text encoding is UTF-8.
    ///
    /// # Safety
    /// `db` must stay open until the returned value is dropped.
    pub(super) unsafe fn register(
        db: *mut ffi::sqlite3,
        keep: bool,
        digest: bool,
        utf8: bool,
    ) -> Changes {
        let hooked = Box::into_raw(Box::new(Hooked {
            utf8,
            acc: Mutex::new(Acc::new(keep, digest, 0)),
        }));
        // SAFETY: `hooked` lives until `drop`, which unregisters the hook first.
        unsafe {
            ffi::sqlite3_preupdate_hook(db, Some(hook), hooked.cast());
        }
        Changes { db, hooked }
    }

    fn acc(&self) -> std::sync::MutexGuard<'_, Acc> {
        // SAFETY: `hooked` is valid while `self` is.
        unsafe { &(*self.hooked).acc }
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Rows changed and their digest since the last call; starts afresh.
    pub(super) fn take(&self) -> EventChanges {
        let mut acc = self.acc();
        let fresh = acc.renew();
        let done = std::mem::replace(&mut *acc, fresh);
        EventChanges {
            rows: done.rows,
            digest: done.hasher.map_or([0; 32], |h| h.finalize().into()),
            changes: done.kept.unwrap_or_default(),
        }
    }

    /// Forgets the changes since the last [`Changes::take`].
    pub(super) fn reset(&self) {
        let mut acc = self.acc();
        *acc = acc.renew();
    }
}

impl Drop for Changes {
    fn drop(&mut self) {
        // SAFETY: the connection is still open (the owner drops us first);
        // after unregistering, SQLite no longer holds `acc`.
        unsafe {
            ffi::sqlite3_preupdate_hook(self.db, None, std::ptr::null_mut());
            drop(Box::from_raw(self.hooked));
        }
    }
}

/// The row changes of one event.
#[derive(Debug, Clone, PartialEq)]
pub struct EventChanges {
    pub rows: u32,
    /// Zeros when the capture computes no digests.
    pub digest: [u8; 32],
    /// In order; empty unless kept.
    pub changes: ChangeLog,
}

impl EventChanges {
    /// An event that changed nothing.
    pub fn none() -> EventChanges {
        EventChanges {
            rows: 0,
            digest: empty_digest(),
            changes: ChangeLog::default(),
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
    let (hooked, db_name, table) = unsafe {
        (
            &*(ctx as *const Hooked),
            CStr::from_ptr(db_name).to_bytes(),
            CStr::from_ptr(table).to_bytes(),
        )
    };
    if db_name != b"main" || table.starts_with(b"_rewind_") {
        return;
    }
    let utf8 = hooked.utf8;
    let mut acc = hooked.acc.lock().unwrap_or_else(PoisonError::into_inner);
    let acc = &mut *acc;
    acc.rows = acc.rows.saturating_add(1);
    let mut h = acc.hasher.as_mut();
    if let Some(h) = h.as_mut() {
        h.update((table.len() as u32).to_le_bytes());
        h.update(table);
        h.update(op.to_le_bytes());
    }
    let (has_before, has_after) = (op != ffi::SQLITE_INSERT, op != ffi::SQLITE_DELETE);
    // The before row goes straight into the log, the after row into a
    // scratch buffer appended behind it: one pass over the columns.
    let after = &mut acc.after;
    after.clear();
    let mut kept = acc.kept.as_mut();
    if let Some(log) = kept.as_mut() {
        let rows = if has_before { HAS_BEFORE } else { 0 } | if has_after { HAS_AFTER } else { 0 };
        log.begin(table, rows);
    }
    // SAFETY: inside the hook the pre-update accessors are valid for `db`.
    unsafe {
        let columns = ffi::sqlite3_preupdate_count(db).max(0);
        if let Some(log) = kept.as_mut() {
            let width = (columns as u32).to_le_bytes();
            if has_before {
                log.bytes.extend_from_slice(&width);
            }
            if has_after {
                after.extend_from_slice(&width);
            }
        }
        for i in 0..columns {
            let mut value = std::ptr::null_mut();
            // A value SQLite cannot read is left out of the digest (as it
            // always was) and reads as NULL in the log, which keeps the
            // row's width.
            if has_before {
                let v = (ffi::sqlite3_preupdate_old(db, i, &mut value) == 0)
                    .then(|| value_ref(value, utf8));
                if let (Some(h), Some(v)) = (h.as_mut(), v) {
                    hash_value(h, v);
                }
                if let Some(log) = kept.as_mut() {
                    put_value(&mut log.bytes, v.flatten().unwrap_or(ValueRef::Null));
                }
            }
            if has_after {
                let v = (ffi::sqlite3_preupdate_new(db, i, &mut value) == 0)
                    .then(|| value_ref(value, utf8));
                if let (Some(h), Some(v)) = (h.as_mut(), v) {
                    hash_value(h, v);
                }
                if kept.is_some() {
                    put_value(after, v.flatten().unwrap_or(ValueRef::Null));
                }
            }
        }
    }
    if let Some(log) = kept {
        log.bytes.extend_from_slice(after);
    }
}

/// A value SQLite handed out, borrowed (`None`: the pointer is null).
/// In a `utf8` database a text is read as it is stored
/// (`sqlite3_value_blob`: the same bytes) rather than through
/// `sqlite3_value_text`, which first copies it to add a terminating NUL
/// (~120 instructions a text, ~1% of a replay).
///
/// # Safety
/// `value` is null or a value SQLite handed out for the current call; the
/// result lives no longer than that call.
unsafe fn value_ref<'a>(value: *mut ffi::sqlite3_value, utf8: bool) -> Option<ValueRef<'a>> {
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
            ffi::SQLITE_TEXT if utf8 => {
                ValueRef::Text(bytes(ffi::sqlite3_value_blob(value).cast()))
            }
            ffi::SQLITE_TEXT => ValueRef::Text(bytes(ffi::sqlite3_value_text(value).cast())),
            ffi::SQLITE_BLOB => ValueRef::Blob(bytes(ffi::sqlite3_value_blob(value).cast())),
            _ => ValueRef::Null,
        })
    }
}

/// Where a value's encoding goes: a digest or a buffer.
pub(crate) trait Put {
    fn put(&mut self, bytes: &[u8]);
}

impl Put for Sha256 {
    fn put(&mut self, bytes: &[u8]) {
        self.update(bytes);
    }
}

impl Put for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

/// One value as the digests, the change log and row keys encode it: a type
/// tag (0 NULL, 1 integer, 2 real, 3 text, 4 blob), then integers and
/// reals' bits as 8 little-endian bytes, text and blobs as a u64 length and
/// their bytes.
pub(crate) fn put_value(out: &mut impl Put, value: ValueRef<'_>) {
    match value {
        ValueRef::Null => out.put(&[0]),
        ValueRef::Integer(i) => {
            out.put(&[1]);
            out.put(&i.to_le_bytes());
        }
        ValueRef::Real(r) => {
            out.put(&[2]);
            out.put(&r.to_bits().to_le_bytes());
        }
        ValueRef::Text(b) | ValueRef::Blob(b) => {
            out.put(&[if matches!(value, ValueRef::Text(_)) {
                3
            } else {
                4
            }]);
            out.put(&(b.len() as u64).to_le_bytes());
            out.put(b);
        }
    }
}

/// Hashes one value; a null pointer (no value) has a tag of its own.
fn hash_value(h: &mut Sha256, value: Option<ValueRef<'_>>) {
    match value {
        None => h.update([0xff]),
        Some(value) => put_value(h, value),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `sql` on a fresh database with the hook registered; returns what it saw.
    fn captured(keep: bool, sql: &str) -> EventChanges {
        captured_with(keep, true, sql)
    }

    fn captured_with(keep: bool, digest: bool, sql: &str) -> EventChanges {
        captured_in("UTF-8", true, keep, digest, sql)
    }

    /// As [`captured_with`], in a database of text `encoding`, with texts
    /// read as stored when `utf8`.
    fn captured_in(
        encoding: &str,
        utf8: bool,
        keep: bool,
        digest: bool,
        sql: &str,
    ) -> EventChanges {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        conn.pragma_update(None, "encoding", encoding).unwrap();
        conn.execute_batch(
            "CREATE TABLE t (k TEXT PRIMARY KEY, i INTEGER, r REAL, b BLOB, n);
             CREATE TABLE _rewind_meta (key TEXT);",
        )
        .unwrap();
        let stored: String = conn
            .pragma_query_value(None, "encoding", |row| row.get(0))
            .unwrap();
        assert_eq!(stored, encoding);
        // SAFETY: `changes` is dropped before `conn`.
        let changes = unsafe { Changes::register(conn.handle(), keep, digest, utf8) };
        conn.execute_batch(sql).unwrap();
        let taken = changes.take();
        drop(changes);
        taken
    }

    const WRITES: &str = "INSERT INTO t VALUES ('a', 1, 1.5, x'00ff', NULL);
         INSERT INTO _rewind_meta VALUES ('host tables are left out');
         UPDATE t SET i = -7, k = 'é' WHERE k = 'a';
         DELETE FROM t WHERE k = 'é';";

    #[test]
    fn kept_changes_decode_to_every_row_in_order_and_the_digest_does_not_depend_on_keeping() {
        let kept = captured(true, WRITES);
        let row = |k: &str, i: i64| {
            vec![
                SqlValue::Text(k.into()),
                SqlValue::Integer(i),
                SqlValue::Real(1.5),
                SqlValue::Blob(vec![0, 0xff]),
                SqlValue::Null,
            ]
        };
        let change = |before, after| Change {
            table: "t".into(),
            before,
            after,
        };
        assert_eq!(
            kept.changes.decode(),
            vec![
                change(None, Some(row("a", 1))),
                change(Some(row("a", 1)), Some(row("é", -7))),
                change(Some(row("é", -7)), None),
            ]
        );
        assert_eq!(kept.rows, 3);
        assert_eq!(kept.changes.len(), 3);
        let digest_only = captured(false, WRITES);
        assert!(digest_only.changes.is_empty());
        assert_eq!(digest_only.rows, 3);
        assert_eq!(digest_only.digest, kept.digest);
        // A replay keeps the changes without digesting them.
        let undigested = captured_with(true, false, WRITES);
        assert_eq!(undigested.changes, kept.changes);
        assert_eq!(undigested.rows, 3);
        assert_eq!(undigested.digest, [0; 32]);
        assert_ne!(kept.digest, EventChanges::none().digest);
    }

    /// Texts read as they are stored (a UTF-8 database) give the same log
    /// and digest as texts read through `sqlite3_value_text`; a UTF-16
    /// database's texts are read converted, to the same UTF-8 bytes.
    #[test]
    fn texts_read_as_stored_equal_texts_read_as_text() {
        let stored = captured_in("UTF-8", true, true, true, WRITES);
        assert_eq!(captured_in("UTF-8", false, true, true, WRITES), stored);
        assert_eq!(captured_in("UTF-16le", false, true, true, WRITES), stored);
        assert_eq!(
            stored.changes.decode()[1].after.as_ref().unwrap()[0],
            SqlValue::Text("é".into())
        );
    }

    /// The digest's byte stream is part of the tape format (recorded
    /// digests are checked by `verify`): spelled out here byte by byte.
    #[test]
    fn the_row_digest_is_sha256_over_the_documented_stream() {
        let digest = captured(false, "INSERT INTO t VALUES ('a', 1, 1.5, x'00ff', NULL)").digest;
        let mut h = Sha256::new();
        h.update(b"rewind-rows-v1\0");
        h.update(1u32.to_le_bytes());
        h.update(b"t");
        h.update(ffi::SQLITE_INSERT.to_le_bytes());
        h.update([3]);
        h.update(1u64.to_le_bytes());
        h.update(b"a");
        h.update([1]);
        h.update(1i64.to_le_bytes());
        h.update([2]);
        h.update(1.5f64.to_bits().to_le_bytes());
        h.update([4]);
        h.update(2u64.to_le_bytes());
        h.update([0x00, 0xff]);
        h.update([0]);
        let expected: [u8; 32] = h.finalize().into();
        assert_eq!(digest, expected);
    }

    #[test]
    fn a_truncated_log_decodes_without_panicking() {
        let kept = captured(true, WRITES);
        for cut in 0..kept.changes.bytes.len() {
            let log = ChangeLog {
                bytes: kept.changes.bytes[..cut].to_vec(),
                count: kept.changes.count,
            };
            assert_eq!(log.decode().len(), 3);
        }
    }
}
