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

mod render;

use std::fmt::Write as _;

pub use render::{html, markdown};

use rusqlite::types::Value;
use serde_json::{Map, Value as Json, json};

use crate::diff::{RowChange, StateDiff, TableDiff};
use crate::event::Output;
use crate::printable::printable_str;
use crate::replay::{DeadDiff, Divergence, Replay, SideEvent};
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

/// How many differing rows per table a report holds: the JSON report has
/// them all; a terminal summary needs only the first few.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rows {
    All,
    First(usize),
}

/// The events that caused a differing row of a table (by key): the seqs
/// listed, and how many more there were.
pub type CausedBy<'a> = dyn Fn(&TableDiff, &[(String, Value)]) -> (Vec<u64>, u64) + 'a;

/// The per-table section, with causes when a replay found them.
pub fn tables(diff: &StateDiff, caused_by: &CausedBy<'_>, rows: Rows) -> Json {
    let limit = match rows {
        Rows::All => usize::MAX,
        Rows::First(n) => n,
    };
    Json::Array(
        diff.tables
            .iter()
            .map(|t| {
                let rows: Vec<Json> = t
                    .rows
                    .iter()
                    .take(limit)
                    .map(|r| {
                        let key: Map<String, Json> =
                            r.key.iter().map(|(c, v)| (c.clone(), value(v))).collect();
                        let columns: Map<String, Json> = r
                            .columns
                            .iter()
                            .map(|(c, o, n)| {
                                let v = |x: &Option<Value>| x.as_ref().map_or(Json::Null, value);
                                (c.clone(), json!({ "old": v(o), "new": v(n) }))
                            })
                            .collect();
                        let (seqs, unlisted) = caused_by(t, &r.key);
                        let mut row = json!({
                            "key": key,
                            "change": change_name(r.change),
                            "columns": columns,
                            "caused_by": seqs,
                        });
                        // Only when some are left out: approved baselines
                        // made before this field stay equal.
                        if unlisted > 0 {
                            row["caused_by_unlisted"] = json!(unlisted);
                        }
                        row
                    })
                    .collect();
                json!({
                    "name": t.name,
                    "keyed": t.keyed,
                    "key_columns": t.key_columns,
                    "added": t.added,
                    "removed": t.removed,
                    "changed": t.changed,
                    "rows": rows,
                })
            })
            .collect(),
    )
}

/// The replay report (the JSON contract).
pub fn replay_json(r: &Replay, old_path: &str, new_path: &str, rows: Rows) -> Json {
    let mut tables = tables(
        &r.state,
        &|t, key| {
            (
                r.caused_by(&t.name, key).to_vec(),
                r.causes_unlisted(&t.name, key),
            )
        },
        rows,
    );
    // Where each causing event sits in its source, next to its seq.
    for row in tables
        .as_array_mut()
        .into_iter()
        .flatten()
        .filter_map(|t| t["rows"].as_array_mut())
        .flatten()
    {
        let positions: Vec<Json> = row["caused_by"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|seq| r.cause_positions.get(&seq.as_u64()?))
            .map(|p| json!({"stream": p.stream, "partition": p.partition, "offset": p.offset}))
            .collect();
        row["caused_by_positions"] = Json::Array(positions);
    }
    json!({
        "old": { "path": old_path, "module_digest": r.old_digest },
        "new": { "path": new_path, "module_digest": r.new_digest },
        "summary": {
            "events": r.events,
            "diverged_events": r.diverged_events,
            "first_divergence": r.first_divergence.as_ref().map(divergence),
        },
        "schema": r.state.schema,
        "tables": tables,
        "outputs": {
            "diverged_events": r.outputs.len(),
            "events": r.outputs.iter().map(|o| json!({
                "seq": o.seq,
                "old": o.old.iter().map(output).collect::<Vec<_>>(),
                "new": o.new.iter().map(output).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        },
        "dead_letters": {
            "only_old": r.dead_only_old.iter().map(dead).collect::<Vec<_>>(),
            "only_new": r.dead_only_new.iter().map(dead).collect::<Vec<_>>(),
        },
    })
}

/// The `rewind diff` report: the table section of the replay report.
pub fn diff_json(d: &StateDiff, old_path: &str, new_path: &str, rows: Rows) -> Json {
    json!({
        "old": { "path": old_path },
        "new": { "path": new_path },
        "schema": d.schema,
        "tables": tables(d, &|_, _| (Vec::new(), 0), rows),
    })
}

/// What the approved-baseline gate compares: everything but where the files
/// and modules were (a rebuilt module that behaves the same passes).
pub fn gated(report: &Json) -> Json {
    let mut r = report.clone();
    if let Some(o) = r.as_object_mut() {
        o.remove("old");
        o.remove("new");
    }
    r
}

/// Where a gated report differs from the approved one, a line per part
/// (at most `limit` lines): summary fields, tables (how many rows, and the
/// first key), outputs (how many events, and the first seq), and any other
/// section as a whole.
pub fn gate_changes(approved: &Json, current: &Json, limit: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let sections = keys(approved)
        .chain(keys(current))
        .collect::<std::collections::BTreeSet<_>>();
    for section in sections {
        let (a, c) = (&approved[section], &current[section]);
        if a == c {
            continue;
        }
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
                    r.as_array()
                        .into_iter()
                        .flatten()
                        .map(|t| (t["name"].as_str().unwrap_or("").to_owned(), t.clone()))
                        .collect()
                };
                let (a, c) = (named(a), named(c));
                for name in a
                    .keys()
                    .chain(c.keys())
                    .collect::<std::collections::BTreeSet<_>>()
                {
                    let (x, y) = (
                        &a.get(name).cloned().unwrap_or(Json::Null),
                        &c.get(name).cloned().unwrap_or(Json::Null),
                    );
                    if x == y {
                        continue;
                    }
                    let (n, first) = differing(&x["rows"], &y["rows"], "key");
                    let first = first
                        .map(|k| format!(" (first {})", cut(&k)))
                        .unwrap_or_default();
                    lines.push(if x.is_null() {
                        format!("table {name}: {n} rows differ, none approved{first}")
                    } else if y.is_null() {
                        format!("table {name}: {n} rows approved, none differ now{first}")
                    } else {
                        format!("table {name}: {n} rows differ from the approved ones{first}")
                    });
                }
            }
            "outputs" => {
                let (n, first) = differing(&a["events"], &c["events"], "seq");
                lines.push(format!(
                    "outputs: {n} events differ from the approved ones{}",
                    first
                        .map(|s| format!(" (first seq {s})"))
                        .unwrap_or_default()
                ));
            }
            other => lines.push(format!("{other}: not as approved")),
        }
    }
    if lines.len() > limit {
        let more = lines.len() - limit;
        lines.truncate(limit);
        lines.push(format!("… {more} more"));
    }
    lines
}

/// An object's keys (none for anything else).
fn keys(v: &Json) -> impl Iterator<Item = &str> {
    v.as_object()
        .into_iter()
        .flat_map(|o| o.keys().map(String::as_str))
}

/// How many entries of two lists, matched by their `id` field, are not the
/// same in both, and the first such id. Entries without one (the rows of a
/// table without a primary key) are their own id.
fn differing(a: &Json, b: &Json, id: &str) -> (usize, Option<String>) {
    let by_id = |v: &Json| -> std::collections::BTreeMap<String, Json> {
        v.as_array()
            .into_iter()
            .flatten()
            .map(|e| match &e[id] {
                Json::Null => (e.to_string(), e.clone()),
                Json::Object(o) if o.is_empty() => (e.to_string(), e.clone()),
                key => (key.to_string(), e.clone()),
            })
            .collect()
    };
    let (a, b) = (by_id(a), by_id(b));
    let ids: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    let mut differ = ids.into_iter().filter(|k| a.get(*k) != b.get(*k));
    let first = differ.next().cloned();
    (first.iter().count() + differ.count(), first)
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
            dl["only_old"].as_array().map_or(0, Vec::len),
            dl["only_new"].as_array().map_or(0, Vec::len)
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
            gate_changes(&approved, &current, 10),
            [
                "outputs: 1 events differ from the approved ones (first seq 9)",
                "schema: not as approved",
                "summary diverged_events: 2 approved, 3 now",
                r#"table gone: 1 rows approved, none differ now (first {"id":"z"})"#,
                r#"table t: 3 rows differ from the approved ones (first {"id":"b"})"#,
            ]
        );
        assert_eq!(gate_changes(&approved, &approved, 10), Vec::<String>::new());
        // Rows of a table without a key are told apart by their content.
        let unkeyed = |ns: &[i64]| json!({"tables": [{"name": "u", "rows": ns.iter().map(|n| json!({"key": {}, "change": "added", "columns": {"n": {"old": null, "new": n}}})).collect::<Vec<_>>()}]});
        assert_eq!(
            gate_changes(&unkeyed(&[1, 2, 3]), &unkeyed(&[1, 4, 5]), 10),
            [
                "table u: 4 rows differ from the approved ones (first {\"change\":\"added\",\"columns\":{\"n\":{\"new\":2,\"old\":null}},\"key\"…)"
            ]
        );
        assert_eq!(
            gate_changes(&approved, &current, 2)
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
