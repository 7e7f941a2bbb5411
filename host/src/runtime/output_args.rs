//! The `output` import linked by hand: an output event is lifted out of
//! guest memory in one pass, straight into the host's [`Output`].
//!
//! Through the bindings, `emit` lifted the stream name through a string view
//! and a copy, and each of key and payload through an option and a list, each
//! looking the guest's memory up again: ~1,400 instructions an output, ~370
//! lifted here (a payments run: -930 an event). As for `sql` (`sql_args.rs`), the type
//! checks defer to the bindings' own type, every pointer, length and case is
//! checked against guest memory, the stream name is read in the guest's string
//! encoding (checked, when UTF-8), and the
//! bytes count against wasmtime's per-call host-call fuel. Headers (which no
//! payments output has) and a record passed in memory rather than flat go
//! through the bindings' lifting.

use wasmtime::component::__internal::{InstanceType, InterfaceType, LiftContext};
use wasmtime::component::{ComponentType, Lift, Linker};
use wasmtime::{Result, StoreContextMut, ValRaw, bail};

use super::host::HostState;
use super::sql_args::{guest_bytes, guest_str};
use crate::event::{Header, Output};
use crate::wit::World;
use crate::wit::rewind::processor::output;

/// Links `output.emit` into `linker`, for every world version (the
/// interface is the same in each).
pub fn add_to_linker(linker: &mut Linker<HostState>) -> Result<()> {
    for world in World::ALL {
        linker.instance(&world.interface("output"))?.func_wrap(
            "emit",
            |mut store: StoreContextMut<'_, HostState>, (event,): (GuestOutput,)| {
                Ok((store.data_mut().emit(event.0),))
            },
        )?;
    }
    Ok(())
}

/// An output event, lifted from guest memory.
pub struct GuestOutput(Output);

/// The world's type for it, whose layout and checks [`GuestOutput`] keeps.
type Like = output::OutputEvent;

// SAFETY: the canonical ABI of the world's `output-event`, whose type check
// and layout this defers to; flat, it is ten values (see `lift_flat`).
unsafe impl ComponentType for GuestOutput {
    type Lower = [ValRaw; 10];
    const ABI: wasmtime::component::__internal::CanonicalAbiInfo = <Like as ComponentType>::ABI;

    fn typecheck(ty: &InterfaceType, types: &InstanceType<'_>) -> Result<()> {
        <Like as ComponentType>::typecheck(ty, types)
    }
}

const _: () = assert!(
    matches!(<Like as ComponentType>::ABI.flat_count, Some(10))
        && size_of::<<Like as ComponentType>::Lower>() == size_of::<[ValRaw; 10]>()
);

// SAFETY: reads only checked ranges of guest memory.
unsafe impl Lift for GuestOutput {
    fn linear_lift_from_flat(
        cx: &mut LiftContext<'_>,
        ty: InterfaceType,
        src: &Self::Lower,
    ) -> Result<Self> {
        lift_flat(cx, ty, src).map(GuestOutput)
    }

    fn linear_lift_from_memory(
        cx: &mut LiftContext<'_>,
        ty: InterfaceType,
        bytes: &[u8],
    ) -> Result<Self> {
        let event = <Like as Lift>::linear_lift_from_memory(cx, ty, bytes)?;
        Ok(GuestOutput(Output {
            stream: event.stream,
            key: event.key,
            payload: event.payload,
            headers: headers(event.headers),
        }))
    }
}

/// The record's flat values: the stream (pointer, length), key and payload
/// (case, pointer, length each) and the headers (pointer, length).
fn lift_flat(cx: &mut LiftContext<'_>, ty: InterfaceType, src: &[ValRaw; 10]) -> Result<Output> {
    let word = |i: usize| src[i].get_u32() as usize;
    let stream = guest_str(cx, cx.options().string_encoding, word(0), word(1))?.into_owned();
    let mut bytes = |at: usize| -> Result<Option<Vec<u8>>> {
        match src[at].get_u32() {
            0 => Ok(None),
            1 => Ok(Some(
                guest_bytes(cx, word(at + 1), word(at + 2), 1)?.to_vec(),
            )),
            other => bail!("invalid option discriminant {other} the guest passed"),
        }
    };
    let (key, payload) = (bytes(2)?, bytes(5)?);
    let headers = match word(9) {
        0 => Vec::new(),
        _ => {
            let InterfaceType::Record(record) = ty else {
                bail!("an output event is a record");
            };
            let field = cx.types[record].fields[3].ty;
            let list = [src[8], src[9]];
            headers(<Vec<output::Header> as Lift>::linear_lift_from_flat(
                cx, field, &list,
            )?)
        }
    };
    Ok(Output {
        stream,
        key,
        payload,
        headers,
    })
}

fn headers(headers: Vec<output::Header>) -> Vec<Header> {
    headers
        .into_iter()
        .map(|h| Header {
            name: h.name,
            value: h.value,
        })
        .collect()
}
