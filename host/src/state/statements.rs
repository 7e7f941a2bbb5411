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
//! The statements borrow the connection for as long as they live, which
//! Rust cannot express between two fields of one struct, so they are kept
//! as `Statement<'static>` under the rules written at [`Statements`].

use std::cell::RefCell;

use rusqlite::{Connection, Statement};

/// Statements kept at most: more than any real processor uses, few enough
/// that a scan is cheap. A guest that builds its SQL text per event evicts
/// the oldest.
const CAPACITY: usize = 64;

/// Prepared statements of one connection. A connection has two sets: the
/// guest's, prepared under its authorizer, and the host's, so that neither
/// can run a statement the other prepared.
///
/// # Safety rules (upheld by `StateDb`)
/// - The connection is boxed, so it does not move while statements point at it.
/// - This is dropped before the connection (it is declared before it), and
///   cleared before anything takes the connection mutably.
#[derive(Default)]
pub(super) struct Statements {
    /// Oldest first.
    entries: RefCell<Vec<(Box<str>, Statement<'static>)>>,
}

// SAFETY: the statements belong to one connection and live only inside the
// `StateDb` that owns it, so they cross threads together with it, and a
// connection (opened in SQLite's multi-thread mode) may be used from any one
// thread at a time. Not `Sync`: the `RefCell` keeps them to one thread.
unsafe impl Send for Statements {}

impl Statements {
    /// Runs `f` with the prepared statement for `sql`, preparing it on `conn`
    /// first if it is not kept yet. A statement whose preparation fails is
    /// not kept. `release`: clear the statement's bindings afterwards (they
    /// hold large values).
    pub(super) fn with<T>(
        &self,
        conn: &Connection,
        sql: &str,
        release: bool,
        f: impl FnOnce(&mut Statement<'_>) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<T> {
        let mut entries = self.entries.borrow_mut();
        let found = entries
            .iter()
            .rposition(|(text, _)| text.len() == sql.len() && **text == *sql);
        let index = match found {
            Some(index) => index,
            None => {
                let statement = conn.prepare(sql)?;
                // SAFETY: see the type's rules: `conn` outlives the entry
                // and stays where it is while the entry lives.
                let statement =
                    unsafe { std::mem::transmute::<Statement<'_>, Statement<'static>>(statement) };
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
            statement.clear_bindings();
        }
        result
    }

    /// Finalizes every statement.
    pub(super) fn clear(&self) {
        self.entries.borrow_mut().clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_are_kept_by_text_and_the_oldest_leaves_first() {
        let conn = Box::new(Connection::open_in_memory().unwrap());
        let statements = Statements::default();
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
}
