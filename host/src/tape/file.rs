//! Tape files: the header, appending frames ([`TapeWriter`]) and reading
//! them back with every length and checksum checked ([`TapeReader`]).

use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::{
    EventFrame, EventResult, Frame, HEADER_LEN, KIND_EVENT, KIND_RUN, MAGIC, MAX_FRAME,
    OLDEST_TAPE_VERSION, RunInfo, TAPE_VERSION, TapeError, TapeEvent,
};
use crate::codec::{Reader, Writer};
use crate::source::Record;

/// Whether the file at `path` starts like a tape.
pub fn is_tape(path: &Path) -> bool {
    let mut magic = [0u8; 12];
    // Only a file is looked into: bytes read from a pipe would be gone.
    File::open(path)
        .and_then(|mut f| {
            if !f.metadata()?.is_file() {
                return Err(std::io::Error::other("not a file"));
            }
            f.read_exact(&mut magic)
        })
        .is_ok_and(|()| &magic == MAGIC)
}

/// Where a tape's committed frames end, as the state DB records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TapeMark {
    /// The tape's id (hex), from its header.
    pub id: String,
    pub bytes: u64,
}

/// Reads a tape's header: its id and format version.
fn read_header(file: &mut File, path: &Path) -> Result<([u8; 16], u32), TapeError> {
    let mut header = [0u8; HEADER_LEN as usize];
    let mut filled = 0;
    while filled < header.len() {
        match file.read(&mut header[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(TapeError::Io {
                    path: path.to_owned(),
                    source,
                });
            }
        }
    }
    if filled < MAGIC.len() || &header[..12] != MAGIC {
        return Err(TapeError::NotATape {
            path: path.to_owned(),
        });
    }
    if filled < header.len() {
        return Err(TapeError::Truncated {
            path: path.to_owned(),
            at: filled as u64,
            reason: "the header is incomplete".into(),
        });
    }
    let version = u32::from_le_bytes(header[12..16].try_into().expect("4 bytes"));
    if !(OLDEST_TAPE_VERSION..=TAPE_VERSION).contains(&version) {
        return Err(TapeError::UnknownVersion {
            path: path.to_owned(),
            found: version,
        });
    }
    Ok((header[16..32].try_into().expect("16 bytes"), version))
}

/// Appends frames to a tape; frames reach the file at [`TapeWriter::flush`].
pub struct TapeWriter {
    path: PathBuf,
    file: File,
    id: [u8; 16],
    /// The tape's format version: frames are appended in it.
    version: u32,
    len: u64,
    pending: Writer,
    /// Where the open batch's frames start in `pending`.
    batch_start: usize,
}

impl std::fmt::Debug for TapeWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TapeWriter")
            .field("path", &self.path)
            .field("len", &self.len)
            .finish()
    }
}

impl TapeWriter {
    /// Opens the tape at `path` for the run whose state DB recorded `mark`
    /// (`None`: the state never wrote a tape). A missing tape is created (the
    /// caller claims it in the state DB before writing frames); frames past
    /// the mark (an uncommitted batch) are cut off; a tape holding frames the
    /// state did not write is refused, never appended to.
    pub fn open(path: &Path, mark: Option<&TapeMark>) -> Result<TapeWriter, TapeError> {
        let io = |source| TapeError::Io {
            path: path.to_owned(),
            source,
        };
        let mismatch = |message: String| TapeError::Mismatch {
            path: path.to_owned(),
            message,
        };
        if !path.exists() {
            if let Some(mark) = mark {
                return Err(mismatch(format!(
                    "the state DB recorded {} bytes on this tape, but it is missing; \
                     restore it, or continue with a new --tape",
                    mark.bytes
                )));
            }
            return TapeWriter::create(path, new_tape_id(path));
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io)?;
        if mark.is_none() && file.metadata().map_err(io)?.len() == 0 {
            // A crash between creating the file and writing its header
            // leaves it empty: there is nothing to protect, start it anew.
            return TapeWriter::start(path, file, new_tape_id(path));
        }
        let (id, version) = read_header(&mut file, path)?;
        let len = file.metadata().map_err(io)?.len();
        let Some(mark) = mark else {
            if len == HEADER_LEN {
                // No frames: nothing to protect. This is how a crash between
                // creating a tape and claiming it in the state DB leaves it.
                file.seek(SeekFrom::Start(HEADER_LEN)).map_err(io)?;
                return Ok(TapeWriter {
                    path: path.to_owned(),
                    file,
                    id,
                    version,
                    len,
                    pending: Writer::default(),
                    batch_start: 0,
                });
            }
            return Err(mismatch(
                "it was not recorded by this state DB; choose a new --tape \
                 (a tape records one state DB's input)"
                    .into(),
            ));
        };
        if mark.id != hex::encode(id) {
            return Err(mismatch(format!(
                "it is not the tape this state DB recorded to (tape id {}, expected {})",
                hex::encode(id),
                mark.id
            )));
        }
        if len < mark.bytes {
            return Err(mismatch(format!(
                "it ends at byte {len}, but the state DB committed {} bytes of it \
                 (was it truncated or replaced?)",
                mark.bytes
            )));
        }
        // Frames past the mark belong to a batch that never committed.
        file.set_len(mark.bytes).map_err(io)?;
        file.seek(SeekFrom::Start(mark.bytes)).map_err(io)?;
        Ok(TapeWriter {
            path: path.to_owned(),
            file,
            id,
            version,
            len: mark.bytes,
            pending: Writer::default(),
            batch_start: 0,
        })
    }

    /// Creates a new tape with id `id`. Imported tapes have id 0: importing
    /// the same records twice gives byte-identical tapes.
    pub fn create(path: &Path, id: [u8; 16]) -> Result<TapeWriter, TapeError> {
        let io = |source| TapeError::Io {
            path: path.to_owned(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(io)?;
        TapeWriter::start(path, file, id)
    }

    /// Writes the header of a new tape into `file`, which is empty.
    fn start(path: &Path, mut file: File, id: [u8; 16]) -> Result<TapeWriter, TapeError> {
        let mut header = Vec::with_capacity(HEADER_LEN as usize);
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&TAPE_VERSION.to_le_bytes());
        header.extend_from_slice(&id);
        file.write_all(&header)
            .map_err(|source| TapeError::writing(path, source))?;
        Ok(TapeWriter {
            path: path.to_owned(),
            file,
            id,
            version: TAPE_VERSION,
            len: HEADER_LEN,
            pending: Writer::default(),
            batch_start: 0,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Queues a run frame.
    pub fn run(&mut self, info: &RunInfo) {
        let version = self.version;
        self.frame(|w| info.encode(w, version));
    }

    /// Queues an event frame.
    pub fn event(&mut self, event: &TapeEvent) {
        self.frame(|w| event.encode(w));
    }

    /// Queues the frame of the record consumed as `seq`, with its result:
    /// the frame of [`TapeEvent::from_record`] without copying the record.
    pub fn record(&mut self, seq: u64, record: &Record, result: Option<&EventResult>) {
        self.frame(|w| EventFrame::of_record(seq, record, result).encode(w));
    }

    fn frame(&mut self, encode: impl FnOnce(&mut Writer)) {
        let start = self.pending.buf.len();
        self.pending.buf.extend_from_slice(&[0; 8]);
        encode(&mut self.pending);
        let body = &self.pending.buf[start + 8..];
        let len = body.len() as u32;
        let crc = crc32fast::hash(body);
        self.pending.buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
        self.pending.buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    }

    /// Marks where a batch's frames begin (frames queued before it, such as
    /// a run frame, survive [`TapeWriter::discard`]).
    pub fn begin_batch(&mut self) {
        self.batch_start = self.pending.buf.len();
    }

    /// Drops the frames queued since [`TapeWriter::begin_batch`] (their
    /// batch is being redone).
    pub fn discard(&mut self) {
        self.pending.buf.truncate(self.batch_start);
    }

    /// Writes the queued frames; returns the mark to commit with the batch.
    pub fn flush(&mut self) -> Result<TapeMark, TapeError> {
        if !self.pending.buf.is_empty() {
            self.file
                .write_all(&self.pending.buf)
                .map_err(|source| TapeError::writing(&self.path, source))?;
            self.len += self.pending.buf.len() as u64;
            self.pending.buf.clear();
        }
        self.batch_start = 0;
        Ok(self.mark())
    }

    /// The committed-so-far mark.
    pub fn mark(&self) -> TapeMark {
        TapeMark {
            id: hex::encode(self.id),
            bytes: self.len,
        }
    }
}

/// A tape id: unique per tape file created (never part of any result).
fn new_tape_id(path: &Path) -> [u8; 16] {
    let mut h = Sha256::new();
    h.update(path.as_os_str().as_encoded_bytes());
    h.update(std::process::id().to_le_bytes());
    if let Ok(t) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.update(t.as_nanos().to_le_bytes());
    }
    h.finalize()[..16].try_into().expect("16 bytes")
}

/// Reads a tape's frames in order.
pub struct TapeReader {
    path: PathBuf,
    reader: BufReader<File>,
    at: u64,
    len: u64,
    id: [u8; 16],
    version: u32,
}

impl TapeReader {
    pub fn open(path: &Path) -> Result<TapeReader, TapeError> {
        let io = |source| TapeError::Io {
            path: path.to_owned(),
            source,
        };
        let mut file = File::open(path).map_err(io)?;
        // Frames are checked against the file's length, and tapes are read
        // more than once (by each side of a replay, by verify).
        if !file.metadata().map_err(io)?.is_file() {
            return Err(io(std::io::Error::other(
                "not a file (a pipe?): tapes are read from files; pass the tape's path",
            )));
        }
        let (id, version) = read_header(&mut file, path)?;
        let len = file.metadata().map_err(io)?.len();
        Ok(TapeReader {
            path: path.to_owned(),
            reader: BufReader::with_capacity(1 << 20, file),
            at: HEADER_LEN,
            len,
            id,
            version,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The tape's id (hex).
    pub fn id(&self) -> String {
        hex::encode(self.id)
    }

    /// The tape's size in bytes.
    pub fn size(&self) -> u64 {
        self.len
    }

    /// Bytes read so far.
    pub fn position(&self) -> u64 {
        self.at
    }

    /// The next frame; `None` at the end of the tape.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, TapeError> {
        if self.at >= self.len {
            return Ok(None);
        }
        let start = self.at;
        let path = self.path.clone();
        let truncated = |reason: String| TapeError::Truncated {
            path: path.clone(),
            at: start,
            reason,
        };
        let corrupt = |reason: String| TapeError::Corrupt {
            path: path.clone(),
            at: start,
            reason,
        };
        if self.len - start < 8 {
            return Err(truncated("a frame header is incomplete".into()));
        }
        let mut head = [0u8; 8];
        self.read_exact(&mut head)?;
        let len = u32::from_le_bytes(head[..4].try_into().expect("4 bytes"));
        let crc = u32::from_le_bytes(head[4..].try_into().expect("4 bytes"));
        if len == 0 || len > MAX_FRAME {
            return Err(corrupt(format!("a frame claims {len} bytes")));
        }
        if self.len - start - 8 < u64::from(len) {
            return Err(truncated(format!(
                "a frame of {len} bytes has only {} on the tape",
                self.len - start - 8
            )));
        }
        let mut body = vec![0u8; len as usize];
        self.read_exact(&mut body)?;
        if crc32fast::hash(&body) != crc {
            return Err(corrupt("a frame's checksum does not match".into()));
        }
        let mut r = Reader::new(&body[1..]);
        let frame = match body[0] {
            KIND_RUN => RunInfo::decode(&mut r, self.version).map(Frame::Run),
            KIND_EVENT => TapeEvent::decode(&mut r).map(|e| Frame::Event(Box::new(e))),
            other => Err(format!("unknown frame kind {other}")),
        }
        .map_err(&corrupt)?;
        if !r.is_empty() {
            return Err(corrupt("a frame has bytes left over".into()));
        }
        Ok(Some(frame))
    }

    /// The next event frame, skipping run frames.
    pub fn next_event(&mut self) -> Result<Option<TapeEvent>, TapeError> {
        loop {
            match self.next_frame()? {
                None => return Ok(None),
                Some(Frame::Event(event)) => return Ok(Some(*event)),
                Some(Frame::Run(_)) => {}
            }
        }
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), TapeError> {
        self.reader
            .read_exact(buf)
            .map_err(|source| TapeError::Io {
                path: self.path.clone(),
                source,
            })?;
        self.at += buf.len() as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Event, Header, Position};
    use crate::tape::{Outcome, TapeMark};

    /// A kill between creating a tape and writing its header leaves an empty
    /// file: the rerun (whose state DB claims none of it yet) starts it anew;
    /// a state DB that claims bytes of it refuses it.
    #[test]
    fn an_empty_tape_left_by_a_crash_is_started_anew() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.tape");
        std::fs::write(&path, b"").unwrap();
        drop(TapeWriter::open(&path, None).unwrap());
        assert_eq!(TapeReader::open(&path).unwrap().size(), HEADER_LEN);

        std::fs::write(&path, b"").unwrap();
        let mark = TapeMark {
            id: "00".repeat(16),
            bytes: HEADER_LEN,
        };
        assert!(TapeWriter::open(&path, Some(&mark)).is_err());
        // Anything else that is not a tape is still refused.
        std::fs::write(&path, b"{}\n").unwrap();
        assert!(matches!(
            TapeWriter::open(&path, None),
            Err(TapeError::NotATape { .. })
        ));
    }

    /// A version 1 tape (run frames without the dedup header) is read, its
    /// runs taken to have deduplicated by the default header, and a run
    /// that continues it appends version 1 frames; a new tape is version 2
    /// and keeps the header, or its absence.
    #[test]
    fn version_1_tapes_are_read_and_continued_in_version_1() {
        let dir = tempfile::tempdir().unwrap();
        let run = |first_seq, dedup_header: Option<&str>| RunInfo {
            first_seq,
            module_digest: "sha256:00".into(),
            fuel: 7,
            memory_bytes: 1 << 20,
            dedup_header: dedup_header.map(str::to_owned),
        };

        let new = dir.path().join("new.tape");
        let mut writer = TapeWriter::create(&new, [1; 16]).unwrap();
        writer.run(&run(0, None));
        writer.run(&run(5, Some("x-id")));
        let mark = writer.flush().unwrap();
        let mut reader = TapeReader::open(&new).unwrap();
        assert_eq!(reader.version, TAPE_VERSION);
        assert_eq!(reader.next_frame().unwrap(), Some(Frame::Run(run(0, None))));
        assert_eq!(
            reader.next_frame().unwrap(),
            Some(Frame::Run(run(5, Some("x-id"))))
        );

        // The same tape as version 1 wrote it: the version in the header,
        // run frames ending after the memory cap.
        let old = dir.path().join("old.tape");
        let mut bytes = std::fs::read(&new).unwrap()[..HEADER_LEN as usize].to_vec();
        bytes[12..16].copy_from_slice(&1u32.to_le_bytes());
        let mut w = Writer::default();
        run(0, None).encode(&mut w, 1);
        let body = w.buf;
        bytes.extend_from_slice(&(body.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        bytes.extend_from_slice(&body);
        std::fs::write(&old, &bytes).unwrap();
        let default = Some(crate::sink::ID_HEADER);
        let mut reader = TapeReader::open(&old).unwrap();
        assert_eq!(
            reader.next_frame().unwrap(),
            Some(Frame::Run(run(0, default)))
        );

        let mark = TapeMark {
            bytes: bytes.len() as u64,
            ..mark
        };
        let mut writer = TapeWriter::open(&old, Some(&mark)).unwrap();
        writer.run(&run(9, Some("x-id")));
        writer.flush().unwrap();
        let mut reader = TapeReader::open(&old).unwrap();
        assert_eq!(reader.version, 1);
        reader.next_frame().unwrap();
        // Version 1 cannot say which header: the frame reads as the default.
        assert_eq!(
            reader.next_frame().unwrap(),
            Some(Frame::Run(run(9, default)))
        );
        assert_eq!(reader.next_frame().unwrap(), None);
    }

    /// A record's frame written from the record equals the frame of its
    /// `TapeEvent`, byte for byte, for well-formed and malformed records,
    /// and reads back as the record.
    #[test]
    fn a_record_is_written_as_its_tape_event_would_be() {
        let dir = tempfile::tempdir().unwrap();
        let position = Position {
            stream: "orders".into(),
            partition: 2,
            offset: 41,
        };
        let well_formed = Record::decoded(
            Event {
                position: position.clone(),
                key: Some(b"k".to_vec()),
                payload: Some(b"{\"a\":1}".to_vec()),
                headers: vec![Header {
                    name: "h".into(),
                    value: None,
                }],
                timestamp_ms: Some(1_700_000_000_000),
            },
            None,
        );
        let malformed = Record::malformed(position, vec![0xff, b'{'], "not JSON".into());
        let result = EventResult {
            outcome: Outcome::DeadLetter {
                class: "invalid-input".into(),
                message: "no".into(),
            },
            rows: 3,
            outputs: 1,
            rows_digest: [7; 32],
            outputs_digest: [9; 32],
        };
        let written = |by_record: bool| {
            let path = dir.path().join(format!("{by_record}.tape"));
            let mut tape = TapeWriter::create(&path, [0; 16]).unwrap();
            for (seq, record) in [&well_formed, &malformed].into_iter().enumerate() {
                for result in [None, Some(&result)] {
                    if by_record {
                        tape.record(seq as u64, record, result);
                    } else {
                        let mut event = TapeEvent::from_record(seq as u64, record);
                        event.result = result.cloned();
                        tape.event(&event);
                    }
                }
            }
            tape.flush().unwrap();
            std::fs::read(&path).unwrap()
        };
        let by_record = written(true);
        assert!(by_record.len() > HEADER_LEN as usize + 100);
        assert_eq!(by_record, written(false));

        // And what was written reads back as the records were.
        let mut reader = TapeReader::open(&dir.path().join("true.tape")).unwrap();
        let mut events = Vec::new();
        while let Some(frame) = reader.next_frame().unwrap() {
            if let Frame::Event(event) = frame {
                events.push(event);
            }
        }
        assert_eq!(events.len(), 4);
        let (ok, bad) = (&events[1], &events[3]);
        assert_eq!((ok.seq, bad.seq), (0, 1));
        assert_eq!(ok.result.as_ref(), Some(&result));
        assert_eq!(events[0].result, None);
        assert_eq!(ok.position.offset, 41);
        assert_eq!(ok.key.as_deref(), Some(&b"k"[..]));
        assert_eq!(ok.payload.as_deref(), Some(&b"{\"a\":1}"[..]));
        assert_eq!(ok.headers.len(), 1);
        assert_eq!(ok.timestamp_ms, Some(1_700_000_000_000));
        assert_eq!(ok.malformed, None);
        assert_eq!(bad.payload.as_deref(), Some(&[0xff, b'{'][..]));
        assert_eq!(bad.malformed.as_deref(), Some("not JSON"));
        assert_eq!((bad.key.as_ref(), bad.timestamp_ms), (None, None));
        assert!(bad.headers.is_empty());
    }
}
