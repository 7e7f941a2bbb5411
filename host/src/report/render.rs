//! Markdown and HTML renderings of a report (replay or diff), made from
//! its JSON form so that every format shows the same facts.

use std::fmt::Write as _;

use html_escape::encode_text as esc;
use serde_json::Value as Json;

/// Rows shown per table in Markdown before the rest are left to the JSON.
const SHOWN_ROWS: usize = 20;
/// Causes shown per row in Markdown.
const SHOWN_CAUSES: usize = 10;
/// What the HTML page shows at most (a browser must still open it): rows
/// per table, dead letters per side, causes per row. Renderings are made
/// from a brief report holding this many ([`super::Report::brief`]).
pub const HTML_ROWS: usize = 5_000;
pub const HTML_CAUSES: usize = 100;

/// A JSON value as a short display string.
fn show(v: &Json) -> String {
    match v {
        Json::Null => "NULL".into(),
        Json::String(s) => s.clone(),
        Json::Object(o) if o.contains_key("blob_hex") => {
            format!("x'{}'", o["blob_hex"].as_str().unwrap_or(""))
        }
        other => other.to_string(),
    }
}

fn key_text(key: &Json) -> String {
    key.as_object()
        .map(|o| {
            o.iter()
                .map(|(k, v)| format!("{k}={}", show(v)))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
}

/// The first `limit` seqs that caused a row's difference, and how many
/// more (the JSON report lists up to a thousand, and counts the rest).
fn seqs(row: &Json, limit: usize) -> String {
    let all = arr(&row["caused_by"]);
    let more =
        all.len().saturating_sub(limit) as u64 + row["caused_by_unlisted"].as_u64().unwrap_or(0);
    let mut text = all
        .iter()
        .take(limit)
        .map(Json::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    if more > 0 {
        let _ = write!(text, " … and {more} more");
    }
    text
}

use super::arr;

fn schema_differs(schema: &Json) -> bool {
    !arr(&schema["tables_only_old"]).is_empty()
        || !arr(&schema["tables_only_new"]).is_empty()
        || !arr(&schema["columns"]).is_empty()
}

/// Markdown for a pull-request comment: summary, per-table counts, the
/// first rows of each table in collapsed details.
pub fn markdown(report: &Json) -> String {
    let mut out = String::new();
    let md = |s: &str| s.replace('|', "\\|").replace('\n', " ");
    let _ = writeln!(out, "## rewind: what the new version changes\n");
    if let (Some(old), Some(new)) = (report.get("old"), report.get("new")) {
        let _ = writeln!(
            out,
            "old `{}` → new `{}`\n",
            show(&old["path"]),
            show(&new["path"])
        );
    }
    if let Some(s) = report.get("summary") {
        let _ = writeln!(
            out,
            "**{}** events replayed, **{}** diverged.",
            s["events"], s["diverged_events"]
        );
        if let Some(f) = s.get("first_divergence").filter(|f| !f.is_null()) {
            let _ = writeln!(
                out,
                "First divergence: seq {} (`{}/{}@{}`): old {}, new {}.",
                f["seq"],
                show(&f["stream"]),
                f["partition"],
                f["offset"],
                show(&f["old"]["result"]),
                show(&f["new"]["result"])
            );
        }
        let _ = writeln!(out);
    }
    let tables = arr(&report["tables"]);
    let _ = writeln!(
        out,
        "| table | added | removed | changed |\n|---|---:|---:|---:|"
    );
    for t in tables {
        let _ = writeln!(
            out,
            "| `{}` | {} | {} | {} |",
            show(&t["name"]),
            t["added"],
            t["removed"],
            t["changed"]
        );
    }
    if tables.is_empty() {
        let _ = writeln!(out, "| (no differences) | | | |");
    }
    if schema_differs(&report["schema"]) {
        let _ = writeln!(out, "\n**Schema differences:** `{}`", report["schema"]);
    }
    for t in tables {
        let rows = arr(&t["rows"]);
        let total = super::total(t, "rows");
        let _ = writeln!(
            out,
            "\n<details><summary><code>{}</code>: {} differing rows</summary>\n",
            esc(&show(&t["name"])),
            total
        );
        let _ = writeln!(
            out,
            "| key | change | columns (old → new) | caused by seq |\n|---|---|---|---|"
        );
        for r in rows.iter().take(SHOWN_ROWS) {
            let cols: Vec<String> = r["columns"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(c, v)| format!("{c}: {} → {}", show(&v["old"]), show(&v["new"])))
                .collect();
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} |",
                md(&key_text(&r["key"])),
                show(&r["change"]),
                md(&cols.join("; ")),
                seqs(r, SHOWN_CAUSES)
            );
        }
        if total > SHOWN_ROWS as u64 {
            let _ = writeln!(
                out,
                "\n… and {} more rows (see the JSON report).",
                total - SHOWN_ROWS as u64
            );
        }
        let _ = writeln!(out, "\n</details>");
    }
    if let Some(o) = report.get("outputs") {
        let _ = writeln!(
            out,
            "\nOutputs differ for **{}** events.",
            o["diverged_events"]
        );
    }
    if let Some(d) = report.get("dead_letters") {
        let _ = writeln!(
            out,
            "Dead letters: **{}** only in old, **{}** only in new.",
            super::total(d, "only_old"),
            super::total(d, "only_new")
        );
    }
    out
}

const STYLE: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em;max-width:100%}td.mono{overflow-wrap:anywhere}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.new{background:#fff3bf}tr.added td{background:#d3f9d8}tr.removed td{background:#ffe3e3}
code,.mono{font-family:ui-monospace,monospace}.muted{color:#777}h2{margin-top:1.5em}";

/// One self-contained HTML page (no scripts, no network): summary, first
/// divergence, per-table rows with the changed cells highlighted and the
/// causing events per row, dead letters.
pub fn html(report: &Json) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>rewind report</title>\
         <style>{STYLE}</style></head><body><h1>rewind: what the new version changes</h1>"
    );
    if let (Some(old), Some(new)) = (report.get("old"), report.get("new")) {
        let _ = write!(
            out,
            "<p>old <code>{}</code> <span class=\"muted\">{}</span><br>\
             new <code>{}</code> <span class=\"muted\">{}</span></p>",
            esc(&show(&old["path"])),
            esc(&show(&old["module_digest"])),
            esc(&show(&new["path"])),
            esc(&show(&new["module_digest"]))
        );
    }
    if let Some(s) = report.get("summary") {
        let _ = write!(
            out,
            "<h2>Summary</h2><p id=\"summary\"><b>{}</b> events replayed, <b>{}</b> diverged.</p>",
            s["events"], s["diverged_events"]
        );
        if let Some(f) = s.get("first_divergence").filter(|f| !f.is_null()) {
            first_divergence(&mut out, f);
        }
    }
    let schema = &report["schema"];
    if schema_differs(schema) {
        let _ = write!(out, "<h2>Schema</h2><ul>");
        for (key, side) in [("tables_only_old", "old"), ("tables_only_new", "new")] {
            for t in arr(&schema[key]) {
                let _ = write!(
                    out,
                    "<li>table <code>{}</code> only in {side}</li>",
                    esc(&show(t))
                );
            }
        }
        for c in arr(&schema["columns"]) {
            let names = |v: &Json| arr(v).iter().map(show).collect::<Vec<_>>().join(", ");
            let _ = write!(
                out,
                "<li><code>{}</code>: columns only in old [{}], only in new [{}]</li>",
                esc(&show(&c["table"])),
                esc(&names(&c["only_old"])),
                esc(&names(&c["only_new"]))
            );
        }
        let _ = write!(out, "</ul>");
    }
    let tables = arr(&report["tables"]);
    let _ = write!(out, "<h2>Tables</h2>");
    if tables.is_empty() {
        let _ = write!(out, "<p>No row differs.</p>");
    }
    for t in tables {
        table(&mut out, t);
    }
    if let Some(o) = report.get("outputs") {
        let _ = write!(
            out,
            "<h2>Outputs</h2><p>{} events emit different outputs.</p>",
            o["diverged_events"]
        );
    }
    if let Some(d) = report.get("dead_letters") {
        let _ = write!(
            out,
            "<h2>Dead letters</h2><table><tr><th>only in</th><th>seq</th><th>position</th>\
             <th>class</th><th>message</th></tr>"
        );
        for (side, key) in [("old", "only_old"), ("new", "only_new")] {
            for x in arr(&d[key]).iter().take(HTML_ROWS) {
                let _ = write!(
                    out,
                    "<tr><td>{side}</td><td>{}</td><td class=\"mono\">{}/{}@{}</td><td>{}</td><td>{}</td></tr>",
                    x["seq"],
                    esc(&show(&x["stream"])),
                    x["partition"],
                    x["offset"],
                    esc(&show(&x["class"])),
                    esc(&show(&x["message"]))
                );
            }
        }
        let _ = write!(out, "</table>");
        for (side, key) in [("old", "only_old"), ("new", "only_new")] {
            more_in_json(
                &mut out,
                super::total(d, key),
                &format!("dead letters only in {side}"),
            );
        }
    }
    let _ = writeln!(out, "</body></html>");
    out
}

fn first_divergence(out: &mut String, f: &Json) {
    let _ = write!(
        out,
        "<h2>First divergence</h2><p>seq {} at <code>{}/{}@{}</code>, payload <code>{}</code></p>\
         <table><tr><th></th><th>outcome</th><th>rows written</th><th>outputs</th></tr>",
        f["seq"],
        esc(&show(&f["stream"])),
        f["partition"],
        f["offset"],
        esc(&show(&f["payload"]))
    );
    for side in ["old", "new"] {
        let x = &f[side];
        let rows: Vec<String> = arr(&x["rows"])
            .iter()
            .map(|r| {
                esc(&format!(
                    "{} {} {}",
                    show(&r["op"]),
                    show(&r["table"]),
                    if r["after"].is_null() {
                        &r["before"]
                    } else {
                        &r["after"]
                    }
                ))
                .into_owned()
            })
            .collect();
        let outputs: Vec<String> = arr(&x["outputs"])
            .iter()
            .map(|o| esc(&show(&o["payload"])).into_owned())
            .collect();
        let outcome = format!(
            "{}{}",
            show(&x["result"]),
            x.get("class")
                .map(|c| format!(" ({}: {})", show(c), show(&x["message"])))
                .unwrap_or_default()
        );
        let _ = write!(
            out,
            "<tr><th>{side}</th><td>{}</td><td class=\"mono\">{}</td><td class=\"mono\">{}</td></tr>",
            esc(&outcome),
            rows.join("<br>"),
            outputs.join("<br>")
        );
    }
    let _ = write!(out, "</table>");
}

fn table(out: &mut String, t: &Json) {
    let _ = write!(
        out,
        "<h3><code>{}</code>: {} added, {} removed, {} changed{}</h3>\
         <table class=\"rows\"><tr><th>key</th><th>change</th><th>column</th><th>old</th>\
         <th>new</th><th>caused by seq</th></tr>",
        esc(&show(&t["name"])),
        t["added"],
        t["removed"],
        t["changed"],
        if t["keyed"] == Json::Bool(false) {
            " (no primary key: compared by full row)"
        } else {
            ""
        }
    );
    let rows = arr(&t["rows"]);
    for r in rows.iter().take(HTML_ROWS) {
        let change = show(&r["change"]);
        let cols: Vec<(&String, &Json)> = r["columns"].as_object().into_iter().flatten().collect();
        let span = cols.len().max(1);
        let causes = esc(&seqs(r, HTML_CAUSES)).into_owned();
        let _ = write!(
            out,
            "<tr class=\"{0}\"><td rowspan=\"{span}\" class=\"mono key\">{1}</td><td rowspan=\"{span}\">{0}</td>",
            esc(&change),
            esc(&key_text(&r["key"]))
        );
        if cols.is_empty() {
            let _ = write!(out, "<td></td><td></td><td></td><td>{causes}</td></tr>");
        }
        for (i, (c, v)) in cols.iter().enumerate() {
            if i > 0 {
                let _ = write!(out, "<tr class=\"{}\">", esc(&change));
            }
            let _ = write!(
                out,
                "<td class=\"mono\">{}</td><td class=\"mono old\">{}</td><td class=\"mono new\">{}</td>",
                esc(c.as_str()),
                esc(&show(&v["old"])),
                esc(&show(&v["new"]))
            );
            if i == 0 {
                let _ = write!(out, "<td rowspan=\"{span}\" class=\"causes\">{causes}</td>");
            }
            let _ = write!(out, "</tr>");
        }
    }
    let _ = write!(out, "</table>");
    more_in_json(out, super::total(t, "rows"), "rows");
}

/// Says how many of `total` things the page left out, if any.
fn more_in_json(out: &mut String, total: u64, things: &str) {
    if total > HTML_ROWS as u64 {
        let _ = write!(
            out,
            "<p class=\"muted\">… and {} more {things} (see the JSON report).</p>",
            total - HTML_ROWS as u64
        );
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// The page stays one a browser opens: past `HTML_ROWS` rows of a table
    /// (or dead letters of a side) it says how many more the JSON holds.
    #[test]
    fn the_html_page_shows_a_bounded_number_of_rows() {
        let rows: Vec<Json> = (0..HTML_ROWS + 7)
            .map(|i| json!({"key": {"id": i}, "change": "added", "columns": {"n": {"old": null, "new": i}}, "caused_by": [i]}))
            .collect();
        let dead: Vec<Json> = (0..HTML_ROWS + 3)
            .map(|i| json!({"seq": i, "stream": "s", "partition": 0, "offset": i, "class": "malformed", "message": "m"}))
            .collect();
        let report = json!({
            "tables": [{"name": "t", "added": rows.len(), "removed": 0, "changed": 0, "rows": rows}],
            "dead_letters": {"only_old": dead, "only_new": []},
        });
        let page = html(&report);
        assert_eq!(page.matches("<tr class=\"added\">").count(), HTML_ROWS);
        assert!(page.contains("… and 7 more rows (see the JSON report)."));
        assert!(page.contains("… and 3 more dead letters only in old (see the JSON report)."));
        assert!(!page.contains("dead letters only in new (see"));
    }
}
