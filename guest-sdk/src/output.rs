//! Output events: published if and only if the event's state change commits.

use serde::Serialize;

use crate::__private::bindings::rewind::processor::output::{OutputEvent, emit as wit_emit};
use crate::__private::bindings::rewind::processor::types::Header as WitHeader;
use crate::{Error, Result};

/// An output event under construction. Most processors only need [`emit`] or
/// [`emit_json`]; the builder adds headers and tombstones.
#[derive(Debug, Clone)]
pub struct Output {
    event: OutputEvent,
}

impl Output {
    /// An output on `stream` with no key, payload or headers.
    pub fn new(stream: impl Into<String>) -> Self {
        Output {
            event: OutputEvent {
                stream: stream.into(),
                key: None,
                payload: None,
                headers: Vec::new(),
            },
        }
    }

    /// Sets the key.
    pub fn key(mut self, key: impl AsRef<[u8]>) -> Self {
        self.event.key = Some(key.as_ref().to_vec());
        self
    }

    /// Sets the payload; without one the output is a tombstone.
    pub fn payload(mut self, payload: impl AsRef<[u8]>) -> Self {
        self.event.payload = Some(payload.as_ref().to_vec());
        self
    }

    /// Adds a header.
    pub fn header(mut self, name: impl Into<String>, value: impl AsRef<[u8]>) -> Self {
        self.event.headers.push(WitHeader {
            name: name.into(),
            value: Some(value.as_ref().to_vec()),
        });
        self
    }

    /// Queues the output in the host's outbox.
    pub fn emit(self) -> Result<()> {
        wit_emit(&self.event).map_err(Error::Failed)
    }
}

/// Emits `payload` on `stream` under `key`.
pub fn emit(stream: &str, key: impl AsRef<[u8]>, payload: impl AsRef<[u8]>) -> Result<()> {
    Output::new(stream).key(key).payload(payload).emit()
}

/// Emits `value` serialised as JSON on `stream` under `key`.
pub fn emit_json<T: Serialize + ?Sized>(
    stream: &str,
    key: impl AsRef<[u8]>,
    value: &T,
) -> Result<()> {
    let payload =
        serde_json::to_vec(value).map_err(|e| Error::failed(format!("encode output: {e}")))?;
    emit(stream, key, payload)
}
