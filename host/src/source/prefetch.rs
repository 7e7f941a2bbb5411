//! Reads a finite source ahead on its own thread, so that reading, splitting
//! and decoding records overlaps with the processor working on earlier ones.

use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Condvar, Mutex, PoisonError};

use super::{InputError, Record, Source};

/// Records handed over at once: one channel operation per chunk, not per record.
const CHUNK_RECORDS: usize = 512;
/// A chunk is handed over early once its raw bytes reach this.
const CHUNK_BYTES: usize = 1 << 20;
/// Chunks read ahead at most.
const CHUNKS_AHEAD: usize = 4;
/// Raw bytes read ahead at most (handed over and not yet consumed), past
/// which the reader waits: lines can be up to 64 MiB each.
const BYTES_AHEAD: usize = 16 << 20;

enum Chunk {
    /// Records, each with the source's byte count after it, and their raw bytes.
    Records(Vec<(Record, u64)>, usize),
    Failed(InputError),
}

/// Raw bytes handed over and not yet consumed, shared by both ends.
#[derive(Default)]
struct Ahead {
    state: Mutex<AheadState>,
    changed: Condvar,
}

#[derive(Default)]
struct AheadState {
    bytes: usize,
    /// The consumer is gone: stop waiting.
    closed: bool,
}

impl Ahead {
    fn lock(&self) -> std::sync::MutexGuard<'_, AheadState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until there is room to read ahead; `false` if the consumer is gone.
    fn wait_for_room(&self) -> bool {
        let mut state = self.lock();
        while state.bytes >= BYTES_AHEAD && !state.closed {
            state = self
                .changed
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        !state.closed
    }

    fn add(&self, bytes: usize) {
        self.lock().bytes += bytes;
    }

    fn release(&self, bytes: usize) {
        let mut state = self.lock();
        state.bytes = state.bytes.saturating_sub(bytes);
        self.changed.notify_all();
    }

    fn close(&self) {
        self.lock().closed = true;
        self.changed.notify_all();
    }
}

/// A finite [`Source`] read on a background thread. Records arrive in the
/// source's order; an error arrives where the source raised it, after every
/// record before it; the end arrives as the source's end.
///
/// It reads at most [`CHUNKS_AHEAD`] chunks and about [`BYTES_AHEAD`] raw
/// bytes ahead. Dropping it hangs up: the reader stops at its next
/// hand-over. It is not waited for, as it may be blocked reading a pipe
/// that never ends.
pub struct Prefetch {
    rx: Option<Receiver<Chunk>>,
    current: std::vec::IntoIter<(Record, u64)>,
    /// The raw bytes of `current`, released to the reader once consumed.
    current_bytes: usize,
    ahead: Arc<Ahead>,
    size: Option<u64>,
    bytes_read: u64,
}

impl std::fmt::Debug for Prefetch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prefetch")
            .field("bytes_read", &self.bytes_read)
            .finish_non_exhaustive()
    }
}

impl Prefetch {
    /// Starts reading `source` ahead once for `readers` consumers, each of
    /// which is handed every record (the first the records read, the
    /// others copies), its error too; fails only if no thread can be
    /// started. A run reads with one consumer; a replay's two versions read one
    /// tape so, decoded and seeded once. The reader keeps within the
    /// read-ahead bounds of every consumer still there; one hanging up
    /// leaves the others reading.
    pub fn start_shared(
        mut source: Box<dyn Source + Send>,
        readers: usize,
    ) -> std::io::Result<Vec<Prefetch>> {
        let size = source.size();
        let (mut outs, mut prefetches) = (Vec::new(), Vec::new());
        for _ in 0..readers.max(1) {
            let (tx, rx) = sync_channel(CHUNKS_AHEAD);
            let ahead = Arc::new(Ahead::default());
            outs.push((tx, Arc::clone(&ahead)));
            prefetches.push(Prefetch {
                rx: Some(rx),
                current: Vec::new().into_iter(),
                current_bytes: 0,
                ahead,
                size,
                bytes_read: 0,
            });
        }
        std::thread::Builder::new()
            .name("rewind-source".into())
            .spawn(move || read_ahead(source.as_mut(), outs))?;
        Ok(prefetches)
    }
}

/// Why the reader stopped filling a chunk.
enum Filled {
    /// The chunk is full; there may be more.
    Full,
    End,
    Failed(InputError),
}

/// The reading thread: chunks of records until the source ends, fails, or
/// every consumer hangs up.
fn read_ahead(source: &mut dyn Source, mut outs: Vec<(SyncSender<Chunk>, Arc<Ahead>)>) {
    loop {
        outs.retain(|(_, ahead)| ahead.wait_for_room());
        if outs.is_empty() {
            return;
        }
        let mut records = Vec::with_capacity(CHUNK_RECORDS);
        let mut bytes = 0;
        let filled = loop {
            match source.next_record() {
                Ok(Some(mut record)) => {
                    record.prepare();
                    bytes += record.raw().len();
                    records.push((record, source.bytes_read()));
                    if records.len() == CHUNK_RECORDS || bytes >= CHUNK_BYTES {
                        break Filled::Full;
                    }
                }
                Ok(None) => break Filled::End,
                Err(error) => break Filled::Failed(error),
            }
        };
        if !records.is_empty() {
            // Copies first, so the first consumer can have the records read.
            let mut chunks: Vec<_> = (1..outs.len()).map(|_| records.clone()).collect();
            chunks.insert(0, records);
            let mut sent = chunks.into_iter();
            outs.retain(|(tx, ahead)| {
                let chunk = sent.next().expect("a chunk per consumer");
                ahead.add(bytes);
                tx.send(Chunk::Records(chunk, bytes)).is_ok()
            });
            if outs.is_empty() {
                return;
            }
        }
        match filled {
            Filled::Full => {}
            // The channel closing is the end.
            Filled::End => return,
            Filled::Failed(error) => {
                for (tx, _) in &outs[1..] {
                    let _ = tx.send(Chunk::Failed(InputError::Shared(error.to_string())));
                }
                let _ = outs[0].0.send(Chunk::Failed(error));
                return;
            }
        }
    }
}

impl Source for Prefetch {
    fn next_record(&mut self) -> Result<Option<Record>, InputError> {
        loop {
            if let Some((record, bytes_read)) = self.current.next() {
                self.bytes_read = bytes_read;
                return Ok(Some(record));
            }
            self.ahead.release(std::mem::take(&mut self.current_bytes));
            let Some(rx) = &self.rx else {
                return Ok(None);
            };
            match rx.recv() {
                Ok(Chunk::Records(records, bytes)) => {
                    self.current = records.into_iter();
                    self.current_bytes = bytes;
                }
                Ok(Chunk::Failed(error)) => {
                    self.rx = None;
                    return Err(error);
                }
                // The reader hung up: the source ended.
                Err(_) => {
                    self.rx = None;
                    return Ok(None);
                }
            }
        }
    }

    fn size(&self) -> Option<u64> {
        self.size
    }

    fn bytes_read(&self) -> u64 {
        self.bytes_read
    }
}

impl Drop for Prefetch {
    fn drop(&mut self) {
        // A reader waiting for room stops; one handing over finds the
        // channel closed once `rx` goes.
        self.ahead.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Position;
    use crate::source::SourceError;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

    /// Yields `records` numbered records, then fails (or ends).
    struct Scripted {
        records: i64,
        next: i64,
        fail: bool,
        /// Each record's raw length.
        raw_len: usize,
        /// How many records were read, for the test to watch.
        read: Arc<AtomicI64>,
        /// Set when the source is dropped: its reader has finished.
        dropped: Arc<AtomicBool>,
    }

    impl Drop for Scripted {
        fn drop(&mut self) {
            self.dropped.store(true, Ordering::SeqCst);
        }
    }

    fn scripted(records: i64, fail: bool) -> (Box<Scripted>, Arc<AtomicBool>) {
        let dropped = Arc::new(AtomicBool::new(false));
        let source = Scripted {
            records,
            next: 0,
            fail,
            raw_len: 10,
            read: Arc::default(),
            dropped: Arc::clone(&dropped),
        };
        (Box::new(source), dropped)
    }

    impl Source for Scripted {
        fn next_record(&mut self) -> Result<Option<Record>, InputError> {
            if self.next == self.records {
                if self.fail {
                    self.fail = false;
                    return Err(InputError::File(SourceError {
                        path: "scripted".into(),
                        source: std::io::Error::other("device gone"),
                    }));
                }
                return Ok(None);
            }
            self.next += 1;
            self.read.store(self.next, Ordering::SeqCst);
            Ok(Some(Record::malformed(
                Position {
                    stream: "s".into(),
                    partition: 0,
                    offset: self.next,
                },
                vec![b'x'; self.raw_len],
                "raw".into(),
            )))
        }
        fn size(&self) -> Option<u64> {
            Some(10 * self.records as u64)
        }
        fn bytes_read(&self) -> u64 {
            10 * self.next as u64
        }
    }

    /// `source` read ahead for one consumer.
    fn start(source: Box<Scripted>) -> std::io::Result<Prefetch> {
        Ok(Prefetch::start_shared(source, 1)?.remove(0))
    }

    fn drain(source: &mut Prefetch) -> (Vec<i64>, Option<InputError>) {
        let mut offsets = Vec::new();
        loop {
            match source.next_record() {
                Ok(Some(record)) => {
                    offsets.push(record.position.offset);
                    assert_eq!(source.bytes_read(), 10 * record.position.offset as u64);
                }
                Ok(None) => return (offsets, None),
                Err(error) => return (offsets, Some(error)),
            }
        }
    }

    #[test]
    fn records_arrive_in_order_with_their_byte_counts_across_chunks() {
        let records = 3 * CHUNK_RECORDS as i64 + 7;
        let (scripted, _) = scripted(records, false);
        let mut source = start(scripted).unwrap();
        assert_eq!(source.size(), Some(10 * records as u64));
        let (offsets, error) = drain(&mut source);
        assert!(error.is_none());
        assert_eq!(offsets, (1..=records).collect::<Vec<_>>());
        // The end stays the end.
        assert!(source.next_record().unwrap().is_none());
    }

    #[test]
    fn an_error_arrives_after_every_record_before_it_then_the_source_ends() {
        let (scripted, _) = scripted(CHUNK_RECORDS as i64 + 3, true);
        let mut source = start(scripted).unwrap();
        let (offsets, error) = drain(&mut source);
        assert_eq!(offsets.len(), CHUNK_RECORDS + 3);
        let error = error.expect("the source's error is passed on");
        assert!(error.to_string().contains("device gone"), "{error}");
        assert!(source.next_record().unwrap().is_none());
    }

    #[test]
    fn dropping_it_early_stops_the_reader() {
        // Far more than the channel holds: the reader is blocked handing over.
        let (scripted, dropped) = scripted(100 * CHUNK_RECORDS as i64, false);
        let mut source = start(scripted).unwrap();
        assert_eq!(source.next_record().unwrap().unwrap().position.offset, 1);
        drop(source);
        // The reader notices the hang-up and ends, dropping its source.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !dropped.load(Ordering::SeqCst) {
            assert!(
                std::time::Instant::now() < deadline,
                "the reader kept going"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    #[test]
    fn big_records_are_read_ahead_only_up_to_the_byte_bound() {
        const RAW: usize = 8 << 20;
        let (mut scripted, _) = scripted(20, false);
        scripted.raw_len = RAW;
        let read = Arc::clone(&scripted.read);
        let mut source = start(scripted).unwrap();
        assert_eq!(source.next_record().unwrap().unwrap().raw().len(), RAW);
        // Let the reader run as far ahead as it may.
        let mut last = -1;
        while read.load(Ordering::SeqCst) != last {
            last = read.load(Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        // One chunk per 8 MiB record, the first one still being consumed:
        // the channel alone would let the reader read 6 records; 16 MiB of
        // read-ahead stops it after the second (a third at most).
        assert!(
            (2..=3).contains(&last),
            "read {last} records of 8 MiB with the first not yet consumed"
        );
        let (offsets, error) = drain(&mut source);
        assert!(error.is_none());
        assert_eq!(offsets, (2..=20).collect::<Vec<_>>());
    }

    /// Two consumers of one read each get every record, in order, and the
    /// error after them; one hanging up early leaves the other reading.
    #[test]
    fn a_shared_read_hands_every_record_and_the_error_to_each_consumer() {
        let records = 3 * CHUNK_RECORDS as i64 + 5;
        let (failing, _) = scripted(records, true);
        let mut both = Prefetch::start_shared(failing, 2).unwrap();
        let (mut second, mut first) = (both.pop().unwrap(), both.pop().unwrap());
        let (offsets, error) = drain(&mut second);
        assert_eq!(offsets, (1..=records).collect::<Vec<_>>());
        let copied = error.expect("the error is handed to every consumer");
        let (offsets, error) = drain(&mut first);
        assert_eq!(offsets, (1..=records).collect::<Vec<_>>());
        let error = error.expect("the error is handed to every consumer");
        assert!(matches!(error, InputError::File(_)), "{error:?}");
        assert!(matches!(copied, InputError::Shared(_)), "{copied:?}");
        assert_eq!(error.to_string(), copied.to_string());

        let many = 20 * CHUNK_RECORDS as i64;
        let (scripted, _) = scripted(many, false);
        let mut both = Prefetch::start_shared(scripted, 2).unwrap();
        let mut kept = both.remove(1);
        drop(both);
        let (offsets, error) = drain(&mut kept);
        assert!(error.is_none());
        assert_eq!(offsets.len() as i64, many);
    }
}
