//! Sources of input records. For now: JSONL files (bare payloads or kcat
//! `-J` envelopes, detected per line).

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use crate::envelope::decode_line;
use crate::event::{Event, Position};

/// One consumed input record: its position, its bytes exactly as read, and
/// the decoded event or why it could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub position: Position,
    pub raw: Vec<u8>,
    pub decoded: Result<Event, String>,
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
}

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
        Ok(FileSource {
            path: path.to_owned(),
            reader: BufReader::with_capacity(1 << 20, file),
            stream,
            line: 0,
            bytes_read: 0,
            size: meta.is_file().then_some(meta.len()),
            buf: Vec::new(),
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
        loop {
            self.buf.clear();
            let n = self
                .reader
                .read_until(b'\n', &mut self.buf)
                .map_err(|source| SourceError {
                    path: self.path.clone(),
                    source,
                })?;
            if n == 0 {
                return Ok(None);
            }
            self.bytes_read += n as u64;
            self.line += 1;
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
            let position = match &decoded {
                Ok(event) => event.position.clone(),
                Err(_) => position,
            };
            return Ok(Some(Record {
                position,
                raw: line.to_vec(),
                decoded,
            }));
        }
    }
}

impl Iterator for FileSource {
    type Item = Result<Record, SourceError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_record().transpose()
    }
}
