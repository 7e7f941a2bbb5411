//! A processor of the released world `rewind:processor@0.1.0`, written
//! against that world's bindings alone: the SDK moved on to 0.2.0, and the
//! host still runs every released world. The tests hold it to that.
//!
//! It keeps every event it is handed (its identity, key and payload) with
//! the first eight bytes of the event's random stream, which in 0.1.0 are
//! WASI's first, logs a line, and emits the payload back on `echo`. The
//! payload `{"reject":true}` is invalid input.

/// The world's bindings (generated; their lowered signatures are not ours to shape).
#[allow(clippy::too_many_arguments)]
mod bindings {
    wit_bindgen::generate!({
        path: "../../wit/processor-0.1.0",
        world: "rewind:processor/processor@0.1.0",
    });
}

use bindings::rewind::processor::log::{self, Level};
use bindings::rewind::processor::output::{self, OutputEvent};
use bindings::rewind::processor::sql::{self, Value};
use bindings::rewind::processor::types::{Error, Event};
use bindings::{Guest, export};

struct Legacy;

impl Guest for Legacy {
    fn init() -> Result<(), Error> {
        sql::execute(
            "CREATE TABLE IF NOT EXISTS seen (
                stream TEXT NOT NULL, partition INTEGER NOT NULL, offset INTEGER NOT NULL,
                key BLOB, payload BLOB, random INTEGER NOT NULL,
                PRIMARY KEY (stream, partition, offset)) WITHOUT ROWID",
            &[],
        )
        .map_err(Error::Failed)?;
        Ok(())
    }

    fn handle(event: Event) -> Result<(), Error> {
        if event.payload.as_deref() == Some(br#"{"reject":true}"#) {
            return Err(Error::InvalidInput("rejected on request".into()));
        }
        let random = getrandom::u64().map_err(|e| Error::Failed(e.to_string()))?;
        let blob = |bytes: &Option<Vec<u8>>| bytes.clone().map_or(Value::Null, Value::Blob);
        sql::execute(
            "INSERT INTO seen VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            &[
                Value::Text(event.stream.clone()),
                Value::Integer(event.partition.into()),
                Value::Integer(event.offset),
                blob(&event.key),
                blob(&event.payload),
                Value::Integer(random as i64),
            ],
        )
        .map_err(Error::Failed)?;
        log::log(
            Level::Info,
            &format!("kept {}@{}", event.stream, event.offset),
        );
        output::emit(&OutputEvent {
            stream: "echo".into(),
            key: event.key,
            payload: event.payload,
            headers: Vec::new(),
        })
        .map_err(Error::Failed)
    }
}

export!(Legacy with_types_in bindings);
