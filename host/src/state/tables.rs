//! The host tables: dead letters, the outbox, sink marks, and summaries.

use rusqlite::{OptionalExtension, params};
use serde_json::json;

use super::{StateDb, StateError};
use crate::event::{Header, Output, Position};

pub(super) const HOST_SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS _rewind_meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS _rewind_offsets (
    stream TEXT NOT NULL,
    partition INTEGER NOT NULL,
    next_offset INTEGER NOT NULL,
    PRIMARY KEY (stream, partition)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS _rewind_dlq (
    seq INTEGER PRIMARY KEY,
    stream TEXT NOT NULL,
    partition INTEGER NOT NULL,
    "offset" INTEGER NOT NULL,
    module_digest TEXT NOT NULL,
    error_class TEXT NOT NULL,
    message TEXT NOT NULL,
    key BLOB,
    payload BLOB,
    headers TEXT NOT NULL,
    timestamp_ms INTEGER,
    raw BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS _rewind_dedup (
    id BLOB PRIMARY KEY,
    seq INTEGER NOT NULL
) WITHOUT ROWID;
"#;

/// An event that could not be processed, with everything needed to redrive it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub seq: u64,
    pub position: Position,
    pub module_digest: String,
    /// `malformed`, `invalid-input`, `failed`, `trap`, `panic`,
    /// `fuel-exhausted`, `memory-limit`, `stack-overflow`, `sql-budget`.
    pub error_class: String,
    pub message: String,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<Header>,
    pub timestamp_ms: Option<i64>,
    /// The record exactly as the source delivered it.
    pub raw: Vec<u8>,
}

/// An output waiting in the outbox for the sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRow {
    pub seq: u64,
    pub n: u32,
    /// Deterministic idempotency id: the input's position and the output's index.
    pub id: String,
    pub output: Output,
    pub timestamp_ms: Option<i64>,
}

/// How far a file sink got: committed with the outbox rows it delivered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SinkMark {
    /// Outputs written so far.
    pub outputs: u64,
    /// Bytes written so far.
    pub bytes: u64,
    /// SHA-256 of the last line written, to recognise the file on restart.
    pub last_line_sha256: String,
}

/// Row count of one processor table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableCount {
    pub name: String,
    pub rows: u64,
}

/// What `rewind inspect` shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub module_digest: Option<String>,
    pub consumed: u64,
    pub tables: Vec<TableCount>,
    pub offsets: Vec<(String, i32, i64)>,
    pub dead_letters: u64,
    pub outbox_pending: u64,
    /// Event ids remembered for deduplication.
    pub event_ids: u64,
    pub outputs_delivered: u64,
}

/// Headers as stored: a JSON array of `[name, value]`, a value being a
/// string when it is UTF-8, `{"hex": …}` when not, or null.
pub fn headers_to_json(headers: &[Header]) -> String {
    if headers.is_empty() {
        return "[]".to_owned();
    }
    let items: Vec<_> = headers
        .iter()
        .map(|h| {
            let value = match &h.value {
                None => serde_json::Value::Null,
                Some(v) => match std::str::from_utf8(v) {
                    Ok(s) => json!(s),
                    Err(_) => json!({ "hex": hex::encode(v) }),
                },
            };
            json!([h.name, value])
        })
        .collect();
    serde_json::Value::Array(items).to_string()
}

pub fn headers_from_json(text: &str) -> Option<Vec<Header>> {
    let items: Vec<(String, serde_json::Value)> = serde_json::from_str(text).ok()?;
    items
        .into_iter()
        .map(|(name, value)| {
            let value = match value {
                serde_json::Value::Null => None,
                serde_json::Value::String(s) => Some(s.into_bytes()),
                serde_json::Value::Object(o) => Some(hex::decode(o.get("hex")?.as_str()?).ok()?),
                _ => return None,
            };
            Some(Header { name, value })
        })
        .collect()
}

impl StateDb {
    pub fn insert_dead_letter(&self, dl: &DeadLetter) -> Result<(), StateError> {
        self.conn
            .prepare_cached(host_sql!(
                r#"INSERT INTO _rewind_dlq (seq, stream, partition, "offset", module_digest,
                    error_class, message, key, payload, headers, timestamp_ms, raw)
                   VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"#
            ))
            .and_then(|mut s| {
                s.execute(params![
                    dl.seq as i64,
                    dl.position.stream,
                    dl.position.partition,
                    dl.position.offset,
                    dl.module_digest,
                    dl.error_class,
                    dl.message,
                    dl.key,
                    dl.payload,
                    headers_to_json(&dl.headers),
                    dl.timestamp_ms,
                    dl.raw,
                ])
            })
            .map(drop)
            .map_err(|e| self.err(e))
    }

    /// Hands every dead letter, in consumption order, to `f`, one at a time:
    /// a dead-letter table (a flood of malformed input) can hold far more
    /// than memory.
    pub fn each_dead_letter<E: From<StateError>>(
        &self,
        mut f: impl FnMut(DeadLetter) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut stmt = self
            .conn
            .prepare(
                r#"SELECT seq, stream, partition, "offset", module_digest, error_class, message,
                          key, payload, headers, timestamp_ms, raw
                   FROM _rewind_dlq ORDER BY seq"#,
            )
            .map_err(|e| self.err(e))?;
        let mut rows = stmt.query([]).map_err(|e| self.err(e))?;
        while let Some(r) = rows.next().map_err(|e| self.err(e))? {
            f(dead_letter(r).map_err(|e| self.err(e))?)?;
        }
        Ok(())
    }

    /// How many dead letters there are, the longest position
    /// (`stream/partition@offset`) and the longest error class, in
    /// characters: for a table of them, without reading them all first.
    pub fn dead_letter_widths(&self) -> Result<(u64, usize, usize), StateError> {
        self.conn
            .query_row(
                r#"SELECT count(*),
                          coalesce(max(length(stream) + length(partition) + length("offset") + 2), 0),
                          coalesce(max(length(error_class)), 0)
                   FROM _rewind_dlq"#,
                [],
                |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as usize, r.get::<_, i64>(2)? as usize)),
            )
            .map_err(|e| self.err(e))
    }

    /// How far the tape this state records onto goes, if it records one.
    pub fn tape_mark(&self) -> Result<Option<crate::tape::TapeMark>, StateError> {
        Ok(match self.meta("tape.id")? {
            Some(id) => Some(crate::tape::TapeMark {
                id,
                bytes: self.meta_u64("tape.bytes")?,
            }),
            None => None,
        })
    }

    /// Records how far the tape goes (inside the current transaction).
    pub fn set_tape_mark(&self, mark: &crate::tape::TapeMark) -> Result<(), StateError> {
        self.set_meta("tape.id", &mark.id)?;
        self.set_meta("tape.bytes", &mark.bytes.to_string())
    }

    /// The file sink's progress.
    pub fn sink_mark(&self) -> Result<SinkMark, StateError> {
        Ok(SinkMark {
            outputs: self.meta_u64("sink.outputs")?,
            bytes: self.meta_u64("sink.bytes")?,
            last_line_sha256: self.meta("sink.last_line_sha256")?.unwrap_or_default(),
        })
    }

    /// Module digest, table counts, offsets and host-table counts.
    pub fn summary(&self) -> Result<Summary, StateError> {
        let count = |sql: &str| -> Result<u64, StateError> {
            self.conn
                .query_row(sql, [], |r| r.get::<_, i64>(0))
                .map(|n| n as u64)
                .map_err(|e| self.err(e))
        };
        let names: Vec<String> = self
            .conn
            .prepare(
                "SELECT name FROM sqlite_schema WHERE type = 'table'
                 AND name NOT LIKE '\\_rewind\\_%' ESCAPE '\\' AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\'
                 ORDER BY name",
            )
            .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
            .map_err(|e| self.err(e))?;
        let mut tables = Vec::new();
        for name in names {
            let rows = count(&format!(
                "SELECT count(*) FROM \"{}\"",
                name.replace('"', "\"\"")
            ))?;
            tables.push(TableCount { name, rows });
        }
        let offsets = self
            .conn
            .prepare("SELECT stream, partition, next_offset FROM _rewind_offsets ORDER BY 1, 2")
            .and_then(|mut s| {
                s.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                    .collect()
            })
            .map_err(|e| self.err(e))?;
        Ok(Summary {
            module_digest: self.meta("module_digest")?,
            consumed: self.meta_u64("next_seq")?,
            tables,
            offsets,
            dead_letters: count("SELECT count(*) FROM _rewind_dlq")?,
            outbox_pending: self.outbox_pending()?,
            event_ids: count("SELECT count(*) FROM _rewind_dedup")?,
            outputs_delivered: self.meta_u64("sink.outputs")?,
        })
    }

    /// Whether an event with this id was consumed before.
    pub fn seen_event_id(&self, id: &[u8]) -> Result<bool, StateError> {
        self.host_statements
            .with(
                &self.conn,
                host_sql!("SELECT 1 FROM _rewind_dedup WHERE id = ?1"),
                false,
                |s| s.query_row([id], |_| Ok(())).optional(),
            )
            .map(|r| r.is_some())
            .map_err(|e| self.err(e))
    }

    /// Remembers an event id (inside the batch transaction).
    pub fn record_event_id(&self, id: &[u8], seq: u64) -> Result<(), StateError> {
        self.host_statements
            .with(
                &self.conn,
                host_sql!("INSERT INTO _rewind_dedup (id, seq) VALUES (?1, ?2)"),
                false,
                |s| s.execute(params![id, seq as i64]),
            )
            .map(drop)
            .map_err(|e| self.err(e))
    }
}

/// A row of `_rewind_dlq`, its columns in `each_dead_letter`'s order.
fn dead_letter(r: &rusqlite::Row<'_>) -> rusqlite::Result<DeadLetter> {
    let headers: String = r.get(9)?;
    Ok(DeadLetter {
        seq: r.get::<_, i64>(0)? as u64,
        position: Position {
            stream: r.get(1)?,
            partition: r.get(2)?,
            offset: r.get(3)?,
        },
        module_digest: r.get(4)?,
        error_class: r.get(5)?,
        message: r.get(6)?,
        key: r.get(7)?,
        payload: r.get(8)?,
        headers: headers_from_json(&headers).unwrap_or_default(),
        timestamp_ms: r.get(10)?,
        raw: r.get(11)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_through_json() {
        let headers = vec![
            Header {
                name: "a".into(),
                value: Some(b"text".to_vec()),
            },
            Header {
                name: "b".into(),
                value: None,
            },
            Header {
                name: "c".into(),
                value: Some(vec![0xff, 0x00, 0x80]),
            },
        ];
        assert_eq!(headers_from_json(&headers_to_json(&headers)), Some(headers));
    }
}
