//! Tape tools: import JSONL into a tape, export a tape as kcat `-J` JSONL,
//! and summarise a tape.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use super::{Frame, RunInfo, TapeError, TapeEvent, TapeReader, TapeWriter};
use crate::envelope::encode_line;
use crate::event::Header;
use crate::source::{FileSource, InputError};

/// The header an exported malformed record carries: its reason. Importing
/// it gives back the malformed record, so export → import loses nothing.
pub const MALFORMED_HEADER: &str = "rewind-malformed";

/// Failures of the tape tools.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error(transparent)]
    Input(#[from] InputError),
    #[error(transparent)]
    Tape(#[from] TapeError),
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} already exists; choose a new --out")]
    Exists { path: std::path::PathBuf },
    #[error(
        "{path} is already a tape: use it as it is (as --input or --tape), or \
         `rewind tape export` it to JSONL"
    )]
    AlreadyATape { path: std::path::PathBuf },
}

/// Records every line of a JSONL file (bare lines and kcat `-J` envelopes,
/// malformed lines included) onto a new tape, byte-exact, with seqs from 0.
/// Returns how many records it wrote.
pub fn import(input: &Path, out: &Path, stream: Option<&str>) -> Result<u64, ToolError> {
    if out.exists() {
        return Err(ToolError::Exists {
            path: out.to_owned(),
        });
    }
    if super::is_tape(input) {
        return Err(ToolError::AlreadyATape {
            path: input.to_owned(),
        });
    }
    let mut source = FileSource::open(input, stream).map_err(InputError::from)?;
    let mut tape = TapeWriter::create(out, [0; 16])?;
    let mut seq = 0;
    let result = (|| {
        while let Some(record) = source.next_record().map_err(InputError::from)? {
            tape.record(seq, &record, None);
            seq += 1;
            if seq % 10_000 == 0 {
                tape.flush()?;
            }
        }
        tape.flush()?;
        Ok(seq)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(out);
    }
    result
}

/// Writes a tape's records as kcat `-J` JSONL to `out`, in tape order.
/// Returns how many records it wrote.
pub fn export(tape: &Path, out: &mut dyn Write, out_name: &Path) -> Result<u64, ToolError> {
    let mut reader = TapeReader::open(tape)?;
    let io = |source| ToolError::Io {
        path: out_name.to_owned(),
        source,
    };
    let mut n = 0;
    while let Some(event) = reader.next_event()? {
        out.write_all(&export_line(&event)).map_err(io)?;
        n += 1;
    }
    out.flush().map_err(io)?;
    Ok(n)
}

/// One record as a kcat `-J` line (with its newline).
pub fn export_line(event: &TapeEvent) -> Vec<u8> {
    match &event.malformed {
        None => encode_line(
            &event.position,
            event.timestamp_ms,
            &event.headers,
            event.key.as_deref(),
            event.payload.as_deref(),
        ),
        Some(reason) => encode_line(
            &event.position,
            None,
            &[Header {
                name: MALFORMED_HEADER.into(),
                value: Some(reason.clone().into_bytes()),
            }],
            None,
            event.payload.as_deref(),
        ),
    }
}

/// What a tape holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct TapeInfo {
    pub bytes: u64,
    pub events: u64,
    /// Seqs of the first and last event.
    pub seqs: Option<(u64, u64)>,
    pub malformed: u64,
    /// Events a run recorded results for.
    pub with_results: u64,
    pub partitions: Vec<PartitionInfo>,
    pub runs: Vec<RunSummary>,
}

/// One stream partition on a tape.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PartitionInfo {
    pub stream: String,
    pub partition: i32,
    pub events: u64,
    pub first_offset: i64,
    pub last_offset: i64,
}

/// One run that appended to a tape.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RunSummary {
    pub first_seq: u64,
    pub module_digest: String,
    pub fuel: u64,
    pub memory_bytes: u64,
    pub dedup_header: Option<String>,
    pub events: u64,
}

/// The settings of the tape's first run (module, fuel, memory cap, dedup
/// header): what replaying it as recorded needs. `None` for a tape no run
/// recorded (imported). Reads only the first frame.
pub fn recorded_run(tape: &Path) -> Result<Option<RunInfo>, TapeError> {
    let mut reader = TapeReader::open(tape)?;
    Ok(match reader.next_frame()? {
        Some(Frame::Run(run)) => Some(run),
        _ => None,
    })
}

/// Reads a whole tape (checking every frame) and summarises it.
pub fn info(tape: &Path) -> Result<TapeInfo, ToolError> {
    let mut reader = TapeReader::open(tape)?;
    let mut info = TapeInfo {
        bytes: reader.size(),
        ..TapeInfo::default()
    };
    let mut partitions: BTreeMap<(String, i32), PartitionInfo> = BTreeMap::new();
    while let Some(frame) = reader.next_frame()? {
        match frame {
            Frame::Run(RunInfo {
                first_seq,
                module_digest,
                fuel,
                memory_bytes,
                dedup_header,
            }) => info.runs.push(RunSummary {
                first_seq,
                module_digest,
                fuel,
                memory_bytes,
                dedup_header,
                events: 0,
            }),
            Frame::Event(event) => {
                info.events += 1;
                info.seqs = Some(match info.seqs {
                    None => (event.seq, event.seq),
                    Some((first, _)) => (first, event.seq),
                });
                info.malformed += u64::from(event.malformed.is_some());
                if event.result.is_some() {
                    info.with_results += 1;
                    if let Some(run) = info.runs.last_mut() {
                        run.events += 1;
                    }
                }
                let p = &event.position;
                partitions
                    .entry((p.stream.clone(), p.partition))
                    .and_modify(|i| {
                        i.events += 1;
                        i.first_offset = i.first_offset.min(p.offset);
                        i.last_offset = i.last_offset.max(p.offset);
                    })
                    .or_insert(PartitionInfo {
                        stream: p.stream.clone(),
                        partition: p.partition,
                        events: 1,
                        first_offset: p.offset,
                        last_offset: p.offset,
                    });
            }
        }
    }
    info.partitions = partitions.into_values().collect();
    Ok(info)
}
