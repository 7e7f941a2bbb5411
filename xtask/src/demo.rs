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

/// Runs `rewind`, passing its stderr through; `ok` lists the exit codes
/// that are not failures (replay exits 1 when the versions differ).
fn rewind_with(bin: &Path, args: &[&str], ok: &[i32]) -> Result<String> {
    let output = Command::new(bin)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {}", bin.display()))?;
    eprint!("{}", String::from_utf8_lossy(&output.stderr));
    if !output.status.code().is_some_and(|c| ok.contains(&c)) {
        bail!("`rewind {}` failed ({})", args.join(" "), output.status);
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn rewind(bin: &Path, args: &[&str]) -> Result<String> {
    rewind_with(bin, args, &[0])
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
    let path = |p: &Path| p.to_string_lossy().into_owned();
    let (v1, v2) = (wasm.join("payments-v1.wasm"), wasm.join("payments-v2.wasm"));
    let (live, tape, output) = (
        dir.join("live.db"),
        dir.join("orders.tape"),
        dir.join("payments.jsonl"),
    );

    println!("== live: payments v1 (the buggy one) runs, recording every input on a tape");
    let run = [
        "run",
        "--processor",
        &path(&v1),
        "--input",
        &path(&input),
        "--state",
        &path(&live),
        "--tape",
        &path(&tape),
        "--output",
        &path(&output),
    ];
    println!("rewind {}", run.join(" "));
    rewind(&bin, &run)?;
    print!("{}", rewind(&bin, &["inspect", "--state", &path(&live)])?);
    println!();
    print!("{}", rewind(&bin, &["tape", "info", &path(&tape)])?);

    println!("\n== replay: v1 against the fix (v2), side by side, on the tape");
    let (json, html, keep) = (
        dir.join("report.json"),
        dir.join("report.html"),
        dir.join("replay"),
    );
    let replay = [
        "replay",
        "--tape",
        &path(&tape),
        "--old",
        &path(&v1),
        "--new",
        &path(&v2),
        "--json",
        &path(&json),
        "--html",
        &path(&html),
        "--keep",
        &path(&keep),
    ];
    println!("rewind {}", replay.join(" "));
    print!("{}", rewind_with(&bin, &replay, &[0, 1])?);

    println!(
        "\nreports: {} (open in a browser), {}",
        html.display(),
        json.display()
    );
    println!("look closer:");
    println!("  {} dlq list --state {}", bin.display(), live.display());
    println!(
        "  {} diff {} {}",
        bin.display(),
        keep.join("old.db").display(),
        keep.join("new.db").display()
    );
    Ok(())
}
