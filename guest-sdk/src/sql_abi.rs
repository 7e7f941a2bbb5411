//! `sql.execute` called through the canonical ABI directly.
//!
//! The bindings lower a `list<value>` by allocating it on the heap, writing
//! each case there from an intermediate array, and freeing it after the
//! call. A processor's statements take a handful of parameters, converted
//! here from the [`ToSql`] values straight into their ABI layout on the
//! stack: no allocation and one pass. Everything else about `execute` (its
//! text, its result) is what the bindings do; the import's core signature
//! is checked against the world when the component is made, and every SQL
//! test runs through it.

use std::mem::MaybeUninit;

use crate::sql::{INLINE_PARAMS, ToSql, ValueRef};

/// A `value` as the canonical ABI lays it out in a list: 16 bytes aligned
/// to 8, the case in the first byte and its payload at offset 8 (an `s64`,
/// an `f64`, or a pointer and a length of 32 bits each).
#[repr(C, align(8))]
#[derive(Clone, Copy)]
struct Slot {
    case: u8,
    payload: u64,
}

const _: () = assert!(size_of::<Slot>() == 16 && align_of::<Slot>() == 8);

impl Slot {
    const NULL: Slot = Slot {
        case: 0,
        payload: 0,
    };

    fn of(value: ValueRef<'_>) -> Slot {
        // Pointers and lengths are 32 bits in wasm32 linear memory.
        let pair = |ptr: *const u8, len: usize| (ptr as usize as u64) | ((len as u64) << 32);
        match value {
            ValueRef::Null => Slot::NULL,
            ValueRef::Integer(i) => Slot {
                case: 1,
                payload: i as u64,
            },
            ValueRef::Real(r) => Slot {
                case: 2,
                payload: r.to_bits(),
            },
            ValueRef::Text(s) => Slot {
                case: 3,
                payload: pair(s.as_ptr(), s.len()),
            },
            ValueRef::Blob(b) => Slot {
                case: 4,
                payload: pair(b.as_ptr(), b.len()),
            },
        }
    }
}

/// Where the host writes `result<u64, string>`: the case in the first byte,
/// then the `u64`, or the string's pointer and length, at offset 8.
#[repr(C, align(8))]
struct Ret {
    case: u8,
    payload: u64,
}

#[link(wasm_import_module = "rewind:processor/sql@0.2.0")]
unsafe extern "C" {
    #[link_name = "execute"]
    fn import(
        statement: *const u8,
        statement_len: usize,
        params: *const Slot,
        params_len: usize,
        ret: *mut Ret,
    );
}

/// Runs `statement` with `params` through the host's `sql.execute`.
pub(crate) fn execute(statement: &str, params: &[&dyn ToSql]) -> Result<u64, String> {
    let mut inline = [const { MaybeUninit::<Slot>::uninit() }; INLINE_PARAMS];
    let heap: Vec<Slot>;
    let slots: &[Slot] = if params.len() <= INLINE_PARAMS {
        for (slot, param) in inline.iter_mut().zip(params) {
            slot.write(Slot::of(param.to_sql()));
        }
        // SAFETY: the first `params.len()` slots were written just now.
        unsafe { std::slice::from_raw_parts(inline.as_ptr().cast::<Slot>(), params.len()) }
    } else {
        heap = params.iter().map(|p| Slot::of(p.to_sql())).collect();
        &heap
    };
    let mut ret = Ret {
        case: 0,
        payload: 0,
    };
    // SAFETY: the pointers are to the statement, the slots and the values
    // they point at, all borrowed for the call and laid out as the ABI says
    // (above); the host writes only `ret`.
    unsafe {
        import(
            statement.as_ptr(),
            statement.len(),
            slots.as_ptr(),
            slots.len(),
            &mut ret,
        )
    };
    match ret.case {
        0 => Ok(ret.payload),
        _ => {
            let (ptr, len) = (ret.payload as u32 as usize, (ret.payload >> 32) as usize);
            // SAFETY: the host lowered the message through `cabi_realloc`
            // (the global allocator, alignment 1), handing it over to us, as
            // the bindings would take it.
            let bytes = unsafe { Vec::from_raw_parts(ptr as *mut u8, len, len) };
            Err(String::from_utf8(bytes)
                .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()))
        }
    }
}
