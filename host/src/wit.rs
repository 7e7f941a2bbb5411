//! The processor world's host bindings: one `bindgen!` per world version
//! the host runs. The newest (0.2.0) is the host's own vocabulary; the
//! released 0.1.0 is kept for processors built against it ([`v0_1`]).

wasmtime::component::bindgen!({
    path: "../wit/processor-0.2.0",
    world: "rewind:processor/processor",
    imports: { default: trappable },
});

/// The released world 0.1.0: its imports are the newest's (the host links
/// the same functions under both names), its event lacks the random prefix.
pub mod v0_1 {
    wasmtime::component::bindgen!({
        path: "../wit/processor-0.1.0",
        world: "rewind:processor/processor",
        imports: { default: trappable },
    });
}

use std::mem::MaybeUninit;

use wasmtime::component::__internal::{
    CanonicalAbiInfo, InstanceType, InterfaceType, LowerContext,
};
use wasmtime::component::{ComponentType, Lower};
use wasmtime::{Result, ValRaw};

/// A version of the processor world the host runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum World {
    V0_1,
    V0_2,
}

impl World {
    /// Every version, newest first.
    pub const ALL: [World; 2] = [World::V0_2, World::V0_1];

    /// The version as WIT writes it.
    pub fn version(self) -> &'static str {
        match self {
            World::V0_1 => "0.1.0",
            World::V0_2 => "0.2.0",
        }
    }

    /// The full name of one of the world's interfaces in this version.
    pub fn interface(self, name: &str) -> String {
        format!("rewind:processor/{name}@{}", self.version())
    }

    /// Bytes of an event's random stream its `handle` is given with the
    /// event (and WASI's stream starts after).
    pub fn random_prefix(self) -> usize {
        match self {
            World::V0_1 => 0,
            World::V0_2 => 16,
        }
    }
}

impl std::fmt::Display for World {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "rewind:processor@{}", self.version())
    }
}

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
    pub headers: HeadersRef<'a>,
    #[component(name = "timestamp-ms")]
    pub timestamp_ms: Option<i64>,
    #[component(name = "random-prefix")]
    pub random_prefix: (u64, u64),
}

impl<'a> EventRef<'a> {
    /// The event as world 0.1.0 has it.
    pub fn v0_1(self) -> EventRefV0_1<'a> {
        EventRefV0_1 {
            stream: self.stream,
            partition: self.partition,
            offset: self.offset,
            key: self.key,
            payload: self.payload,
            headers: self.headers,
            timestamp_ms: self.timestamp_ms,
        }
    }
}

/// World 0.1.0's `event` record, borrowed: [`EventRef`] without the random
/// prefix.
#[derive(ComponentType, Lower)]
#[component(record)]
pub struct EventRefV0_1<'a> {
    pub stream: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<&'a [u8]>,
    pub payload: Option<&'a [u8]>,
    pub headers: HeadersRef<'a>,
    #[component(name = "timestamp-ms")]
    pub timestamp_ms: Option<i64>,
}

/// An event's headers, lowered as the world's `list<header>`, except that
/// an empty list is handed over without a call to the guest's `realloc`.
///
/// The canonical ABI asks a guest's `realloc` for the bytes of every list,
/// zero bytes included: a call into the guest (~400 instructions) for each
/// event without headers, which is most of them, for a pointer the guest
/// never reads. What the `realloc` of wit-bindgen's bindings (and
/// wasi-libc's) answers for zero bytes is the alignment itself: that is
/// the pointer the guest is given here, so it sees the same arguments.
#[derive(Clone, Copy)]
pub struct HeadersRef<'a>(pub &'a [HeaderRef<'a>]);

impl HeadersRef<'_> {
    /// The pointer of an empty list: its elements' alignment.
    const EMPTY: u32 = <HeaderRef<'static> as ComponentType>::ALIGN32;
}

// SAFETY: the canonical ABI of a list: a pointer and a length; the type
// check is the list's.
unsafe impl ComponentType for HeadersRef<'_> {
    type Lower = [ValRaw; 2];
    const ABI: CanonicalAbiInfo = CanonicalAbiInfo::POINTER_PAIR;

    fn typecheck(ty: &InterfaceType, types: &InstanceType<'_>) -> Result<()> {
        <[HeaderRef<'_>] as ComponentType>::typecheck(ty, types)
    }
}

// SAFETY: a non-empty list is lowered by wasmtime's own code; an empty one
// is a pointer and a length of zero, as wasmtime writes them.
unsafe impl Lower for HeadersRef<'_> {
    fn linear_lower_to_flat<U>(
        &self,
        cx: &mut LowerContext<'_, U>,
        ty: InterfaceType,
        dst: &mut MaybeUninit<[ValRaw; 2]>,
    ) -> Result<()> {
        if self.0.is_empty() {
            dst.write([ValRaw::i64(Self::EMPTY.into()), ValRaw::i64(0)]);
            return Ok(());
        }
        self.0.linear_lower_to_flat(cx, ty, dst)
    }

    fn linear_lower_to_memory<U>(
        &self,
        cx: &mut LowerContext<'_, U>,
        ty: InterfaceType,
        offset: usize,
    ) -> Result<()> {
        if self.0.is_empty() {
            *cx.get::<4>(offset) = Self::EMPTY.to_le_bytes();
            *cx.get::<4>(offset + 4) = 0u32.to_le_bytes();
            return Ok(());
        }
        self.0.linear_lower_to_memory(cx, ty, offset)
    }
}

/// The world's `header` record, borrowed.
#[derive(ComponentType, Lower)]
#[component(record)]
pub struct HeaderRef<'a> {
    pub name: &'a str,
    pub value: Option<&'a [u8]>,
}
