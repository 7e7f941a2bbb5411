//! What a comparison found, kept in a scratch SQLite file instead of memory:
//! the differing rows of a state diff, the events that caused each, the
//! events whose outputs differ and the dead letters of one version only.
//!
//! A fix can change every row of a large state, or every event of a long
//! tape: held in memory, a replay of a million events whose versions differ
//! in half of them took 6.8 GB. Written here as they are found and read back
//! one at a time by the report ([`crate::report`]), they cost disk in the
//! replay's scratch directory and a small page cache, whatever their number.
//!
//! Rows, outputs and dead letters are stored in the host's binary field
//! encoding (`codec.rs`), in the order they were found; causes by
//! (table, key, seq), so a row's causes are one index range.

use std::cell::Cell;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, config::DbConfig, params};

use crate::codec::{Reader, Writer};
use crate::diff::{RowChange, RowDiff};
use crate::event::{Output, Position};

/// The scratch file could not be written or read back.
#[derive(Debug, thiserror::Error)]
pub enum FindingsError {
    #[error(
        "cannot keep the differences in {path} ({source}); make room in {dir} (or give a \
         replay --keep DIR elsewhere, or set TMPDIR to a directory with room) and run it again",
        dir = path.parent().unwrap_or(path).display()
    )]
    Storage {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("differences file {path}: {source}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("differences file {path}: a damaged record ({message}); was it changed meanwhile?")]
    Damaged { path: PathBuf, message: String },
    #[error(
        "cannot compare with the approved baseline in a temporary file ({source}); make room \
         in the temporary directory (or set TMPDIR to a directory with room) and run it again"
    )]
    Scratch {
        #[source]
        source: rusqlite::Error,
    },
}

const SCHEMA: &str = "
PRAGMA journal_mode = OFF;
PRAGMA synchronous = OFF;
PRAGMA locking_mode = EXCLUSIVE;
PRAGMA cache_size = -4096;
CREATE TABLE rows (tbl TEXT NOT NULL, n INTEGER NOT NULL, row BLOB NOT NULL,
    PRIMARY KEY (tbl, n)) WITHOUT ROWID;
CREATE TABLE causes (tbl TEXT NOT NULL, key BLOB NOT NULL, seq INTEGER NOT NULL,
    PRIMARY KEY (tbl, key, seq)) WITHOUT ROWID;
CREATE TABLE positions (seq INTEGER PRIMARY KEY, stream TEXT NOT NULL,
    partition INTEGER NOT NULL, offset INTEGER NOT NULL);
CREATE TABLE outputs (seq INTEGER PRIMARY KEY, diff BLOB NOT NULL);
CREATE TABLE dead (side INTEGER NOT NULL, seq INTEGER NOT NULL, stream TEXT NOT NULL,
    partition INTEGER NOT NULL, offset INTEGER NOT NULL, class TEXT NOT NULL,
    message TEXT NOT NULL, PRIMARY KEY (side, seq)) WITHOUT ROWID;
BEGIN;
";

/// The first causes of one row, in order (see [`Findings::causes`]).
const CAUSES: &str = "SELECT c.seq, p.stream, p.partition, p.offset FROM causes c
    LEFT JOIN positions p ON p.seq = c.seq
    WHERE c.tbl = ?1 AND c.key = ?2 ORDER BY c.seq LIMIT ?3";

/// Which version a dead letter is only in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    Old,
    New,
}

/// An event whose outputs differ.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputDiff {
    pub seq: u64,
    pub old: Vec<Output>,
    pub new: Vec<Output>,
}

/// An event that is a dead letter in one version only (or with another class).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadDiff {
    pub seq: u64,
    pub stream: String,
    pub partition: i32,
    pub offset: i64,
    pub class: String,
    pub message: String,
}

/// The events that caused a differing row: the first ones (with where
/// each sits in its source), and how many more there were.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Causes {
    pub listed: Vec<(u64, Position)>,
    pub unlisted: u64,
}

/// A comparison's findings, in a scratch file removed when dropped.
pub struct Findings {
    conn: Connection,
    path: PathBuf,
    /// Rows are numbered in the order found, across tables.
    next_row: Cell<i64>,
    /// Keeps a temporary file's directory alive.
    _dir: Option<tempfile::TempDir>,
}

impl Findings {
    /// Findings in a new file at `path` (one there is replaced), removed
    /// when dropped.
    pub fn create(path: &Path) -> Result<Findings, FindingsError> {
        for file in crate::state::db_files(path) {
            let _ = std::fs::remove_file(file);
        }
        Findings::open(path, None)
    }

    /// Findings in a temporary directory of their own (`TMPDIR`), gone when dropped.
    pub fn temporary() -> Result<Findings, FindingsError> {
        let dir = tempfile::Builder::new()
            .prefix("rewind-diff-")
            .tempdir()
            .map_err(|e| FindingsError::Damaged {
                path: std::env::temp_dir(),
                message: format!("cannot make a scratch directory: {e}"),
            })?;
        let path = dir.path().join("findings.db");
        Findings::open(&path, Some(dir))
    }

    fn open(path: &Path, dir: Option<tempfile::TempDir>) -> Result<Findings, FindingsError> {
        let conn = Connection::open(path).map_err(|e| error(path, e))?;
        // The statement cache clears a statement's bindings after each use,
        // and SQLite re-prepares (parses and plans anew) a statement whose
        // plan might depend on a bound value once its bindings change:
        // `causes` (`WHERE … ORDER BY`, run for every differing row of a
        // report) was, and a report of 550,000 rows spent 60% of its time
        // there. With a stable query planner, plans never depend on bindings.
        conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)
            .map_err(|e| error(path, e))?;
        conn.execute_batch(SCHEMA)
            .map_err(|e| error(path, crate::state::with_os_error(&conn, e)))?;
        Ok(Findings {
            conn,
            path: path.to_owned(),
            next_row: Cell::new(0),
            _dir: dir,
        })
    }

    /// Where the findings are kept.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn fail(&self, source: rusqlite::Error) -> FindingsError {
        error(&self.path, crate::state::with_os_error(&self.conn, source))
    }

    fn damaged(&self, message: String) -> FindingsError {
        FindingsError::Damaged {
            path: self.path.clone(),
            message,
        }
    }

    /// Records a differing row of `table`.
    pub(crate) fn add_row(&self, table: &str, row: &RowDiff) -> Result<(), FindingsError> {
        let n = self.next_row.get();
        self.next_row.set(n + 1);
        self.exec(
            "INSERT INTO rows (tbl, n, row) VALUES (?1, ?2, ?3)",
            params![table, n, encode_row(row)],
        )
    }

    /// The differing rows of `table`, in the order found, at most `limit`,
    /// each handed to `each` (which may stop the walk with an error).
    pub fn each_row<E: From<FindingsError>>(
        &self,
        table: &str,
        limit: Option<usize>,
        each: impl FnMut(RowDiff) -> Result<(), E>,
    ) -> Result<(), E> {
        self.walk(
            "SELECT row FROM rows WHERE tbl = ?1 ORDER BY n LIMIT ?2",
            params![table, sql_limit(limit)],
            |r| {
                let bytes = r.get_ref(0).map_err(|e| self.fail(e))?;
                decode_row(bytes.as_blob().unwrap_or_default()).map_err(|m| self.damaged(m))
            },
            each,
        )
    }

    /// Every differing row of `table` (for small diffs and tests: a large
    /// diff is read with [`Findings::each_row`]).
    pub fn rows(&self, table: &str) -> Result<Vec<RowDiff>, FindingsError> {
        let mut out = Vec::new();
        self.each_row(table, None, |row| {
            out.push(row);
            Ok::<_, FindingsError>(())
        })?;
        Ok(out)
    }

    /// Records that the event `seq` made a difference in the row of `table`
    /// whose key values encode to `key` ([`crate::replay::encode_key`]).
    /// Where the event sits is recorded once, with [`Findings::add_position`].
    pub(crate) fn add_cause(&self, table: &str, key: &[u8], seq: u64) -> Result<(), FindingsError> {
        self.exec(
            "INSERT OR IGNORE INTO causes (tbl, key, seq) VALUES (?1, ?2, ?3)",
            params![table, key, seq as i64],
        )
    }

    /// Records where the event `seq` that caused differences sits.
    pub(crate) fn add_position(&self, seq: u64, position: &Position) -> Result<(), FindingsError> {
        self.exec(
            "INSERT OR IGNORE INTO positions (seq, stream, partition, offset)
             VALUES (?1, ?2, ?3, ?4)",
            params![
                seq as i64,
                position.stream,
                position.partition,
                position.offset
            ],
        )
    }

    /// The events that caused the row of `table` with `key`: the first
    /// `limit`, in order, and how many more.
    pub fn causes(&self, table: &str, key: &[u8], limit: usize) -> Result<Causes, FindingsError> {
        let mut stmt = self.conn.prepare_cached(CAUSES).map_err(|e| self.fail(e))?;
        let limit = sql_limit(Some(limit));
        let listed = stmt
            .query_map(params![table, key, limit], |r| {
                Ok((
                    r.get::<_, i64>(0)? as u64,
                    Position {
                        stream: r.get::<_, Option<String>>(1)?.unwrap_or_default(),
                        partition: r.get::<_, Option<i32>>(2)?.unwrap_or_default(),
                        offset: r.get::<_, Option<i64>>(3)?.unwrap_or_default(),
                    },
                ))
            })
            .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(|e| self.fail(e))?;
        let unlisted = if (listed.len() as i64) < limit {
            0
        } else {
            let all = self.count(
                "SELECT count(*) FROM causes WHERE tbl = ?1 AND key = ?2",
                params![table, key],
            )?;
            all.saturating_sub(listed.len() as u64)
        };
        Ok(Causes { listed, unlisted })
    }

    /// Records an event whose outputs differ.
    pub(crate) fn add_output(&self, diff: &OutputDiff) -> Result<(), FindingsError> {
        let mut w = Writer::default();
        for side in [&diff.old, &diff.new] {
            w.u32(side.len() as u32);
            for o in side {
                w.str(&o.stream);
                w.opt_bytes(o.key.as_deref());
                w.opt_bytes(o.payload.as_deref());
                w.headers(&o.headers);
            }
        }
        self.exec(
            "INSERT OR REPLACE INTO outputs (seq, diff) VALUES (?1, ?2)",
            params![diff.seq as i64, w.buf],
        )
    }

    /// The events whose outputs differ, by seq, at most `limit`.
    pub fn each_output<E: From<FindingsError>>(
        &self,
        limit: Option<usize>,
        each: impl FnMut(OutputDiff) -> Result<(), E>,
    ) -> Result<(), E> {
        self.walk(
            "SELECT seq, diff FROM outputs ORDER BY seq LIMIT ?1",
            [sql_limit(limit)],
            |r| {
                let seq = r.get::<_, i64>(0).map_err(|e| self.fail(e))? as u64;
                let bytes = r.get_ref(1).map_err(|e| self.fail(e))?;
                decode_outputs(seq, bytes.as_blob().unwrap_or_default())
                    .map_err(|m| self.damaged(m))
            },
            each,
        )
    }

    /// Records a dead letter of one version only.
    pub(crate) fn add_dead(&self, side: Version, d: &DeadDiff) -> Result<(), FindingsError> {
        self.exec(
            "INSERT OR REPLACE INTO dead (side, seq, stream, partition, offset, class, message)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                side as i64,
                d.seq as i64,
                d.stream,
                d.partition,
                d.offset,
                d.class,
                d.message
            ],
        )
    }

    /// The dead letters only `side` has, by seq, at most `limit`.
    pub fn each_dead<E: From<FindingsError>>(
        &self,
        side: Version,
        limit: Option<usize>,
        each: impl FnMut(DeadDiff) -> Result<(), E>,
    ) -> Result<(), E> {
        self.walk(
            "SELECT seq, stream, partition, offset, class, message FROM dead
             WHERE side = ?1 ORDER BY seq LIMIT ?2",
            params![side as i64, sql_limit(limit)],
            |r| {
                let dead = || {
                    Ok(DeadDiff {
                        seq: r.get::<_, i64>(0)? as u64,
                        stream: r.get(1)?,
                        partition: r.get(2)?,
                        offset: r.get(3)?,
                        class: r.get(4)?,
                        message: r.get(5)?,
                    })
                };
                dead().map_err(|e| self.fail(e))
            },
            each,
        )
    }

    /// How many dead letters only `side` has.
    pub fn dead_count(&self, side: Version) -> Result<u64, FindingsError> {
        self.count("SELECT count(*) FROM dead WHERE side = ?1", [side as i64])
    }

    /// How many events' outputs differ.
    pub fn output_count(&self) -> Result<u64, FindingsError> {
        self.count("SELECT count(*) FROM outputs", [])
    }

    fn count(&self, sql: &str, params: impl rusqlite::Params) -> Result<u64, FindingsError> {
        self.conn
            .prepare_cached(sql)
            .and_then(|mut s| s.query_row(params, |r| r.get::<_, i64>(0)))
            .map(|n| n as u64)
            .map_err(|e| self.fail(e))
    }

    fn exec(&self, sql: &str, params: impl rusqlite::Params) -> Result<(), FindingsError> {
        self.conn
            .prepare_cached(sql)
            .and_then(|mut s| s.execute(params))
            .map(drop)
            .map_err(|e| self.fail(e))
    }

    /// Hands what `read` makes of each row `sql` selects to `each`.
    fn walk<T, E: From<FindingsError>>(
        &self,
        sql: &str,
        params: impl rusqlite::Params,
        read: impl Fn(&rusqlite::Row<'_>) -> Result<T, FindingsError>,
        mut each: impl FnMut(T) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut stmt = self.conn.prepare_cached(sql).map_err(|e| self.fail(e))?;
        let mut rows = stmt.query(params).map_err(|e| self.fail(e))?;
        while let Some(r) = rows.next().map_err(|e| self.fail(e))? {
            each(read(r)?)?;
        }
        Ok(())
    }
}

impl Drop for Findings {
    fn drop(&mut self) {
        for file in crate::state::db_files(&self.path) {
            let _ = std::fs::remove_file(file);
        }
    }
}

impl std::fmt::Debug for Findings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Findings")
            .field("path", &self.path)
            .finish()
    }
}

/// A row limit for SQL: `-1` is none.
fn sql_limit(limit: Option<usize>) -> i64 {
    limit.map_or(-1, |n| i64::try_from(n).unwrap_or(i64::MAX))
}

fn error(path: &Path, source: rusqlite::Error) -> FindingsError {
    match source.sqlite_error_code() {
        Some(rusqlite::ErrorCode::DiskFull | rusqlite::ErrorCode::SystemIoFailure) => {
            FindingsError::Storage {
                path: path.to_owned(),
                source,
            }
        }
        _ => FindingsError::Sqlite {
            path: path.to_owned(),
            source,
        },
    }
}

/// A row: its change, key columns and values, then each column's name and
/// old and new value (each behind a presence flag).
fn encode_row(row: &RowDiff) -> Vec<u8> {
    let mut w = Writer::default();
    w.u8(match row.change {
        RowChange::Added => 0,
        RowChange::Removed => 1,
        RowChange::Changed => 2,
    });
    w.u32(row.key.len() as u32);
    for (column, value) in &row.key {
        w.str(column);
        w.value(value);
    }
    w.u32(row.columns.len() as u32);
    for (column, old, new) in &row.columns {
        w.str(column);
        for v in [old, new] {
            match v {
                None => w.u8(0),
                Some(v) => {
                    w.u8(1);
                    w.value(v);
                }
            }
        }
    }
    w.buf
}

fn decode_row(bytes: &[u8]) -> Result<RowDiff, String> {
    let mut r = Reader::new(bytes);
    let change = match r.u8("change")? {
        0 => RowChange::Added,
        1 => RowChange::Removed,
        2 => RowChange::Changed,
        other => return Err(format!("change {other}")),
    };
    let keys = r.u32("key columns")?;
    let mut key = Vec::new();
    for _ in 0..keys {
        key.push((r.str("key column")?, r.value("key value")?));
    }
    let columns = r.u32("columns")?;
    let mut out = Vec::new();
    for _ in 0..columns {
        let name = r.str("column")?;
        let mut side = || -> Result<_, String> {
            Ok(match r.u8("value flag")? {
                0 => None,
                _ => Some(r.value("value")?),
            })
        };
        let (old, new) = (side()?, side()?);
        out.push((name, old, new));
    }
    Ok(RowDiff {
        key,
        change,
        columns: out,
    })
}

fn decode_outputs(seq: u64, bytes: &[u8]) -> Result<OutputDiff, String> {
    let mut r = Reader::new(bytes);
    let mut side = || -> Result<Vec<Output>, String> {
        let n = r.u32("outputs")?;
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(Output {
                stream: r.str("stream")?,
                key: r.opt_bytes("key")?,
                payload: r.opt_bytes("payload")?,
                headers: r.headers()?,
            });
        }
        Ok(out)
    };
    let (old, new) = (side()?, side()?);
    Ok(OutputDiff { seq, old, new })
}

#[cfg(test)]
mod tests {
    use rusqlite::types::Value;

    use super::*;
    use crate::event::Header;

    #[test]
    fn rows_outputs_dead_letters_and_causes_read_back_as_written() {
        let f = Findings::temporary().unwrap();
        let path = f.path().to_owned();
        let row = |n: i64| RowDiff {
            key: vec![("id".into(), Value::Text(format!("k{n}")))],
            change: RowChange::Changed,
            columns: vec![
                ("a".into(), Some(Value::Integer(n)), Some(Value::Real(0.5))),
                ("b".into(), None, Some(Value::Blob(vec![0, 255]))),
                ("c".into(), Some(Value::Null), None),
            ],
        };
        for n in 0..3 {
            f.add_row("t", &row(n)).unwrap();
        }
        f.add_row("u", &row(9)).unwrap();
        assert_eq!(f.rows("t").unwrap(), vec![row(0), row(1), row(2)]);
        assert_eq!(f.rows("u").unwrap(), vec![row(9)]);
        let mut first = Vec::new();
        f.each_row("t", Some(2), |r| {
            first.push(r);
            Ok::<_, FindingsError>(())
        })
        .unwrap();
        assert_eq!(first, vec![row(0), row(1)]);

        let at = |offset| Position {
            stream: "s".into(),
            partition: 0,
            offset,
        };
        for seq in [7, 3, 5, 3] {
            f.add_cause("t", b"k", seq).unwrap();
            f.add_position(seq, &at(seq as i64 + 100)).unwrap();
        }
        let causes = f.causes("t", b"k", 2).unwrap();
        assert_eq!(causes.listed, vec![(3, at(103)), (5, at(105))]);
        assert_eq!(causes.unlisted, 1);
        assert_eq!(f.causes("t", b"k", 10).unwrap().unlisted, 0);
        assert_eq!(f.causes("t", b"other", 10).unwrap(), Causes::default());
        // Asked for row after row, the query is planned once.
        for _ in 0..3 {
            f.causes("t", b"k", 10).unwrap();
        }
        let planned = f.conn.prepare_cached(CAUSES).unwrap();
        assert_eq!(planned.get_status(rusqlite::StatementStatus::RePrepare), 0);
        drop(planned);

        let output = Output {
            stream: "out".into(),
            key: None,
            payload: Some(b"{}".to_vec()),
            headers: vec![Header {
                name: "h".into(),
                value: None,
            }],
        };
        let diff = OutputDiff {
            seq: 4,
            old: vec![output.clone(), output],
            new: vec![],
        };
        f.add_output(&diff).unwrap();
        let mut outputs = Vec::new();
        f.each_output(None, |o| {
            outputs.push(o);
            Ok::<_, FindingsError>(())
        })
        .unwrap();
        assert_eq!(outputs, vec![diff]);
        assert_eq!(f.output_count().unwrap(), 1);

        let dead = DeadDiff {
            seq: 2,
            stream: "s".into(),
            partition: 1,
            offset: 9,
            class: "invalid-input".into(),
            message: "no".into(),
        };
        f.add_dead(Version::New, &dead).unwrap();
        assert_eq!(f.dead_count(Version::Old).unwrap(), 0);
        assert_eq!(f.dead_count(Version::New).unwrap(), 1);
        let mut deads = Vec::new();
        f.each_dead(Version::New, None, |d| {
            deads.push(d);
            Ok::<_, FindingsError>(())
        })
        .unwrap();
        assert_eq!(deads, vec![dead]);

        drop(f);
        assert!(!path.exists(), "a temporary findings file is removed");
    }

    #[test]
    fn a_damaged_row_is_an_error_not_a_panic() {
        for bytes in [
            &[][..],
            &[7],
            &[2, 1, 0, 0, 0],
            &[0, 0, 0, 0, 0, 1, 0, 0, 0],
        ] {
            assert!(decode_row(bytes).is_err(), "{bytes:?}");
        }
        assert!(decode_outputs(0, &[1, 0, 0, 0]).is_err());
    }
}
