//! The benchmark's baseline: payments v2 written natively against rusqlite,
//! issuing the same SQL as the guest with the same batching and database
//! set-up as `rewind run`, so that `cargo xtask bench` measures what the
//! sandbox costs and nothing else.
//!
//! `native_payments INPUT.jsonl STATE.db BATCH_SIZE`
//!
//! Like the host it commits state, outbox pages and offsets per batch
//! (rounded up to the host's instance epochs), checkpoints the WAL
//! in the background, and runs events without savepoints (payments rejects an
//! event before writing anything, so none is needed natively). Outputs are
//! encoded into outbox pages of up to 1 MiB as the host does.

use std::borrow::Cow;
use std::path::Path;

use anyhow::{Context, Result};
use rewind_host::Position;
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

/// The same allocator as `rewind`.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The payload, read flat as the processor reads it.
#[derive(Deserialize)]
struct Order<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    order_id: String,
    customer_id: Option<String>,
    amount_cents: Option<i64>,
    currency: Option<String>,
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

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [input, db, batch] = args.as_slice() else {
        anyhow::bail!("usage: native_payments INPUT.jsonl STATE.db BATCH_SIZE");
    };
    let batch: usize = batch.parse().context("BATCH_SIZE")?;
    run(Path::new(input), Path::new(db), batch)
}

fn run(input: &Path, db: &Path, batch: usize) -> Result<()> {
    let mut conn = Connection::open(db)?;
    conn.execute_batch(
        "PRAGMA page_size = 16384; PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA cache_size = -65536;
         PRAGMA temp_store = MEMORY;
         CREATE TABLE _rewind_offsets (stream TEXT NOT NULL, partition INTEGER NOT NULL,
             next_offset INTEGER NOT NULL, PRIMARY KEY (stream, partition)) WITHOUT ROWID;
         CREATE TABLE _rewind_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
         CREATE TABLE _rewind_outbox (last_slot INTEGER PRIMARY KEY,
             first_slot INTEGER NOT NULL, outputs INTEGER NOT NULL, page BLOB NOT NULL);
         CREATE TABLE _rewind_dlq (seq INTEGER PRIMARY KEY, message TEXT NOT NULL, raw BLOB NOT NULL);",
    )?;
    // The payments processor's schema, as its `init` creates it.
    conn.execute_batch(
        "CREATE TABLE payments (
             order_id TEXT PRIMARY KEY, customer_id TEXT NOT NULL,
             amount_cents INTEGER NOT NULL, currency TEXT NOT NULL, status TEXT NOT NULL,
             gateway_ref TEXT NOT NULL, updated_at_ms INTEGER NOT NULL) WITHOUT ROWID;
         CREATE TABLE customer_totals (
             customer_id TEXT PRIMARY KEY, charged_cents INTEGER NOT NULL,
             refunded_cents INTEGER NOT NULL, charges INTEGER NOT NULL) WITHOUT ROWID;",
    )?;
    let _checkpoints = rewind_host::Checkpointer::start(&mut conn, db, None)?;
    let stream = input
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let text = std::fs::read(input)?;
    let commit_every = batch.next_multiple_of(rewind_host::INSTANCE_EPOCH as usize);
    let mut seq = 0u64;
    let mut outbox = Outbox::default();
    // The input's position, its offset moved along per line.
    let mut position = Position {
        stream: stream.clone(),
        partition: 0,
        offset: 0,
    };
    conn.execute_batch("BEGIN IMMEDIATE")?;
    for (line_no, line) in text
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .enumerate()
    {
        let offset = line_no as i64 + 1;
        position.offset = offset;
        let applied = match serde_json::from_slice::<Order<'_>>(line) {
            Ok(order) => apply(&conn, &mut outbox, order, seq, &position)?,
            Err(e) => Err(format!("payload: {e}")),
        };
        if let Err(message) = applied {
            conn.prepare_cached("INSERT INTO _rewind_dlq VALUES (?1, ?2, ?3)")?
                .execute(params![seq as i64, message, line])?;
        }
        seq += 1;
        if (seq as usize).is_multiple_of(commit_every) {
            outbox.write(&conn)?;
            commit(&conn, &stream, offset + 1, seq)?;
            conn.execute_batch("BEGIN IMMEDIATE")?;
        }
    }
    outbox.write(&conn)?;
    conn.execute_batch("COMMIT")?;
    Ok(())
}

/// The open outbox page, encoded as the host encodes it.
#[derive(Default)]
struct Outbox {
    page: Vec<u8>,
    first_slot: i64,
    last_slot: i64,
    outputs: u32,
}

impl Outbox {
    fn push(
        &mut self,
        conn: &Connection,
        slot: i64,
        id: &str,
        key: &[u8],
        payload: &[u8],
    ) -> Result<()> {
        if !self.page.is_empty()
            && self.page.len() + 64 + id.len() + key.len() + payload.len() > 1 << 20
        {
            self.write(conn)?;
        }
        if self.outputs == 0 {
            self.first_slot = slot;
        }
        self.last_slot = slot;
        self.outputs += 1;
        let page = &mut self.page;
        page.extend_from_slice(&slot.to_le_bytes());
        for field in [id.as_bytes(), b"payments"] {
            page.extend_from_slice(&(field.len() as u32).to_le_bytes());
            page.extend_from_slice(field);
        }
        for field in [key, payload] {
            page.push(1);
            page.extend_from_slice(&(field.len() as u32).to_le_bytes());
            page.extend_from_slice(field);
        }
        // No headers, no timestamp.
        page.extend_from_slice(&0u32.to_le_bytes());
        page.push(0);
        Ok(())
    }

    fn write(&mut self, conn: &Connection) -> Result<()> {
        if self.outputs > 0 {
            conn.prepare_cached(
                "INSERT INTO _rewind_outbox (last_slot, first_slot, outputs, page) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![self.last_slot, self.first_slot, self.outputs, self.page])?;
            self.page.clear();
            self.outputs = 0;
        }
        Ok(())
    }
}

fn commit(conn: &Connection, stream: &str, next_offset: i64, seq: u64) -> Result<()> {
    conn.prepare_cached("INSERT OR REPLACE INTO _rewind_offsets VALUES (?1, 0, ?2)")?
        .execute(params![stream, next_offset])?;
    conn.prepare_cached("INSERT OR REPLACE INTO _rewind_meta VALUES ('next_seq', ?1)")?
        .execute([seq.to_string()])?;
    conn.execute_batch("COMMIT")?;
    Ok(())
}

/// The payments v2 logic; `Err` is invalid input.
fn apply(
    conn: &Connection,
    outbox: &mut Outbox,
    order: Order<'_>,
    seq: u64,
    position: &Position,
) -> Result<Result<(), String>> {
    let mut emit = |p: &Payment<'_>| -> Result<()> {
        outbox.push(
            conn,
            (seq << 16) as i64,
            &position.output_id(0),
            p.order_id.as_bytes(),
            &serde_json::to_vec(p)?,
        )
    };
    match &*order.kind {
        "order_completed" => {
            let (Some(customer_id), Some(amount_cents), Some(currency)) =
                (order.customer_id, order.amount_cents, order.currency)
            else {
                return Ok(Err(
                    "order_completed needs customer_id, amount_cents and currency".into(),
                ));
            };
            let order_id = order.order_id;
            // Built as the processor builds it: a prefix and hex digits, no `format!`.
            let gateway_ref = ["gw_", &hex(splitmix(seq))].concat();
            let p = Payment {
                order_id: &order_id,
                customer_id: &customer_id,
                amount_cents,
                currency: &currency,
                status: "charged",
                gateway_ref: &gateway_ref,
                updated_at_ms: 0,
            };
            let inserted = conn
                .prepare_cached(
                    "INSERT INTO payments (order_id, customer_id, amount_cents, currency,
                        status, gateway_ref, updated_at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                     ON CONFLICT (order_id) DO NOTHING",
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
            if inserted == 0 {
                return Ok(Ok(()));
            }
            conn.prepare_cached(
                "INSERT INTO customer_totals VALUES (?1, ?2, 0, 1)
                 ON CONFLICT (customer_id) DO UPDATE SET
                    charged_cents = charged_cents + excluded.charged_cents,
                    charges = charges + 1",
            )?
            .execute(params![p.customer_id, p.amount_cents])?;
            emit(&p)?;
        }
        "order_cancelled" => {
            let order_id = order.order_id;
            let row: Option<(String, i64, String, String, String)> = conn
                .prepare_cached(
                    "SELECT customer_id, amount_cents, currency, gateway_ref, status
                     FROM payments WHERE order_id = ?1",
                )?
                .query_row([&order_id], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                })
                .optional()?;
            let Some((customer_id, amount_cents, currency, gateway_ref, status)) = row else {
                return Ok(Err(format!("cancel of unknown order {order_id}")));
            };
            if status != "charged" {
                return Ok(Err(format!("order {order_id} is already refunded")));
            }
            conn.prepare_cached(
                "UPDATE payments SET status = 'refunded', updated_at_ms = ?2 WHERE order_id = ?1",
            )?
            .execute(params![order_id, 0])?;
            conn.prepare_cached(
                "UPDATE customer_totals SET refunded_cents = refunded_cents + ?2
                 WHERE customer_id = ?1",
            )?
            .execute(params![customer_id, amount_cents])?;
            emit(&Payment {
                order_id: &order_id,
                customer_id: &customer_id,
                amount_cents,
                currency: &currency,
                status: "refunded",
                gateway_ref: &gateway_ref,
                updated_at_ms: 0,
            })?;
        }
        other => return Ok(Err(format!("unknown order type {other:?}"))),
    }
    Ok(Ok(()))
}

/// `n` as 16 lowercase hex digits, as the guest SDK's `random_hex` writes bytes.
fn hex(n: u64) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut hex = Vec::with_capacity(16);
    for b in n.to_be_bytes() {
        hex.extend_from_slice(&[DIGITS[usize::from(b >> 4)], DIGITS[usize::from(b & 0xf)]]);
    }
    // As the SDK's `random_hex` writes it.
    String::from_utf8(hex).expect("hex digits are ASCII")
}

/// A cheap stand-in for the host's seeded randomness.
fn splitmix(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
