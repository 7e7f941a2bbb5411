//! The outbox: outputs waiting for the sink, written in pages of many outputs.
//!
//! An output is queued in memory, encoded into the open page, and pages are
//! written to `_rewind_outbox` inside the batch transaction (when one fills
//! up, and at commit), so an output is durable exactly when the state change
//! that made it is. One row per page instead of one per output: a SQLite
//! insert per output was a tenth of a run's time.
//!
//! Outputs are ordered by their slot, `seq * 65536 + n`. A page is keyed by
//! the slot of its last output (a rowid: pages append). The sink reports
//! outputs durable up to a slot; pages wholly at or below it are deleted,
//! and the slot is kept in `_rewind_meta` (`outbox.acked`) so that the
//! outputs of a page only partly delivered are not sent again after a
//! restart.

use std::cell::RefCell;

use rusqlite::{OptionalExtension, params};

use super::tables::{OutboxRow, headers_from_json};
use super::{StateDb, StateError};
use crate::codec::{Reader, Writer};
use crate::event::Output;

pub(super) const OUTBOX_SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS _rewind_outbox (
    last_slot INTEGER PRIMARY KEY,
    first_slot INTEGER NOT NULL,
    outputs INTEGER NOT NULL,
    page BLOB NOT NULL
);
"#;

/// Outputs of one event are at most this many (the host caps them lower),
/// so slots order outputs by event, then by index.
const OUTBOX_SLOTS: u64 = 1 << 16;
const _: () = assert!((crate::runtime::MAX_OUTPUTS_PER_EVENT as u64) < OUTBOX_SLOTS);

/// A page is written once its encoding passes this many bytes.
const PAGE_BYTES: usize = 1 << 20;

/// The slot of output `n` of the event consumed as `seq`.
pub(super) fn outbox_slot(seq: u64, n: u32) -> i64 {
    (seq * OUTBOX_SLOTS + u64::from(n)) as i64
}

/// The page being filled: outputs of the open transaction not written yet.
#[derive(Default)]
pub(super) struct OpenPage {
    page: Writer,
    first_slot: i64,
    last_slot: i64,
    outputs: u32,
}

impl OpenPage {
    fn push(&mut self, row: &OutboxRow) {
        let slot = outbox_slot(row.seq, row.n);
        if self.outputs == 0 {
            self.first_slot = slot;
        }
        self.last_slot = slot;
        self.outputs += 1;
        encode(&mut self.page, slot, row);
    }

    fn clear(&mut self) {
        self.page.buf.clear();
        self.outputs = 0;
    }
}

/// One output in a page: its slot, id, stream, key, payload, headers and
/// timestamp.
fn encode(w: &mut Writer, slot: i64, row: &OutboxRow) {
    w.i64(slot);
    w.str(&row.id);
    w.str(&row.output.stream);
    w.opt_bytes(row.output.key.as_deref());
    w.opt_bytes(row.output.payload.as_deref());
    w.headers(&row.output.headers);
    w.opt_i64(row.timestamp_ms);
}

/// An upper bound of what [`encode`] appends for `row`.
fn encoded_len(row: &OutboxRow) -> usize {
    let output = &row.output;
    let headers: usize = output
        .headers
        .iter()
        .map(|h| 9 + h.name.len() + h.value.as_ref().map_or(0, Vec::len))
        .sum();
    8 + 8
        + row.id.len()
        + output.stream.len()
        + 10
        + output.key.as_ref().map_or(0, Vec::len)
        + output.payload.as_ref().map_or(0, Vec::len)
        + 4
        + headers
        + 9
}

/// The outputs of a page whose slot is past `after`, in order.
fn decode(page: &[u8], after: i64, into: &mut Vec<OutboxRow>) -> Result<(), String> {
    let mut r = Reader::new(page);
    while !r.is_empty() {
        let slot = r.i64("slot")?;
        let id = r.str("id")?;
        let stream = r.str("stream")?;
        let key = r.opt_bytes("key")?;
        let payload = r.opt_bytes("payload")?;
        let headers = r.headers()?;
        let timestamp_ms = r.opt_i64("timestamp")?;
        if slot > after {
            let slot = slot as u64;
            into.push(OutboxRow {
                seq: slot / OUTBOX_SLOTS,
                n: (slot % OUTBOX_SLOTS) as u32,
                id,
                output: Output {
                    stream,
                    key,
                    payload,
                    headers,
                },
                timestamp_ms,
            });
        }
    }
    Ok(())
}

pub(super) type Outbox = RefCell<OpenPage>;

impl StateDb {
    /// Queues an output in the open transaction: it is written with the
    /// transaction and discarded with it.
    pub fn queue_outbox(&self, row: &OutboxRow) -> Result<(), StateError> {
        // A page is at most PAGE_BYTES, or one larger output alone: never
        // more than SQLite's value limit when the output itself is not.
        let used = self.outbox.borrow().page.buf.len();
        if used > 0 && used + encoded_len(row) > PAGE_BYTES {
            self.write_outbox_page()?;
        }
        self.outbox.borrow_mut().push(row);
        Ok(())
    }

    /// Writes the open page, if it holds anything (before a commit).
    pub(super) fn write_outbox_page(&self) -> Result<(), StateError> {
        let mut open = self.outbox.borrow_mut();
        if open.outputs == 0 {
            return Ok(());
        }
        self.host_statements
            .with(
                &self.conn,
                host_sql!(
                    "INSERT INTO _rewind_outbox (last_slot, first_slot, outputs, page)
                     VALUES (?1, ?2, ?3, ?4)"
                ),
                true,
                |s| {
                    s.execute(params![
                        open.last_slot,
                        open.first_slot,
                        open.outputs,
                        open.page.buf
                    ])
                },
            )
            .map_err(|e| self.err(e))?;
        open.clear();
        Ok(())
    }

    /// Forgets the open page (the transaction is rolled back).
    pub(super) fn discard_outbox_page(&self) {
        self.outbox.borrow_mut().clear();
    }

    /// The slot through which the sink has made outputs durable.
    fn outbox_acked(&self) -> Result<i64, StateError> {
        match self.meta("outbox.acked")? {
            None => Ok(-1),
            Some(value) => value
                .parse()
                .map_err(|_| self.invalid(format!("outbox.acked is {value:?}, not a slot"))),
        }
    }

    /// Outputs not yet delivered, in order: after `after` (the last one
    /// sent), or after the last one acknowledged; at most `limit` (the page
    /// that reaches it is returned whole).
    pub fn pending_outbox(
        &self,
        after: Option<(u64, u32)>,
        limit: usize,
    ) -> Result<Vec<OutboxRow>, StateError> {
        let after = match after {
            Some((seq, n)) => outbox_slot(seq, n),
            None => self.outbox_acked()?,
        };
        let mut stmt = self
            .conn
            .prepare_cached(host_sql!(
                "SELECT page FROM _rewind_outbox WHERE last_slot > ?1 ORDER BY last_slot"
            ))
            .map_err(|e| self.err(e))?;
        let mut pages = stmt.query([after]).map_err(|e| self.err(e))?;
        let mut rows = Vec::new();
        while rows.len() < limit {
            let Some(page) = pages.next().map_err(|e| self.err(e))? else {
                break;
            };
            let page = page.get_ref(0).map_err(|e| self.err(e))?;
            let page = page
                .as_blob()
                .map_err(|e| self.invalid(format!("an outbox page is not a blob: {e}")))?;
            decode(page, after, &mut rows)
                .map_err(|e| self.invalid(format!("an outbox page: {e}")))?;
        }
        Ok(rows)
    }

    /// Outputs waiting for the sink.
    pub(super) fn outbox_pending(&self) -> Result<u64, StateError> {
        let acked = self.outbox_acked()?;
        let total: i64 = self
            .conn
            .query_row(
                "SELECT coalesce(sum(outputs), 0) FROM _rewind_outbox WHERE last_slot > ?1",
                [acked],
                |r| r.get(0),
            )
            .map_err(|e| self.err(e))?;
        // Only the first pending page can hold outputs already delivered.
        let first: Option<(i64, Vec<u8>)> = self
            .conn
            .query_row(
                "SELECT outputs, page FROM _rewind_outbox WHERE last_slot > ?1 AND first_slot <= ?1
                 ORDER BY last_slot LIMIT 1",
                [acked],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(|e| self.err(e))?;
        let delivered = match first {
            Some((outputs, page)) => {
                let mut pending = Vec::new();
                decode(&page, acked, &mut pending)
                    .map_err(|e| self.invalid(format!("an outbox page: {e}")))?;
                outputs - pending.len() as i64
            }
            None => 0,
        };
        Ok(total.saturating_sub(delivered).max(0) as u64)
    }

    /// Removes delivered outputs (up to and including `through`) and records
    /// the sink's progress, atomically.
    pub fn ack_outbox(
        &self,
        through: (u64, u32),
        mark: Option<&super::SinkMark>,
    ) -> Result<(), StateError> {
        let through = outbox_slot(through.0, through.1);
        self.begin()?;
        let result = (|| {
            self.conn
                .prepare_cached(host_sql!(
                    "DELETE FROM _rewind_outbox WHERE last_slot <= ?1"
                ))
                .and_then(|mut s| s.execute([through]))
                .map_err(|e| self.err(e))?;
            self.set_meta("outbox.acked", &through.to_string())?;
            if let Some(mark) = mark {
                self.set_meta("sink.outputs", &mark.outputs.to_string())?;
                self.set_meta("sink.bytes", &mark.bytes.to_string())?;
                self.set_meta("sink.last_line_sha256", &mark.last_line_sha256)?;
            }
            self.commit()
        })();
        if result.is_err() {
            let _ = self.rollback();
        }
        result
    }

    /// Moves the outputs of a `rewind-state-2` DB (a row per output) into
    /// pages (inside the caller's transaction).
    pub(super) fn migrate_outbox_from_rows(&self) -> Result<(), StateError> {
        self.conn
            .execute_batch("ALTER TABLE _rewind_outbox RENAME TO _rewind_outbox_rows;")
            .and_then(|()| self.conn.execute_batch(OUTBOX_SCHEMA))
            .map_err(|e| self.err(e))?;
        // Row by row into pages: memory stays at a page, whatever is pending.
        let mut stmt = self
            .conn
            .prepare(
                "SELECT slot, id, stream, key, payload, headers, timestamp_ms
                 FROM _rewind_outbox_rows ORDER BY slot",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| {
                let slot = r.get::<_, i64>(0)? as u64;
                let headers: String = r.get(5)?;
                Ok(OutboxRow {
                    seq: slot / OUTBOX_SLOTS,
                    n: (slot % OUTBOX_SLOTS) as u32,
                    id: r.get(1)?,
                    output: Output {
                        stream: r.get(2)?,
                        key: r.get(3)?,
                        payload: r.get(4)?,
                        headers: headers_from_json(&headers).unwrap_or_default(),
                    },
                    timestamp_ms: r.get(6)?,
                })
            })
            .map_err(|e| self.err(e))?;
        for row in rows {
            self.queue_outbox(&row.map_err(|e| self.err(e))?)?;
        }
        drop(stmt);
        self.write_outbox_page()?;
        self.conn
            .execute_batch("DROP TABLE _rewind_outbox_rows;")
            .map_err(|e| self.err(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Header;

    fn row(seq: u64, n: u32, payload: Option<&[u8]>) -> OutboxRow {
        OutboxRow {
            seq,
            n,
            id: format!("in/0@{seq}/{n}"),
            output: Output {
                stream: "out".into(),
                key: n.is_multiple_of(2).then(|| vec![0xff, n as u8]),
                payload: payload.map(<[u8]>::to_vec),
                headers: vec![
                    Header {
                        name: "h".into(),
                        value: None,
                    },
                    Header {
                        name: "bin".into(),
                        value: Some(vec![0, 0x80]),
                    },
                ],
            },
            timestamp_ms: (!seq.is_multiple_of(3)).then_some(seq as i64 * 1000),
        }
    }

    #[test]
    fn pages_round_trip_and_skip_what_was_sent() {
        let rows: Vec<_> = (0..5)
            .flat_map(|seq| (0..3).map(move |n| (seq, n)))
            .map(|(seq, n)| row(seq, n, (seq != 2).then_some(b"{\"a\":1}".as_slice())))
            .collect();
        let mut page = OpenPage::default();
        for r in &rows {
            page.push(r);
        }
        assert_eq!(page.outputs, 15);
        assert_eq!(page.first_slot, outbox_slot(0, 0));
        assert_eq!(page.last_slot, outbox_slot(4, 2));
        let mut decoded = Vec::new();
        decode(&page.page.buf, -1, &mut decoded).unwrap();
        assert_eq!(decoded, rows);
        let mut rest = Vec::new();
        decode(&page.page.buf, outbox_slot(3, 1), &mut rest).unwrap();
        assert_eq!(rest, rows[11..]);
    }

    #[test]
    fn a_damaged_page_is_an_error() {
        let mut page = OpenPage::default();
        page.push(&row(1, 0, Some(b"payload")));
        let buf = &page.page.buf;
        for cut in [1, 9, buf.len() - 1] {
            assert!(
                decode(&buf[..cut], -1, &mut Vec::new()).is_err(),
                "cut at {cut}"
            );
        }
    }
}
