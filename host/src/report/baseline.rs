//! The approved baseline of the gate (`--expect`), read from its file as a
//! report [`Source`]: its head in memory, the entries of its long lists in
//! a private scratch database. A baseline that differs from the current
//! report (or that `--accept` did not write) is then checked in bounded
//! memory whatever its length: read whole, one of 22 MB took ~165 MiB.

use std::cell::RefCell;
use std::path::Path;

use rusqlite::{Connection, params};
use serde::Deserializer as _;
use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value as Json};

use super::{List, Source, Stop};
use crate::findings::{FindingsError, Version};

/// An approved baseline, its long lists kept on disk.
pub struct Baseline {
    head: Json,
    /// `entries(list, body)`: each entry's JSON in the file's order; `list`
    /// is [`OUTPUTS`], [`ONLY_OLD`], [`ONLY_NEW`], or [`FIRST_TABLE`] plus
    /// the table's index in `tables`.
    store: Connection,
    /// Each table's name, by its index (`None`: it has no name).
    tables: Vec<Option<String>>,
}

const OUTPUTS: i64 = 0;
const ONLY_OLD: i64 = 1;
const ONLY_NEW: i64 = 2;
const FIRST_TABLE: i64 = 3;

/// Why a baseline could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BaselineError {
    /// The file could not be read.
    #[error("{0}")]
    Read(std::io::Error),
    /// The file is not JSON.
    #[error("{0}")]
    NotJson(serde_json::Error),
    /// The scratch database could not be written.
    #[error(transparent)]
    Scratch(FindingsError),
}

/// A private scratch database: SQLite makes it in the temporary directory
/// and removes it when the connection closes (or the process ends).
fn scratch() -> Result<Connection, FindingsError> {
    let conn = Connection::open("").map_err(scratch_error)?;
    // Never committed: the transaction spares a journal and sync per row.
    conn.execute_batch("PRAGMA journal_mode = OFF; BEGIN")
        .map_err(scratch_error)?;
    Ok(conn)
}

fn scratch_error(source: rusqlite::Error) -> FindingsError {
    FindingsError::Scratch { source }
}

/// The JSON entry in `column` of a scratch database's row. The databases
/// hold only JSON they were given: anything else means the file was damaged
/// meanwhile, an error like any other of the file's.
fn entry(row: &rusqlite::Row<'_>, column: usize) -> rusqlite::Result<Json> {
    let body = row.get_ref(column)?;
    let not_json = |e: Box<dyn std::error::Error + Send + Sync>| {
        rusqlite::Error::FromSqlConversionFailure(column, body.data_type(), e)
    };
    let bytes = body.as_bytes().map_err(|e| not_json(Box::new(e)))?;
    serde_json::from_slice(bytes).map_err(|e| not_json(Box::new(e)))
}

impl Baseline {
    /// Reads the baseline at `path`, streaming its long lists into a
    /// scratch database.
    pub fn read(path: &Path) -> Result<Baseline, BaselineError> {
        let file = std::fs::File::open(path).map_err(BaselineError::Read)?;
        let store = scratch().map_err(BaselineError::Scratch)?;
        store
            .execute_batch("CREATE TABLE entries (list INTEGER NOT NULL, body TEXT NOT NULL)")
            .map_err(|e| BaselineError::Scratch(scratch_error(e)))?;
        let (read, failed, tables) = {
            let loader = Loader {
                store: &store,
                insert: RefCell::new(
                    store
                        .prepare("INSERT INTO entries (list, body) VALUES (?1, ?2)")
                        .map_err(|e| BaselineError::Scratch(scratch_error(e)))?,
                ),
                failed: RefCell::new(None),
                tables: RefCell::new(Vec::new()),
            };
            let mut json = serde_json::Deserializer::from_reader(std::io::BufReader::new(file));
            let read = (&mut json)
                .deserialize_any(AnyJson {
                    loader: &loader,
                    kind: Kind::Top,
                })
                .and_then(|head| json.end().map(|()| head));
            (read, loader.failed.take(), loader.tables.take())
        };
        if let Some(e) = failed {
            return Err(BaselineError::Scratch(scratch_error(e)));
        }
        let head = read.map_err(|e| match e.io_error_kind() {
            Some(_) => BaselineError::Read(e.into()),
            None => BaselineError::NotJson(e),
        })?;
        // Each list is read on its own (and more than once): by an index made
        // once the entries are in, not by scanning every list's entries.
        store
            .execute_batch("CREATE INDEX entries_list ON entries (list)")
            .map_err(|e| BaselineError::Scratch(scratch_error(e)))?;
        Ok(Baseline {
            head,
            store,
            tables,
        })
    }

    /// The store's number for a list (`None`: the baseline has no such list).
    fn list_id(&self, list: &List) -> Option<i64> {
        Some(match list {
            List::Outputs => OUTPUTS,
            List::Dead(Version::Old) => ONLY_OLD,
            List::Dead(Version::New) => ONLY_NEW,
            // The first table of the name, as a report in memory finds it.
            List::Rows(name) => {
                let index = self.tables.iter().position(|t| t.as_ref() == Some(name))?;
                FIRST_TABLE + index as i64
            }
        })
    }
}

impl Source for Baseline {
    fn head(&self) -> &Json {
        &self.head
    }

    fn each(
        &self,
        list: &List,
        limit: Option<usize>,
        take: &mut dyn FnMut(Json) -> Result<(), Stop>,
    ) -> Result<(), Stop> {
        let Some(id) = self.list_id(list) else {
            return Ok(());
        };
        let limit = limit.map_or(-1, |l| i64::try_from(l).unwrap_or(i64::MAX));
        let mut stmt = self
            .store
            .prepare_cached("SELECT body FROM entries WHERE list = ?1 ORDER BY rowid LIMIT ?2")
            .map_err(scratch_error)?;
        let mut rows = stmt.query(params![id, limit]).map_err(scratch_error)?;
        while let Some(row) = rows.next().map_err(scratch_error)? {
            take(entry(row, 0).map_err(scratch_error)?)?;
        }
        Ok(())
    }
}

/// Streams a baseline's long lists into the scratch database as the file
/// is read.
struct Loader<'a> {
    store: &'a Connection,
    insert: RefCell<rusqlite::Statement<'a>>,
    /// The scratch database failed (reading stops with a placeholder error).
    failed: RefCell<Option<rusqlite::Error>>,
    tables: RefCell<Vec<Option<String>>>,
}

impl Loader<'_> {
    fn keep<E: de::Error>(&self, list: i64, entry: &Json) -> Result<(), E> {
        let body = entry.to_string();
        let mut insert = self.insert.borrow_mut();
        insert
            .execute(params![list, body])
            .map(drop)
            .map_err(|e| self.fail(e))
    }

    /// The entries kept for `list`, taken back out of the store.
    fn take_back<E: de::Error>(&self, list: i64) -> Result<Vec<Json>, E> {
        let read = || -> rusqlite::Result<Vec<Json>> {
            let mut stmt = self
                .store
                .prepare("SELECT body FROM entries WHERE list = ?1 ORDER BY rowid")?;
            let entries = stmt
                .query_map([list], |r| entry(r, 0))?
                .collect::<rusqlite::Result<_>>()?;
            self.store
                .execute("DELETE FROM entries WHERE list = ?1", [list])?;
            Ok(entries)
        };
        read().map_err(|e| self.fail(e))
    }

    fn fail<E: de::Error>(&self, e: rusqlite::Error) -> E {
        *self.failed.borrow_mut() = Some(e);
        E::custom("the scratch database failed")
    }
}

/// Where in a baseline a value is read, as far as its long lists go.
#[derive(Clone, Copy)]
enum Kind {
    Top,
    Tables,
    /// A table, and its index.
    Table(usize),
    Outputs,
    Dead,
    /// A long list, kept in the store under this number when it is an array
    /// (anything else is read as it is: a list without entries, as a report
    /// in memory reads it).
    List(i64),
    /// Anything else: read into memory.
    Plain,
}

/// Reads a value of the baseline as JSON, the long lists at `kind` left
/// out (as empty arrays) and kept in the scratch database.
struct AnyJson<'l, 'a> {
    loader: &'l Loader<'a>,
    kind: Kind,
}

impl<'de> DeserializeSeed<'de> for AnyJson<'_, '_> {
    type Value = Json;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Json, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for AnyJson<'_, '_> {
    type Value = Json;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Json, E> {
        Ok(Json::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Json, E> {
        Ok(v.into())
    }
    fn visit_u64<E>(self, v: u64) -> Result<Json, E> {
        Ok(v.into())
    }
    fn visit_f64<E>(self, v: f64) -> Result<Json, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Json::Null, Json::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Json, E> {
        Ok(Json::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Json, E> {
        Ok(Json::String(v))
    }
    fn visit_unit<E>(self) -> Result<Json, E> {
        Ok(Json::Null)
    }
    fn visit_none<E>(self) -> Result<Json, E> {
        Ok(Json::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Json, A::Error> {
        if let Kind::List(list) = self.kind {
            while let Some(entry) = seq.next_element::<Json>()? {
                self.loader.keep(list, &entry)?;
            }
            // Handed out by `Baseline::each`, as a report's lists are.
            return Ok(Json::Array(Vec::new()));
        }
        let mut items = Vec::new();
        let mut index = 0;
        loop {
            let kind = match self.kind {
                Kind::Tables => Kind::Table(index),
                _ => Kind::Plain,
            };
            let seed = AnyJson {
                loader: self.loader,
                kind,
            };
            let Some(item) = seq.next_element_seed(seed)? else {
                break;
            };
            let mut item = item;
            if let Kind::Table(i) = kind {
                let name = item["name"].as_str().map(str::to_owned);
                // A table without a name has no list of rows in a report:
                // its rows are a plain part of it, like any other value.
                if name.is_none() && item.get("rows").is_some_and(|r| r == &Json::Array(vec![])) {
                    item["rows"] = Json::Array(self.loader.take_back(FIRST_TABLE + i as i64)?);
                }
                let mut tables = self.loader.tables.borrow_mut();
                tables.resize(i + 1, None);
                tables[i] = name;
            }
            items.push(item);
            index += 1;
        }
        Ok(Json::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Json, A::Error> {
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let kind = match (self.kind, key.as_str()) {
                (Kind::Top, "tables") => Kind::Tables,
                (Kind::Top, "outputs") => Kind::Outputs,
                (Kind::Top, "dead_letters") => Kind::Dead,
                (Kind::Table(i), "rows") => Kind::List(FIRST_TABLE + i as i64),
                (Kind::Outputs, "events") => Kind::List(OUTPUTS),
                (Kind::Dead, "only_old") => Kind::List(ONLY_OLD),
                (Kind::Dead, "only_new") => Kind::List(ONLY_NEW),
                _ => Kind::Plain,
            };
            let value = map.next_value_seed(AnyJson {
                loader: self.loader,
                kind,
            })?;
            object.insert(key, value);
        }
        Ok(Json::Object(object))
    }
}

/// The entries of an approved list not yet matched with a current one,
/// by id, in a scratch database: the gate compares lists of any length in
/// bounded memory.
pub(super) struct Pending {
    conn: Connection,
}

impl Pending {
    pub(super) fn new() -> Result<Pending, FindingsError> {
        let conn = scratch()?;
        conn.execute_batch(
            "CREATE TABLE pending (id TEXT NOT NULL, body TEXT NOT NULL);
             CREATE INDEX pending_id ON pending (id)",
        )
        .map_err(scratch_error)?;
        Ok(Pending { conn })
    }

    pub(super) fn add(&self, id: &str, entry: &Json) -> Result<(), FindingsError> {
        self.conn
            .prepare_cached("INSERT INTO pending (id, body) VALUES (?1, ?2)")
            .and_then(|mut s| s.execute(params![id, entry.to_string()]))
            .map(drop)
            .map_err(scratch_error)
    }

    /// Matches `wanted` with a pending one of the same id: one equal to it,
    /// or else the first of them. Returns whether an equal one was found;
    /// the matched one is no longer pending either way.
    pub(super) fn take(&self, id: &str, wanted: &Json) -> Result<bool, FindingsError> {
        let mut first = None;
        let mut equal = None;
        {
            let mut stmt = self
                .conn
                .prepare_cached("SELECT rowid, body FROM pending WHERE id = ?1 ORDER BY rowid")
                .map_err(scratch_error)?;
            let mut rows = stmt.query([id]).map_err(scratch_error)?;
            while let Some(row) = rows.next().map_err(scratch_error)? {
                let rowid: i64 = row.get(0).map_err(scratch_error)?;
                first.get_or_insert(rowid);
                if entry(row, 1).map_err(scratch_error)? == *wanted {
                    equal = Some(rowid);
                    break;
                }
            }
        }
        if let Some(rowid) = equal.or(first) {
            self.conn
                .prepare_cached("DELETE FROM pending WHERE rowid = ?1")
                .and_then(|mut s| s.execute([rowid]))
                .map_err(scratch_error)?;
        }
        Ok(equal.is_some())
    }

    /// How many entries are still pending, and the least of their ids.
    pub(super) fn left(&self) -> Result<(usize, Option<String>), FindingsError> {
        self.conn
            .query_row("SELECT count(*), min(id) FROM pending", [], |r| {
                Ok((r.get::<_, i64>(0)? as usize, r.get(1)?))
            })
            .map_err(scratch_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{gate_changes, gate_digest};
    use serde_json::json;

    fn entries(source: &dyn Source, list: &List) -> Vec<Json> {
        let mut out = Vec::new();
        source
            .each(list, None, &mut |e| {
                out.push(e);
                Ok(())
            })
            .unwrap();
        out
    }

    fn read(dir: &Path, name: &str, text: &[u8]) -> Result<Baseline, BaselineError> {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        Baseline::read(&path)
    }

    /// A baseline read from its file is the same report as the JSON in
    /// memory, whatever its layout, including shapes no `--accept` writes:
    /// the same gate digest, the same entries of each list, the same verdict.
    #[test]
    fn a_baseline_read_from_its_file_is_the_report_it_holds() {
        let dir = tempfile::tempdir().unwrap();
        let row = |id: i64| json!({"key": {"id": id}, "change": "changed", "columns": {"n": {"old": 0, "new": id}}, "caused_by": [id]});
        let reports = [
            json!({
                "old": {"path": "a.wasm"}, "new": {"path": "b.wasm"},
                "summary": {"events": 3, "diverged_events": 2, "first_divergence": null},
                "schema": {"tables_only_old": [], "tables_only_new": []},
                "tables": [
                    {"name": "t", "keyed": true, "added": 0, "removed": 0, "changed": 2, "rows": [row(1), row(2)]},
                    {"name": "u", "rows": [row(3)]},
                ],
                "outputs": {"diverged_events": 1, "events": [{"seq": 2, "old": [], "new": [{"stream": "s"}]}]},
                "dead_letters": {"only_old": [{"seq": 1, "class": "invalid-input"}], "only_new": []},
            }),
            // Lists that are no lists, tables that are no tables, a name twice.
            json!({
                "summary": {"events": 1},
                "tables": ["t", {"rows": [row(1)]}, {"name": "t", "rows": 5}, {"name": "t", "rows": [row(2)]}],
                "outputs": {"events": {"seq": 1}},
                "dead_letters": {"only_old": "none", "only_new": [null, 1.5]},
                "extra": [{"rows": [row(9)]}],
            }),
            json!([1, {"tables": []}]),
            json!("just a string"),
        ];
        let lists = [
            List::Rows("t".into()),
            List::Rows("u".into()),
            List::Rows("none".into()),
            List::Outputs,
            List::Dead(Version::Old),
            List::Dead(Version::New),
        ];
        for (i, report) in reports.iter().enumerate() {
            let layouts = [
                serde_json::to_vec_pretty(report).unwrap(),
                serde_json::to_vec(report).unwrap(),
            ];
            for (j, text) in layouts.iter().enumerate() {
                let baseline = read(dir.path(), &format!("{i}-{j}.json"), text).unwrap();
                assert_eq!(
                    gate_digest(&baseline).unwrap(),
                    gate_digest(report).unwrap(),
                    "report {i}, layout {j}"
                );
                for list in &lists {
                    assert_eq!(
                        entries(&baseline, list),
                        entries(report, list),
                        "report {i}, {list:?}"
                    );
                }
                assert_eq!(
                    gate_changes(&baseline, &reports[0], 10).unwrap(),
                    gate_changes(report, &reports[0], 10).unwrap(),
                    "report {i}"
                );
            }
        }
    }

    /// A scratch database's entry that is no longer JSON (the file damaged
    /// meanwhile) is an error, not a panic.
    #[test]
    fn an_entry_that_is_no_longer_json_is_an_error() {
        let conn = Connection::open_in_memory().unwrap();
        let read = |sql: &str| conn.query_row(sql, [], |r| entry(r, 0));
        assert_eq!(
            read("SELECT '{\"a\": 1}'").unwrap(),
            serde_json::json!({"a": 1})
        );
        for damaged in ["SELECT '{\"a\": '", "SELECT x'ff00'", "SELECT 12"] {
            let error = scratch_error(read(damaged).unwrap_err());
            assert!(
                error.to_string().contains("temporary file"),
                "{damaged}: {error}"
            );
        }
    }

    /// What is not a readable JSON file says which of the two it is.
    #[test]
    fn a_baseline_that_is_not_json_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        for text in [
            &b"{\"summary\": "[..],
            b"{} trailing",
            b"",
            b"{\"tables\": [\xff]}",
        ] {
            match read(dir.path(), "bad.json", text) {
                Err(BaselineError::NotJson(_)) => {}
                other => panic!("{:?}: {:?}", String::from_utf8_lossy(text), other.err()),
            }
        }
        match Baseline::read(&dir.path().join("missing.json")) {
            Err(BaselineError::Read(e)) => assert_eq!(e.kind(), std::io::ErrorKind::NotFound),
            other => panic!("{:?}", other.err()),
        }
    }
}
