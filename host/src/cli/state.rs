//! `rewind inspect` and `rewind dlq list`: what a state DB holds.

use std::path::PathBuf;

use anyhow::Context as _;
use rewind_host::{StateDb, printable, printable_str};

pub fn inspect(state: PathBuf, json: bool) -> anyhow::Result<()> {
    if state.is_dir() {
        // A Kafka run's state directory: every partition's DB in turn.
        let dbs = rewind_host::kafka::state_dbs(&state)
            .with_context(|| format!("reading {}", state.display()))?;
        if dbs.is_empty() {
            anyhow::bail!("{} holds no partition-N.db state DBs", state.display());
        }
        for (i, db) in dbs.into_values().enumerate() {
            if i > 0 && !json {
                outln!()?;
            }
            inspect_db(db, json)?;
        }
        return Ok(());
    }
    inspect_db(state, json)
}

fn inspect_db(state: PathBuf, json: bool) -> anyhow::Result<()> {
    let db = StateDb::open_existing(&state)?;
    let summary = db.summary()?;
    // The tape this state records onto, if any: its id and committed bytes.
    let tape = db.tape_mark()?.map(|m| (m.id, m.bytes));
    if json {
        let value = serde_json::json!({
            "state": state,
            "module_digest": summary.module_digest,
            "consumed": summary.consumed,
            "tables": summary.tables.iter().map(|t| serde_json::json!({"name": t.name, "rows": t.rows})).collect::<Vec<_>>(),
            "offsets": summary.offsets.iter().map(|(s, p, o)| serde_json::json!({"stream": s, "partition": p, "next_offset": o})).collect::<Vec<_>>(),
            "dead_letters": summary.dead_letters,
            "outbox_pending": summary.outbox_pending,
            "event_ids": summary.event_ids,
            "outputs_delivered": summary.outputs_delivered,
            "tape": tape.as_ref().map(|(id, bytes)| serde_json::json!({"id": id, "bytes": bytes})),
        });
        outln!("{}", serde_json::to_string_pretty(&value)?)?;
        return Ok(());
    }
    outln!("state         {}", state.display())?;
    outln!(
        "module        {}",
        summary.module_digest.as_deref().unwrap_or("(none yet)")
    )?;
    outln!("consumed      {} records", summary.consumed)?;
    let width = summary
        .tables
        .iter()
        .map(|t| t.name.len())
        .max()
        .unwrap_or(0);
    for (i, table) in summary.tables.iter().enumerate() {
        let label = if i == 0 { "tables" } else { "" };
        outln!(
            "{label:<13} {:<width$}  {} rows",
            printable_str(&table.name),
            table.rows
        )?;
    }
    if summary.tables.is_empty() {
        outln!("tables        (none)")?;
    }
    for (i, (stream, partition, next)) in summary.offsets.iter().enumerate() {
        let label = if i == 0 { "offsets" } else { "" };
        let stream = printable_str(stream);
        outln!("{label:<13} {stream}/{partition}  next offset {next}")?;
    }
    outln!("dead letters  {}", summary.dead_letters)?;
    outln!(
        "outbox        {} pending, {} delivered",
        summary.outbox_pending,
        summary.outputs_delivered
    )?;
    outln!(
        "event ids     {} remembered for deduplication",
        summary.event_ids
    )?;
    match tape {
        Some((id, bytes)) => outln!("tape          id {id}, {bytes} bytes committed")?,
        None => outln!("tape          none (run with --tape to record one)")?,
    }
    Ok(())
}

/// Characters of a dead letter's raw bytes `dlq list` shows (`--json` has
/// them all).
const RAW_SHOWN: usize = 60;

pub fn dlq_list(state: PathBuf, json: bool) -> anyhow::Result<()> {
    let db = StateDb::open_existing(&state)?;
    let reading = || format!("reading dead letters of {}", state.display());
    if json {
        let text =
            |b: &Option<Vec<u8>>| b.as_ref().map(|b| String::from_utf8_lossy(b).into_owned());
        return db
            .each_dead_letter(|dl| {
                let line = serde_json::json!({
                    "seq": dl.seq,
                    "stream": dl.position.stream,
                    "partition": dl.position.partition,
                    "offset": dl.position.offset,
                    "module_digest": dl.module_digest,
                    "error_class": dl.error_class,
                    "message": dl.message,
                    "key": text(&dl.key),
                    "payload": text(&dl.payload),
                    "timestamp_ms": dl.timestamp_ms,
                    "raw_hex": hex::encode(&dl.raw),
                });
                outln!("{line}")
            })
            .with_context(reading);
    }
    let (count, position_chars, class_chars) = db.dead_letter_widths().with_context(reading)?;
    if count == 0 {
        outln!("no dead letters in {}", state.display())?;
        return Ok(());
    }
    // Columns as wide as their widest entry (classes run to 20 characters).
    let (pw, cw) = (position_chars.max(8), class_chars.max(5));
    outln!(
        "{:>6}  {:<pw$}  {:<cw$}  message",
        "seq",
        "position",
        "class"
    )?;
    db.each_dead_letter(|dl| {
        // What the input and the guest wrote, escaped: a dead letter's
        // bytes are whatever arrived.
        let position = printable_str(&dl.position.to_string()).into_owned();
        // (Of its first bytes only: a character takes at most four.)
        let head = &dl.raw[..dl.raw.len().min(4 * RAW_SHOWN)];
        let raw = printable(head);
        let mut shown: String = raw.chars().take(RAW_SHOWN).collect();
        if shown.len() < raw.len() || head.len() < dl.raw.len() {
            shown.push('…');
        }
        outln!(
            "{:>6}  {position:<pw$}  {:<cw$}  {}",
            dl.seq,
            dl.error_class,
            printable_str(&dl.message)
        )?;
        outln!("{:>6}  {:<pw$}  {:<cw$}  raw: {shown}", "", "", "")
    })
    .with_context(reading)?;
    outln!("{count} dead letters")?;
    Ok(())
}
