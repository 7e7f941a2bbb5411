//! Sinks that relay the outbox after commit. For now: a JSONL file in kcat's
//! `-J` envelope form.
//!
//! The file sink is exactly-once across crashes: after writing and syncing a
//! batch of outputs it records the file's length (and a hash of its last
//! line) in the state DB, in the same transaction that removes the delivered
//! rows from the outbox. On restart, bytes past the recorded length were
//! written for outputs whose removal never committed, so they are cut off and
//! written again from the outbox.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::envelope::encode_line;
use crate::event::{Header, Position};
use crate::state::{OutboxRow, SinkMark};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SinkError {
    #[error("output {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("kafka ({brokers}): {message}")]
    Kafka { brokers: String, message: String },
    #[error(
        "output {path} is not the file this state DB wrote ({reason}); \
         pass the --output it was run with, or start a new --state"
    )]
    Foreign { path: PathBuf, reason: String },
    #[error(
        "output {path} is not a regular file: delivering exactly once needs a file that \
         can be synced and cut back after a crash; write to a file (and read it with \
         `tail -f`), or leave out --output to keep outputs in the state DB's outbox"
    )]
    NotAFile { path: PathBuf },
}

/// An outbox row's place: its input's seq and its index among the outputs.
pub type Slot = (u64, u32);

/// Where a run relays its outbox after each commit. Rows leave the outbox
/// only once the sink says they are durable, so delivery may lag behind
/// (a Kafka producer's acknowledgements arrive while the run goes on).
pub trait Sink: Send {
    /// Starts delivering `rows`, which follow every row sent before.
    fn send(&mut self, rows: &[OutboxRow]) -> Result<(), SinkError>;
    /// The last row up to which everything sent is durable (written and
    /// synced, or acknowledged), with the mark to commit with their removal
    /// from the outbox; `None` if nothing new. `wait`: until everything
    /// sent is.
    fn durable(&mut self, wait: bool) -> Result<Option<(Slot, Option<SinkMark>)>, SinkError>;
}

impl Sink for FileSink {
    fn send(&mut self, rows: &[OutboxRow]) -> Result<(), SinkError> {
        self.mark = FileSink::write(self, rows)?;
        self.written = rows.last().map(|r| (r.seq, r.n)).or(self.written);
        Ok(())
    }
    fn durable(&mut self, _wait: bool) -> Result<Option<(Slot, Option<SinkMark>)>, SinkError> {
        Ok(self
            .written
            .take()
            .map(|slot| (slot, Some(self.mark.clone()))))
    }
}

/// The header carrying an output's deterministic idempotency id.
pub const ID_HEADER: &str = "rewind-id";

/// Appends outputs to a JSONL file.
pub struct FileSink {
    path: PathBuf,
    file: File,
    mark: SinkMark,
    /// The last row written since [`Sink::durable`] last said so.
    written: Option<Slot>,
}

impl std::fmt::Debug for FileSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileSink")
            .field("path", &self.path)
            .field("mark", &self.mark)
            .finish()
    }
}

fn last_line_hash(file: &mut File, end: u64) -> std::io::Result<String> {
    // Lines are short; read a window before `end` and find the previous newline.
    let mut start = end.saturating_sub(1 << 16);
    loop {
        let mut window = vec![0; (end - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut window)?;
        let body = window.strip_suffix(b"\n").unwrap_or(&window);
        if let Some(nl) = body.iter().rposition(|&b| b == b'\n') {
            return Ok(hex::encode(Sha256::digest(&window[nl + 1..])));
        }
        if start == 0 {
            return Ok(hex::encode(Sha256::digest(&window)));
        }
        start = start.saturating_sub(1 << 20);
    }
}

impl FileSink {
    /// Opens the output for a state DB whose sink progress is `mark`.
    /// `claimed` says this state DB has delivered to an output file before:
    /// unless it has, an existing non-empty file belongs to someone else.
    pub fn open(path: &Path, mark: &SinkMark, claimed: bool) -> Result<FileSink, SinkError> {
        let io = |source| SinkError::Io {
            path: path.to_owned(),
            source,
        };
        let foreign = |reason: String| SinkError::Foreign {
            path: path.to_owned(),
            reason,
        };
        let exists = match std::fs::metadata(path) {
            Ok(meta) if !meta.is_file() => {
                return Err(SinkError::NotAFile {
                    path: path.to_owned(),
                });
            }
            Ok(_) => true,
            Err(_) => false,
        };
        if !exists && mark.bytes > 0 {
            return Err(foreign(format!(
                "it is missing, but {} bytes were written to it",
                mark.bytes
            )));
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        if len < mark.bytes {
            return Err(foreign(format!(
                "it has {len} bytes, but {} were written to it",
                mark.bytes
            )));
        }
        if mark.bytes == 0 && len > 0 && !claimed {
            return Err(foreign(format!(
                "it already holds {len} bytes and this state DB never wrote to an output"
            )));
        }
        if mark.bytes > 0
            && last_line_hash(&mut file, mark.bytes).map_err(io)? != mark.last_line_sha256
        {
            return Err(foreign("its last delivered line differs".to_owned()));
        }
        if len > mark.bytes {
            // Written after the last commit: those outputs are still in the outbox.
            file.set_len(mark.bytes).map_err(io)?;
        }
        file.seek(SeekFrom::Start(mark.bytes)).map_err(io)?;
        Ok(FileSink {
            path: path.to_owned(),
            file,
            mark: mark.clone(),
            written: None,
        })
    }

    /// Writes and syncs `rows`; returns the mark to commit with their removal.
    pub fn write(&mut self, rows: &[OutboxRow]) -> Result<SinkMark, SinkError> {
        let io = |source| SinkError::Io {
            path: self.path.clone(),
            source,
        };
        let mut buf = Vec::new();
        let mut mark = self.mark.clone();
        let mut last = Vec::new();
        for row in rows {
            let mut headers = Vec::with_capacity(row.output.headers.len() + 1);
            headers.push(Header {
                name: ID_HEADER.into(),
                value: Some(row.id.clone().into_bytes()),
            });
            headers.extend(row.output.headers.iter().cloned());
            let position = Position {
                stream: row.output.stream.clone(),
                partition: 0,
                offset: mark.outputs as i64,
            };
            last = encode_line(
                &position,
                row.timestamp_ms,
                &headers,
                row.output.key.as_deref(),
                row.output.payload.as_deref(),
            );
            buf.extend_from_slice(&last);
            mark.outputs += 1;
        }
        self.file.write_all(&buf).map_err(io)?;
        self.file.sync_data().map_err(io)?;
        mark.bytes += buf.len() as u64;
        if !last.is_empty() {
            mark.last_line_sha256 = hex::encode(Sha256::digest(&last));
        }
        self.mark = mark.clone();
        Ok(mark)
    }
}
