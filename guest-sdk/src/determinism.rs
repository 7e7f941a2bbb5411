//! Time and randomness, deterministic by construction.
//!
//! The host backs the WASI clocks with the current event's timestamp and WASI
//! randomness with a stream seeded from the event's identity (stream,
//! partition, offset). These helpers say so, and ask the host only when
//! they must: the timestamp and the stream's first 16 bytes come with the
//! event, and WASI's `random` goes on after them.

use std::cell::Cell;

/// Bytes of the random stream an event brings along.
const PREFIX: usize = 16;

thread_local! {
    static EVENT_TIME_MS: Cell<i64> = const { Cell::new(0) };
    /// The current event's first stream bytes; those before
    /// [`PREFIX_DRAWN`] are drawn already.
    static PREFIX_BYTES: Cell<[u8; PREFIX]> = const { Cell::new([0; PREFIX]) };
    static PREFIX_DRAWN: Cell<usize> = const { Cell::new(PREFIX) };
}

/// Starts an event: its time, and its stream's first bytes as the event
/// brought them (two little-endian words).
pub(crate) fn enter_event(ms: i64, (a, b): (u64, u64)) {
    EVENT_TIME_MS.set(ms);
    let mut bytes = [0; PREFIX];
    bytes[..8].copy_from_slice(&a.to_le_bytes());
    bytes[8..].copy_from_slice(&b.to_le_bytes());
    PREFIX_BYTES.set(bytes);
    PREFIX_DRAWN.set(0);
}

/// Starts `init`: time 0, and no bytes brought along (WASI's stream still
/// starts after them).
pub(crate) fn enter_init() {
    EVENT_TIME_MS.set(0);
    PREFIX_DRAWN.set(PREFIX);
}

/// The current event's timestamp in milliseconds since the Unix epoch (0 when
/// the source gave none, and during `init`). Never the wall clock: the host's
/// WASI clocks (`std::time::SystemTime::now()`) return the same instant,
/// this just does not ask the host for it.
pub fn now_ms() -> i64 {
    EVENT_TIME_MS.get()
}

/// Fills `buf` with the next bytes of this event's random stream: those the
/// event brought first, then WASI's.
fn fill(buf: &mut [u8]) {
    let drawn = PREFIX_DRAWN.get();
    let from_prefix = buf.len().min(PREFIX - drawn);
    if from_prefix > 0 {
        let bytes = PREFIX_BYTES.get();
        buf[..from_prefix].copy_from_slice(&bytes[drawn..drawn + from_prefix]);
        PREFIX_DRAWN.set(drawn + from_prefix);
    }
    // Then WASI's, a word at a time (the last one's unused bytes dropped),
    // so a draw takes the same words wherever its buffer lies.
    for chunk in buf[from_prefix..].chunks_mut(8) {
        // The host's generator never fails; a failure would mean the
        // component runs outside rewind, where determinism is not promised.
        let word = getrandom::u64().expect("the host provides randomness");
        chunk.copy_from_slice(&word.to_le_bytes()[..chunk.len()]);
    }
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
    let mut hex = Vec::with_capacity(2 * n);
    // Drawn a block at a time, on the stack; written as bytes (a `char`
    // pushed onto a `String` is encoded and checked one at a time).
    let mut block = [0; PREFIX];
    let mut left = n;
    while left > 0 {
        let bytes = &mut block[..left.min(PREFIX)];
        fill(bytes);
        for &b in &*bytes {
            hex.extend_from_slice(&[DIGITS[usize::from(b >> 4)], DIGITS[usize::from(b & 0xf)]]);
        }
        left -= bytes.len();
    }
    // SAFETY: hex digits are ASCII.
    unsafe { String::from_utf8_unchecked(hex) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Draws take the bytes the event brought, in order and once, across a
    /// draw that runs past their end; the next event starts them over, and
    /// `init` has none.
    #[test]
    fn draws_take_the_events_bytes_first_and_once() {
        let (a, b) = (0x0706_0504_0302_0100_u64, 0x0f0e_0d0c_0b0a_0908_u64);
        let prefix: Vec<u8> = (0..16).collect();
        enter_event(5, (a, b));
        assert_eq!(now_ms(), 5);
        assert_eq!(random_bytes(5), prefix[..5]);
        assert_eq!(random_u64().to_le_bytes(), prefix[5..13]);
        // Three bytes left: a longer draw starts with them.
        let past = random_bytes(10);
        assert_eq!(past[..3], prefix[13..]);
        // None left: the next draws come from elsewhere (WASI in the sandbox).
        assert_eq!(PREFIX_DRAWN.get(), PREFIX);
        enter_event(6, (a, b));
        assert_eq!(random_hex(2), "0001");
        enter_init();
        assert_eq!(now_ms(), 0);
        assert_eq!(PREFIX_DRAWN.get(), PREFIX);
    }
}
