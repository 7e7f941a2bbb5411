//! Prepared statements kept by their text: the guest's, and the host's
//! own that run per event.
//!
//! A processor runs the same few statements for every event. rusqlite's
//! statement cache hashes a statement's text twice per use (to take the
//! statement out of its LRU and to put it back) and clears its bindings on
//! return; for the two or three statements of a payments event that was 4%
//! of a run. Here a statement stays where it is: a use is a scan of a short
//! list comparing lengths first, and binding every parameter again
//! replaces the old bindings.
//!
//! The guest's `execute` statements are [`Direct`]: run through SQLite's C
//! API so that their text and blob parameters are bound in place instead of
//! copied (1.6% of a payments run's instructions).
//!
//! `sqlite3_clear_bindings` marks a statement whose plan SQLite may tailor
//! to bound values (an `ORDER BY` that an index serves, a `LIMIT ?`, a
//! `LIKE ?`) as expired, and its next use parses and plans it again; binding
//! one parameter anew does that only for a parameter the plan was tailored
//! to. So a statement that SQLite had to prepare again lets go of its
//! parameters one by one after a run; the others (all of payments') clear
//! them at once, which is cheaper (~170 instructions an event).
//!
//! The statements borrow the connection for as long as they live, which
//! Rust cannot express between two fields of one struct, so they are kept
//! as `Statement<'static>` or raw handles under the rules written at
//! [`Statements`].

use std::cell::RefCell;
use std::ffi::c_int;
use std::ptr::{self, NonNull};
use std::str::Utf8Error;

use rusqlite::types::ValueRef;
use rusqlite::{Connection, Statement, ffi};

/// Statements kept at most: more than any real processor uses, few enough
/// that a scan is cheap. A guest that builds its SQL text per event evicts
/// the oldest.
const CAPACITY: usize = 64;

/// A statement prepared on a connection, as [`Statements`] keeps it.
pub(super) trait Kept: Sized {
    fn prepare(conn: &Connection, sql: &str) -> rusqlite::Result<Self>;
    /// Lets go of the values bound to it (they may be large).
    fn release(&mut self);
}

impl Kept for Statement<'static> {
    fn prepare(conn: &Connection, sql: &str) -> rusqlite::Result<Self> {
        let statement = conn.prepare(sql)?;
        // SAFETY: see the rules at `Statements`: the connection outlives
        // the statement and stays where it is while the statement lives.
        Ok(unsafe { std::mem::transmute::<Statement<'_>, Statement<'static>>(statement) })
    }

    fn release(&mut self) {
        for index in 1..=self.parameter_count() {
            // Binding NULL cannot fail for an index the statement has.
            let _ = self.raw_bind_parameter(index, rusqlite::types::Null);
        }
    }
}

/// Prepared statements of one connection. A connection has several sets:
/// the guest's, prepared under its authorizer, and the host's, so that
/// neither can run a statement the other prepared.
///
/// # Safety rules (upheld by `StateDb`)
/// - The connection is boxed, so it does not move while statements point at it.
/// - This is dropped before the connection (it is declared before it), and
///   cleared before anything takes the connection mutably.
pub(super) struct Statements<S = Statement<'static>> {
    /// Oldest first.
    entries: RefCell<Vec<(Box<str>, S)>>,
}

impl<S> Default for Statements<S> {
    fn default() -> Self {
        Statements {
            entries: RefCell::new(Vec::new()),
        }
    }
}

// SAFETY: the statements (rusqlite's or raw handles, the two `Kept` kinds)
// belong to one connection and live only inside the `StateDb` that owns it,
// so they cross threads together with it, and a connection (opened in
// SQLite's multi-thread mode) may be used from any one thread at a time.
// Not `Sync`: the `RefCell` keeps them to one thread.
unsafe impl<S: Kept> Send for Statements<S> {}

impl<S: Kept> Statements<S> {
    /// Runs `f` with the prepared statement for `sql`, preparing it on `conn`
    /// first if it is not kept yet. A statement whose preparation fails is
    /// not kept. `release`: let go of the statement's bound values
    /// afterwards (they are large).
    pub(super) fn with<T>(
        &self,
        conn: &Connection,
        sql: &str,
        release: bool,
        f: impl FnOnce(&mut S) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<T> {
        self.with_text(conn, sql.as_bytes(), release, f)?
            .map_err(rusqlite::Error::from)
    }

    /// As [`Statements::with`], for a text not known to be UTF-8: only one
    /// that no kept statement has is checked (a kept statement's text is
    /// UTF-8, so bytes equal to it are too), and `Ok(Err(_))` if it is not.
    pub(super) fn with_text<T>(
        &self,
        conn: &Connection,
        sql: &[u8],
        release: bool,
        f: impl FnOnce(&mut S) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<Result<T, Utf8Error>> {
        let mut entries = self.entries.borrow_mut();
        let found = entries.iter().rposition(|(text, _)| text.as_bytes() == sql);
        let index = match found {
            Some(index) => index,
            None => {
                let sql = match std::str::from_utf8(sql) {
                    Ok(sql) => sql,
                    Err(error) => return Ok(Err(error)),
                };
                let statement = S::prepare(conn, sql)?;
                if entries.len() == CAPACITY {
                    entries.remove(0);
                }
                entries.push((sql.into(), statement));
                entries.len() - 1
            }
        };
        let statement = &mut entries[index].1;
        let result = f(statement);
        if release {
            statement.release();
        }
        result.map(Ok)
    }

    /// Finalizes every statement.
    pub(super) fn clear(&self) {
        self.entries.borrow_mut().clear();
    }
}

/// A statement run to its end through SQLite's C API, its text and blob
/// parameters bound where they are (`SQLITE_STATIC`) rather than copied:
/// rusqlite binds every one `SQLITE_TRANSIENT`, and SQLite copied each into
/// memory of its own and freed it on the next bind (~250 instructions a
/// text parameter). Its texts and blobs are unbound before [`Direct::run`]
/// returns, so the statement never points at parameters that are gone.
pub(super) struct Direct {
    raw: NonNull<ffi::sqlite3_stmt>,
    /// SQLite prepared it again since: its plan may be tailored to its
    /// bound values (see the module's docs), so its parameters are let go
    /// of one by one, which keeps the plan, instead of all at once, which
    /// is cheaper but makes SQLite plan it anew.
    tailored: bool,
}

impl Kept for Direct {
    fn prepare(conn: &Connection, sql: &str) -> rusqlite::Result<Self> {
        // rusqlite's preparation first, for its checks and its words for
        // what is wrong (syntax errors with their offset, a second statement).
        drop(conn.prepare(sql)?);
        // SAFETY: the handle is the connection's own, used on its thread.
        let db = NonNull::new(unsafe { conn.handle() }).ok_or_else(|| misuse("no connection"))?;
        let len = c_int::try_from(sql.len()).map_err(|_| misuse("statement too long"))?;
        let mut raw = ptr::null_mut();
        // SAFETY: `sql` is valid for `len` bytes; SQLite writes `raw`.
        let rc = unsafe {
            ffi::sqlite3_prepare_v3(
                db.as_ptr(),
                sql.as_ptr().cast(),
                len,
                0,
                &mut raw,
                ptr::null_mut(),
            )
        };
        if rc != ffi::SQLITE_OK {
            return Err(error(db, rc));
        }
        let raw = NonNull::new(raw).ok_or_else(|| misuse("the statement is empty"))?;
        Ok(Direct {
            raw,
            tailored: false,
        })
    }

    fn release(&mut self) {
        // Nothing stays bound after a run.
    }
}

impl Direct {
    /// Whether the statement makes no direct change to the database.
    pub(super) fn readonly(&self) -> bool {
        // SAFETY: `raw` is a live statement of this connection.
        unsafe { ffi::sqlite3_stmt_readonly(self.raw.as_ptr()) != 0 }
    }

    /// Binds `params` (`?1`, `?2`, …), steps the statement to its end and
    /// resets it with its bindings cleared.
    pub(super) fn run(&mut self, params: &[ValueRef<'_>]) -> rusqlite::Result<()> {
        let raw = self.raw.as_ptr();
        // SAFETY: `raw` is a live statement of this connection.
        let expected = unsafe { ffi::sqlite3_bind_parameter_count(raw) };
        let expected = usize::try_from(expected).unwrap_or(0);
        if params.len() != expected {
            return Err(rusqlite::Error::InvalidParameterCount(
                params.len(),
                expected,
            ));
        }
        let result = self.bind_and_step(params);
        // SAFETY: as above. Resetting reports the step's error again, which
        // `result` holds already; clearing the bindings, or binding NULL to
        // each text and blob parameter, drops every pointer into `params`
        // (numbers may stay bound: they point nowhere).
        unsafe {
            ffi::sqlite3_reset(raw);
            self.tailored = self.tailored
                || ffi::sqlite3_stmt_status(raw, ffi::SQLITE_STMTSTATUS_REPREPARE, 0) > 0;
            if self.tailored {
                for (index, value) in (1..).zip(params) {
                    if matches!(value, ValueRef::Text(_) | ValueRef::Blob(_)) {
                        ffi::sqlite3_bind_null(raw, index);
                    }
                }
            } else {
                ffi::sqlite3_clear_bindings(raw);
            }
        }
        result
    }

    fn bind_and_step(&mut self, params: &[ValueRef<'_>]) -> rusqlite::Result<()> {
        let raw = self.raw.as_ptr();
        for (index, value) in (1..).zip(params) {
            // SAFETY: `raw` is live; a text or blob bound `SQLITE_STATIC`
            // points into `params`, which outlives the steps below, and
            // `run` unbinds every text and blob before returning.
            let rc = unsafe {
                match value {
                    ValueRef::Null => ffi::sqlite3_bind_null(raw, index),
                    ValueRef::Integer(i) => ffi::sqlite3_bind_int64(raw, index, *i),
                    ValueRef::Real(r) => ffi::sqlite3_bind_double(raw, index, *r),
                    ValueRef::Text(text) => ffi::sqlite3_bind_text64(
                        raw,
                        index,
                        text.as_ptr().cast(),
                        text.len() as u64,
                        ffi::SQLITE_STATIC(),
                        ffi::SQLITE_UTF8 as u8,
                    ),
                    // As rusqlite binds it: an empty blob, not NULL.
                    ValueRef::Blob([]) => ffi::sqlite3_bind_zeroblob(raw, index, 0),
                    ValueRef::Blob(blob) => ffi::sqlite3_bind_blob64(
                        raw,
                        index,
                        blob.as_ptr().cast(),
                        blob.len() as u64,
                        ffi::SQLITE_STATIC(),
                    ),
                }
            };
            if rc != ffi::SQLITE_OK {
                return Err(self.error(rc));
            }
        }
        loop {
            // SAFETY: `raw` is live and fully bound.
            match unsafe { ffi::sqlite3_step(raw) } {
                ffi::SQLITE_ROW => {}
                ffi::SQLITE_DONE => return Ok(()),
                rc => return Err(self.error(rc)),
            }
        }
    }

    /// This statement's error `rc`, with its connection's message.
    fn error(&self, rc: c_int) -> rusqlite::Error {
        // SAFETY: `raw` is live; its connection outlives it.
        let db = unsafe { ffi::sqlite3_db_handle(self.raw.as_ptr()) };
        NonNull::new(db).map_or_else(|| misuse("no connection"), |db| error(db, rc))
    }
}

impl Drop for Direct {
    fn drop(&mut self) {
        // SAFETY: the statement is live and finalized once; its connection
        // outlives it (the rules at `Statements`).
        unsafe {
            ffi::sqlite3_finalize(self.raw.as_ptr());
        }
    }
}

/// An error of `db` as rusqlite words it: the code and the connection's message.
fn error(db: NonNull<ffi::sqlite3>, rc: c_int) -> rusqlite::Error {
    // SAFETY: `db` is live; SQLite's message is a NUL-terminated string
    // valid until the next call on the connection, copied at once.
    let message = unsafe {
        let message = ffi::sqlite3_errmsg(db.as_ptr());
        (!message.is_null()).then(|| {
            std::ffi::CStr::from_ptr(message)
                .to_string_lossy()
                .into_owned()
        })
    };
    rusqlite::Error::SqliteFailure(ffi::Error::new(rc), message)
}

fn misuse(message: &str) -> rusqlite::Error {
    rusqlite::Error::SqliteFailure(ffi::Error::new(ffi::SQLITE_MISUSE), Some(message.into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::types::Value as SqlValue;

    /// `values` borrowed, as the guest's parameters are bound.
    fn refs(values: &[SqlValue]) -> Vec<ValueRef<'_>> {
        values.iter().map(ValueRef::from).collect()
    }

    #[test]
    fn statements_are_kept_by_text_and_the_oldest_leaves_first() {
        let conn = Box::new(Connection::open_in_memory().unwrap());
        let statements: Statements = Statements::default();
        conn.execute_batch("CREATE TABLE t (x INTEGER)").unwrap();
        let insert = "INSERT INTO t VALUES (?1)";
        for i in 0..3 {
            statements
                .with(&conn, insert, false, |s| s.execute([i]))
                .unwrap();
        }
        assert_eq!(statements.entries.borrow().len(), 1);
        for i in 0..CAPACITY + 1 {
            let sql = format!("SELECT {i}");
            let got: i64 = statements
                .with(&conn, &sql, i == 0, |s| s.query_row([], |r| r.get(0)))
                .unwrap();
            assert_eq!(got, i as i64);
        }
        let entries = statements.entries.borrow();
        assert_eq!(entries.len(), CAPACITY);
        assert!(entries.iter().all(|(text, _)| &**text != insert));
        drop(entries);
        // A statement that fails to prepare is an error and is not kept.
        assert!(
            statements
                .with(&conn, "SELEC 1", false, |_| Ok(()))
                .is_err()
        );
        assert!(
            statements
                .entries
                .borrow()
                .iter()
                .all(|(t, _)| &**t != "SELEC 1")
        );
        let count: i64 = statements
            .with(&conn, "SELECT count(*) FROM t", false, |s| {
                s.query_row([], |r| r.get(0))
            })
            .unwrap();
        assert_eq!(count, 3);
        statements.clear();
    }

    /// What `Direct` leaves bound after a run, as SQLite would expand it.
    fn expanded(statement: &Direct) -> String {
        // SAFETY: a live statement; SQLite's string is freed with sqlite3_free.
        unsafe {
            let text = ffi::sqlite3_expanded_sql(statement.raw.as_ptr());
            let copy = std::ffi::CStr::from_ptr(text)
                .to_string_lossy()
                .into_owned();
            ffi::sqlite3_free(text.cast());
            copy
        }
    }

    /// A text is checked as UTF-8 when it is new, and found by its bytes
    /// when it is kept; a text that is not UTF-8 is refused and not kept.
    #[test]
    fn a_new_text_is_checked_and_a_kept_one_found_by_its_bytes() {
        let conn = Box::new(Connection::open_in_memory().unwrap());
        let statements: Statements = Statements::default();
        let select = "SELECT 'é'";
        let got = statements
            .with_text(&conn, select.as_bytes(), false, |s| {
                s.query_row([], |r| r.get::<_, String>(0))
            })
            .unwrap()
            .unwrap();
        assert_eq!(got, "é");
        // The same bytes from elsewhere find the kept statement.
        let again = select.as_bytes().to_vec();
        let got = statements
            .with_text(&conn, &again, false, |s| {
                s.query_row([], |r| r.get::<_, String>(0))
            })
            .unwrap()
            .unwrap();
        assert_eq!(got, "é");
        assert_eq!(statements.entries.borrow().len(), 1);
        // Cut in the middle of the `é`, the text is no longer UTF-8.
        let broken = &select.as_bytes()[..select.len() - 2];
        let refused = statements
            .with_text(&conn, broken, false, |_| -> rusqlite::Result<()> {
                panic!("a text that is not UTF-8 ran")
            })
            .unwrap();
        assert!(refused.is_err());
        assert_eq!(statements.entries.borrow().len(), 1);
    }

    #[test]
    fn direct_statements_bind_every_kind_in_place_and_keep_nothing_bound() {
        let conn = Box::new(Connection::open_in_memory().unwrap());
        conn.execute_batch("CREATE TABLE t (k TEXT PRIMARY KEY, i INTEGER, r REAL, b BLOB, n)")
            .unwrap();
        let statements = Statements::<Direct>::default();
        let insert = "INSERT INTO t VALUES (?1, ?2, ?3, ?4, ?5)";
        let rows = [("é\0x", 7, 0.5, vec![0u8, 255]), ("", -1, -0.0, vec![])];
        for (k, i, r, b) in &rows {
            let params = vec![
                SqlValue::Text((*k).to_owned()),
                SqlValue::Integer(*i),
                SqlValue::Real(*r),
                SqlValue::Blob(b.clone()),
                SqlValue::Null,
            ];
            statements
                .with(&conn, insert, false, |s| {
                    s.run(&refs(&params))?;
                    // Nothing points into `params` once the run is over.
                    assert_eq!(
                        expanded(s),
                        "INSERT INTO t VALUES (NULL, NULL, NULL, NULL, NULL)"
                    );
                    Ok(())
                })
                .unwrap();
        }
        let mut got = conn
            .prepare("SELECT k, i, r, b, n IS NULL, typeof(b) FROM t ORDER BY i DESC")
            .unwrap();
        let got: Vec<(String, i64, f64, Vec<u8>, bool, String)> = got
            .query_map([], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                ))
            })
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(got[0].0, "é\0x");
        assert_eq!(
            (got[0].1, got[0].2, &got[0].3[..]),
            (7, 0.5, &[0u8, 255][..])
        );
        // An empty blob is an empty blob, not NULL, as rusqlite binds it.
        assert_eq!(
            (&got[1].0[..], &got[1].3[..], &got[1].5[..]),
            ("", &[][..], "blob")
        );
        assert!(got.iter().all(|row| row.4));

        // Errors are rusqlite's: a wrong parameter count, SQLite's message,
        // and a statement that fails to prepare is not kept.
        let two = [SqlValue::Integer(1), SqlValue::Integer(2)];
        let error = statements
            .with(&conn, insert, false, |s| s.run(&refs(&two)))
            .unwrap_err();
        assert!(
            matches!(error, rusqlite::Error::InvalidParameterCount(2, 5)),
            "{error:?}"
        );
        let duplicate: Vec<SqlValue> = [SqlValue::Text(String::new())]
            .into_iter()
            .chain([
                SqlValue::Integer(0),
                SqlValue::Real(0.0),
                SqlValue::Null,
                SqlValue::Null,
            ])
            .collect();
        let error = statements
            .with(&conn, insert, false, |s| s.run(&refs(&duplicate)))
            .unwrap_err();
        assert!(
            error.to_string().contains("UNIQUE constraint failed: t.k"),
            "{error}"
        );
        let error = statements
            .with(&conn, "INSERT INTO nowhere VALUES (1)", false, |s| {
                s.run(&[])
            })
            .unwrap_err();
        assert!(
            error.to_string().contains("no such table: nowhere"),
            "{error}"
        );
        let error = statements
            .with(&conn, "SELECT 1; SELECT 2", false, |s| s.run(&[]))
            .unwrap_err();
        assert!(
            matches!(error, rusqlite::Error::MultipleStatement),
            "{error:?}"
        );
        assert_eq!(statements.entries.borrow().len(), 1);
        statements.clear();
    }

    /// How often SQLite prepared `raw` again since it was first prepared.
    fn reprepares(raw: *mut ffi::sqlite3_stmt) -> c_int {
        // SAFETY: a live statement.
        unsafe { ffi::sqlite3_stmt_status(raw, ffi::SQLITE_STMTSTATUS_REPREPARE, 0) }
    }

    /// A statement whose plan an index's order serves for the value bound
    /// (here `ORDER BY` under an equality on the key's first column) is
    /// parsed and planned again once at most, not on every use after its
    /// parameters were let go (with `sqlite3_clear_bindings` it was, every
    /// time).
    #[test]
    fn letting_go_of_parameters_keeps_the_plan() {
        let conn = Box::new(Connection::open_in_memory().unwrap());
        conn.execute_batch(
            "CREATE TABLE recent (customer TEXT, at INTEGER, PRIMARY KEY (customer, at));
             INSERT INTO recent VALUES ('a', 1), ('a', 2), ('b', 3);",
        )
        .unwrap();
        let trim = "DELETE FROM recent WHERE customer = ?1 AND at < \
                    (SELECT at FROM recent WHERE customer = ?1 ORDER BY at DESC LIMIT 1 OFFSET ?2)";
        let direct = Statements::<Direct>::default();
        let latest = "SELECT at FROM recent WHERE customer = ?1 ORDER BY at DESC";
        let queries: Statements = Statements::default();
        let big = "x".repeat(100);
        for customer in ["a", "b", "a", "c", "b"] {
            let params = [SqlValue::Text(customer.into()), SqlValue::Integer(5)];
            direct
                .with(&conn, trim, false, |s| s.run(&refs(&params)))
                .unwrap();
            for value in [customer, &big] {
                queries
                    .with(&conn, latest, true, |s| {
                        s.query_map([value], |r| r.get::<_, i64>(0))?
                            .collect::<rusqlite::Result<Vec<_>>>()
                    })
                    .unwrap();
            }
        }
        direct
            .with(&conn, trim, false, |s| {
                assert_eq!(reprepares(s.raw.as_ptr()), 1);
                // Its text parameter is let go of (the number stays).
                assert!(
                    expanded(s).contains("customer = NULL AND"),
                    "{}",
                    expanded(s)
                );
                Ok(())
            })
            .unwrap();
        queries
            .with(&conn, latest, false, |s| {
                assert_eq!(s.get_status(rusqlite::StatementStatus::RePrepare), 0);
                Ok(())
            })
            .unwrap();
        direct.clear();
        queries.clear();
    }
}
