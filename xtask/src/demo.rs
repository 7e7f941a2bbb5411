//! `cargo xtask demo`: the README's main command. Builds everything,
//! generates a payments stream with re-delivered orders and a few malformed
//! lines, runs payments v1 (double-charges) and v2 (idempotent) over it, and
//! shows what each did.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::target_dir;

/// A small deterministic generator, so every demo run shows the same stream.
pub struct XorShift(pub u64);

impl XorShift {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

fn envelope(offset: usize, key: &str, payload: &str) -> String {
    let ts = 1_767_225_600_000u64 + offset as u64 * 1500;
    format!(
        "{{\"topic\":\"orders\",\"partition\":0,\"offset\":{offset},\"tstype\":\"create\",\"ts\":{ts},\"broker\":0,\"key\":{},\"payload\":{}}}",
        serde_json_string(key),
        serde_json_string(payload)
    )
}

fn serde_json_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Generates the demo stream as kcat -J lines plus a few malformed lines.
pub fn payments_stream(orders: usize, customers: u64, seed: u64) -> Vec<u8> {
    let mut rng = XorShift(seed | 1);
    let mut payloads: Vec<(String, String)> = Vec::new();
    let mut later: Vec<(usize, String, String)> = Vec::new();
    for i in 0..orders {
        let order = format!("o-{i}");
        let completed = format!(
            r#"{{"type":"order_completed","order_id":"{order}","customer_id":"c-{}","amount_cents":{},"currency":"{}"}}"#,
            rng.below(customers),
            100 + rng.below(20_000),
            ["EUR", "USD", "GBP"][rng.below(3) as usize],
        );
        payloads.push((order.clone(), completed.clone()));
        if rng.chance(8) {
            // Re-produced after an outage: the same order, delivered again later.
            later.push((i + 1 + rng.below(200) as usize, order.clone(), completed));
        }
        if rng.chance(10) {
            let cancel = format!(r#"{{"type":"order_cancelled","order_id":"{order}"}}"#);
            later.push((i + 1 + rng.below(300) as usize, order.clone(), cancel));
        }
        if rng.chance(1) {
            let unknown = format!(r#"{{"type":"order_cancelled","order_id":"o-missing-{i}"}}"#);
            payloads.push((format!("o-missing-{i}"), unknown));
        }
        later.sort_by_key(|(at, ..)| std::cmp::Reverse(*at));
        while later.last().is_some_and(|(at, ..)| *at <= i) {
            let (_, key, payload) = later.pop().expect("checked");
            payloads.push((key, payload));
        }
    }
    for (_, key, payload) in later.into_iter().rev() {
        payloads.push((key, payload));
    }
    let mut out = Vec::new();
    for (offset, (key, payload)) in payloads.iter().enumerate() {
        out.extend_from_slice(envelope(offset, key, payload).as_bytes());
        out.push(b'\n');
        match offset {
            100 => out.extend_from_slice(b"{\"type\":\"order_completed\",\"order_id\":\"o-trunc\n"),
            700 => out.extend_from_slice(b"not json at all\n"),
            1300 => out.extend_from_slice(b"{\"type\":\"order_\xff\xfe\"}\n"),
            1900 => out.extend_from_slice(b"{\"type\":\"order_shipped\",\"order_id\":\"o-1\"}\n"),
            _ => {}
        }
    }
    out
}

fn rewind(bin: &Path, args: &[&str]) -> Result<String> {
    let output = Command::new(bin)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {}", bin.display()))?;
    eprint!("{}", String::from_utf8_lossy(&output.stderr));
    if !output.status.success() {
        bail!("`rewind {}` failed ({})", args.join(" "), output.status);
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

pub fn run() -> Result<()> {
    let (wasm, bin) = crate::build_release()?;
    let dir: PathBuf = target_dir().join("demo");
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("cannot clear {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir)?;
    let input = dir.join("orders.jsonl");
    std::fs::write(&input, payments_stream(3000, 400, 0x5eed))?;
    println!(
        "generated {} (3000 orders, re-deliveries, cancels, 4 malformed lines)\n",
        input.display()
    );

    for version in ["v1", "v2"] {
        let processor = wasm.join(format!("payments-{version}.wasm"));
        let state = dir.join(format!("payments-{version}.db"));
        let output = dir.join(format!("payments-{version}.jsonl"));
        println!(
            "== payments {version}: rewind run --processor {} --input {} --state {} --output {}",
            processor.display(),
            input.display(),
            state.display(),
            output.display()
        );
        rewind(
            &bin,
            &[
                "run",
                "--processor",
                &processor.to_string_lossy(),
                "--input",
                &input.to_string_lossy(),
                "--state",
                &state.to_string_lossy(),
                "--output",
                &output.to_string_lossy(),
            ],
        )?;
        print!(
            "{}",
            rewind(&bin, &["inspect", "--state", &state.to_string_lossy()])?
        );
        println!();
    }

    let (v1, v2) = (dir.join("payments-v1.db"), dir.join("payments-v2.db"));
    let attach = format!("ATTACH '{}' AS v2;", v2.display());
    let conn = rusqlite::Connection::open(&v1)?;
    conn.execute_batch(&attach)?;
    let differing: Vec<(String, i64, i64, i64, i64)> = conn
        .prepare(
            "SELECT a.customer_id, a.charged_cents, b.charged_cents, a.charges, b.charges
             FROM main.customer_totals a JOIN v2.customer_totals b USING (customer_id)
             WHERE a.charged_cents != b.charged_cents OR a.charges != b.charges
             ORDER BY a.charged_cents - b.charged_cents DESC",
        )?
        .query_map([], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })?
        .collect::<rusqlite::Result<_>>()?;
    let overcharged: i64 = differing.iter().map(|d| d.1 - d.2).sum();
    println!("== what the fix changes");
    println!(
        "{} customers were charged differently by v1; v1 overcharged {}.{:02} in total",
        differing.len(),
        overcharged / 100,
        overcharged % 100
    );
    for (customer, c1, c2, n1, n2) in differing.iter().take(5) {
        println!("  {customer}: v1 charged {c1} cents in {n1} charges, v2 {c2} cents in {n2}");
    }
    let recharged: i64 = conn.query_row(
        "SELECT count(*) FROM main.payments a JOIN v2.payments b USING (order_id)
         WHERE a.gateway_ref != b.gateway_ref OR a.status != b.status",
        [],
        |r| r.get(0),
    )?;
    println!(
        "{recharged} payments differ (v1 charged a re-delivered order again, with a new gateway_ref)"
    );
    println!(
        "\nlook closer:\n  {} dlq list --state {}",
        bin.display(),
        v1.display()
    );
    println!("  {} inspect --state {}", bin.display(), v2.display());
    Ok(())
}
