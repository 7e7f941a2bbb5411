//! The processor world's host bindings: the one `bindgen!` in the host.

wasmtime::component::bindgen!({
    path: "../wit/processor-0.1.0",
    world: "rewind:processor/processor",
    imports: { default: trappable },
});

pub use rewind::processor::types::Header;
