//! The WASI a guest sees: nothing ambient, everything from the event.
//!
//! No filesystem (no preopens), no network (TCP, UDP and name lookup
//! refused), no environment, no arguments, no stdin. Both clocks read the
//! current event's timestamp; both random generators are ChaCha streams
//! reseeded from each event's identity. stdout and stderr are captured into
//! a capped buffer that the host forwards to its log.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rand_chacha::ChaCha20Rng;
use rand_core::{Rng, TryRng};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};
use wasmtime_wasi::{HostMonotonicClock, HostWallClock, WasiCtx, WasiCtxBuilder};

use wasmtime::StoreContextMut;
use wasmtime::component::{Linker, Resource};
use wasmtime_wasi::p2::DynPollable;

use super::host::HostState;
use crate::event::{Entropy, Seed};
use crate::wit::World;

/// Bytes of stdout (and, separately, stderr) kept per event.
pub const CAPTURE_LIMIT: usize = 64 * 1024;

/// Replaces WASI's timers with ones that trap.
///
/// wasmtime-wasi's timers really sleep (they wait on tokio's clock for the
/// time between our fixed clock and the deadline), so a guest that called
/// `std::thread::sleep` would block the host, unbounded by fuel. A processor
/// has nothing to wait for, so asking to is an error at that exact point.
pub fn forbid_waiting(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    let mut clock = linker.instance("wasi:clocks/monotonic-clock@0.2.12")?;
    clock.func_wrap(
        "subscribe-duration",
        |_: StoreContextMut<'_, HostState>,
         (_,): (u64,)|
         -> wasmtime::Result<(Resource<DynPollable>,)> {
            Err(wasmtime::Error::new(WaitForbidden))
        },
    )?;
    clock.func_wrap(
        "subscribe-instant",
        |_: StoreContextMut<'_, HostState>,
         (_,): (u64,)|
         -> wasmtime::Result<(Resource<DynPollable>,)> {
            Err(wasmtime::Error::new(WaitForbidden))
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}

/// A guest asked to wait (sleep, or poll a timer).
#[derive(Debug, thiserror::Error)]
#[error(
    "the processor tried to wait (sleep or a timer): processors run on event time and must not wait"
)]
pub struct WaitForbidden;

/// The per-event inputs of a guest's WASI: the clock reading and the random
/// streams. An instance lives for several events, so its WASI reads these
/// cells, which the host sets before each call.
#[derive(Clone)]
pub struct EventCells {
    timestamp_ms: Arc<AtomicI64>,
    streams: Arc<Mutex<Streams>>,
    /// Words of WASI `random`'s keystream handed over with each event.
    skip: u64,
}

impl EventCells {
    /// The cells of an instance of a module of `world`: WASI's `random`
    /// starts after the bytes that world hands over with each event.
    pub fn new(world: World) -> Self {
        let skip = world.random_prefix();
        debug_assert!(skip.is_multiple_of(4));
        let skip = (skip / 4) as u64;
        let init = Streams::of(Entropy::init(), skip);
        EventCells {
            timestamp_ms: Arc::new(AtomicI64::new(0)),
            streams: Arc::new(Mutex::new(init)),
            skip,
        }
    }

    /// Points the clocks and random streams at this event.
    pub fn enter(&self, entropy: &Entropy, timestamp_ms: i64) {
        self.timestamp_ms.store(timestamp_ms, Ordering::Relaxed);
        *self.streams.lock().unwrap_or_else(|p| p.into_inner()) = Streams::of(entropy, self.skip);
    }

    /// WASI's `random` or `insecure-random` (`stream`, a [`Seed`] constant).
    fn rng(&self, stream: u64) -> SharedRng {
        SharedRng {
            stream,
            streams: Arc::clone(&self.streams),
        }
    }

    /// Builds the WASI context of one instance.
    pub fn wasi(&self, capture: &Capture) -> WasiCtx {
        let mut builder = WasiCtxBuilder::new();
        builder
            .wall_clock(EventTime {
                timestamp_ms: Arc::clone(&self.timestamp_ms),
            })
            .monotonic_clock(EventTime {
                timestamp_ms: Arc::clone(&self.timestamp_ms),
            })
            .secure_random(self.rng(Seed::WASI))
            .insecure_random(self.rng(Seed::WASI_INSECURE))
            // WASI says this seed is fixed for an instance's lifetime; a
            // constant keeps it the same for every instance and version.
            .insecure_random_seed(u128::from_le_bytes(
                Entropy::init().seed.0[..16].try_into().expect("16 bytes"),
            ))
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .stdout(capture.stdout.clone())
            .stderr(capture.stderr.clone());
        builder.build()
    }
}

/// One of the current event's WASI random streams, drawn from by the
/// guest's WASI context; the host points both at each event in turn.
#[derive(Clone)]
struct SharedRng {
    /// `Seed::WASI` or `Seed::WASI_INSECURE`.
    stream: u64,
    streams: Arc<Mutex<Streams>>,
}

/// The current event's two WASI streams, behind one lock (each lock taken
/// per event shows in a run's profile).
struct Streams {
    entropy: Entropy,
    secure: Keystream,
    insecure: Keystream,
}

impl Streams {
    /// `entropy`'s streams, `random`'s from word `skip` on.
    fn of(entropy: &Entropy, skip: u64) -> Self {
        Streams {
            entropy: entropy.clone(),
            secure: Keystream::at(skip),
            insecure: Keystream::at(0),
        }
    }
}

/// A position in one event's ChaCha20 keystream. Draws from WASI `random`
/// are served from the bytes prepared ahead (`Entropy::wasi_prefix`) while
/// they last; the generator is built (and moved to the position) only past
/// them. Either way a draw of `n` bytes takes the next `ceil(n / 4)` words
/// of the keystream, as `ChaCha20Rng` does, so the values are the generator's.
struct Keystream {
    /// Words drawn so far (or skipped).
    words: u64,
    rng: Option<ChaCha20Rng>,
}

impl Keystream {
    fn at(words: u64) -> Self {
        Keystream { words, rng: None }
    }

    fn fill(&mut self, seed: Seed, stream: u64, prefix: Option<&[u8]>, dst: &mut [u8]) {
        if self.rng.is_none() {
            let start = self.words as usize * 4;
            if let Some(bytes) = prefix.and_then(|p| p.get(start..start + dst.len())) {
                dst.copy_from_slice(bytes);
                self.words += dst.len().div_ceil(4) as u64;
                return;
            }
        }
        let words = self.words;
        self.rng
            .get_or_insert_with(|| {
                let mut rng = seed.rng(stream);
                rng.set_word_pos(u128::from(words));
                rng
            })
            .fill_bytes(dst);
    }
}

impl SharedRng {
    fn fill(&self, dst: &mut [u8]) {
        let mut streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        let Streams {
            entropy,
            secure,
            insecure,
        } = &mut *streams;
        if self.stream == Seed::WASI {
            secure.fill(entropy.seed, Seed::WASI, Some(&entropy.wasi_prefix), dst);
        } else {
            insecure.fill(entropy.seed, self.stream, None, dst);
        }
    }
}

impl TryRng for SharedRng {
    type Error = Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Infallible> {
        let mut word = [0; 4];
        self.fill(&mut word);
        Ok(u32::from_le_bytes(word))
    }

    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        let mut words = [0; 8];
        self.fill(&mut words);
        Ok(u64::from_le_bytes(words))
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Infallible> {
        self.fill(dst);
        Ok(())
    }
}

/// Both WASI clocks: they read the current event's timestamp.
#[derive(Clone)]
struct EventTime {
    timestamp_ms: Arc<AtomicI64>,
}

impl EventTime {
    /// Milliseconds since the epoch; WASI clocks cannot go before it, so a
    /// negative timestamp reads as 0 rather than wrapping.
    fn millis(&self) -> u64 {
        self.timestamp_ms.load(Ordering::Relaxed).max(0) as u64
    }
}

impl HostWallClock for EventTime {
    fn resolution(&self) -> Duration {
        Duration::from_millis(1)
    }

    fn now(&self) -> Duration {
        Duration::from_millis(self.millis())
    }
}

impl HostMonotonicClock for EventTime {
    fn resolution(&self) -> u64 {
        1_000_000
    }

    fn now(&self) -> u64 {
        self.millis().saturating_mul(1_000_000)
    }
}

/// Captured stdout and stderr of one guest call.
#[derive(Default, Clone)]
pub struct Capture {
    pub stdout: CappedPipe,
    pub stderr: CappedPipe,
}

/// An output stream that keeps the first [`CAPTURE_LIMIT`] bytes and counts
/// the rest. It never fails a write: a guest that prints too much is not
/// punished for it, so its results do not depend on the cap.
#[derive(Default, Clone)]
pub struct CappedPipe {
    inner: Arc<Pipe>,
}

#[derive(Default)]
struct Pipe {
    /// Whether anything was written since the last `take`: read after
    /// every call, which locks only when a guest wrote (the locks of the
    /// two pipes were ~0.7% of a run whose guest printed nothing).
    written: AtomicBool,
    captured: Mutex<Captured>,
}

#[derive(Default)]
struct Captured {
    kept: Vec<u8>,
    dropped: usize,
}

impl CappedPipe {
    fn append(&self, bytes: &[u8]) {
        let mut inner = self
            .inner
            .captured
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let room = CAPTURE_LIMIT.saturating_sub(inner.kept.len());
        let keep = room.min(bytes.len());
        inner.kept.extend_from_slice(&bytes[..keep]);
        inner.dropped += bytes.len() - keep;
        self.inner.written.store(true, Ordering::Release);
    }

    /// The kept bytes and the number dropped, emptying the pipe.
    pub fn take(&self) -> (Vec<u8>, usize) {
        if !self.inner.written.load(Ordering::Acquire) {
            return (Vec::new(), 0);
        }
        let mut inner = self
            .inner
            .captured
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        self.inner.written.store(false, Ordering::Relaxed);
        let dropped = std::mem::take(&mut inner.dropped);
        (std::mem::take(&mut inner.kept), dropped)
    }
}

impl IsTerminal for CappedPipe {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for CappedPipe {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl OutputStream for CappedPipe {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.append(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(CAPTURE_LIMIT)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for CappedPipe {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for CappedPipe {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.append(buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Position;

    /// Draws of every kind and size from either stream, across the prepared
    /// bytes' end and the generator's block ends, give exactly what the
    /// generator gives (`random` from the byte the world's event does not
    /// carry on), and every event starts its streams over.
    #[test]
    fn a_keystream_draws_what_the_generator_draws() {
        let position = Position {
            stream: "orders".into(),
            partition: 3,
            offset: 17,
        };
        let entropy = Entropy::of(&position);
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let both = World::ALL
            .into_iter()
            .flat_map(|w| [(w, Seed::WASI), (w, Seed::WASI_INSECURE)]);
        for (world, stream) in both {
            let cells = EventCells::new(world);
            for _ in 0..200 {
                cells.enter(&entropy, 0);
                let mut shared = cells.rng(stream);
                let mut rng = entropy.seed.rng(stream);
                if stream == Seed::WASI {
                    rng.set_word_pos(world.random_prefix() as u128 / 4);
                }
                for _ in 0..12 {
                    match next() % 3 {
                        0 => assert_eq!(shared.next_u32(), rng.next_u32()),
                        1 => assert_eq!(shared.next_u64(), rng.next_u64()),
                        _ => {
                            let n = (next() % 71) as usize;
                            let (mut ours, mut theirs) = (vec![0; n], vec![0; n]);
                            shared.fill_bytes(&mut ours);
                            rng.fill_bytes(&mut theirs);
                            assert_eq!(ours, theirs);
                        }
                    }
                }
            }
        }
    }

    /// What world 0.2.0 hands over with an event and what its WASI draws
    /// next are the stream, once, in order.
    #[test]
    fn the_carried_prefix_and_wasi_make_one_stream() {
        let entropy = Entropy::of(&Position {
            stream: "orders".into(),
            partition: 0,
            offset: 5,
        });
        let cells = EventCells::new(World::V0_2);
        cells.enter(&entropy, 0);
        let (a, b) = entropy.random_prefix();
        let mut seen = [a.to_le_bytes(), b.to_le_bytes()].concat();
        let mut wasi = cells.rng(Seed::WASI);
        let mut more = [0; 40];
        wasi.fill_bytes(&mut more);
        seen.extend_from_slice(&more);
        let mut whole = [0; 56];
        entropy.seed.rng(Seed::WASI).fill_bytes(&mut whole);
        assert_eq!(seen, whole);
    }
}
