//! Sinks that relay the outbox after commit. For now: a JSONL file in kcat's
//! `-J` envelope form.
//!
//! The file sink is exactly-once across crashes: after writing and syncing a
//! batch of outputs it records the file's length (and a hash of its last
//! line) in the state DB, in the same transaction that removes the delivered
//! rows from the outbox. On restart, bytes past the recorded length were
//! written for outputs whose removal never committed, so they are cut off and
//! written again from the outbox.
//!
//! Encoding, writing and syncing happen on a thread of the sink's own
//! (`rewind-output`), so the run goes on with the next batch meanwhile; the
//! rows become durable, like a Kafka producer's, when that thread says so.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError};
use std::thread::JoinHandle;

use sha2::{Digest, Sha256};

use crate::envelope::{Line, append_line};
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
    #[error(
        "could not write outputs to {path} ({source}); make room and rerun: outputs not \
         written yet stay in the state DB's outbox and are written then"
    )]
    Write {
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
    fn send(&mut self, rows: Vec<OutboxRow>) -> Result<(), SinkError>;
    /// The last row up to which everything sent is durable (written and
    /// synced, or acknowledged), with the mark to commit with their removal
    /// from the outbox; `None` if nothing new. `wait`: until everything
    /// sent is.
    fn durable(&mut self, wait: bool) -> Result<Option<(Slot, Option<SinkMark>)>, SinkError>;
}

impl Sink for FileSink {
    fn send(&mut self, rows: Vec<OutboxRow>) -> Result<(), SinkError> {
        if rows.is_empty() {
            return Ok(());
        }
        let sent = self.rows.as_ref().is_some_and(|to| to.send(rows).is_ok());
        if !sent {
            return Err(self.writer_failure());
        }
        self.in_flight += 1;
        Ok(())
    }

    fn durable(&mut self, wait: bool) -> Result<Option<(Slot, Option<SinkMark>)>, SinkError> {
        let mut latest = None;
        while self.in_flight > 0 {
            let report = if wait {
                self.written.recv().ok()
            } else {
                match self.written.try_recv() {
                    Ok(report) => Some(report),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => None,
                }
            };
            let Some(report) = report else {
                return Err(self.writer_failure());
            };
            self.in_flight -= 1;
            latest = Some(report?);
        }
        Ok(latest.map(|(slot, mark)| (slot, Some(mark))))
    }
}

/// The header carrying an output's deterministic idempotency id.
pub const ID_HEADER: &str = "rewind-id";

/// Batches of rows the output thread may hold before `send` waits for it.
const QUEUED_BATCHES: usize = 2;

/// Appends outputs to a JSONL file, on a thread of its own.
pub struct FileSink {
    path: PathBuf,
    /// Rows for the output thread (`None` once it is told to finish).
    rows: Option<SyncSender<Vec<OutboxRow>>>,
    /// Per batch sent, in order: its last row and the mark that makes it
    /// durable, or why it could not be written.
    written: Receiver<Result<(Slot, SinkMark), SinkError>>,
    /// Batches sent and not yet reported on.
    in_flight: usize,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for FileSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileSink")
            .field("path", &self.path)
            .field("in_flight", &self.in_flight)
            .finish()
    }
}

impl Drop for FileSink {
    fn drop(&mut self) {
        // Whatever was sent is written before the sink is gone.
        drop(self.rows.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
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
        let mut writer = Writer {
            path: path.to_owned(),
            file,
            mark: mark.clone(),
            buf: Vec::new(),
        };
        let (to_writer, rows) = std::sync::mpsc::sync_channel::<Vec<OutboxRow>>(QUEUED_BATCHES);
        let (report, written) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("rewind-output".to_owned())
            .spawn(move || {
                for batch in rows {
                    let Some(last) = batch.last().map(|r| (r.seq, r.n)) else {
                        continue;
                    };
                    let result = writer.write(&batch).map(|mark| (last, mark));
                    let failed = result.is_err();
                    if report.send(result).is_err() || failed {
                        break;
                    }
                }
            })
            .map_err(io)?;
        Ok(FileSink {
            path: path.to_owned(),
            rows: Some(to_writer),
            written,
            in_flight: 0,
            thread: Some(thread),
        })
    }

    /// Why the output thread stopped: the error it reported, if any is
    /// left to read.
    fn writer_failure(&mut self) -> SinkError {
        while let Ok(report) = self.written.recv() {
            if let Err(error) = report {
                return error;
            }
        }
        SinkError::Io {
            path: self.path.clone(),
            source: std::io::Error::other("the thread writing the outputs stopped"),
        }
    }
}

/// The output thread's side: the file and how far it got.
struct Writer {
    path: PathBuf,
    file: File,
    mark: SinkMark,
    /// The lines of a batch, encoded; kept for the next one.
    buf: Vec<u8>,
}

impl Writer {
    /// Writes and syncs `rows`; returns the mark to commit with their removal.
    fn write(&mut self, rows: &[OutboxRow]) -> Result<SinkMark, SinkError> {
        let io = |source| SinkError::Write {
            path: self.path.clone(),
            source,
        };
        let buf = &mut self.buf;
        buf.clear();
        let mut mark = self.mark.clone();
        let mut last_line = 0..0;
        for row in rows {
            let start = buf.len();
            let id = (ID_HEADER, Some(row.id.as_bytes()));
            let headers = row
                .output
                .headers
                .iter()
                .map(|h| (h.name.as_str(), h.value.as_deref()));
            append_line(
                buf,
                Line {
                    stream: &row.output.stream,
                    partition: 0,
                    offset: mark.outputs as i64,
                    timestamp_ms: row.timestamp_ms,
                    headers: std::iter::once(id).chain(headers),
                    key: row.output.key.as_deref(),
                    payload: row.output.payload.as_deref(),
                },
            );
            last_line = start..buf.len();
            mark.outputs += 1;
        }
        self.file.write_all(buf).map_err(io)?;
        self.file.sync_data().map_err(io)?;
        mark.bytes += buf.len() as u64;
        if !last_line.is_empty() {
            mark.last_line_sha256 = hex::encode(Sha256::digest(&buf[last_line]));
        }
        self.mark = mark.clone();
        Ok(mark)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Header, Output};

    fn row(seq: u64, n: u32, payload: &str) -> OutboxRow {
        OutboxRow {
            seq,
            n,
            id: format!("in/0@{seq}/{n}"),
            output: Output {
                stream: "payments".to_owned(),
                key: Some(b"k\"ey".to_vec()),
                payload: Some(payload.as_bytes().to_vec()),
                headers: vec![Header {
                    name: "h".to_owned(),
                    value: None,
                }],
            },
            timestamp_ms: Some(seq as i64),
        }
    }

    fn batch(seqs: std::ops::Range<u64>) -> Vec<OutboxRow> {
        seqs.map(|seq| row(seq, 0, &format!("{{\"n\":{seq}}}")))
            .collect()
    }

    #[test]
    fn batches_become_durable_in_order_with_a_mark_that_matches_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        let mut sink = FileSink::open(&path, &SinkMark::default(), false).unwrap();
        sink.send(batch(1..4)).unwrap();
        sink.send(Vec::new()).unwrap();
        sink.send(batch(4..6)).unwrap();
        let (slot, mark) = sink.durable(true).unwrap().unwrap();
        let mark = mark.unwrap();
        assert_eq!(slot, (5, 0));
        assert_eq!(sink.durable(true).unwrap(), None, "nothing new");

        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5);
        assert_eq!(mark.outputs, 5);
        assert_eq!(mark.bytes, text.len() as u64);
        let last = format!("{}\n", lines[4]);
        assert_eq!(mark.last_line_sha256, hex::encode(Sha256::digest(&last)));
        assert_eq!(
            lines[0],
            r#"{"topic":"payments","partition":0,"offset":0,"tstype":"create","ts":1,"broker":-1,"headers":["rewind-id","in/0@1/0","h",null],"key":"k\"ey","payload":"{\"n\":1}"}"#
        );
        assert!(lines[4].contains(r#""offset":4,"#), "{}", lines[4]);
    }

    #[test]
    fn reopening_cuts_off_what_no_commit_recorded_and_goes_on_from_the_mark() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        let mut sink = FileSink::open(&path, &SinkMark::default(), false).unwrap();
        sink.send(batch(1..3)).unwrap();
        let (_, mark) = sink.durable(true).unwrap().unwrap();
        let mark = mark.unwrap();
        // Written, but the commit recording it never happened.
        sink.send(batch(3..9)).unwrap();
        drop(sink);
        let written = std::fs::metadata(&path).unwrap().len();
        assert!(written > mark.bytes);

        let mut sink = FileSink::open(&path, &mark, true).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), mark.bytes);
        sink.send(batch(3..9)).unwrap();
        let (slot, again) = sink.durable(true).unwrap().unwrap();
        assert_eq!(slot, (8, 0));
        assert_eq!(again.unwrap().bytes, written, "the same lines again");

        // A state DB that never wrote here does not get to cut the file.
        let refused = FileSink::open(&path, &SinkMark::default(), false).unwrap_err();
        assert!(matches!(refused, SinkError::Foreign { .. }), "{refused}");
    }
}
