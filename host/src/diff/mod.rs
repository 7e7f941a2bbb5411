//! Comparing two state DBs: schema differences and, per table, the rows
//! added, removed and changed by primary key, with old and new values per
//! changed column. Host tables (`_rewind_*`) are left out.
//!
//! Both sides are read in primary-key order (`COLLATE BINARY`, which the
//! key's index serves), each on a thread of its own that copies its rows
//! out of SQLite in batches of a fixed size, and merged, so memory stays
//! flat whatever the size.
//! Tables without a primary key are compared by full row content, as
//! multisets, and flagged. A table that both sides laid out alike, page for
//! page, is not read row by row at all (`pages`).

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

use rusqlite::types::{Value, ValueRef};
use rusqlite::{Connection, OpenFlags};

use crate::findings::{Findings, FindingsError};
use crate::state::StateError;

mod pages;

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

impl std::fmt::Display for Ignore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ignore::Table(table) => f.write_str(table),
            Ignore::Column { table, column } => write!(f, "{table}.{column}"),
        }
    }
}

/// A comparison failed: a DB given to compare could not be read (what any
/// command says of a state DB it cannot read, with what to do), or what
/// differs could not be kept.
#[derive(Debug, thiserror::Error)]
pub enum DiffError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Findings(#[from] FindingsError),
}

impl DiffError {
    /// The error for `error`, met reading the DB at `path`.
    pub(crate) fn reading(path: &Path, error: rusqlite::Error) -> DiffError {
        DiffError::State(StateError::from_sqlite(path, error))
    }
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

/// The differences of one table (its rows are in the comparison's
/// [`Findings`]).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TableDiff {
    pub name: String,
    /// Compared by primary key; `false`: by full row content.
    pub keyed: bool,
    pub key_columns: Vec<String>,
    pub added: u64,
    pub removed: u64,
    pub changed: u64,
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
    /// Ignore rules that name no table (or column) of either state: most
    /// likely misspelt, since they leave nothing out.
    pub unmatched: Vec<Ignore>,
}

impl StateDiff {
    pub fn is_empty(&self) -> bool {
        self.schema.is_empty() && self.tables.is_empty()
    }

    /// Adds the differences of another pair of DBs (another partition of
    /// the same state, its rows added to the same findings): tables of one
    /// name become one table.
    pub fn merge(&mut self, other: StateDiff) {
        let schema = &mut self.schema;
        for (into, from) in [
            (&mut schema.tables_only_old, other.schema.tables_only_old),
            (&mut schema.tables_only_new, other.schema.tables_only_new),
        ] {
            for table in from {
                if !into.contains(&table) {
                    into.push(table);
                }
            }
        }
        for column in other.schema.columns {
            if !schema.columns.contains(&column) {
                schema.columns.push(column);
            }
        }
        for table in other.tables {
            match self.tables.iter_mut().find(|t| t.name == table.name) {
                Some(into) => {
                    into.added += table.added;
                    into.removed += table.removed;
                    into.changed += table.changed;
                }
                None => self.tables.push(table),
            }
        }
        self.tables.sort_by(|a, b| a.name.cmp(&b.name));
        // A rule matches the whole if it matches any part.
        self.unmatched.retain(|rule| other.unmatched.contains(rule));
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
    let err = |error| DiffError::reading(path, error);
    if !path.exists() {
        return Err(DiffError::State(StateError::Missing {
            path: path.to_owned(),
        }));
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

/// Compares two state DBs (old, new); the differing rows go to `findings`.
pub fn diff_states(
    old: &Path,
    new: &Path,
    ignore: &[Ignore],
    findings: &Findings,
) -> Result<StateDiff, DiffError> {
    let (mut a, mut b) = (open(old)?, open(new)?);
    let err_a = |error| DiffError::reading(old, error);
    let err_b = |error| DiffError::reading(new, error);
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
    let unmatched = ignore
        .iter()
        .filter(|rule| {
            !old_shapes
                .iter()
                .chain(&new_shapes)
                .any(|(t, s)| match rule {
                    Ignore::Table(table) => table == t,
                    Ignore::Column { table, column } => table == t && s.columns.contains(column),
                })
        })
        .cloned()
        .collect();
    old_shapes.retain(|t, _| !ignored_table(t));
    new_shapes.retain(|t, _| !ignored_table(t));
    for (t, s) in old_shapes.iter_mut().chain(new_shapes.iter_mut()) {
        s.columns.retain(|c| !ignored_column(t, c));
    }

    let mut diff = StateDiff {
        unmatched,
        ..StateDiff::default()
    };
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
        if so.is_some() && sn.is_some() && pages::same_pages(&a, &b, name) {
            continue;
        }
        let table =
            diff_table(name, (&mut a, so), (&mut b, sn), findings).map_err(|e| match e {
                Failed::Reading(side, error) => {
                    DiffError::reading(if side { new } else { old }, error)
                }
                Failed::Keeping(e) => DiffError::Findings(e),
            })?;
        if table.added + table.removed + table.changed > 0 {
            diff.tables.push(table);
        }
    }
    Ok(diff)
}

/// A side's rows of a table, in key order: key columns, then `columns`.
fn side<'c>(
    conn: &'c Connection,
    table: &str,
    key: &[String],
    columns: &[String],
) -> rusqlite::Result<rusqlite::Statement<'c>> {
    let order = if key.is_empty() { columns } else { key };
    let select: Vec<String> = key.iter().chain(columns).map(|c| quote(c)).collect();
    let order: Vec<String> = order
        .iter()
        .map(|c| format!("{} COLLATE BINARY", quote(c)))
        .collect();
    let sql = format!(
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
    );
    conn.prepare(&sql)
}

/// Why a table's comparison stopped: reading a side (`true`: new), or
/// keeping a differing row.
enum Failed {
    Reading(bool, rusqlite::Error),
    Keeping(FindingsError),
}

impl From<FindingsError> for Failed {
    fn from(error: FindingsError) -> Failed {
        Failed::Keeping(error)
    }
}

fn diff_table(
    name: &str,
    (a, old): (&mut Connection, Option<&TableShape>),
    (b, new): (&mut Connection, Option<&TableShape>),
    findings: &Findings,
) -> Result<TableDiff, Failed> {
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
    // Each side is read on a thread of its own (SQLite's stepping and
    // column reads are most of a diff's work) and merged here.
    std::thread::scope(|scope| {
        let (ta, ra) = sync_channel(SCAN_AHEAD);
        let (tb, rb) = sync_channel(SCAN_AHEAD);
        let (key, old_cols_ref, new_cols_ref) = (&key, &old_cols, &new_cols);
        for (present, conn, columns, tx, new_side, thread) in [
            (old.is_some(), a, old_cols_ref, ta, false, "rewind-diff-old"),
            (new.is_some(), b, new_cols_ref, tb, true, "rewind-diff-new"),
        ] {
            if !present {
                continue;
            }
            let spawned = std::thread::Builder::new()
                .name(thread.into())
                .spawn_scoped(scope, move || scan(conn, name, key, columns, tx));
            if let Err(error) = spawned {
                let why = format!("cannot start a thread to read it: {error}");
                return Err(Failed::Reading(new_side, stopped(&why)));
            }
        }
        let sides = (
            Cursor::new(old.is_some().then_some(ra), false)?,
            Cursor::new(new.is_some().then_some(rb), true)?,
        );
        let columns = (old_cols_ref.as_slice(), new_cols_ref.as_slice());
        merge(&mut out, key, columns, sides, findings)?;
        Ok(out)
    })
}

/// Merges the two sides' rows, in key order, into `out` and `findings`.
/// Dropping the cursors (on return) stops their reading threads.
fn merge(
    out: &mut TableDiff,
    key: &[String],
    (old_cols, new_cols): (&[String], &[String]),
    (mut ca, mut cb): (Cursor, Cursor),
    findings: &Findings,
) -> Result<(), Failed> {
    let name = out.name.clone();
    let k = key.len();
    // Where each of old's compared columns sits in new's rows.
    let in_new: Vec<Option<usize>> = old_cols
        .iter()
        .map(|c| new_cols.iter().position(|n| n == c).map(|i| k + i))
        .collect();
    let (width_a, width_b) = (k + old_cols.len(), k + new_cols.len());
    loop {
        let order = match (ca.row(), cb.row()) {
            (None, None) => break,
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some(x), Some(y)) => {
                let n = if out.keyed { k } else { width_a.min(width_b) };
                cmp_refs(x, y, n)
            }
        };
        match order {
            Ordering::Less => {
                let row = owned(ca.row().expect("old has a row"), width_a);
                let (kv, v) = split(row, k);
                out.removed += 1;
                findings.add_row(&name, &whole(key, kv, old_cols, v, RowChange::Removed))?;
                ca.advance()?;
            }
            Ordering::Greater => {
                let row = owned(cb.row().expect("new has a row"), width_b);
                let (kv, v) = split(row, k);
                out.added += 1;
                findings.add_row(&name, &whole(key, kv, new_cols, v, RowChange::Added))?;
                cb.advance()?;
            }
            Ordering::Equal => {
                let (rx, ry) = (ca.row().expect("a row"), cb.row().expect("a row"));
                if out.keyed {
                    let mut columns = Vec::new();
                    for (i, c) in old_cols.iter().enumerate() {
                        let Some(j) = in_new[i] else { continue };
                        let (va, vb) = (rx.get(k + i), ry.get(j));
                        if !same_ref(va, vb) {
                            columns.push((c.clone(), Some(to_value(va)), Some(to_value(vb))));
                        }
                    }
                    if !columns.is_empty() {
                        let kv = (0..k).map(|i| to_value(rx.get(i)));
                        out.changed += 1;
                        findings.add_row(
                            &name,
                            &RowDiff {
                                key: key.iter().cloned().zip(kv).collect(),
                                change: RowChange::Changed,
                                columns,
                            },
                        )?;
                    }
                }
                ca.advance()?;
                cb.advance()?;
            }
        }
    }
    Ok(())
}

/// Rows a side's thread reads into one batch.
const SCAN_BATCH: usize = 1024;
/// Batches a side's thread may read ahead of the merge.
const SCAN_AHEAD: usize = 2;

/// What a side's thread sends: a batch, the end (`None`), or why it stopped.
type Scanned = rusqlite::Result<Option<Batch>>;

/// One value of a read row; a text's or blob's bytes are in [`Batch::bytes`].
#[derive(Debug, Clone, Copy)]
enum Cell {
    Null,
    Integer(i64),
    Real(f64),
    Text(usize, usize),
    Blob(usize, usize),
}

/// Rows of one side, copied out of SQLite on the side's thread: `width`
/// cells a row, with no allocation per value.
#[derive(Debug, Default)]
struct Batch {
    rows: usize,
    width: usize,
    cells: Vec<Cell>,
    bytes: Vec<u8>,
}

impl Batch {
    fn push(&mut self, value: ValueRef<'_>) {
        let mut bytes = |b: &[u8]| {
            let start = self.bytes.len();
            self.bytes.extend_from_slice(b);
            (start, self.bytes.len())
        };
        let cell = match value {
            ValueRef::Null => Cell::Null,
            ValueRef::Integer(i) => Cell::Integer(i),
            ValueRef::Real(r) => Cell::Real(r),
            ValueRef::Text(t) => {
                let (start, end) = bytes(t);
                Cell::Text(start, end)
            }
            ValueRef::Blob(b) => {
                let (start, end) = bytes(b);
                Cell::Blob(start, end)
            }
        };
        self.cells.push(cell);
    }
}

/// A row of a batch.
#[derive(Clone, Copy)]
struct RowRef<'b> {
    batch: &'b Batch,
    row: usize,
}

impl<'b> RowRef<'b> {
    fn get(&self, column: usize) -> ValueRef<'b> {
        let batch = self.batch;
        match batch.cells[self.row * batch.width + column] {
            Cell::Null => ValueRef::Null,
            Cell::Integer(i) => ValueRef::Integer(i),
            Cell::Real(r) => ValueRef::Real(r),
            Cell::Text(start, end) => ValueRef::Text(&batch.bytes[start..end]),
            Cell::Blob(start, end) => ValueRef::Blob(&batch.bytes[start..end]),
        }
    }
}

/// Reads a side's rows of `table` in key order (see [`side`]) and sends
/// them in batches, then the end; stops early when the merge is gone.
fn scan(
    conn: &mut Connection,
    table: &str,
    key: &[String],
    columns: &[String],
    tx: SyncSender<Scanned>,
) {
    let width = key.len() + columns.len();
    let read = || -> rusqlite::Result<()> {
        let mut statement = side(conn, table, key, columns)?;
        let mut rows = statement.query([])?;
        loop {
            let mut batch = Batch {
                width,
                ..Batch::default()
            };
            while batch.rows < SCAN_BATCH {
                let Some(row) = rows.next()? else { break };
                for i in 0..width {
                    batch.push(row.get_ref(i)?);
                }
                batch.rows += 1;
            }
            let end = batch.rows < SCAN_BATCH;
            if batch.rows > 0 && tx.send(Ok(Some(batch))).is_err() {
                return Ok(());
            }
            if end {
                return Ok(());
            }
        }
    };
    let _ = match read() {
        Ok(()) => tx.send(Ok(None)),
        Err(error) => tx.send(Err(error)),
    };
}

/// The error for a side whose reading stopped other than through SQLite.
fn stopped(why: &str) -> rusqlite::Error {
    rusqlite::Error::UserFunctionError(why.into())
}

/// The merge's place in one side's rows.
struct Cursor {
    /// `None` once the side has sent its end (or has no such table).
    rx: Option<Receiver<Scanned>>,
    /// Whether this is the new side (for errors).
    new: bool,
    batch: Batch,
    at: usize,
}

impl Cursor {
    fn new(rx: Option<Receiver<Scanned>>, new: bool) -> Result<Cursor, Failed> {
        let mut cursor = Cursor {
            rx,
            new,
            batch: Batch::default(),
            at: 0,
        };
        cursor.fill()?;
        Ok(cursor)
    }

    /// The current row, if the side has one left.
    fn row(&self) -> Option<RowRef<'_>> {
        (self.at < self.batch.rows).then_some(RowRef {
            batch: &self.batch,
            row: self.at,
        })
    }

    fn advance(&mut self) -> Result<(), Failed> {
        self.at += 1;
        if self.at >= self.batch.rows {
            self.fill()?;
        }
        Ok(())
    }

    /// The next batch, or none left.
    fn fill(&mut self) -> Result<(), Failed> {
        self.at = 0;
        self.batch.rows = 0;
        let Some(rx) = &self.rx else {
            return Ok(());
        };
        match rx.recv() {
            Ok(Ok(Some(batch))) => self.batch = batch,
            Ok(Ok(None)) => self.rx = None,
            Ok(Err(error)) => return Err(Failed::Reading(self.new, error)),
            // Only a panic ends a side without its end or an error.
            Err(_) => {
                return Err(Failed::Reading(
                    self.new,
                    stopped("its reading thread stopped"),
                ));
            }
        }
        Ok(())
    }
}

fn owned(row: RowRef<'_>, width: usize) -> Vec<Value> {
    (0..width).map(|i| to_value(row.get(i))).collect()
}

fn split(mut row: Vec<Value>, k: usize) -> (Vec<Value>, Vec<Value>) {
    let rest = row.split_off(k);
    (row, rest)
}

/// Compares the first `n` columns of two rows in SQLite's BINARY order.
fn cmp_refs(a: RowRef<'_>, b: RowRef<'_>, n: usize) -> Ordering {
    for i in 0..n {
        let (x, y) = (a.get(i), b.get(i));
        let order = match (x, y) {
            (ValueRef::Text(p), ValueRef::Text(q)) | (ValueRef::Blob(p), ValueRef::Blob(q)) => {
                p.cmp(q)
            }
            (ValueRef::Integer(p), ValueRef::Integer(q)) => p.cmp(&q),
            _ => cmp_value(&to_value(x), &to_value(y)),
        };
        if order != Ordering::Equal {
            return order;
        }
    }
    Ordering::Equal
}

/// A value copied out of a row. A text that is not UTF-8 (SQL can store
/// one: `CAST(x'ff' AS TEXT)`) is kept with U+FFFD for its bad bytes
/// rather than failing the whole diff.
fn to_value(v: ValueRef<'_>) -> Value {
    match v {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(i) => Value::Integer(i),
        ValueRef::Real(r) => Value::Real(r),
        ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
        ValueRef::Blob(b) => Value::Blob(b.to_vec()),
    }
}

fn same_ref(a: ValueRef<'_>, b: ValueRef<'_>) -> bool {
    match (a, b) {
        (ValueRef::Real(x), ValueRef::Real(y)) => x.to_bits() == y.to_bits(),
        _ => a == b,
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Texts that are not UTF-8, in keys and values, in rows that differ
    /// and rows only one side has: reported (lossily), not an error.
    #[test]
    fn texts_that_are_not_utf8_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.db"), dir.path().join("b.db"));
        for (path, rows) in [
            (
                &a,
                "('a', CAST(x'ff41' AS TEXT)), (CAST(x'fe' AS TEXT), 'gone')",
            ),
            (&b, "('a', 'b'), ('c', CAST(x'c3' AS TEXT))"),
        ] {
            Connection::open(path)
                .unwrap()
                .execute_batch(&format!(
                    "CREATE TABLE t (k TEXT PRIMARY KEY, v TEXT); INSERT INTO t VALUES {rows};"
                ))
                .unwrap();
        }
        let findings = Findings::temporary().unwrap();
        let diff = diff_states(&a, &b, &[], &findings).unwrap();
        let t = &diff.tables[0];
        assert_eq!((t.added, t.removed, t.changed), (1, 1, 1));
        let text = |s: &str| Some(Value::Text(s.into()));
        let rows = findings.rows(&t.name).unwrap();
        let row = |change| rows.iter().find(|r| r.change == change).unwrap();
        assert_eq!(
            row(RowChange::Changed).columns,
            [("v".to_owned(), text("\u{fffd}A"), text("b"))]
        );
        assert_eq!(
            row(RowChange::Removed).key,
            [("k".to_owned(), Value::Text("\u{fffd}".into()))]
        );
        assert!(
            row(RowChange::Added)
                .columns
                .contains(&("v".to_owned(), None, text("\u{fffd}")))
        );
    }
}
