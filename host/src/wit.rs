//! The processor world's host bindings: the one `bindgen!` in the host.

wasmtime::component::bindgen!({
    path: "../wit/processor-0.1.0",
    world: "rewind:processor/processor",
    imports: { default: trappable },
});

use wasmtime::component::{ComponentType, Lower};

/// The world's `event` record, lowered from borrowed parts: a call hands the
/// guest the host's own event without first copying it into the bindings'
/// owned [`rewind::processor::types::Event`]. Checked against the export's
/// type when an instance is made (see `runtime`).
#[derive(ComponentType, Lower)]
#[component(record)]
pub struct EventRef<'a> {
    pub stream: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<&'a [u8]>,
    pub payload: Option<&'a [u8]>,
    pub headers: &'a [HeaderRef<'a>],
    #[component(name = "timestamp-ms")]
    pub timestamp_ms: Option<i64>,
}

/// The world's `header` record, borrowed.
#[derive(ComponentType, Lower)]
#[component(record)]
pub struct HeaderRef<'a> {
    pub name: &'a str,
    pub value: Option<&'a [u8]>,
}
