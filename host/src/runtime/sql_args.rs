//! The `sql` import linked by hand: a statement's text and parameters are
//! read where they lie in guest memory, checked, and bound from there.
//!
//! Through the bindings, every call lifted the text and each text or blob
//! parameter into a `String` or `Vec` of its own (an allocation and a free
//! apiece, and the guest memory looked up again for each), only for SQLite
//! to read them in place once; a first hand-written lift still copied them
//! into one buffer per call. Here the arguments' types check against the
//! world's as the bindings' do (`ComponentType::typecheck` defers to the
//! bindings' own types), every pointer and length is checked against guest
//! memory, every text is checked as UTF-8, and what a guest passes counts
//! against wasmtime's per-call host-call fuel, exactly as before.
//!
//! # Borrowing guest memory
//!
//! A lifted argument keeps a pointer into the guest's linear memory
//! ([`InMemory`]) rather than a copy. It is read only by [`run`], inside
//! the host call that lifted it: the guest is suspended in that call, its
//! memory is not shared (no threads), and nothing the call does reaches
//! the guest (SQLite reads the host's state DB; the guest is not entered,
//! so its memory can neither grow, which could move it, nor change). The
//! lifted types are private to this module, so nothing else can keep them
//! past the call.

use std::borrow::Cow;
use std::cell::RefCell;

use rusqlite::types::ValueRef;
use wasmtime::component::__internal::{
    CanonicalAbiInfo, ComponentVariant, InstanceType, InterfaceType, LiftContext, wasmtime_environ,
};
use wasmtime::component::{ComponentType, Lift, Linker};
use wasmtime::{Result, StoreContextMut, ValRaw, bail};
use wasmtime_environ::component::StringEncoding;

use super::host::{HostState, guest_result};
use crate::state::{GuestSqlError, StateDb};
use crate::wit::World;
use crate::wit::rewind::processor::sql;

/// Links `sql.execute` and `sql.query` into `linker`, for every world
/// version (the interface is the same in each).
pub fn add_to_linker(linker: &mut Linker<HostState>) -> Result<()> {
    for world in World::ALL {
        let mut sql = linker.instance(&world.interface("sql"))?;
        sql.func_wrap("execute", |store, args| {
            Ok((run(store, args, StateDb::guest_execute)?,))
        })?;
        sql.func_wrap("query", |store, args| {
            let rows = run(store, args, |db, statement, params| {
                db.guest_query(statement, params).map(super::host::to_rows)
            })?;
            Ok((rows,))
        })?;
    }
    Ok(())
}

/// Runs one guest statement with `f`: its result for the guest, or a trap.
/// Called only from the host function that lifted `statement` and `params`
/// (see the module's docs).
fn run<T>(
    mut store: StoreContextMut<'_, HostState>,
    (statement, params): (GuestStatement, GuestValues),
    f: impl FnOnce(&StateDb, &[u8], &[ValueRef<'_>]) -> std::result::Result<T, GuestSqlError>,
) -> Result<std::result::Result<T, String>> {
    let db = store.data_mut().db()?;
    // SAFETY: within the host call that lifted them (see the module's docs).
    let result = unsafe { params.with(|params| f(db, statement.0.bytes(), params)) };
    guest_result(result)
}

/// Bytes of guest memory, checked to be in bounds when lifted. Read only
/// within the host call that lifted them (see the module's docs).
#[derive(Clone, Copy)]
struct InMemory {
    ptr: *const u8,
    len: usize,
}

// SAFETY: a pointer into a store's guest memory, read only while that
// store's host call runs; the memory is not shared, so whichever thread
// reads it then reads what the guest passed and nothing writes it meanwhile.
// wasmtime requires lifted values to be `Send` and `Sync`.
unsafe impl Send for InMemory {}
// SAFETY: as for `Send`.
unsafe impl Sync for InMemory {}

impl InMemory {
    fn new(bytes: &[u8]) -> Self {
        InMemory {
            ptr: bytes.as_ptr(),
            len: bytes.len(),
        }
    }

    /// # Safety
    /// Only within the host call that lifted these bytes.
    unsafe fn bytes(&self) -> &[u8] {
        // SAFETY: in bounds of guest memory when lifted, which cannot have
        // moved or changed since (the caller's promise).
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

/// A text: where the guest passed it, or decoded from the guest's UTF-16
/// or Latin-1.
enum GuestText {
    InMemory(InMemory),
    Decoded(String),
}

impl GuestText {
    /// # Safety
    /// Only within the host call that lifted it.
    unsafe fn bytes(&self) -> &[u8] {
        match self {
            // SAFETY: the caller's promise.
            GuestText::InMemory(text) => unsafe { text.bytes() },
            GuestText::Decoded(text) => text.as_bytes(),
        }
    }
}

/// A statement's text, its bytes not checked as UTF-8 yet: the state DB
/// checks those of a statement it has not kept (kept ones are UTF-8, and
/// most calls repeat one; see `StateDb::guest_execute`).
struct GuestStatement(GuestText);

impl GuestStatement {
    fn lift(cx: &mut LiftContext<'_>, ptr: usize, len: usize) -> Result<GuestStatement> {
        if cx.options().string_encoding != StringEncoding::Utf8 {
            return Ok(GuestStatement(GuestText::Decoded(decoded(cx, ptr, len)?)));
        }
        let bytes = guest_bytes(cx, ptr, len, 1)?;
        Ok(GuestStatement(GuestText::InMemory(InMemory::new(bytes))))
    }
}

/// A text parameter: guest memory checked as UTF-8, or decoded from the
/// guest's other encoding.
#[inline(always)]
fn guest_text(
    cx: &mut LiftContext<'_>,
    encoding: StringEncoding,
    ptr: usize,
    len: usize,
) -> Result<GuestText> {
    Ok(match guest_str(cx, encoding, ptr, len)? {
        Cow::Borrowed(text) => GuestText::InMemory(InMemory::new(text.as_bytes())),
        Cow::Owned(text) => GuestText::Decoded(text),
    })
}

/// The parameters of a statement: numbers by value, texts and blobs where
/// the guest passed them.
struct GuestValues(Slots);

/// One parameter.
enum Slot {
    Null,
    Integer(i64),
    Real(f64),
    Text(GuestText),
    Blob(InMemory),
}

/// Parameters a statement is given without an allocation for them.
const ON_STACK: usize = 16;

impl GuestValues {
    /// Calls `f` with the parameters borrowed.
    ///
    /// # Safety
    /// Only within the host call that lifted them.
    unsafe fn with<R>(&self, f: impl FnOnce(&[ValueRef<'_>]) -> R) -> R {
        // SAFETY: the caller's promise.
        let value = |slot| unsafe { slot_value(slot) };
        let slots = &self.0.0;
        if slots.len() <= ON_STACK {
            let mut values = [ValueRef::Null; ON_STACK];
            for (to, slot) in values.iter_mut().zip(slots) {
                *to = value(slot);
            }
            f(&values[..slots.len()])
        } else {
            f(&slots.iter().map(value).collect::<Vec<_>>())
        }
    }
}

/// A parameter as SQLite binds it.
///
/// # Safety
/// Only within the host call that lifted it.
unsafe fn slot_value(slot: &Slot) -> ValueRef<'_> {
    match slot {
        Slot::Null => ValueRef::Null,
        Slot::Integer(i) => ValueRef::Integer(*i),
        Slot::Real(r) => ValueRef::Real(*r),
        // SAFETY: the caller's promise.
        Slot::Text(text) => ValueRef::Text(unsafe { text.bytes() }),
        // SAFETY: the caller's promise.
        Slot::Blob(blob) => ValueRef::Blob(unsafe { blob.bytes() }),
    }
}

/// Parameter slots, taken from a per-thread spare and given back when
/// dropped, so a call allocates nothing once a thread has made a few.
struct Slots(Vec<Slot>);

/// Spare slot lists kept per thread: the one of a call in flight, and room.
const SPARES: usize = 2;
/// A list that grew past this many slots is let go rather than kept.
const KEEP_SLOTS: usize = 1 << 12;

thread_local! {
    static SPARE: RefCell<Vec<Vec<Slot>>> = const { RefCell::new(Vec::new()) };
}

impl Slots {
    fn take() -> Slots {
        Slots(SPARE.with_borrow_mut(Vec::pop).unwrap_or_default())
    }
}

impl Drop for Slots {
    fn drop(&mut self) {
        if self.0.capacity() > KEEP_SLOTS {
            return;
        }
        let mut slots = std::mem::take(&mut self.0);
        slots.clear();
        // A thread being torn down has no spares to keep.
        let _ = SPARE.try_with(|s| {
            let mut s = s.borrow_mut();
            if s.len() < SPARES {
                s.push(slots);
            }
        });
    }
}

/// Guest memory's string at `ptr`, `len`, in the guest's `encoding`:
/// borrowed and checked when that is UTF-8, else decoded. Inlined into
/// each caller: called out of line, it cost ~250 instructions an event.
#[inline(always)]
pub(super) fn guest_str<'a>(
    cx: &mut LiftContext<'a>,
    encoding: StringEncoding,
    ptr: usize,
    len: usize,
) -> Result<Cow<'a, str>> {
    if encoding != StringEncoding::Utf8 {
        return decoded(cx, ptr, len).map(Cow::Owned);
    }
    let bytes = guest_bytes(cx, ptr, len, 1)?;
    // SQL, keys and stream names are ASCII as a rule: checked a word at a
    // time, that costs a third of a full UTF-8 check.
    let text = if bytes.is_ascii() {
        // SAFETY: ASCII is UTF-8.
        unsafe { std::str::from_utf8_unchecked(bytes) }
    } else {
        let Ok(text) = std::str::from_utf8(bytes) else {
            bail!("invalid utf-8 in a string the guest passed");
        };
        text
    };
    Ok(Cow::Borrowed(text))
}

/// A string in UTF-16 or Latin-1 (no Rust guest passes either), decoded by
/// wasmtime's own lift.
fn decoded(cx: &mut LiftContext<'_>, ptr: usize, len: usize) -> Result<String> {
    let flat = [ValRaw::u32(ptr as u32), ValRaw::u32(len as u32)];
    <String as Lift>::linear_lift_from_flat(cx, InterfaceType::String, &flat)
}

/// `len` bytes of guest memory at `ptr`, aligned to `align`, counted
/// against the call's host-call fuel.
pub(super) fn guest_bytes<'a>(
    cx: &mut LiftContext<'a>,
    ptr: usize,
    len: usize,
    align: usize,
) -> Result<&'a [u8]> {
    if !ptr.is_multiple_of(align) {
        bail!("pointer {ptr:#x} the guest passed is not aligned to {align}");
    }
    let memory = cx.memory();
    let Some(bytes) = ptr.checked_add(len).and_then(|end| memory.get(ptr..end)) else {
        bail!("pointer/length the guest passed out of bounds of memory");
    };
    cx.consume_fuel(len)?;
    Ok(bytes)
}

/// A pointer and a length, lowered flat.
fn flat_pair(src: &[ValRaw; 2]) -> (usize, usize) {
    (src[0].get_u32() as usize, src[1].get_u32() as usize)
}

/// A pointer and a length, stored in memory.
fn stored_pair(bytes: &[u8]) -> (usize, usize) {
    let word = |at: usize| {
        u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]) as usize
    };
    (word(0), word(4))
}

/// Implements lifting for `$lifted`, a type whose canonical ABI is the
/// pointer and length of `$like` (the bindings' type, which its type check
/// defers to), from its `lift(cx, ptr, len)`.
macro_rules! lift_pointer_pair {
    ($lifted:ty, $like:ty) => {
        // SAFETY: the canonical ABI of a string or list: a pointer and a length.
        unsafe impl ComponentType for $lifted {
            type Lower = [ValRaw; 2];
            const ABI: CanonicalAbiInfo = CanonicalAbiInfo::POINTER_PAIR;

            fn typecheck(ty: &InterfaceType, types: &InstanceType<'_>) -> Result<()> {
                <$like as ComponentType>::typecheck(ty, types)
            }
        }

        // SAFETY: reads only checked ranges of guest memory.
        unsafe impl Lift for $lifted {
            fn linear_lift_from_flat(
                cx: &mut LiftContext<'_>,
                _: InterfaceType,
                src: &Self::Lower,
            ) -> Result<Self> {
                let (ptr, len) = flat_pair(src);
                <$lifted>::lift(cx, ptr, len)
            }

            fn linear_lift_from_memory(
                cx: &mut LiftContext<'_>,
                _: InterfaceType,
                bytes: &[u8],
            ) -> Result<Self> {
                let (ptr, len) = stored_pair(bytes);
                <$lifted>::lift(cx, ptr, len)
            }
        }
    };
}

lift_pointer_pair!(GuestStatement, String);
lift_pointer_pair!(GuestValues, Vec<sql::Value>);

impl GuestValues {
    /// Lifts `len` values of the world's `value` variant stored at `ptr`.
    fn lift(cx: &mut LiftContext<'_>, ptr: usize, len: usize) -> Result<GuestValues> {
        // The layout is the bindings' own type's: a discriminant, then the
        // payload at its offset.
        let size = <sql::Value as ComponentType>::SIZE32;
        let align = <sql::Value as ComponentType>::ALIGN32 as usize;
        let payload = <sql::Value as ComponentVariant>::PAYLOAD_OFFSET32;
        let Some(bytes) = len.checked_mul(size) else {
            bail!("list pointer/length out of bounds of memory");
        };
        let elements = guest_bytes(cx, ptr, bytes, align)?;
        let mut slots = Slots::take();
        slots.0.reserve(len);
        let encoding = cx.options().string_encoding;
        for element in elements.chunks_exact(size) {
            let word = |at: usize| -> [u8; 8] {
                let mut w = [0; 8];
                w.copy_from_slice(&element[payload + at..payload + at + 8]);
                w
            };
            let slot = match element[0] {
                0 => Slot::Null,
                1 => Slot::Integer(i64::from_le_bytes(word(0))),
                2 => Slot::Real(f64::from_le_bytes(word(0))),
                3 => {
                    let (ptr, len) = stored_pair(&element[payload..payload + 8]);
                    Slot::Text(guest_text(cx, encoding, ptr, len)?)
                }
                4 => {
                    let (ptr, len) = stored_pair(&element[payload..payload + 8]);
                    Slot::Blob(InMemory::new(guest_bytes(cx, ptr, len, 1)?))
                }
                other => bail!("invalid variant discriminant {other} for a SQL value"),
            };
            slots.0.push(slot);
        }
        Ok(GuestValues(slots))
    }
}
