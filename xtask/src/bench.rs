//! `cargo xtask bench [--events N] [--batch-size N]`: `rewind run` with payments-v2 against a
//! native Rust implementation of the same logic issuing the same SQL through
//! rusqlite with the same batching, in the same run, plus peak RSS and cold
//! versus warm start. The machines are shared and noisy: read the ratio.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

use crate::demo::XorShift;
use crate::{cargo, cmd, target_dir};

pub fn run(args: &[String]) -> Result<()> {
    // The native baseline is code in this crate: measure it optimised.
    if cfg!(debug_assertions) {
        let mut release = vec![
            "run",
            "--quiet",
            "--release",
            "--package",
            "xtask",
            "--",
            "bench",
        ];
        release.extend(args.iter().map(String::as_str));
        return cmd(&cargo(), &release);
    }
    let (mut events, mut batch) = (1_000_000usize, 1000usize);
    let mut rest = args.iter();
    while let Some(flag) = rest.next() {
        let value = rest.next().and_then(|v| v.parse().ok());
        match (flag.as_str(), value) {
            ("--events", Some(n)) => events = n,
            ("--batch-size", Some(n)) if n > 0 => batch = n,
            _ => bail!("usage: cargo xtask bench [--events N] [--batch-size N]"),
        }
    }
    let (wasm, bin) = crate::build_release()?;
    let dir = target_dir().join("bench");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let input = dir.join("orders.jsonl");
    generate(&input, events, events as u64 / 10)?;
    let processor = wasm.join("payments-v2.wasm");
    println!(
        "{events} events, {} customers, batches of {batch}",
        events / 10
    );

    // Cold start compiles the component; warm start loads it from the cache.
    let cache = dir.join("cache");
    let tiny = dir.join("tiny.jsonl");
    std::fs::write(&tiny, "{}\n")?;
    let cold = start_time(&bin, &processor, &tiny, &dir.join("cold.db"), &cache)?;
    let warm = start_time(&bin, &processor, &tiny, &dir.join("warm.db"), &cache)?;
    println!("start: cold (compile) {cold}, warm (cache) {warm}");

    let (wasm_time, rss) = run_rewind(
        &bin,
        &processor,
        &input,
        &dir.join("wasm.db"),
        &cache,
        batch,
    )?;
    let native_time = native(&input, &dir.join("native.db"), batch)?;
    // The host's own cost per event: a processor that does nothing.
    let noop_input = dir.join("noop.jsonl");
    std::fs::write(&noop_input, "{\"do\":\"noop\"}\n".repeat(events))?;
    let (noop_time, _) = run_rewind(
        &bin,
        &wasm.join("hostile.wasm"),
        &noop_input,
        &dir.join("noop.db"),
        &cache,
        batch,
    )?;
    let rate = |t: Duration| events as f64 / t.as_secs_f64();
    println!(
        "rewind run (wasm): {:>9.0} events/s  ({:.2}s, peak RSS {} MiB)",
        rate(wasm_time),
        wasm_time.as_secs_f64(),
        rss / 1024
    );
    println!(
        "native rusqlite:   {:>9.0} events/s  ({:.2}s)",
        rate(native_time),
        native_time.as_secs_f64()
    );
    println!(
        "host alone (no-op processor): {:>9.0} events/s  ({:.2}s)",
        rate(noop_time),
        noop_time.as_secs_f64()
    );
    println!(
        "wasm/native time ratio: {:.2}",
        wasm_time.as_secs_f64() / native_time.as_secs_f64()
    );
    println!(
        "floor: >= 150000 events/s and ratio <= 1.5; goal: >= 300000 events/s and ratio <= 1.3"
    );
    Ok(())
}

fn generate(path: &Path, events: usize, customers: u64) -> Result<()> {
    let mut rng = XorShift(0xbe7c4);
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    for i in 0..events {
        if i % 20 == 19 {
            writeln!(
                out,
                r#"{{"type":"order_cancelled","order_id":"o-{}"}}"#,
                i - 10
            )?;
        } else {
            writeln!(
                out,
                r#"{{"type":"order_completed","order_id":"o-{i}","customer_id":"c-{}","amount_cents":{},"currency":"EUR"}}"#,
                rng.below(customers.max(1)),
                100 + rng.below(10_000)
            )?;
        }
    }
    Ok(())
}

/// `rewind run` of `processor` over `input` into `state`.
fn rewind_run(bin: &Path, processor: &Path, input: &Path, state: &Path, cache: &Path) -> Command {
    let mut command = Command::new(bin);
    command
        .arg("run")
        .arg("--processor")
        .arg(processor)
        .arg("--input")
        .arg(input)
        .arg("--state")
        .arg(state)
        .arg("--cache-dir")
        .arg(cache);
    command
}

fn start_time(
    bin: &Path,
    processor: &Path,
    input: &Path,
    state: &Path,
    cache: &Path,
) -> Result<String> {
    let out = rewind_run(bin, processor, input, state, cache).output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stderr
        .lines()
        .find(|l| l.starts_with("module "))
        .context("rewind printed no module line")?;
    Ok(line
        .split_once('(')
        .map_or(line, |(_, rest)| rest.trim_end_matches(')'))
        .to_owned())
}

/// Runs `rewind run`, polling its peak RSS (VmHWM, KiB) while it runs.
fn run_rewind(
    bin: &Path,
    processor: &Path,
    input: &Path,
    state: &Path,
    cache: &Path,
    batch: usize,
) -> Result<(Duration, u64)> {
    let started = Instant::now();
    let mut child = rewind_run(bin, processor, input, state, cache)
        .arg("--quiet")
        // Batches end by size only, as in the native baseline.
        .args(["--batch-size", &batch.to_string(), "--batch-ms", "3600000"])
        .stdout(Stdio::null())
        .spawn()?;
    let status_file = PathBuf::from(format!("/proc/{}/status", child.id()));
    let mut peak = 0;
    loop {
        if let Ok(status) = std::fs::read_to_string(&status_file)
            && let Some(kib) = status.lines().find_map(|l| l.strip_prefix("VmHWM:"))
        {
            peak = peak.max(
                kib.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse()
                    .unwrap_or(0),
            );
        }
        if let Some(status) = child.try_wait()? {
            if !status.success() {
                bail!("rewind run failed ({status})");
            }
            return Ok((started.elapsed(), peak));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Order {
    OrderCompleted {
        order_id: String,
        customer_id: String,
        amount_cents: i64,
        currency: String,
    },
    OrderCancelled {
        order_id: String,
    },
}

#[derive(Serialize)]
struct Payment<'a> {
    order_id: &'a str,
    customer_id: &'a str,
    amount_cents: i64,
    currency: &'a str,
    status: &'a str,
    gateway_ref: &'a str,
    updated_at_ms: i64,
}

/// The payments v2 logic, natively: the same statements, a savepoint per
/// event, outbox rows and offsets committed per batch, as the host does.
fn native(input: &Path, db: &Path, batch: usize) -> Result<Duration> {
    let started = Instant::now();
    let conn = Connection::open(db)?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA cache_size = -65536; PRAGMA temp_store = MEMORY;
         CREATE TABLE _rewind_offsets (stream TEXT NOT NULL, partition INTEGER NOT NULL, next_offset INTEGER NOT NULL, PRIMARY KEY (stream, partition)) WITHOUT ROWID;
         CREATE TABLE _rewind_outbox (seq INTEGER NOT NULL, n INTEGER NOT NULL, id TEXT NOT NULL, stream TEXT NOT NULL, key BLOB, payload BLOB, headers TEXT NOT NULL, timestamp_ms INTEGER, PRIMARY KEY (seq, n)) WITHOUT ROWID;
         CREATE TABLE _rewind_dlq (seq INTEGER PRIMARY KEY, message TEXT NOT NULL, raw BLOB NOT NULL);
         CREATE TABLE payments (order_id TEXT PRIMARY KEY, customer_id TEXT NOT NULL, amount_cents INTEGER NOT NULL, currency TEXT NOT NULL, status TEXT NOT NULL, gateway_ref TEXT NOT NULL, updated_at_ms INTEGER NOT NULL);
         CREATE TABLE customer_totals (customer_id TEXT PRIMARY KEY, charged_cents INTEGER NOT NULL, refunded_cents INTEGER NOT NULL, charges INTEGER NOT NULL);",
    )?;
    let text = std::fs::read(input)?;
    let mut seq = 0i64;
    conn.execute_batch("BEGIN")?;
    for (line_no, line) in text
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .enumerate()
    {
        conn.prepare_cached("SAVEPOINT e")?.execute([])?;
        let applied = match serde_json::from_slice::<Order>(line) {
            Ok(order) => apply(&conn, order, seq)?,
            Err(e) => Err(e.to_string()),
        };
        conn.prepare_cached(if applied.is_ok() {
            "RELEASE e"
        } else {
            "ROLLBACK TO e"
        })?
        .execute([])?;
        if let Err(message) = applied {
            conn.prepare_cached("RELEASE e")?.execute([])?;
            conn.prepare_cached("INSERT INTO _rewind_dlq VALUES (?1, ?2, ?3)")?
                .execute(params![seq, message, line])?;
        }
        seq += 1;
        // The host commits at instance-epoch boundaries (64 events), so its
        // batches of 1000 are really 1024.
        if (seq as usize).is_multiple_of(batch.next_multiple_of(64)) {
            conn.prepare_cached(
                "INSERT OR REPLACE INTO _rewind_offsets VALUES ('orders.jsonl', 0, ?1)",
            )?
            .execute([line_no as i64 + 2])?;
            conn.execute_batch("COMMIT; BEGIN")?;
        }
    }
    conn.execute_batch("COMMIT")?;
    Ok(started.elapsed())
}

fn apply(conn: &Connection, order: Order, seq: i64) -> Result<Result<(), String>> {
    let gateway_ref = format!("gw_{:016x}", XorShift(seq as u64 | 1).next_u64());
    let emit = |p: &Payment<'_>| -> Result<()> {
        conn.prepare_cached(
            "INSERT INTO _rewind_outbox VALUES (?1, 0, ?2, 'payments', ?3, ?4, '[]', NULL)",
        )?
        .execute(params![
            seq,
            format!("orders.jsonl/0@{seq}/0"),
            p.order_id,
            serde_json::to_vec(p)?
        ])?;
        Ok(())
    };
    match order {
        Order::OrderCompleted {
            order_id,
            customer_id,
            amount_cents,
            currency,
        } => {
            let seen = conn
                .prepare_cached("SELECT 1 FROM payments WHERE order_id = ?1")?
                .query_row([&order_id], |_| Ok(()))
                .optional()?;
            if seen.is_some() {
                return Ok(Ok(()));
            }
            let p = Payment {
                order_id: &order_id,
                customer_id: &customer_id,
                amount_cents,
                currency: &currency,
                status: "charged",
                gateway_ref: &gateway_ref,
                updated_at_ms: 0,
            };
            conn.prepare_cached(
                "INSERT OR REPLACE INTO payments VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?
            .execute(params![
                p.order_id,
                p.customer_id,
                p.amount_cents,
                p.currency,
                p.status,
                p.gateway_ref,
                p.updated_at_ms
            ])?;
            conn.prepare_cached(
                "INSERT INTO customer_totals VALUES (?1, ?2, 0, 1) ON CONFLICT (customer_id) DO UPDATE SET
                 charged_cents = charged_cents + excluded.charged_cents, charges = charges + 1",
            )?
            .execute(params![p.customer_id, p.amount_cents])?;
            emit(&p)?;
        }
        Order::OrderCancelled { order_id } => {
            let row: Option<(String, i64, String, String, String)> = conn
                .prepare_cached("SELECT customer_id, amount_cents, currency, gateway_ref, status FROM payments WHERE order_id = ?1")?
                .query_row([&order_id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))
                .optional()?;
            let Some((customer_id, amount_cents, currency, gateway, status)) = row else {
                return Ok(Err(format!("cancel of unknown order {order_id}")));
            };
            if status != "charged" {
                return Ok(Err(format!("order {order_id} is already refunded")));
            }
            conn.prepare_cached(
                "UPDATE payments SET status = 'refunded', updated_at_ms = ?2 WHERE order_id = ?1",
            )?
            .execute(params![order_id, 0])?;
            conn.prepare_cached("UPDATE customer_totals SET refunded_cents = refunded_cents + ?2 WHERE customer_id = ?1")?
                .execute(params![customer_id, amount_cents])?;
            let p = Payment {
                order_id: &order_id,
                customer_id: &customer_id,
                amount_cents,
                currency: &currency,
                status: "refunded",
                gateway_ref: &gateway,
                updated_at_ms: 0,
            };
            emit(&p)?;
        }
    }
    Ok(Ok(()))
}
