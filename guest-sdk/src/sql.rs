//! SQL on the processor's own SQLite database.
//!
//! Statements take positional parameters (`?1`, `?2`, …) as a slice of
//! [`ToSql`] values and return typed rows:
//!
//! ```no_run
//! use rewind_guest::sql;
//!
//! # fn add(key: &str, amount: i64) -> Result<i64, sql::SqlError> {
//! sql::execute("UPDATE totals SET n = n + ?2 WHERE key = ?1", &[&key, &amount])?;
//! if let Some(row) = sql::query_row("SELECT n FROM totals WHERE key = ?1", &[&key])? {
//!     let n: i64 = row.get(0)?;
//!     return Ok(n);
//! }
//! # Ok(0)
//! # }
//! ```
//!
//! Every statement runs inside the current event's savepoint. Host tables
//! (`_rewind_*`), the schema table, the storage tables (`dbstat`,
//! `sqlite_dbpage`), ATTACH, PRAGMA, transactions and extensions are refused
//! with an error.
//!
//! SQL is as deterministic as the rest: `random()`, `randomblob()` and
//! `'now'` follow the event; `changes()`, `total_changes()` and
//! `last_insert_rowid()` start at 0 with each event and count its own
//! statements. Two things would let SQLite decide by chance, so they fail
//! the event (a dead letter of class `nondeterministic-sql`): storing a row
//! with the largest rowid (`i64::MAX`; SQLite then picks later rowids at
//! random), and a subquery, view or `CREATE TABLE … AS SELECT` whose alike
//! column names SQLite must number past `name:4`, six `a`s say (it numbers
//! the next one at random; a query's result with such names is refused with
//! an error instead).

use std::fmt;
use std::rc::Rc;

use crate::__private::bindings::rewind::processor::sql as wit;

/// A SQLite value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// SQL NULL.
    Null,
    /// A 64-bit integer.
    Integer(i64),
    /// A 64-bit float.
    Real(f64),
    /// UTF-8 text.
    Text(String),
    /// Bytes.
    Blob(Vec<u8>),
}

/// A SQL statement failed; the message is SQLite's (or the host's guard's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqlError(String);

impl SqlError {
    /// The error message.
    pub fn message(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SqlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sql: {}", self.0)
    }
}

impl std::error::Error for SqlError {}

/// A borrowed SQLite value, as bound to a statement parameter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ValueRef<'a> {
    /// SQL NULL.
    Null,
    /// A 64-bit integer.
    Integer(i64),
    /// A 64-bit float.
    Real(f64),
    /// UTF-8 text.
    Text(&'a str),
    /// Bytes.
    Blob(&'a [u8]),
}

/// A value that can be bound as a statement parameter.
pub trait ToSql {
    /// The SQLite value to bind, borrowed from `self`.
    fn to_sql(&self) -> ValueRef<'_>;
}

/// A value that can be read from a result column.
pub trait FromSql: Sized {
    /// Converts a column value, or explains why it cannot.
    fn from_sql(value: &Value) -> Result<Self, SqlError>;
}

impl ToSql for Value {
    fn to_sql(&self) -> ValueRef<'_> {
        match self {
            Value::Null => ValueRef::Null,
            Value::Integer(i) => ValueRef::Integer(*i),
            Value::Real(r) => ValueRef::Real(*r),
            Value::Text(s) => ValueRef::Text(s),
            Value::Blob(b) => ValueRef::Blob(b),
        }
    }
}

impl ToSql for str {
    fn to_sql(&self) -> ValueRef<'_> {
        ValueRef::Text(self)
    }
}

impl ToSql for String {
    fn to_sql(&self) -> ValueRef<'_> {
        ValueRef::Text(self)
    }
}

impl ToSql for [u8] {
    fn to_sql(&self) -> ValueRef<'_> {
        ValueRef::Blob(self)
    }
}

impl ToSql for Vec<u8> {
    fn to_sql(&self) -> ValueRef<'_> {
        ValueRef::Blob(self)
    }
}

impl ToSql for f64 {
    fn to_sql(&self) -> ValueRef<'_> {
        ValueRef::Real(*self)
    }
}

impl ToSql for bool {
    fn to_sql(&self) -> ValueRef<'_> {
        ValueRef::Integer(i64::from(*self))
    }
}

impl<T: ToSql + ?Sized> ToSql for &T {
    fn to_sql(&self) -> ValueRef<'_> {
        (**self).to_sql()
    }
}

impl<T: ToSql> ToSql for Option<T> {
    fn to_sql(&self) -> ValueRef<'_> {
        self.as_ref().map_or(ValueRef::Null, ToSql::to_sql)
    }
}

macro_rules! integer_sql {
    ($($ty:ty),*) => {$(
        impl ToSql for $ty {
            fn to_sql(&self) -> ValueRef<'_> {
                ValueRef::Integer(i64::from(*self))
            }
        }

        impl FromSql for $ty {
            fn from_sql(value: &Value) -> Result<Self, SqlError> {
                match value {
                    Value::Integer(i) => <$ty>::try_from(*i).map_err(|_| {
                        SqlError(format!("{i} does not fit in {}", stringify!($ty)))
                    }),
                    other => Err(mismatch(stringify!($ty), other)),
                }
            }
        }
    )*};
}

integer_sql!(i8, i16, i32, i64, u8, u16, u32);

fn mismatch(wanted: &str, got: &Value) -> SqlError {
    SqlError(format!("expected {wanted}, got {got:?}"))
}

impl FromSql for Value {
    fn from_sql(value: &Value) -> Result<Self, SqlError> {
        Ok(value.clone())
    }
}

impl FromSql for String {
    fn from_sql(value: &Value) -> Result<Self, SqlError> {
        match value {
            Value::Text(s) => Ok(s.clone()),
            other => Err(mismatch("text", other)),
        }
    }
}

impl FromSql for Vec<u8> {
    fn from_sql(value: &Value) -> Result<Self, SqlError> {
        match value {
            Value::Blob(b) => Ok(b.clone()),
            Value::Text(s) => Ok(s.as_bytes().to_vec()),
            other => Err(mismatch("blob", other)),
        }
    }
}

impl FromSql for f64 {
    fn from_sql(value: &Value) -> Result<Self, SqlError> {
        match value {
            Value::Real(r) => Ok(*r),
            // SQLite stores integral REAL values as integers in some cases;
            // reading them back as floats is always exact enough to expect.
            Value::Integer(i) => Ok(*i as f64),
            other => Err(mismatch("real", other)),
        }
    }
}

impl FromSql for bool {
    fn from_sql(value: &Value) -> Result<Self, SqlError> {
        match value {
            Value::Integer(i) => Ok(*i != 0),
            other => Err(mismatch("boolean (integer)", other)),
        }
    }
}

impl<T: FromSql> FromSql for Option<T> {
    fn from_sql(value: &Value) -> Result<Self, SqlError> {
        match value {
            Value::Null => Ok(None),
            other => T::from_sql(other).map(Some),
        }
    }
}

fn to_wit<'a>(param: &'a dyn ToSql) -> wit::ValueParam<'a> {
    match param.to_sql() {
        ValueRef::Null => wit::ValueParam::Null,
        ValueRef::Integer(i) => wit::ValueParam::Integer(i),
        ValueRef::Real(r) => wit::ValueParam::Real(r),
        ValueRef::Text(s) => wit::ValueParam::Text(s),
        ValueRef::Blob(b) => wit::ValueParam::Blob(b),
    }
}

/// Parameter lists up to this long are converted on the stack.
pub(crate) const INLINE_PARAMS: usize = 16;

/// Calls `f` with `params` in the world's form: on the stack when there are
/// few (every statement of a typical processor), saving an allocation per call.
fn with_wit<R>(params: &[&dyn ToSql], f: impl FnOnce(&[wit::ValueParam<'_>]) -> R) -> R {
    if params.len() <= INLINE_PARAMS {
        let mut inline: [wit::ValueParam<'_>; INLINE_PARAMS] =
            std::array::from_fn(|_| wit::ValueParam::Null);
        for (slot, param) in inline.iter_mut().zip(params) {
            *slot = to_wit(*param);
        }
        f(&inline[..params.len()])
    } else {
        f(&params.iter().map(|p| to_wit(*p)).collect::<Vec<_>>())
    }
}

fn from_wit(value: wit::ValueResult) -> Value {
    match value {
        wit::ValueResult::Null => Value::Null,
        wit::ValueResult::Integer(i) => Value::Integer(i),
        wit::ValueResult::Real(r) => Value::Real(r),
        wit::ValueResult::Text(s) => Value::Text(s),
        wit::ValueResult::Blob(b) => Value::Blob(b),
    }
}

/// Runs one statement and returns how many rows it changed.
pub fn execute(statement: &str, params: &[&dyn ToSql]) -> Result<u64, SqlError> {
    #[cfg(target_arch = "wasm32")]
    let changed = crate::sql_abi::execute(statement, params);
    #[cfg(not(target_arch = "wasm32"))]
    let changed = with_wit(params, |params| wit::execute(statement, params));
    changed.map_err(SqlError)
}

/// Runs one statement and returns all of its rows.
pub fn query(statement: &str, params: &[&dyn ToSql]) -> Result<Rows, SqlError> {
    let result = with_wit(params, |params| wit::query(statement, params)).map_err(SqlError)?;
    let columns: Rc<[String]> = result.columns.into();
    let rows = result
        .rows
        .into_iter()
        .map(|values| Row {
            columns: Rc::clone(&columns),
            values: values.into_iter().map(from_wit).collect(),
        })
        .collect();
    Ok(Rows { columns, rows })
}

/// Runs one statement and returns its first row, if it yields any.
pub fn query_row(statement: &str, params: &[&dyn ToSql]) -> Result<Option<Row>, SqlError> {
    Ok(query(statement, params)?.rows.into_iter().next())
}

/// The rows a query returned.
#[derive(Debug, Clone)]
pub struct Rows {
    columns: Rc<[String]>,
    rows: Vec<Row>,
}

impl Rows {
    /// The column names, in order.
    pub fn columns(&self) -> &[String] {
        &self.columns
    }

    /// The number of rows.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether the query returned no rows.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The rows, in order.
    pub fn iter(&self) -> std::slice::Iter<'_, Row> {
        self.rows.iter()
    }
}

impl IntoIterator for Rows {
    type Item = Row;
    type IntoIter = std::vec::IntoIter<Row>;

    fn into_iter(self) -> Self::IntoIter {
        self.rows.into_iter()
    }
}

/// Selects a column by position or by name.
pub trait ColumnIndex {
    /// The position of the column in `columns`, if it is there.
    fn position(&self, columns: &[String]) -> Option<usize>;
}

impl ColumnIndex for usize {
    fn position(&self, columns: &[String]) -> Option<usize> {
        (*self < columns.len()).then_some(*self)
    }
}

impl ColumnIndex for &str {
    fn position(&self, columns: &[String]) -> Option<usize> {
        columns.iter().position(|c| c == self)
    }
}

/// One result row.
#[derive(Debug, Clone)]
pub struct Row {
    columns: Rc<[String]>,
    values: Vec<Value>,
}

impl Row {
    /// Reads a column by position (`0`) or name (`"amount_cents"`).
    pub fn get<T: FromSql>(&self, column: impl ColumnIndex + fmt::Debug) -> Result<T, SqlError> {
        let index = column
            .position(&self.columns)
            .ok_or_else(|| SqlError(format!("no column {column:?}")))?;
        T::from_sql(&self.values[index])
            .map_err(|e| SqlError(format!("column {}: {}", self.columns[index], e.0)))
    }

    /// The raw values, in column order.
    pub fn values(&self) -> &[Value] {
        &self.values
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(values: Vec<Value>) -> Row {
        let columns: Rc<[String]> =
            vec!["id".to_owned(), "name".to_owned(), "score".to_owned()].into();
        Row { columns, values }
    }

    #[test]
    fn parameters_reach_the_world_in_order_on_the_stack_or_not() {
        for n in [0, 1, INLINE_PARAMS, INLINE_PARAMS + 1, 3 * INLINE_PARAMS] {
            let numbers: Vec<i64> = (0..n as i64).collect();
            let texts: Vec<String> = numbers.iter().map(|i| format!("t{i}")).collect();
            let params: Vec<&dyn ToSql> = numbers
                .iter()
                .zip(&texts)
                .map(|(i, t)| if i % 2 == 0 { i as &dyn ToSql } else { t })
                .collect();
            with_wit(&params, |lowered| {
                assert_eq!(lowered.len(), n);
                for (i, value) in lowered.iter().enumerate() {
                    match value {
                        wit::ValueParam::Integer(v) => assert_eq!(*v, i as i64),
                        wit::ValueParam::Text(t) => assert_eq!(*t, format!("t{i}")),
                        _ => panic!("parameter {i} changed kind"),
                    }
                    assert_eq!(i % 2 == 0, matches!(value, wit::ValueParam::Integer(_)));
                }
            });
        }
    }

    #[test]
    fn rows_read_by_position_and_by_name() {
        let r = row(vec![
            Value::Integer(7),
            Value::Text("ada".into()),
            Value::Null,
        ]);
        assert_eq!(r.get::<i64>(0), Ok(7));
        assert_eq!(r.get::<String>("name"), Ok("ada".to_owned()));
        assert_eq!(r.get::<Option<f64>>("score"), Ok(None));
        assert!(
            r.get::<i64>("missing")
                .unwrap_err()
                .message()
                .contains("no column")
        );
        assert!(r.get::<i64>(9).is_err());
    }

    #[test]
    fn type_mismatches_are_errors_naming_the_column() {
        let r = row(vec![
            Value::Text("x".into()),
            Value::Integer(300),
            Value::Real(1.5),
        ]);
        let err = r.get::<i64>("id").unwrap_err();
        assert!(err.message().contains("column id"), "{err}");
        assert!(
            r.get::<u8>("name")
                .unwrap_err()
                .message()
                .contains("does not fit")
        );
        assert_eq!(r.get::<f64>("score"), Ok(1.5));
        assert_eq!(r.get::<bool>("name"), Ok(true));
    }

    #[test]
    fn parameters_borrow_instead_of_copying() {
        let owned = String::from("o-1");
        let blob = vec![1u8, 2];
        let none: Option<i64> = None;
        let params: [&dyn ToSql; 5] = [&owned, &"lit", &blob, &none, &Some(3u32)];
        let values: Vec<ValueRef<'_>> = params.iter().map(|p| p.to_sql()).collect();
        assert_eq!(
            values,
            vec![
                ValueRef::Text("o-1"),
                ValueRef::Text("lit"),
                ValueRef::Blob(&[1, 2]),
                ValueRef::Null,
                ValueRef::Integer(3)
            ]
        );
    }
}
