//! Comparing two state DBs: schema differences and, per table, the rows
//! added, removed and changed by primary key, with old and new values per
//! changed column. Host tables (`_rewind_*`) are left out.
//!
//! Both sides are read in primary-key order (`COLLATE BINARY`, which the
//! key's index serves) and merged, so memory stays flat whatever the size.
//! Tables without a primary key are compared by full row content, as
//! multisets, and flagged.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rusqlite::types::Value;
use rusqlite::{Connection, OpenFlags};

/// What to leave out of a comparison: a table, or one column of a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ignore {
    Table(String),
    Column { table: String, column: String },
}

impl std::str::FromStr for Ignore {
    type Err = String;
    fn from_str(s: &str) -> Result<Ignore, String> {
        match s.split_once('.') {
            _ if s.is_empty() => Err("empty ignore rule; use TABLE or TABLE.COLUMN".into()),
            None => Ok(Ignore::Table(s.to_owned())),
            Some((table, column)) if !table.is_empty() && !column.is_empty() => {
                Ok(Ignore::Column {
                    table: table.to_owned(),
                    column: column.to_owned(),
                })
            }
            Some(_) => Err(format!("{s:?}: use TABLE or TABLE.COLUMN")),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("state DB {path}: {source}")]
pub struct DiffError {
    pub path: PathBuf,
    #[source]
    pub source: rusqlite::Error,
}

/// How a row differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RowChange {
    Added,
    Removed,
    Changed,
}

/// One differing row.
#[derive(Debug, Clone, PartialEq)]
pub struct RowDiff {
    /// The key columns and values (every column, for a table without a
    /// primary key).
    pub key: Vec<(String, Value)>,
    pub change: RowChange,
    /// Changed columns (every column for an added or removed row), with the
    /// old and new value (`None`: the side has no such row or column).
    pub columns: Vec<(String, Option<Value>, Option<Value>)>,
}

/// The differences of one table.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TableDiff {
    pub name: String,
    /// Compared by primary key; `false`: by full row content.
    pub keyed: bool,
    pub key_columns: Vec<String>,
    pub added: u64,
    pub removed: u64,
    pub changed: u64,
    pub rows: Vec<RowDiff>,
}

/// Columns one side has and the other not.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct SchemaDiff {
    pub tables_only_old: Vec<String>,
    pub tables_only_new: Vec<String>,
    /// Per table in both: columns only old has, only new has.
    pub columns: Vec<ColumnDiff>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ColumnDiff {
    pub table: String,
    pub only_old: Vec<String>,
    pub only_new: Vec<String>,
}

impl SchemaDiff {
    pub fn is_empty(&self) -> bool {
        self.tables_only_old.is_empty()
            && self.tables_only_new.is_empty()
            && self.columns.is_empty()
    }
}

/// The comparison of two state DBs.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StateDiff {
    pub schema: SchemaDiff,
    /// Tables with differing rows, by name.
    pub tables: Vec<TableDiff>,
}

impl StateDiff {
    pub fn is_empty(&self) -> bool {
        self.schema.is_empty() && self.tables.is_empty()
    }
}

/// A table's columns, in order, and its primary key (in key order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableShape {
    pub columns: Vec<String>,
    pub key: Vec<String>,
}

/// The user tables of a DB (not `_rewind_*` or SQLite's own) and their shapes.
pub fn shapes(conn: &Connection) -> rusqlite::Result<BTreeMap<String, TableShape>> {
    let names: Vec<String> = conn
        .prepare(
            "SELECT name FROM sqlite_schema WHERE type = 'table'
             AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' AND name NOT LIKE '\\_rewind\\_%' ESCAPE '\\'
             ORDER BY name",
        )?
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    let mut out = BTreeMap::new();
    for name in names {
        out.insert(name.clone(), shape(conn, &name)?);
    }
    Ok(out)
}

/// One table's shape.
pub fn shape(conn: &Connection, table: &str) -> rusqlite::Result<TableShape> {
    let mut stmt = conn.prepare("SELECT name, pk FROM pragma_table_info(?1) ORDER BY cid")?;
    let cols: Vec<(String, i64)> = stmt
        .query_map([table], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let mut key: Vec<(i64, String)> = cols
        .iter()
        .filter(|(_, pk)| *pk > 0)
        .map(|(n, pk)| (*pk, n.clone()))
        .collect();
    key.sort();
    Ok(TableShape {
        columns: cols.into_iter().map(|(n, _)| n).collect(),
        key: key.into_iter().map(|(_, n)| n).collect(),
    })
}

fn open(path: &Path) -> Result<Connection, DiffError> {
    let err = |source| DiffError {
        path: path.to_owned(),
        source,
    };
    if !path.exists() {
        return Err(err(rusqlite::Error::InvalidPath(path.to_owned())));
    }
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(err)?;
    conn.execute_batch("PRAGMA query_only = ON; PRAGMA cache_size = -8192;")
        .map_err(err)?;
    Ok(conn)
}

fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Compares two state DBs (old, new).
pub fn diff_states(old: &Path, new: &Path, ignore: &[Ignore]) -> Result<StateDiff, DiffError> {
    let (a, b) = (open(old)?, open(new)?);
    let err_a = |source| DiffError {
        path: old.to_owned(),
        source,
    };
    let err_b = |source| DiffError {
        path: new.to_owned(),
        source,
    };
    let ignored_table = |t: &str| {
        ignore
            .iter()
            .any(|i| matches!(i, Ignore::Table(n) if n == t))
    };
    let ignored_column = |t: &str, c: &str| {
        ignore
            .iter()
            .any(|i| matches!(i, Ignore::Column { table, column } if table == t && column == c))
    };
    let mut old_shapes = shapes(&a).map_err(err_a)?;
    let mut new_shapes = shapes(&b).map_err(err_b)?;
    old_shapes.retain(|t, _| !ignored_table(t));
    new_shapes.retain(|t, _| !ignored_table(t));
    for (t, s) in old_shapes.iter_mut().chain(new_shapes.iter_mut()) {
        s.columns.retain(|c| !ignored_column(t, c));
    }

    let mut diff = StateDiff::default();
    for t in old_shapes.keys() {
        if !new_shapes.contains_key(t) {
            diff.schema.tables_only_old.push(t.clone());
        }
    }
    for t in new_shapes.keys() {
        if !old_shapes.contains_key(t) {
            diff.schema.tables_only_new.push(t.clone());
        }
    }
    let names: std::collections::BTreeSet<&String> =
        old_shapes.keys().chain(new_shapes.keys()).collect();
    for name in names {
        let (so, sn) = (old_shapes.get(name), new_shapes.get(name));
        if let (Some(so), Some(sn)) = (so, sn) {
            let only_old: Vec<String> = so
                .columns
                .iter()
                .filter(|c| !sn.columns.contains(c))
                .cloned()
                .collect();
            let only_new: Vec<String> = sn
                .columns
                .iter()
                .filter(|c| !so.columns.contains(c))
                .cloned()
                .collect();
            if !only_old.is_empty() || !only_new.is_empty() {
                diff.schema.columns.push(ColumnDiff {
                    table: name.clone(),
                    only_old,
                    only_new,
                });
            }
        }
        let table = diff_table(name, (old, so), (new, sn)).map_err(|(side, source)| DiffError {
            path: if side { new } else { old }.to_owned(),
            source,
        })?;
        if table.added + table.removed + table.changed > 0 {
            diff.tables.push(table);
        }
    }
    Ok(diff)
}

fn diff_table(
    name: &str,
    (a, old): (&Path, Option<&TableShape>),
    (b, new): (&Path, Option<&TableShape>),
) -> Result<TableDiff, (bool, rusqlite::Error)> {
    // The key: the old side's primary key, if the new side has the same.
    let key: Vec<String> = match (old, new) {
        (Some(o), Some(n)) if o.key == n.key => o.key.clone(),
        (Some(o), None) => o.key.clone(),
        (None, Some(n)) => n.key.clone(),
        _ => Vec::new(),
    };
    let keyed = !key.is_empty();
    let cols = |s: Option<&TableShape>| -> Vec<String> {
        s.map(|s| {
            s.columns
                .iter()
                .filter(|c| !key.contains(c))
                .cloned()
                .collect()
        })
        .unwrap_or_default()
    };
    // Without a key, rows are compared on the columns both sides have.
    let (old_cols, new_cols) = if keyed {
        (cols(old), cols(new))
    } else {
        let common: Vec<String> = cols(old)
            .into_iter()
            .filter(|c| new.is_none_or(|n| n.columns.contains(c)))
            .collect();
        let common_new: Vec<String> = cols(new)
            .into_iter()
            .filter(|c| old.is_none_or(|o| o.columns.contains(c)))
            .collect();
        (common, common_new)
    };
    let mut out = TableDiff {
        name: name.to_owned(),
        keyed,
        key_columns: key.clone(),
        ..TableDiff::default()
    };
    let sql_a = old.map(|_| select(name, &key, &old_cols));
    let sql_b = new.map(|_| select(name, &key, &new_cols));
    let k = key.len();
    // Where each of old's compared columns sits in new's rows.
    let in_new: Vec<Option<usize>> = old_cols
        .iter()
        .map(|c| new_cols.iter().position(|n| n == c).map(|i| k + i))
        .collect();
    let width = (k + old_cols.len()).min(k + new_cols.len());
    std::thread::scope(|scope| {
        // Each side is read on a thread of its own: the two scans run side by
        // side, and the merge below only compares.
        let mut x = Cursor::start(scope, a, sql_a, false);
        let mut y = Cursor::start(scope, b, sql_b, true);
        let (mut rx, mut ry) = (x.next()?, y.next()?);
        loop {
            let order = match (&rx, &ry) {
                (None, None) => break,
                (Some(_), None) => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
                (Some(p), Some(q)) => {
                    let n = if keyed { k } else { width };
                    cmp_row(&p[..n.min(p.len())], &q[..n.min(q.len())])
                }
            };
            match order {
                Ordering::Less => {
                    let (kv, v) = split(rx.take().expect("a row"), k);
                    out.removed += 1;
                    out.rows
                        .push(whole(&key, kv, &old_cols, v, RowChange::Removed));
                    rx = x.next()?;
                }
                Ordering::Greater => {
                    let (kv, v) = split(ry.take().expect("a row"), k);
                    out.added += 1;
                    out.rows
                        .push(whole(&key, kv, &new_cols, v, RowChange::Added));
                    ry = y.next()?;
                }
                Ordering::Equal => {
                    let (p, q) = (rx.take().expect("a row"), ry.take().expect("a row"));
                    if keyed {
                        let columns: Vec<_> = old_cols
                            .iter()
                            .enumerate()
                            .filter_map(|(i, c)| {
                                let j = in_new[i]?;
                                (!same(&p[k + i], &q[j])).then(|| {
                                    (c.clone(), Some(p[k + i].clone()), Some(q[j].clone()))
                                })
                            })
                            .collect();
                        if !columns.is_empty() {
                            out.changed += 1;
                            out.rows.push(RowDiff {
                                key: key.iter().cloned().zip(p.into_iter().take(k)).collect(),
                                change: RowChange::Changed,
                                columns,
                            });
                        }
                    }
                    rx = x.next()?;
                    ry = y.next()?;
                }
            }
        }
        Ok(out)
    })
}

/// The query reading a side's rows of a table in key order (`COLLATE
/// BINARY`, which the key's index serves): key columns, then `columns`.
fn select(table: &str, key: &[String], columns: &[String]) -> String {
    let order = if key.is_empty() { columns } else { key };
    let select: Vec<String> = key.iter().chain(columns).map(|c| quote(c)).collect();
    let order: Vec<String> = order
        .iter()
        .map(|c| format!("{} COLLATE BINARY", quote(c)))
        .collect();
    format!(
        "SELECT {} FROM {} ORDER BY {}",
        if select.is_empty() {
            "NULL".into()
        } else {
            select.join(", ")
        },
        quote(table),
        if order.is_empty() {
            "1".into()
        } else {
            order.join(", ")
        }
    )
}

type Batch = Result<Vec<Vec<Value>>, rusqlite::Error>;

/// One side's rows, read in batches by a thread of its own.
struct Cursor {
    rx: Option<std::sync::mpsc::Receiver<Batch>>,
    batch: std::vec::IntoIter<Vec<Value>>,
    side: bool,
}

/// Rows per batch sent from a reader thread.
const BATCH_ROWS: usize = 4096;

impl Cursor {
    /// Starts reading `path` with `sql` (no rows when `None`: the table is
    /// not on this side).
    fn start<'s>(
        scope: &'s std::thread::Scope<'s, '_>,
        path: &Path,
        sql: Option<String>,
        side: bool,
    ) -> Cursor {
        let rx = sql.map(|sql| {
            let (tx, rx) = std::sync::mpsc::sync_channel::<Batch>(4);
            let path = path.to_owned();
            scope.spawn(move || {
                let read = || -> rusqlite::Result<()> {
                    let conn = open(&path).map_err(|e| e.source)?;
                    let mut stmt = conn.prepare(&sql)?;
                    let width = stmt.column_count();
                    let mut rows = stmt.query([])?;
                    let mut batch = Vec::with_capacity(BATCH_ROWS);
                    while let Some(row) = rows.next()? {
                        batch.push(
                            (0..width)
                                .map(|i| row.get::<_, Value>(i))
                                .collect::<rusqlite::Result<Vec<_>>>()?,
                        );
                        if batch.len() == BATCH_ROWS
                            && tx
                                .send(Ok(std::mem::replace(
                                    &mut batch,
                                    Vec::with_capacity(BATCH_ROWS),
                                )))
                                .is_err()
                        {
                            return Ok(());
                        }
                    }
                    let _ = tx.send(Ok(batch));
                    Ok(())
                };
                if let Err(e) = read() {
                    let _ = tx.send(Err(e));
                }
            });
            rx
        });
        Cursor {
            rx,
            batch: Vec::new().into_iter(),
            side,
        }
    }

    fn next(&mut self) -> Result<Option<Vec<Value>>, (bool, rusqlite::Error)> {
        loop {
            if let Some(row) = self.batch.next() {
                return Ok(Some(row));
            }
            let Some(rx) = &self.rx else {
                return Ok(None);
            };
            match rx.recv() {
                Ok(Ok(batch)) => self.batch = batch.into_iter(),
                Ok(Err(e)) => return Err((self.side, e)),
                Err(_) => {
                    self.rx = None;
                    return Ok(None);
                }
            }
        }
    }
}

fn split(mut row: Vec<Value>, k: usize) -> (Vec<Value>, Vec<Value>) {
    let rest = row.split_off(k);
    (row, rest)
}

/// Equal as SQLite stores them (an integer and a real of the same value
/// are different values here: they are different bytes in the state).
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Real(x), Value::Real(y)) => x.to_bits() == y.to_bits(),
        _ => a == b,
    }
}

fn cmp_row(a: &[Value], b: &[Value]) -> Ordering {
    for (x, y) in a.iter().zip(b) {
        match cmp_value(x, y) {
            Ordering::Equal => {}
            other => return other,
        }
    }
    a.len().cmp(&b.len())
}

fn whole(
    key: &[String],
    k: Vec<Value>,
    cols: &[String],
    v: Vec<Value>,
    change: RowChange,
) -> RowDiff {
    let all: Vec<(String, Value)> = key
        .iter()
        .cloned()
        .zip(k.iter().cloned())
        .chain(cols.iter().cloned().zip(v.iter().cloned()))
        .collect();
    let columns = all
        .iter()
        .map(|(c, v)| match change {
            RowChange::Added => (c.clone(), None, Some(v.clone())),
            _ => (c.clone(), Some(v.clone()), None),
        })
        .collect();
    RowDiff {
        key: if key.is_empty() {
            all
        } else {
            key.iter().cloned().zip(k).collect()
        },
        change,
        columns,
    }
}

/// SQLite's order of values under `COLLATE BINARY`: NULL, numbers, text,
/// blobs; text and blobs by their bytes.
pub fn cmp_value(a: &Value, b: &Value) -> Ordering {
    fn class(v: &Value) -> u8 {
        match v {
            Value::Null => 0,
            Value::Integer(_) | Value::Real(_) => 1,
            Value::Text(_) => 2,
            Value::Blob(_) => 3,
        }
    }
    match (a, b) {
        (Value::Integer(x), Value::Integer(y)) => x.cmp(y),
        (Value::Integer(x), Value::Real(y)) => cmp_int_real(*x, *y),
        (Value::Real(x), Value::Integer(y)) => cmp_int_real(*y, *x).reverse(),
        (Value::Real(x), Value::Real(y)) => x.total_cmp(y),
        (Value::Text(x), Value::Text(y)) => x.as_bytes().cmp(y.as_bytes()),
        (Value::Blob(x), Value::Blob(y)) => x.cmp(y),
        _ => class(a).cmp(&class(b)),
    }
}

fn cmp_int_real(i: i64, r: f64) -> Ordering {
    if r.is_nan() {
        return Ordering::Greater;
    }
    // Exact: compare in i128 when r is integral and in range, else as f64.
    if r.fract() == 0.0 && r.abs() < 1e38 {
        (i as i128).cmp(&(r as i128))
    } else {
        (i as f64).total_cmp(&r)
    }
}
