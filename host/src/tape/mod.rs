//! Tapes: durable recordings of every consumed input, in consumption order.
//!
//! # Format (version 2)
//!
//! A tape is one append-only file: a 32-byte header, then frames.
//!
//! ```text
//! header = "REWIND TAPE\n" (12 bytes) | version: u32 | tape id: 16 bytes (0 when imported)
//! frame  = body length: u32 | CRC-32 of body: u32 | body
//! body   = kind: u8 | fields of that kind
//! ```
//!
//! Integers are little-endian; `bytes` are a u32 length and the bytes; a
//! `str` is `bytes` holding UTF-8; `opt<T>` is a flag byte (0 absent, 1
//! present) followed by `T` when present.
//!
//! Kind 1, **run**: a `rewind run` began appending here, with these
//! settings (what replaying its events as recorded needs).
//! `first_seq: u64 | module_digest: str | fuel: u64 | memory_bytes: u64 | dedup_header: opt<str>`
//!
//! Version 1 run frames end after `memory_bytes`; their runs deduplicated
//! by the default header, `rewind-id`. This host reads both versions, and
//! appends to a version 1 tape in version 1.
//!
//! Kind 2, **event**: one consumed input record and, when a run recorded
//! it, what the run made of it.
//! ```text
//! seq: u64 | stream: str | partition: i32 | offset: i64 | timestamp_ms: opt<i64>
//! | key: opt<bytes> | payload: opt<bytes> | header count: u32 | (name: str | value: opt<bytes>)*
//! | malformed: opt<str>            the source could not decode the record: why;
//!                                  the payload then holds its raw bytes
//! | result: u8 (0 none, 1 present) [ outcome: u8 (1 applied, 2 duplicate, 3 dead letter)
//!     | class: str | message: str | rows: u32 | outputs: u32
//!     | rows digest: 32 bytes | outputs digest: 32 bytes ]
//! ```
//!
//! A live run writes a batch's frames before it commits the batch, and
//! records the tape's length in the state DB in that commit; on restart it
//! cuts the tape back to that length (frames past it belong to a batch that
//! never committed). A frame whose length or CRC does not check out is
//! corruption and is reported with its byte position.

mod file;
mod tools;

pub use file::{TapeMark, TapeReader, TapeWriter, is_tape};

pub use tools::{
    MALFORMED_HEADER, PartitionInfo, RunSummary as TapeRun, TapeInfo, ToolError, export,
    export_line, import, info, recorded_run,
};

use std::path::PathBuf;

use sha2::{Digest, Sha256};

use crate::codec::{Reader, Writer};
use crate::event::{Event, Header, Position};
use crate::source::Record;

pub(crate) const MAGIC: &[u8; 12] = b"REWIND TAPE\n";
/// The tape format this host writes (it also reads [`OLDEST_TAPE_VERSION`]).
pub const TAPE_VERSION: u32 = 2;
/// The oldest tape format this host reads.
pub const OLDEST_TAPE_VERSION: u32 = 1;
const HEADER_LEN: u64 = 32;
/// No frame is larger: a record's bytes are bounded well below (64 MiB lines).
const MAX_FRAME: u32 = 256 << 20;

const KIND_RUN: u8 = 1;
const KIND_EVENT: u8 = 2;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TapeError {
    #[error("tape {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "tape {path} could not be written ({source}); make room and rerun: \
         a run continues its tape and state from the last committed batch"
    )]
    Storage {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} is not a rewind tape (it does not start with the tape header); \
         `rewind run --tape` records one, `rewind tape import` makes one of a JSONL file"
    )]
    NotATape { path: PathBuf },
    #[error(
        "tape {path} has format version {found}; this rewind reads versions \
         {OLDEST_TAPE_VERSION} to {TAPE_VERSION}: \
         use the rewind that wrote it"
    )]
    UnknownVersion { path: PathBuf, found: u32 },
    #[error(
        "tape {path} is truncated at byte {at}: {reason}; \
         if a run was interrupted, rerunning it repairs the tape"
    )]
    Truncated {
        path: PathBuf,
        at: u64,
        reason: String,
    },
    #[error("tape {path} is corrupt at byte {at}: {reason}")]
    Corrupt {
        path: PathBuf,
        at: u64,
        reason: String,
    },
    #[error("tape {path}: {message}")]
    Mismatch { path: PathBuf, message: String },
}

impl TapeError {
    /// A failed write to the tape at `path`: [`TapeError::Storage`] when
    /// the file could not grow (a full disk, a quota, a file size limit).
    pub(crate) fn writing(path: &std::path::Path, source: std::io::Error) -> TapeError {
        use std::io::ErrorKind as K;
        let path = path.to_owned();
        match source.kind() {
            K::StorageFull | K::QuotaExceeded | K::FileTooLarge => {
                TapeError::Storage { path, source }
            }
            _ => TapeError::Io { path, source },
        }
    }
}

/// A run that appended to a tape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunInfo {
    pub first_seq: u64,
    pub module_digest: String,
    pub fuel: u64,
    pub memory_bytes: u64,
    /// The header whose repeated values the run skipped; `None`: none.
    pub dedup_header: Option<String>,
}

/// What a run made of an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    /// Skipped: its event id was seen before.
    Duplicate,
    DeadLetter {
        class: String,
        message: String,
    },
}

/// An event's result as a run recorded it: compared by `rewind verify`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventResult {
    pub outcome: Outcome,
    /// Rows of processor tables the event inserted, updated or deleted.
    pub rows: u32,
    pub outputs: u32,
    /// sha256 over the row changes, in order (see `state::changes`).
    /// Zero in a replay's results, which compare the changes themselves.
    pub rows_digest: [u8; 32],
    /// sha256 over the outputs, in order (zero in a replay's results).
    pub outputs_digest: [u8; 32],
}

/// An event frame borrowed from what it records: a run writes its records
/// onto the tape without copying them into a [`TapeEvent`] first.
pub(crate) struct EventFrame<'a> {
    seq: u64,
    position: &'a Position,
    timestamp_ms: Option<i64>,
    key: Option<&'a [u8]>,
    payload: Option<&'a [u8]>,
    headers: &'a [Header],
    malformed: Option<&'a str>,
    result: Option<&'a EventResult>,
}

impl<'a> EventFrame<'a> {
    /// The record `seq` as a source delivered it, with its result if any.
    pub(crate) fn of_record(
        seq: u64,
        record: &'a Record,
        result: Option<&'a EventResult>,
    ) -> EventFrame<'a> {
        match &record.decoded {
            Ok(event) => EventFrame {
                seq,
                position: &event.position,
                timestamp_ms: event.timestamp_ms,
                key: event.key.as_deref(),
                payload: event.payload.as_deref(),
                headers: &event.headers,
                malformed: None,
                result,
            },
            Err(reason) => EventFrame {
                seq,
                position: &record.position,
                timestamp_ms: None,
                key: None,
                payload: Some(record.raw()),
                headers: &[],
                malformed: Some(reason),
                result,
            },
        }
    }

    /// The frame's event, owned.
    fn to_event(&self) -> TapeEvent {
        TapeEvent {
            seq: self.seq,
            position: self.position.clone(),
            timestamp_ms: self.timestamp_ms,
            key: self.key.map(<[u8]>::to_vec),
            payload: self.payload.map(<[u8]>::to_vec),
            headers: self.headers.to_vec(),
            malformed: self.malformed.map(str::to_owned),
            result: self.result.cloned(),
        }
    }

    fn encode(&self, w: &mut Writer) {
        w.u8(KIND_EVENT);
        w.u64(self.seq);
        w.str(&self.position.stream);
        w.i32(self.position.partition);
        w.i64(self.position.offset);
        w.opt_i64(self.timestamp_ms);
        w.opt_bytes(self.key);
        w.opt_bytes(self.payload);
        w.headers(self.headers);
        w.opt_str(self.malformed);
        match self.result {
            None => w.u8(0),
            Some(r) => {
                w.u8(1);
                let (tag, class, message) = match &r.outcome {
                    Outcome::Applied => (1, "", ""),
                    Outcome::Duplicate => (2, "", ""),
                    Outcome::DeadLetter { class, message } => (3, &class[..], &message[..]),
                };
                w.u8(tag);
                w.str(class);
                w.str(message);
                w.u32(r.rows);
                w.u32(r.outputs);
                w.buf.extend_from_slice(&r.rows_digest);
                w.buf.extend_from_slice(&r.outputs_digest);
            }
        }
    }
}

/// One consumed input record on a tape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TapeEvent {
    pub seq: u64,
    pub position: Position,
    pub timestamp_ms: Option<i64>,
    pub key: Option<Vec<u8>>,
    /// `None` is a tombstone; for a malformed record, its raw bytes.
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<Header>,
    /// Why the source could not decode the record, if it could not.
    pub malformed: Option<String>,
    pub result: Option<EventResult>,
}

impl TapeEvent {
    /// The record `seq` as a source delivered it.
    pub fn from_record(seq: u64, record: &Record) -> TapeEvent {
        EventFrame::of_record(seq, record, None).to_event()
    }

    /// The record, as a source delivers it to a run. The raw bytes of a
    /// well-formed record are its payload (its key, headers and timestamp
    /// travel beside it, as from Kafka).
    pub fn into_record(self) -> Record {
        match self.malformed {
            Some(reason) => {
                Record::malformed(self.position, self.payload.unwrap_or_default(), reason)
            }
            None => Record::decoded(
                Event {
                    position: self.position,
                    key: self.key,
                    payload: self.payload,
                    headers: self.headers,
                    timestamp_ms: self.timestamp_ms,
                },
                None,
            ),
        }
    }

    /// The event as a frame, borrowed.
    fn frame(&self) -> EventFrame<'_> {
        EventFrame {
            seq: self.seq,
            position: &self.position,
            timestamp_ms: self.timestamp_ms,
            key: self.key.as_deref(),
            payload: self.payload.as_deref(),
            headers: &self.headers,
            malformed: self.malformed.as_deref(),
            result: self.result.as_ref(),
        }
    }

    fn encode(&self, w: &mut Writer) {
        self.frame().encode(w);
    }

    fn decode(r: &mut Reader<'_>) -> Result<TapeEvent, String> {
        let seq = r.u64("seq")?;
        let position = Position {
            stream: r.str("stream")?,
            partition: r.i32("partition")?,
            offset: r.i64("offset")?,
        };
        let timestamp_ms = r.opt_i64("timestamp")?;
        let key = r.opt_bytes("key")?;
        let payload = r.opt_bytes("payload")?;
        let headers = r.headers()?;
        let malformed = r.opt_str("malformed reason")?;
        let result = match r.u8("result flag")? {
            0 => None,
            1 => {
                let tag = r.u8("outcome")?;
                let class = r.str("outcome class")?;
                let message = r.str("outcome message")?;
                let outcome = match tag {
                    1 => Outcome::Applied,
                    2 => Outcome::Duplicate,
                    3 => Outcome::DeadLetter { class, message },
                    other => return Err(format!("unknown outcome {other}")),
                };
                Some(EventResult {
                    outcome,
                    rows: r.u32("rows")?,
                    outputs: r.u32("outputs")?,
                    rows_digest: r.digest("rows digest")?,
                    outputs_digest: r.digest("outputs digest")?,
                })
            }
            other => return Err(format!("result flag is {other}, not 0 or 1")),
        };
        Ok(TapeEvent {
            seq,
            position,
            timestamp_ms,
            key,
            payload,
            headers,
            malformed,
            result,
        })
    }
}

/// One frame of a tape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Run(RunInfo),
    Event(Box<TapeEvent>),
}

impl RunInfo {
    /// Whether `other` ran with the same settings (those that change what a
    /// run makes of events, the module aside).
    pub fn same_settings(&self, other: &RunInfo) -> bool {
        (self.fuel, self.memory_bytes, &self.dedup_header)
            == (other.fuel, other.memory_bytes, &other.dedup_header)
    }

    /// Those settings, as the `rewind run` flags that give them.
    pub fn settings(&self) -> String {
        settings_flags(self.fuel, self.memory_bytes, self.dedup_header.as_deref())
    }

    /// Encodes the frame as tape format `version` has it.
    fn encode(&self, w: &mut Writer, version: u32) {
        w.u8(KIND_RUN);
        w.u64(self.first_seq);
        w.str(&self.module_digest);
        w.u64(self.fuel);
        w.u64(self.memory_bytes);
        if version >= 2 {
            w.opt_str(self.dedup_header.as_deref());
        }
    }

    fn decode(r: &mut Reader<'_>, version: u32) -> Result<RunInfo, String> {
        Ok(RunInfo {
            first_seq: r.u64("first seq")?,
            module_digest: r.str("module digest")?,
            fuel: r.u64("fuel")?,
            memory_bytes: r.u64("memory cap")?,
            dedup_header: if version >= 2 {
                r.opt_str("dedup header")?
            } else {
                Some(crate::sink::ID_HEADER.to_owned())
            },
        })
    }
}

/// A run's settings as the `rewind run` flags that give them.
pub fn settings_flags(fuel: u64, memory_bytes: u64, dedup_header: Option<&str>) -> String {
    let dedup = match dedup_header {
        Some(header) => format!("--dedup-header {header}"),
        None => "--no-dedup".to_owned(),
    };
    format!("--fuel {fuel} --memory-mb {} {dedup}", memory_bytes >> 20)
}

/// sha256 over a list of outputs, in order: the outputs part of an
/// [`EventResult`].
pub fn outputs_digest(outputs: &[crate::event::Output]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"rewind-outputs-v1\0");
    let mut w = Writer::default();
    for o in outputs {
        w.buf.clear();
        w.str(&o.stream);
        w.opt_bytes(o.key.as_deref());
        w.opt_bytes(o.payload.as_deref());
        w.headers(&o.headers);
        h.update(&w.buf);
    }
    h.finalize().into()
}
