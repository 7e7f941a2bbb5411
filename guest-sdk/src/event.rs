//! The input event handed to [`Processor::handle`](crate::Processor::handle).

use serde::Deserialize;

use crate::__private::WitEvent;
use crate::{Error, Result};

/// A record header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The header name.
    pub name: String,
    /// The value; Kafka allows a header without one.
    pub value: Option<Vec<u8>>,
}

/// One input event: where it came from, its key, payload and headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    stream: String,
    partition: i32,
    offset: i64,
    key: Option<Vec<u8>>,
    payload: Option<Vec<u8>>,
    headers: Vec<Header>,
    timestamp_ms: Option<i64>,
}

impl Event {
    pub(crate) fn from_wit(event: WitEvent) -> Self {
        Event {
            stream: event.stream,
            partition: event.partition,
            offset: event.offset,
            key: event.key,
            payload: event.payload,
            headers: event
                .headers
                .into_iter()
                .map(|h| Header {
                    name: h.name,
                    value: h.value,
                })
                .collect(),
            timestamp_ms: event.timestamp_ms,
        }
    }

    /// An event built by hand, for unit tests of processor logic.
    pub fn for_test(stream: &str, offset: i64, payload: Option<&[u8]>) -> Self {
        Event {
            stream: stream.to_owned(),
            partition: 0,
            offset,
            key: None,
            payload: payload.map(<[u8]>::to_vec),
            headers: Vec::new(),
            timestamp_ms: None,
        }
    }

    /// The stream (Kafka topic, or input file name) the event came from.
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// The partition within the stream.
    pub fn partition(&self) -> i32 {
        self.partition
    }

    /// The offset within the partition (the line number for files).
    pub fn offset(&self) -> i64 {
        self.offset
    }

    /// The key bytes, if the event has a key.
    pub fn key(&self) -> Option<&[u8]> {
        self.key.as_deref()
    }

    /// The key as UTF-8 text; a key that is not UTF-8 is invalid input.
    pub fn key_str(&self) -> Result<Option<&str>> {
        self.key
            .as_deref()
            .map(|k| std::str::from_utf8(k).map_err(|_| Error::invalid("key is not valid UTF-8")))
            .transpose()
    }

    /// The payload bytes; `None` is a tombstone.
    pub fn payload(&self) -> Option<&[u8]> {
        self.payload.as_deref()
    }

    /// Decodes the payload as JSON. A tombstone or a payload that does not
    /// decode is [`Error::InvalidInput`], so `?` dead-letters the event.
    ///
    /// `T` may borrow from the payload (`&str`, or `Cow<str>` with
    /// `#[serde(borrow)]` for strings that may hold escapes), which spares a
    /// copy of every string field.
    pub fn json<'a, T: Deserialize<'a>>(&'a self) -> Result<T> {
        let payload = self
            .payload
            .as_deref()
            .ok_or_else(|| Error::invalid("payload is empty (tombstone)"))?;
        // Checked as UTF-8 once, whole (word at a time while it is ASCII),
        // the payload's strings need no check of their own each; invalid
        // UTF-8 is parsed as bytes for serde_json's error with its position.
        match std::str::from_utf8(payload) {
            Ok(text) => serde_json::from_str(text),
            Err(_) => serde_json::from_slice(payload),
        }
        .map_err(|e| Error::invalid(format!("payload: {e}")))
    }

    /// Every header, in record order.
    pub fn headers(&self) -> &[Header] {
        &self.headers
    }

    /// The value of the first header with this name.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|h| h.name == name)
            .and_then(|h| h.value.as_deref())
    }

    /// The source's timestamp in milliseconds since the Unix epoch, if any.
    /// [`now_ms`](crate::now_ms) returns the same value (or 0).
    pub fn timestamp_ms(&self) -> Option<i64> {
        self.timestamp_ms
    }
}
