//! Reports of replays and diffs: the JSON contract other tools read, a
//! terminal summary, and the approved-baseline gate.
//!
//! JSON values are numbers, strings, null, or `{"blob_hex": "..."}`. Each
//! differing row of a replay lists its causes as `caused_by` (seqs) and
//! `caused_by_positions` (`{"stream", "partition", "offset"}`, exact even in
//! a report combining several tapes): the first thousand, and when there
//! were more, how many as `caused_by_unlisted`. The terminal, Markdown and
//! HTML renderings show fewer rows and causes, and say how many more the
//! JSON holds.

mod baseline;
mod render;

use std::fmt::Write as _;

pub use baseline::{Baseline, BaselineError};
pub use render::{HTML_CAUSES, HTML_ROWS, html, markdown};

use rusqlite::types::Value;
use serde_json::{Map, Value as Json, json};

use crate::diff::{RowChange, RowDiff, StateDiff};
use crate::event::Output;
use crate::findings::{DeadDiff, Findings, FindingsError, Version};
use crate::printable::printable_str;
use crate::replay::{Divergence, Replay, SideEvent};
use crate::state::Change;
use crate::tape::Outcome;

/// A SQLite value as JSON.
pub fn value(v: &Value) -> Json {
    match v {
        Value::Null => Json::Null,
        Value::Integer(i) => json!(i),
        Value::Real(r) => serde_json::Number::from_f64(*r).map_or(Json::Null, Json::Number),
        Value::Text(t) => json!(t),
        Value::Blob(b) => json!({ "blob_hex": hex::encode(b) }),
    }
}

/// Bytes as JSON: a string when they are UTF-8, else `{"blob_hex"}`.
pub fn bytes(b: Option<&[u8]>) -> Json {
    match b {
        None => Json::Null,
        Some(b) => match std::str::from_utf8(b) {
            Ok(s) => json!(s),
            Err(_) => json!({ "blob_hex": hex::encode(b) }),
        },
    }
}

fn output(o: &Output) -> Json {
    json!({
        "stream": o.stream,
        "key": bytes(o.key.as_deref()),
        "payload": bytes(o.payload.as_deref()),
        "headers": o.headers.iter().map(|h| json!([h.name, bytes(h.value.as_deref())])).collect::<Vec<_>>(),
    })
}

fn outcome(o: &Outcome) -> Json {
    match o {
        Outcome::Applied => json!({ "result": "applied" }),
        Outcome::Duplicate => json!({ "result": "duplicate" }),
        Outcome::DeadLetter { class, message } => {
            json!({ "result": "dead-letter", "class": class, "message": message })
        }
    }
}

fn change(c: &Change) -> Json {
    let row = |r: &Option<Vec<Value>>| match r {
        None => Json::Null,
        Some(values) => Json::Array(values.iter().map(value).collect()),
    };
    json!({
        "table": c.table,
        "op": match (&c.before, &c.after) {
            (None, _) => "insert",
            (_, None) => "delete",
            _ => "update",
        },
        "before": row(&c.before),
        "after": row(&c.after),
    })
}

fn side(s: &SideEvent) -> Json {
    let mut o = outcome(&s.outcome);
    o["rows"] = Json::Array(s.changes.iter().map(change).collect());
    o["outputs"] = Json::Array(s.outputs.iter().map(output).collect());
    o
}

fn divergence(d: &Divergence) -> Json {
    json!({
        "seq": d.event.seq,
        "stream": d.event.position.stream,
        "partition": d.event.position.partition,
        "offset": d.event.position.offset,
        "payload": bytes(d.event.payload.as_deref()),
        "old": side(&d.old),
        "new": side(&d.new),
    })
}

fn dead(d: &DeadDiff) -> Json {
    json!({
        "seq": d.seq, "stream": d.stream, "partition": d.partition, "offset": d.offset,
        "class": d.class, "message": d.message,
    })
}

fn change_name(c: RowChange) -> &'static str {
    match c {
        RowChange::Added => "added",
        RowChange::Removed => "removed",
        RowChange::Changed => "changed",
    }
}

/// The most causes the JSON report lists per row: the first ones matter
/// most; `caused_by_unlisted` counts the rest.
pub const MAX_CAUSES: usize = 1000;

/// A long list of a report, streamed from the findings rather than held.
#[derive(Debug, Clone, PartialEq)]
pub enum List {
    /// The differing rows of a table.
    Rows(String),
    /// The events whose outputs differ.
    Outputs,
    /// The dead letters only one version has.
    Dead(Version),
}

/// Why handing out a list's entries stopped.
#[derive(Debug)]
pub enum Stop {
    /// The findings could not be read.
    Findings(FindingsError),
    /// Whoever took the entries stopped (and kept its reason).
    Taker,
}

impl Stop {
    /// The findings' error, where the taker never stops.
    fn findings(self) -> FindingsError {
        match self {
            Stop::Findings(e) => e,
            Stop::Taker => unreachable!("a taker that collects or compares does not stop"),
        }
    }
}

impl From<FindingsError> for Stop {
    fn from(e: FindingsError) -> Stop {
        Stop::Findings(e)
    }
}

/// A report as its parts: the head (everything but the long lists) and the
/// long lists, handed out one entry at a time. A report in memory (a
/// [`Json`]) is one; a [`Report`] streams its lists from the findings.
pub trait Source {
    /// The report without its long lists' entries.
    fn head(&self) -> &Json;
    /// Hands the entries of `list` to `take`, at most `limit`.
    fn each(
        &self,
        list: &List,
        limit: Option<usize>,
        take: &mut dyn FnMut(Json) -> Result<(), Stop>,
    ) -> Result<(), Stop>;
}

/// The list at `key` of an object found at `at` of a report, if any.
fn list_at(at: At, key: &str, parent: &Json) -> Option<List> {
    match (at, key) {
        (At::Table, "rows") => Some(List::Rows(parent["name"].as_str()?.to_owned())),
        (At::Outputs, "events") => Some(List::Outputs),
        (At::Dead, "only_old") => Some(List::Dead(Version::Old)),
        (At::Dead, "only_new") => Some(List::Dead(Version::New)),
        _ => None,
    }
}

impl Source for Json {
    fn head(&self) -> &Json {
        self
    }

    fn each(
        &self,
        list: &List,
        limit: Option<usize>,
        take: &mut dyn FnMut(Json) -> Result<(), Stop>,
    ) -> Result<(), Stop> {
        let entries = match list {
            List::Rows(name) => arr(&self["tables"])
                .iter()
                .find(|t| t["name"].as_str() == Some(name))
                .map_or(&[][..], |t| arr(&t["rows"])),
            List::Outputs => arr(&self["outputs"]["events"]),
            List::Dead(Version::Old) => arr(&self["dead_letters"]["only_old"]),
            List::Dead(Version::New) => arr(&self["dead_letters"]["only_new"]),
        };
        for e in entries.iter().take(limit.unwrap_or(usize::MAX)) {
            take(e.clone())?;
        }
        Ok(())
    }
}

fn arr(v: &Json) -> &[Json] {
    v.as_array().map_or(&[], Vec::as_slice)
}

/// How many entries the list at `key` of `parent` has: all of them, or
/// when a brief report holds the first few, the `<key>_total` it records.
pub(crate) fn total(parent: &Json, key: &str) -> u64 {
    parent[format!("{key}_total")]
        .as_u64()
        .unwrap_or(arr(&parent[key]).len() as u64)
}

/// A replay's or a diff's report: a small head in memory, the long lists
/// read from the findings when written.
pub struct Report<'a> {
    head: Json,
    findings: &'a Findings,
    /// Rows list their causes (a replay's do; a diff's have none).
    replay: bool,
}

impl<'a> Report<'a> {
    /// The replay report (the JSON contract).
    pub fn replay(
        r: &'a Replay,
        old_path: &str,
        new_path: &str,
    ) -> Result<Report<'a>, FindingsError> {
        let head = json!({
            "old": { "path": old_path, "module_digest": r.old_digest },
            "new": { "path": new_path, "module_digest": r.new_digest },
            "summary": {
                "events": r.events,
                "diverged_events": r.diverged_events,
                "first_divergence": r.first_divergence.as_ref().map(divergence),
            },
            "schema": r.state.schema,
            "tables": tables(&r.state),
            "outputs": {
                "diverged_events": r.findings.output_count()?,
                "events": [],
            },
            "dead_letters": { "only_old": [], "only_new": [] },
        });
        Ok(Report {
            head,
            findings: &r.findings,
            replay: true,
        })
    }

    /// The `rewind diff` report: the table section of the replay report.
    pub fn diff(
        d: &StateDiff,
        findings: &'a Findings,
        old_path: &str,
        new_path: &str,
    ) -> Report<'a> {
        let head = json!({
            "old": { "path": old_path },
            "new": { "path": new_path },
            "schema": d.schema,
            "tables": tables(d),
        });
        Report {
            head,
            findings,
            replay: false,
        }
    }

    /// The report with at most `rows` entries in each long list (and
    /// `causes` per row), and each list's total as `<list>_total`: what the
    /// terminal, Markdown and HTML renderings are made from.
    pub fn brief(&self, rows: usize, causes: usize) -> Result<Json, FindingsError> {
        let mut brief = self.head.clone();
        let fill = |list: &List| -> Result<Vec<Json>, FindingsError> {
            let mut out = Vec::new();
            self.entries(list, Some(rows), causes, &mut |e| {
                out.push(e);
                Ok(())
            })
            .map_err(Stop::findings)?;
            Ok(out)
        };
        for t in brief["tables"].as_array_mut().into_iter().flatten() {
            let name = t["name"].as_str().unwrap_or_default().to_owned();
            t["rows"] = Json::Array(fill(&List::Rows(name))?);
            t["rows_total"] = json!(
                ["added", "removed", "changed"]
                    .iter()
                    .map(|k| t[*k].as_u64().unwrap_or(0))
                    .sum::<u64>()
            );
        }
        if self.replay {
            brief["outputs"]["events"] = Json::Array(fill(&List::Outputs)?);
            brief["outputs"]["events_total"] = brief["outputs"]["diverged_events"].clone();
            for (key, side) in [("only_old", Version::Old), ("only_new", Version::New)] {
                brief["dead_letters"][key] = Json::Array(fill(&List::Dead(side))?);
                brief["dead_letters"][format!("{key}_total")] =
                    json!(self.findings.dead_count(side)?);
            }
        }
        Ok(brief)
    }

    fn entries(
        &self,
        list: &List,
        limit: Option<usize>,
        causes: usize,
        take: &mut dyn FnMut(Json) -> Result<(), Stop>,
    ) -> Result<(), Stop> {
        match list {
            List::Rows(table) => self.findings.each_row(table, limit, |r| {
                let mut row = row_json(&r);
                if self.replay {
                    let key = crate::replay::encode_key(r.key.iter().map(|(_, v)| v));
                    let found = self.findings.causes(table, &key, causes)?;
                    row["caused_by"] = found.listed.iter().map(|(seq, _)| json!(seq)).collect();
                    row["caused_by_positions"] = found
                        .listed
                        .iter()
                        .map(|(_, p)| json!({"stream": p.stream, "partition": p.partition, "offset": p.offset}))
                        .collect();
                    // Only when some are left out: approved baselines made
                    // before this field stay equal.
                    if found.unlisted > 0 {
                        row["caused_by_unlisted"] = json!(found.unlisted);
                    }
                }
                take(row)
            }),
            List::Outputs => self.findings.each_output(limit, |o| {
                take(json!({
                    "seq": o.seq,
                    "old": o.old.iter().map(output).collect::<Vec<_>>(),
                    "new": o.new.iter().map(output).collect::<Vec<_>>(),
                }))
            }),
            List::Dead(side) => self.findings.each_dead(*side, limit, |d| take(dead(&d))),
        }
    }
}

impl Source for Report<'_> {
    fn head(&self) -> &Json {
        &self.head
    }

    fn each(
        &self,
        list: &List,
        limit: Option<usize>,
        take: &mut dyn FnMut(Json) -> Result<(), Stop>,
    ) -> Result<(), Stop> {
        self.entries(list, limit, MAX_CAUSES, take)
    }
}

/// The per-table section's head: counts, the rows left to the findings.
fn tables(diff: &StateDiff) -> Json {
    Json::Array(
        diff.tables
            .iter()
            .map(|t| {
                json!({
                    "name": t.name,
                    "keyed": t.keyed,
                    "key_columns": t.key_columns,
                    "added": t.added,
                    "removed": t.removed,
                    "changed": t.changed,
                    "rows": [],
                })
            })
            .collect(),
    )
}

/// A differing row as the report shows it (a diff's rows have no causes).
fn row_json(r: &RowDiff) -> Json {
    let key: Map<String, Json> = r.key.iter().map(|(c, v)| (c.clone(), value(v))).collect();
    let columns: Map<String, Json> = r
        .columns
        .iter()
        .map(|(c, o, n)| {
            let v = |x: &Option<Value>| x.as_ref().map_or(Json::Null, value);
            (c.clone(), json!({ "old": v(o), "new": v(n) }))
        })
        .collect();
    json!({
        "key": key,
        "change": change_name(r.change),
        "columns": columns,
        "caused_by": [],
    })
}

/// Where in a report an object or array sits, as far as finding its long
/// lists goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum At {
    Top,
    Tables,
    Table,
    Outputs,
    Dead,
    Inside,
}

/// A part of a report, serialized with its long lists streamed and every
/// object's keys in order (one text per report: the gate compares digests).
#[derive(Clone, Copy)]
struct Part<'a> {
    v: &'a Json,
    at: At,
    source: &'a dyn Source,
    /// Leave out where the files and modules were (the gate's form).
    gated: bool,
}

impl serde::Serialize for Part<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{SerializeMap, SerializeSeq};
        match self.v {
            Json::Object(object) => {
                let mut keys: Vec<&String> = object.keys().collect();
                keys.sort();
                let mut map = serializer.serialize_map(None)?;
                for key in keys {
                    if self.at == At::Top && self.gated && (key == "old" || key == "new") {
                        continue;
                    }
                    if let Some(list) = list_at(self.at, key, self.v) {
                        map.serialize_entry(
                            key,
                            &Streamed {
                                list,
                                source: self.source,
                            },
                        )?;
                        continue;
                    }
                    let at = match (self.at, key.as_str()) {
                        (At::Top, "tables") => At::Tables,
                        (At::Top, "outputs") => At::Outputs,
                        (At::Top, "dead_letters") => At::Dead,
                        _ => At::Inside,
                    };
                    map.serialize_entry(
                        key,
                        &Part {
                            v: &object[key],
                            at,
                            ..*self
                        },
                    )?;
                }
                map.end()
            }
            Json::Array(items) => {
                let at = if self.at == At::Tables {
                    At::Table
                } else {
                    At::Inside
                };
                let mut seq = serializer.serialize_seq(Some(items.len()))?;
                for v in items {
                    seq.serialize_element(&Part { v, at, ..*self })?;
                }
                seq.end()
            }
            other => other.serialize(serializer),
        }
    }
}

/// A long list, serialized entry by entry as its source hands them out.
struct Streamed<'a> {
    list: List,
    source: &'a dyn Source,
}

impl serde::Serialize for Streamed<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{Error as _, SerializeSeq};
        let mut seq = serializer.serialize_seq(None)?;
        let mut failed = None;
        let walked = self.source.each(&self.list, None, &mut |entry| {
            let part = Part {
                v: &entry,
                at: At::Inside,
                source: self.source,
                gated: false,
            };
            seq.serialize_element(&part).map_err(|e| {
                failed = Some(e);
                Stop::Taker
            })
        });
        match (walked, failed) {
            (_, Some(e)) => return Err(e),
            (Err(Stop::Findings(e)), None) => return Err(S::Error::custom(e)),
            _ => {}
        }
        seq.end()
    }
}

/// Writes a report as pretty JSON, its long lists streamed (`gated`: in the
/// approved-baseline gate's form, without where the files and modules were).
pub fn write_json(
    source: &dyn Source,
    gated: bool,
    out: impl std::io::Write,
) -> Result<(), serde_json::Error> {
    let mut out = std::io::BufWriter::new(out);
    let part = Part {
        v: source.head(),
        at: At::Top,
        source,
        gated,
    };
    serde_json::to_writer_pretty(&mut out, &part)?;
    std::io::Write::write_all(&mut out, b"\n").map_err(serde_json::Error::io)?;
    std::io::Write::flush(&mut out).map_err(serde_json::Error::io)
}

/// What the approved-baseline gate compares, as a digest: the report
/// without where the files and modules were (a rebuilt module that behaves
/// the same passes), in one canonical text.
pub fn gate_digest(source: &dyn Source) -> Result<[u8; 32], serde_json::Error> {
    let mut hashing = Hashing::default();
    let part = Part {
        v: source.head(),
        at: At::Top,
        source,
        gated: true,
    };
    serde_json::to_writer(&mut hashing, &part)?;
    Ok(hashing.finish())
}

/// The digest of the approved baseline `--accept` would write now: equal
/// to the digest of the baseline file's bytes when nothing changed, which
/// the gate checks without reading the file into memory.
pub fn baseline_digest(source: &dyn Source) -> Result<[u8; 32], serde_json::Error> {
    let mut hashing = Hashing::default();
    write_json(source, true, &mut hashing)?;
    Ok(hashing.finish())
}

/// SHA-256 of what is written to it.
#[derive(Default)]
pub struct Hashing(sha2::Sha256);

impl Hashing {
    pub fn finish(self) -> [u8; 32] {
        use sha2::Digest as _;
        self.0.finalize().into()
    }
}

impl std::io::Write for Hashing {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        use sha2::Digest as _;
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Where the current report differs from the approved one, a line per part
/// (at most `limit` lines): summary fields, tables (how many rows, and the
/// first key), outputs and dead letters (how many events, and the first
/// seq), and any other section as a whole. Both reports' long lists are
/// streamed (the approved one's through a scratch database, matched by id).
pub fn gate_changes(
    approved: &dyn Source,
    current: &dyn Source,
    limit: usize,
) -> Result<Vec<String>, FindingsError> {
    let source = approved;
    let approved = approved.head();
    let head = current.head();
    let mut lines = Vec::new();
    let sections: std::collections::BTreeSet<&str> = keys(approved)
        .chain(keys(head))
        .filter(|k| !matches!(*k, "old" | "new"))
        .collect();
    for section in sections {
        let (a, c) = (&approved[section], &head[section]);
        match section {
            "summary" => {
                for field in keys(a)
                    .chain(keys(c))
                    .collect::<std::collections::BTreeSet<_>>()
                {
                    if a[field] != c[field] {
                        lines.push(format!(
                            "summary {field}: {} approved, {} now",
                            brief(&a[field]),
                            brief(&c[field])
                        ));
                    }
                }
            }
            "tables" => {
                let named = |r: &'_ Json| -> std::collections::BTreeMap<String, Json> {
                    arr(r)
                        .iter()
                        .map(|t| (t["name"].as_str().unwrap_or("").to_owned(), t.clone()))
                        .collect()
                };
                let (a, c) = (named(a), named(c));
                for name in a
                    .keys()
                    .chain(c.keys())
                    .collect::<std::collections::BTreeSet<_>>()
                {
                    let (x, y) = (a.get(name), c.get(name));
                    let rows = List::Rows(name.clone());
                    let (n, first) = differing(
                        x.map(|_| (source, &rows)),
                        y.map(|_| (current, &rows)),
                        "key",
                    )?;
                    let counts_differ = match (x, y) {
                        (Some(x), Some(y)) => without(x, "rows") != without(y, "rows"),
                        _ => true,
                    };
                    if n == 0 && !counts_differ {
                        continue;
                    }
                    let first = first
                        .map(|k| format!(" (first {})", cut(&k)))
                        .unwrap_or_default();
                    lines.push(if x.is_none() {
                        format!("table {name}: {n} rows differ, none approved{first}")
                    } else if y.is_none() {
                        format!("table {name}: {n} rows approved, none differ now{first}")
                    } else {
                        format!("table {name}: {n} rows differ from the approved ones{first}")
                    });
                }
            }
            "outputs" | "dead_letters" => {
                let parts: &[(&str, List, &str)] = if section == "outputs" {
                    &[("events", List::Outputs, "outputs")]
                } else {
                    &[
                        (
                            "only_old",
                            List::Dead(Version::Old),
                            "dead letters only in old",
                        ),
                        (
                            "only_new",
                            List::Dead(Version::New),
                            "dead letters only in new",
                        ),
                    ]
                };
                let mut listed = 0;
                for (key, list, what) in parts {
                    let (n, first) = differing(
                        a.get(*key).map(|_| (source, list)),
                        c.get(*key).map(|_| (current, list)),
                        "seq",
                    )?;
                    listed += n;
                    if n > 0 {
                        lines.push(format!(
                            "{what}: {n} events differ from the approved ones{}",
                            first
                                .map(|s| format!(" (first seq {s})"))
                                .unwrap_or_default()
                        ));
                    }
                }
                // Counts or fields beside the lists.
                let rest = |v: &Json| {
                    parts
                        .iter()
                        .fold(v.clone(), |v, (key, ..)| without(&v, key))
                };
                if listed == 0 && rest(a) != rest(c) {
                    lines.push(format!("{section}: not as approved"));
                }
            }
            other => {
                if a != c {
                    lines.push(format!("{other}: not as approved"));
                }
            }
        }
    }
    if lines.len() > limit {
        let more = lines.len() - limit;
        lines.truncate(limit);
        lines.push(format!("… {more} more"));
    }
    Ok(lines)
}

/// An object without one of its keys.
fn without(v: &Json, key: &str) -> Json {
    let mut v = v.clone();
    if let Some(o) = v.as_object_mut() {
        o.remove(key);
    }
    v
}

/// An object's keys (none for anything else).
fn keys(v: &Json) -> impl Iterator<Item = &str> {
    v.as_object()
        .into_iter()
        .flat_map(|o| o.keys().map(String::as_str))
}

/// How many entries of an approved list and a current one (each streamed
/// from its source; `None`: there is none), matched by their `id` field,
/// are not the same in both, and the first such id. Entries without one
/// (the rows of a table without a primary key) are their own id.
fn differing(
    approved: Option<(&dyn Source, &List)>,
    current: Option<(&dyn Source, &List)>,
    id: &str,
) -> Result<(usize, Option<String>), FindingsError> {
    let id_of = |e: &Json| match &e[id] {
        Json::Null => e.to_string(),
        Json::Object(o) if o.is_empty() => e.to_string(),
        key => key.to_string(),
    };
    let pending = baseline::Pending::new()?;
    if let Some((source, list)) = approved {
        source
            .each(list, None, &mut |e| Ok(pending.add(&id_of(&e), &e)?))
            .map_err(Stop::findings)?;
    }
    let mut n = 0;
    let mut first: Option<String> = None;
    if let Some((source, list)) = current {
        source
            .each(list, None, &mut |e| {
                let key = id_of(&e);
                // The approved entry of the same id: equal, or the pair
                // differs (once).
                if !pending.take(&key, &e)? {
                    n += 1;
                    if first.as_ref().is_none_or(|f| key < *f) {
                        first = Some(key);
                    }
                }
                Ok(())
            })
            .map_err(Stop::findings)?;
    }
    let (left, least) = pending.left()?;
    n += left;
    let first = match (first, least) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    Ok((n, first))
}

/// A value for a one-line message, cut short.
fn brief(v: &Json) -> String {
    cut(&v.to_string())
}

/// Text for a one-line message: at most 60 characters, then `…`.
fn cut(s: &str) -> String {
    match s.char_indices().nth(60) {
        Some((at, _)) => format!("{}…", &s[..at]),
        None => s.to_owned(),
    }
}

/// A terminal summary; `color` adds ANSI colours.
pub fn summary_text(report: &Json, color: bool) -> String {
    let paint = |code: &str, s: &str| {
        if color {
            format!("\x1b[{code}m{s}\x1b[0m")
        } else {
            s.to_owned()
        }
    };
    let mut out = String::new();
    if let Some(summary) = report.get("summary") {
        let events = summary["events"].as_u64().unwrap_or(0);
        let diverged = summary["diverged_events"].as_u64().unwrap_or(0);
        let _ = writeln!(
            out,
            "{} events replayed, {} diverged",
            events,
            if diverged == 0 {
                paint("32", "0")
            } else {
                paint("31", &diverged.to_string())
            }
        );
        if let Some(first) = summary.get("first_divergence").filter(|f| !f.is_null()) {
            let _ = writeln!(
                out,
                "first divergence: seq {} ({}/{}@{}) payload {}",
                first["seq"],
                printable_str(first["stream"].as_str().unwrap_or("")),
                first["partition"],
                first["offset"],
                first["payload"]
            );
            for side in ["old", "new"] {
                let s = &first[side];
                let _ = writeln!(
                    out,
                    "  {side}: {}{}, {} row changes, {} outputs",
                    s["result"].as_str().unwrap_or(""),
                    s.get("class")
                        .and_then(Json::as_str)
                        .map(|c| format!(" ({c})"))
                        .unwrap_or_default(),
                    s["rows"].as_array().map_or(0, Vec::len),
                    s["outputs"].as_array().map_or(0, Vec::len)
                );
            }
        }
    }
    let schema = &report["schema"];
    for (key, label) in [
        ("tables_only_old", "only in old"),
        ("tables_only_new", "only in new"),
    ] {
        if let Some(t) = schema[key].as_array().filter(|t| !t.is_empty()) {
            let _ = writeln!(
                out,
                "{} tables {label}: {}",
                paint("33", "schema:"),
                list(t)
            );
        }
    }
    for c in schema["columns"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "{} {}: columns only in old [{}], only in new [{}]",
            paint("33", "schema:"),
            printable_str(c["table"].as_str().unwrap_or("")),
            list(c["only_old"].as_array().map_or(&[][..], Vec::as_slice)),
            list(c["only_new"].as_array().map_or(&[][..], Vec::as_slice)),
        );
    }
    let tables = report["tables"].as_array().map_or(&[][..], Vec::as_slice);
    if tables.is_empty() {
        let _ = writeln!(out, "tables: {}", paint("32", "no differences"));
    }
    for t in tables {
        let _ = writeln!(
            out,
            "table {}: {} added, {} removed, {} changed{}",
            paint("1", &printable_str(t["name"].as_str().unwrap_or(""))),
            paint("32", &t["added"].to_string()),
            paint("31", &t["removed"].to_string()),
            paint("33", &t["changed"].to_string()),
            if t["keyed"] == json!(false) {
                " (no primary key: compared by full row)"
            } else {
                ""
            }
        );
        let rows = t["rows"].as_array().map_or(&[][..], Vec::as_slice);
        for row in rows.iter().take(5) {
            let cols: Vec<String> = row["columns"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(c, v)| format!("{}: {} → {}", printable_str(c), v["old"], v["new"]))
                .collect();
            let _ = writeln!(
                out,
                "  {} {} {}{}",
                row["change"].as_str().unwrap_or(""),
                row["key"],
                cols.join(", "),
                caused_by(row)
            );
        }
        let total = ["added", "removed", "changed"]
            .iter()
            .map(|k| t[*k].as_u64().unwrap_or(0))
            .sum::<u64>();
        if total > 5 {
            let _ = writeln!(out, "  … {} more", total - 5);
        }
    }
    if let Some(outputs) = report.get("outputs") {
        let _ = writeln!(out, "outputs: {} events differ", outputs["diverged_events"]);
    }
    if let Some(dl) = report.get("dead_letters") {
        let _ = writeln!(
            out,
            "dead letters: {} only in old, {} only in new",
            total(dl, "only_old"),
            total(dl, "only_new")
        );
    }
    out
}

/// Causes listed per row in the terminal; the JSON report has them all.
const CAUSES_SHOWN: usize = 5;

/// "caused by seq 7 (orders/0@6)" for a row of a replay report (the first
/// few causes of a row many events changed, and how many more).
fn caused_by(row: &Json) -> String {
    let Some(seqs) = row["caused_by"].as_array().filter(|c| !c.is_empty()) else {
        return String::new();
    };
    let shown = seqs.len().min(CAUSES_SHOWN);
    let unlisted = row["caused_by_unlisted"].as_u64().unwrap_or(0);
    let more = match (seqs.len() - shown) as u64 + unlisted {
        0 => String::new(),
        n => format!(" and {n} more"),
    };
    let positions = row["caused_by_positions"]
        .as_array()
        .filter(|p| p.len() == seqs.len());
    let Some(positions) = positions else {
        return format!("  caused by seq {}{more}", list(&seqs[..shown]));
    };
    let positions: Vec<String> = positions[..shown]
        .iter()
        .map(|p| {
            format!(
                "{}/{}@{}",
                printable_str(p["stream"].as_str().unwrap_or("")),
                p["partition"],
                p["offset"]
            )
        })
        .collect();
    format!(
        "  caused by seq {} ({}){more}",
        list(&seqs[..shown]),
        positions.join(", ")
    )
}

fn list(items: &[Json]) -> String {
    items
        .iter()
        .map(|i| match i.as_str() {
            Some(s) => printable_str(s).into_owned(),
            None => i.to_string(),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The gate says which parts differ from the approved baseline: each
    /// summary field, each table (its differing rows, matched by key),
    /// outputs (by seq), any other section whole; within a limit.
    #[test]
    fn the_gate_names_what_differs_from_the_baseline() {
        let row = |id: &str, n: i64| json!({"key": {"id": id}, "change": "changed", "columns": {"n": {"old": 0, "new": n}}});
        let approved = json!({
            "summary": {"events": 10, "diverged_events": 2},
            "tables": [{"name": "t", "rows": [row("a", 1), row("b", 2), row("c", 3)]}, {"name": "gone", "rows": [row("z", 1)]}],
            "outputs": {"diverged_events": 1, "events": [{"seq": 4, "old": [], "new": []}]},
            "schema": {"tables_only_new": []},
        });
        let current = json!({
            "summary": {"events": 10, "diverged_events": 3},
            "tables": [{"name": "t", "rows": [row("a", 1), row("b", 5), row("d", 4)]}],
            "outputs": {"diverged_events": 1, "events": [{"seq": 4, "old": [], "new": []}, {"seq": 9, "old": [], "new": []}]},
            "schema": {"tables_only_new": ["x"]},
        });
        assert_eq!(
            gate_changes(&approved, &current, 10).unwrap(),
            [
                "outputs: 1 events differ from the approved ones (first seq 9)",
                "schema: not as approved",
                "summary diverged_events: 2 approved, 3 now",
                r#"table gone: 1 rows approved, none differ now (first {"id":"z"})"#,
                r#"table t: 3 rows differ from the approved ones (first {"id":"b"})"#,
            ]
        );
        assert_eq!(
            gate_changes(&approved, &approved, 10).unwrap(),
            Vec::<String>::new()
        );
        // Rows of a table without a key are told apart by their content.
        let unkeyed = |ns: &[i64]| json!({"tables": [{"name": "u", "rows": ns.iter().map(|n| json!({"key": {}, "change": "added", "columns": {"n": {"old": null, "new": n}}})).collect::<Vec<_>>()}]});
        assert_eq!(
            gate_changes(&unkeyed(&[1, 2, 3]), &unkeyed(&[1, 4, 5]), 10).unwrap(),
            [
                "table u: 4 rows differ from the approved ones (first {\"change\":\"added\",\"columns\":{\"n\":{\"new\":2,\"old\":null}},\"key\"…)"
            ]
        );
        assert_eq!(
            gate_changes(&approved, &current, 2)
                .unwrap()
                .last()
                .map(String::as_str),
            Some("… 3 more")
        );
    }

    #[test]
    fn a_row_names_its_causes_by_seq_and_position() {
        let row = json!({
            "caused_by": [7, 9],
            "caused_by_positions": [
                {"stream": "orders", "partition": 0, "offset": 6},
                {"stream": "orders", "partition": 2, "offset": 40},
            ],
        });
        let many = json!({
            "caused_by": (0..12).collect::<Vec<u64>>(),
            "caused_by_positions": (0..12).map(|i| json!({"stream": "o", "partition": 0, "offset": i + 1})).collect::<Vec<_>>(),
        });
        assert_eq!(
            caused_by(&many),
            "  caused by seq 0, 1, 2, 3, 4 (o/0@1, o/0@2, o/0@3, o/0@4, o/0@5) and 7 more"
        );
        assert_eq!(
            caused_by(&row),
            "  caused by seq 7, 9 (orders/0@6, orders/2@40)"
        );
        // A report without positions (older, or rows beyond the kept causes).
        assert_eq!(caused_by(&json!({"caused_by": [3]})), "  caused by seq 3");
        assert_eq!(caused_by(&json!({"caused_by": []})), "");
    }

    /// Names a processor chose (tables, columns, streams) are shown escaped.
    #[test]
    fn the_summary_escapes_names_a_guest_chose() {
        let report = json!({
            "summary": {"events": 1, "diverged_events": 1, "first_divergence": {
                "seq": 0, "stream": "s\u{1b}[2J", "partition": 0, "offset": 1,
                "payload": "{}", "old": {}, "new": {}}},
            "schema": {"columns": [{"table": "t\u{7}", "only_old": ["c\u{1b}"], "only_new": []}]},
            "tables": [{"name": "t\u{1b}]0;x\u{7}", "added": 0, "removed": 0, "changed": 1,
                "rows": [{"key": {"k": 1}, "change": "changed",
                          "columns": {"v\u{1b}": {"old": 1, "new": 2}},
                          "caused_by": [0],
                          "caused_by_positions": [{"stream": "s\u{1b}", "partition": 0, "offset": 1}]}]}],
        });
        let text = summary_text(&report, false);
        assert!(
            !text.contains('\u{1b}') && !text.contains('\u{7}'),
            "{text:?}"
        );
        for shown in [
            r"s\u{1b}[2J/0@1",
            r"t\u{7}: columns only in old [c\u{1b}]",
            r"table t\u{1b}]0;x\u{7}:",
            r"v\u{1b}: 1 → 2",
            r"(s\u{1b}/0@1)",
        ] {
            assert!(text.contains(shown), "{shown} in {text}");
        }
    }
}
