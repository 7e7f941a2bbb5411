//! Sources of input records. For now: JSONL files (bare payloads or kcat
//! `-J` envelopes, detected per line).

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

mod prefetch;

pub use prefetch::Prefetch;

use crate::envelope::decode_line;
use crate::event::{Entropy, Event, Position};
use crate::tape::MALFORMED_HEADER;

/// One consumed input record: its position, its bytes exactly as read, and
/// the decoded event or why it could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub position: Position,
    /// The bytes as read, unless they are the decoded event's payload (a
    /// bare line, a tape's or Kafka's record): not kept twice then.
    raw: Option<Vec<u8>>,
    pub decoded: Result<Event, String>,
    /// The recorded run gave the processor a fresh instance right before
    /// this record (a tape's run frame): a replay must do the same.
    pub fresh: bool,
    /// The event's randomness, when a reading thread prepared it ahead
    /// (see [`Record::prepare`]); otherwise it is worked out when needed.
    pub entropy: Option<Entropy>,
}

impl Record {
    /// A record decoded as `event`, read as `raw` (`None`: as its payload).
    pub fn decoded(event: Event, raw: Option<Vec<u8>>) -> Record {
        Record {
            position: event.position.clone(),
            raw,
            decoded: Ok(event),
            fresh: false,
            entropy: None,
        }
    }

    /// A record at `position`, read as `raw`, that could not be decoded.
    pub fn malformed(position: Position, raw: Vec<u8>, reason: String) -> Record {
        Record {
            position,
            raw: Some(raw),
            decoded: Err(reason),
            fresh: false,
            entropy: None,
        }
    }

    /// The record's bytes exactly as read.
    pub fn raw(&self) -> &[u8] {
        match (&self.raw, &self.decoded) {
            (Some(raw), _) => raw,
            (None, Ok(event)) => event.payload.as_deref().unwrap_or_default(),
            (None, Err(_)) => &[],
        }
    }

    /// Does ahead of time, on the calling thread, the work on this record
    /// that depends on it alone.
    pub fn prepare(&mut self) {
        if self.decoded.is_ok() && self.entropy.is_none() {
            self.entropy = Some(Entropy::of(&self.position));
        }
    }

    /// The event's randomness: as prepared, else worked out now.
    pub fn entropy(&self) -> std::borrow::Cow<'_, Entropy> {
        match &self.entropy {
            Some(entropy) => std::borrow::Cow::Borrowed(entropy),
            None => std::borrow::Cow::Owned(Entropy::of(&self.position)),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("input {path}: {source}")]
pub struct SourceError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// Reads a JSONL file line by line, as bytes.
///
/// Bare lines get the file's name as their stream (unless overridden),
/// partition 0 and their 1-based line number as offset. Using the whole file
/// name keeps them apart from the topics of kcat envelopes in the same file. Blank
/// lines carry no record and are skipped (they still count as lines).
pub struct FileSource {
    path: PathBuf,
    reader: BufReader<File>,
    stream: String,
    line: i64,
    bytes_read: u64,
    size: Option<u64>,
    buf: Vec<u8>,
    max_line: usize,
}

/// The longest line kept whole: longer lines become dead letters holding
/// their first this many bytes.
pub const MAX_LINE: usize = 64 << 20;

impl std::fmt::Debug for FileSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileSource")
            .field("path", &self.path)
            .field("line", &self.line)
            .finish()
    }
}

impl FileSource {
    pub fn open(path: &Path, stream: Option<&str>) -> Result<FileSource, SourceError> {
        let err = |source| SourceError {
            path: path.to_owned(),
            source,
        };
        let file = File::open(path).map_err(err)?;
        let meta = file.metadata().map_err(err)?;
        if meta.is_dir() {
            return Err(err(std::io::Error::other("is a directory, not a file")));
        }
        let stream = match stream {
            Some(s) => s.to_owned(),
            None => path
                .file_name()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
        };
        let mut reader = BufReader::with_capacity(1 << 20, file);
        // A pipe is not looked into for a tape's header (what is read from
        // it is gone); what it starts with shows without being consumed.
        if !meta.is_file()
            && reader
                .fill_buf()
                .map_err(err)?
                .starts_with(crate::tape::MAGIC)
        {
            return Err(err(std::io::Error::other(
                "a tape arrives through a pipe, but tapes are read from files: pass the tape's path",
            )));
        }
        Ok(FileSource {
            path: path.to_owned(),
            reader,
            stream,
            line: 0,
            bytes_read: 0,
            size: meta.is_file().then_some(meta.len()),
            buf: Vec::new(),
            max_line: MAX_LINE,
        })
    }

    /// The stream name bare lines get.
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// The file's size, when known (for progress).
    pub fn size(&self) -> Option<u64> {
        self.size
    }

    /// Bytes consumed so far.
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read
    }

    /// The next record, `None` at the end of the file.
    pub fn next_record(&mut self) -> Result<Option<Record>, SourceError> {
        let io = |source| SourceError {
            path: self.path.clone(),
            source,
        };
        loop {
            self.buf.clear();
            // A line is read up to a bound, so a file without newlines cannot
            // make the host allocate without limit.
            let n = (&mut self.reader)
                .take(self.max_line as u64 + 1)
                .read_until(b'\n', &mut self.buf)
                .map_err(io)?;
            if n == 0 {
                return Ok(None);
            }
            self.bytes_read += n as u64;
            self.line += 1;
            if self.buf.len() > self.max_line && self.buf.last() != Some(&b'\n') {
                let (mut skipped, mut newline) = (0u64, false);
                loop {
                    let chunk = self.reader.fill_buf().map_err(io)?;
                    if chunk.is_empty() {
                        break;
                    }
                    let (used, done) = match chunk.iter().position(|&b| b == b'\n') {
                        Some(i) => (i + 1, true),
                        None => (chunk.len(), false),
                    };
                    self.reader.consume(used);
                    skipped += used as u64;
                    if done {
                        newline = true;
                        break;
                    }
                }
                self.bytes_read += skipped;
                self.buf.truncate(self.max_line);
                let position = Position {
                    stream: self.stream.clone(),
                    partition: 0,
                    offset: self.line,
                };
                let reason = format!(
                    "{} line {}: longer than {} bytes ({} bytes); the first {} are kept",
                    self.path.display(),
                    self.line,
                    self.max_line,
                    self.max_line as u64 + 1 + skipped - u64::from(newline),
                    self.max_line
                );
                return Ok(Some(Record::malformed(position, self.buf.clone(), reason)));
            }
            let mut line = &self.buf[..];
            line = line.strip_suffix(b"\n").unwrap_or(line);
            line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let position = Position {
                stream: self.stream.clone(),
                partition: 0,
                offset: self.line,
            };
            let decoded = decode_line(line, &position)
                .map_err(|reason| format!("{} line {}: {reason}", self.path.display(), self.line));
            return Ok(Some(match decoded {
                Ok(event) => match exported_malformed(&event) {
                    Some(reason) => {
                        Record::malformed(event.position, event.payload.unwrap_or_default(), reason)
                    }
                    // A bare line is its own payload.
                    None => {
                        let raw = (event.payload.as_deref() != Some(line)).then(|| line.to_vec());
                        Record::decoded(event, raw)
                    }
                },
                Err(reason) => Record::malformed(position, line.to_vec(), reason),
            }));
        }
    }
}

/// The reason of a record `rewind tape export` wrote as malformed: an
/// envelope with the one header [`MALFORMED_HEADER`] and no key. It is read
/// back as the malformed record it was, raw bytes in its payload.
fn exported_malformed(event: &Event) -> Option<String> {
    match &event.headers[..] {
        [header] if header.name == MALFORMED_HEADER && event.key.is_none() => {
            Some(String::from_utf8_lossy(header.value.as_deref().unwrap_or_default()).into_owned())
        }
        _ => None,
    }
}

/// What a source had when asked.
#[derive(Debug)]
#[allow(
    clippy::large_enum_variant,
    reason = "a value handed straight to the caller; boxing would allocate per record"
)]
pub enum Polled {
    Record(Record),
    /// Nothing yet: a live source waited and may have more later.
    Idle,
    /// The input is exhausted (or, for a live source, stopped).
    End,
}

/// How long a source may wait for a record: never past `due` (when the open
/// batch must commit), and never longer than `most` at a time. The clock is
/// read only by a source that has to wait, not once per record.
#[derive(Debug, Clone, Copy)]
pub struct Wait {
    pub due: Option<Instant>,
    pub most: Duration,
}

impl Wait {
    /// How long, from now, the wait may last.
    pub fn remaining(self) -> Duration {
        self.due.map_or(self.most, |due| {
            due.saturating_duration_since(Instant::now()).min(self.most)
        })
    }
}

/// Where a run's records come from.
pub trait Source {
    /// The next record, `None` at the end.
    fn next_record(&mut self) -> Result<Option<Record>, InputError>;
    /// The next record, waiting at most `wait` for one. Finite sources never
    /// idle; live ones (Kafka) do, and the run commits an open batch then.
    fn poll(&mut self, wait: Wait) -> Result<Polled, InputError> {
        let _ = wait;
        Ok(match self.next_record()? {
            Some(record) => Polled::Record(record),
            None => Polled::End,
        })
    }
    /// The input's size in bytes, when known (for progress).
    fn size(&self) -> Option<u64>;
    /// Bytes consumed so far.
    fn bytes_read(&self) -> u64;
}

/// A source failed.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error(transparent)]
    File(#[from] SourceError),
    #[error(transparent)]
    Tape(#[from] crate::tape::TapeError),
    #[error("kafka ({brokers}): {message}")]
    Kafka { brokers: String, message: String },
    /// An error another consumer of a shared read was handed (see
    /// [`Prefetch::start_shared`]), as it reads.
    #[error("{0}")]
    Shared(String),
}

impl Source for FileSource {
    fn next_record(&mut self) -> Result<Option<Record>, InputError> {
        Ok(FileSource::next_record(self)?)
    }
    fn size(&self) -> Option<u64> {
        FileSource::size(self)
    }
    fn bytes_read(&self) -> u64 {
        FileSource::bytes_read(self)
    }
}

/// Reads the records of a tape, in its order.
pub struct TapeSource(crate::tape::TapeReader);

impl TapeSource {
    pub fn open(path: &Path) -> Result<TapeSource, crate::tape::TapeError> {
        crate::tape::TapeReader::open(path).map(TapeSource)
    }
}

impl Source for TapeSource {
    fn next_record(&mut self) -> Result<Option<Record>, InputError> {
        // A run frame marks where the recorded run started a fresh instance
        // (a restart, or a commit while its source was idle).
        let mut fresh = false;
        loop {
            match self.0.next_frame()? {
                None => return Ok(None),
                Some(crate::tape::Frame::Run(_)) => fresh = true,
                Some(crate::tape::Frame::Event(event)) => {
                    let mut record = event.into_record();
                    record.fresh = fresh;
                    return Ok(Some(record));
                }
            }
        }
    }
    fn size(&self) -> Option<u64> {
        Some(self.0.size())
    }
    fn bytes_read(&self) -> u64 {
        self.0.position()
    }
}

/// Opens `path` as a tape if it is one, else as a JSONL file, read ahead
/// on a thread of its own ([`Prefetch`]).
pub fn open(path: &Path, stream: Option<&str>) -> Result<Box<dyn Source>, InputError> {
    let mut one = open_shared(path, stream, 1)?;
    Ok(Box::new(one.pop().expect("one reader asked for")))
}

/// Opens `path` as a tape if it is one, else as a JSONL file, read on the
/// calling thread, its records not prepared ([`Record::prepare`]): for
/// looking a record up rather than running it.
pub fn open_here(path: &Path, stream: Option<&str>) -> Result<Box<dyn Source + Send>, InputError> {
    Ok(if crate::tape::is_tape(path) {
        Box::new(TapeSource::open(path)?)
    } else {
        Box::new(FileSource::open(path, stream)?)
    })
}

/// [`open`] once for `readers` consumers, each handed every record
/// ([`Prefetch::start_shared`]).
pub fn open_shared(
    path: &Path,
    stream: Option<&str>,
    readers: usize,
) -> Result<Vec<Prefetch>, InputError> {
    Prefetch::start_shared(open_here(path, stream)?, readers).map_err(|source| {
        InputError::File(SourceError {
            path: path.to_owned(),
            source,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_overlong_line_is_a_dead_letter_and_the_next_line_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in.jsonl");
        let mut bytes = vec![b'x'; 5000];
        bytes.extend_from_slice(b"\n{\"a\":1}\n");
        std::fs::write(&path, &bytes).unwrap();
        let mut source = FileSource::open(&path, None).unwrap();
        source.max_line = 100;
        let long = source.next_record().unwrap().unwrap();
        assert_eq!(long.raw().len(), 100);
        assert!(
            long.decoded
                .unwrap_err()
                .contains("longer than 100 bytes (5000 bytes)")
        );
        let next = source.next_record().unwrap().unwrap();
        assert_eq!(next.position.offset, 2);
        assert_eq!(
            next.decoded.unwrap().payload.as_deref(),
            Some(&b"{\"a\":1}"[..])
        );
        assert!(source.next_record().unwrap().is_none());
        assert_eq!(source.bytes_read(), bytes.len() as u64);
    }
}
