//! Time and randomness, deterministic by construction.
//!
//! The host backs the WASI clocks with the current event's timestamp and WASI
//! randomness with a stream seeded from the event's identity (stream,
//! partition, offset). These helpers are thin wrappers that say so.

use std::cell::Cell;

thread_local! {
    static EVENT_TIME_MS: Cell<i64> = const { Cell::new(0) };
}

/// Records the current event's time (0 during `init`).
pub(crate) fn set_event_time(ms: i64) {
    EVENT_TIME_MS.with(|t| t.set(ms));
}

/// The current event's timestamp in milliseconds since the Unix epoch (0 when
/// the source gave none, and during `init`). Never the wall clock: the host's
/// WASI clocks (`std::time::SystemTime::now()`) return the same instant,
/// this just does not ask the host for it.
pub fn now_ms() -> i64 {
    EVENT_TIME_MS.with(Cell::get)
}

/// Fills `buf` with the next bytes of this event's random stream.
fn fill(buf: &mut [u8]) {
    // The host's generator never fails; a failure would mean the component
    // runs outside rewind, where determinism is not promised anyway.
    getrandom::fill(buf).expect("the host provides randomness");
}

/// `n` bytes from this event's random stream: the same for every run and
/// every module version that processes the same event.
pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut buf = vec![0; n];
    fill(&mut buf);
    buf
}

/// A `u64` from this event's random stream.
pub fn random_u64() -> u64 {
    let mut buf = [0; 8];
    fill(&mut buf);
    u64::from_le_bytes(buf)
}

/// `n` random bytes from this event's stream, as lowercase hex.
pub fn random_hex(n: usize) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut hex = String::with_capacity(2 * n);
    for b in random_bytes(n) {
        hex.push(char::from(DIGITS[usize::from(b >> 4)]));
        hex.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    hex
}
