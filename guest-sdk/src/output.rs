//! Output events: published if and only if the event's state change commits.

use serde::Serialize;

use crate::__private::bindings::rewind::processor::output::{OutputEvent, emit as wit_emit};
use crate::__private::bindings::rewind::processor::types::HeaderParam;
use crate::{Error, Result};

/// An output event under construction. Most processors only need [`emit`] or
/// [`emit_json`]; the builder adds headers and tombstones.
#[derive(Debug, Clone, Default)]
pub struct Output {
    stream: String,
    key: Option<Vec<u8>>,
    payload: Option<Vec<u8>>,
    headers: Vec<(String, Vec<u8>)>,
}

impl Output {
    /// An output on `stream` with no key, payload or headers.
    pub fn new(stream: impl Into<String>) -> Self {
        Output {
            stream: stream.into(),
            ..Output::default()
        }
    }

    /// Sets the key.
    pub fn key(mut self, key: impl Into<Vec<u8>>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Sets the payload; without one the output is a tombstone.
    pub fn payload(mut self, payload: impl Into<Vec<u8>>) -> Self {
        self.payload = Some(payload.into());
        self
    }

    /// Adds a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Queues the output in the host's outbox.
    pub fn emit(self) -> Result<()> {
        let headers: Vec<HeaderParam<'_>> = self
            .headers
            .iter()
            .map(|(name, value)| HeaderParam {
                name,
                value: Some(value),
            })
            .collect();
        send(
            &self.stream,
            self.key.as_deref(),
            self.payload.as_deref(),
            &headers,
        )
    }
}

fn send(
    stream: &str,
    key: Option<&[u8]>,
    payload: Option<&[u8]>,
    headers: &[HeaderParam<'_>],
) -> Result<()> {
    wit_emit(OutputEvent {
        stream,
        key,
        payload,
        headers,
    })
    .map_err(Error::Failed)
}

/// Emits `payload` on `stream` under `key`.
pub fn emit(stream: &str, key: impl AsRef<[u8]>, payload: impl AsRef<[u8]>) -> Result<()> {
    send(stream, Some(key.as_ref()), Some(payload.as_ref()), &[])
}

/// Emits `value` serialised as JSON on `stream` under `key`: byte for byte
/// what `serde_json::to_vec(value)` gives (compact, fields in declaration
/// order), written by a serialiser built for the sandbox.
pub fn emit_json<T: Serialize + ?Sized>(
    stream: &str,
    key: impl AsRef<[u8]>,
    value: &T,
) -> Result<()> {
    // One buffer serves every output of the instance: the host copies the
    // payload out during `emit`, so it is free again right after.
    thread_local! {
        static BUFFER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    BUFFER.with(|shared| {
        // A nested emit_json (from a `Serialize` impl) gets a buffer of its own.
        let mut own = Vec::new();
        let mut borrowed = shared.try_borrow_mut();
        let buffer = match borrowed.as_deref_mut() {
            Ok(buffer) => buffer,
            Err(_) => &mut own,
        };
        buffer.clear();
        encode(buffer, value)?;
        let sent = emit(stream, key, &*buffer);
        // A rare huge output does not stay allocated for the instance's life.
        if buffer.capacity() > 64 << 10 {
            *buffer = Vec::new();
        }
        sent
    })
}

/// Writes `value` into the empty `out` as JSON: the sandbox's writer, or
/// serde_json for what that leaves to it (see `json.rs`).
fn encode<T: Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) -> Result<()> {
    if !crate::json::write(out, value) {
        out.clear();
        serde_json::to_writer(&mut *out, value)
            .map_err(|e| Error::failed(format!("encode output: {e}")))?;
    }
    Ok(())
}
