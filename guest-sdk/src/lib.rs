//! Write rewind stream processors in Rust.
//!
//! A processor folds events into its own SQLite database. You implement
//! [`Processor`], export it with [`export!`], and build the crate for
//! `wasm32-wasip2`; the rewind host runs the resulting component sandboxed
//! and deterministic. You never touch WIT or the component model.
//!
//! Everything a processor can observe is deterministic: [`now_ms`] is the
//! current event's timestamp, [`random_bytes`] and SQL's `random()` are
//! streams seeded from the event's identity, and there is no filesystem,
//! network or environment. So the same module over the same events always
//! produces the same state, byte for byte.
//!
//! # Example
//!
//! A processor that counts events per key:
//!
//! ```
//! use rewind_guest::{Event, Processor, Result, sql};
//!
//! struct Counter;
//!
//! impl Processor for Counter {
//!     fn init() -> Result<()> {
//!         sql::execute(
//!             "CREATE TABLE IF NOT EXISTS counts (key TEXT PRIMARY KEY, n INTEGER NOT NULL)",
//!             &[],
//!         )?;
//!         Ok(())
//!     }
//!
//!     fn handle(event: Event) -> Result<()> {
//!         let key = event.key_str()?.unwrap_or("");
//!         sql::execute(
//!             "INSERT INTO counts (key, n) VALUES (?1, 1)
//!              ON CONFLICT (key) DO UPDATE SET n = n + 1",
//!             &[&key],
//!         )?;
//!         Ok(())
//!     }
//! }
//!
//! rewind_guest::export!(Counter);
//! # fn main() {
//! #     // Payload helpers work anywhere; SQL needs the host.
//! #     #[derive(serde::Deserialize)]
//! #     struct Order { order_id: String }
//! #     let event = rewind_guest::Event::for_test("orders", 7, Some(br#"{"order_id":"o-1"}"#));
//! #     let order: Order = event.json().unwrap();
//! #     assert_eq!(order.order_id, "o-1");
//! #     assert!(rewind_guest::Event::for_test("orders", 8, Some(b"{")).json::<Order>().is_err());
//! # }
//! ```
//!
//! Build it with `cargo build --release --target wasm32-wasip2` (or, inside
//! the rewind repository, `cargo xtask build-processors`) and run it with
//! `rewind run --processor counter.wasm --input events.jsonl --state counter.db`.
//!
//! # Features
//!
//! - `allocator` (on by default): a processor's small allocations come from
//!   size classes with free lists instead of the system allocator (dlmalloc),
//!   a few instructions each; turn it off to keep dlmalloc, or to install a
//!   global allocator of your own.
#![deny(missing_docs)]

#[cfg(any(test, all(target_arch = "wasm32", feature = "allocator")))]
mod alloc;
mod determinism;
mod error;
mod event;
mod json;
pub mod log;
mod output;
pub mod sql;
#[cfg(target_arch = "wasm32")]
mod sql_abi;

pub use determinism::{now_ms, random_bytes, random_hex, random_u64};

#[cfg(all(target_arch = "wasm32", feature = "allocator"))]
#[global_allocator]
static ALLOCATOR: alloc::Allocator = alloc::Allocator::new();
pub use error::{Error, Result};
pub use event::{Event, Header};
pub use output::{Output, emit, emit_json};

/// A stream processor: the logic rewind runs for every event.
///
/// Implement it on a unit struct and export it with [`export!`]. A processor
/// keeps no state in memory between events: everything lives in its database
/// (through [`sql`]), which is what makes replays and restarts exact.
pub trait Processor {
    /// Creates or migrates the schema. Runs in a transaction before the first
    /// event of every run, so it must be idempotent (`CREATE TABLE IF NOT EXISTS`).
    fn init() -> Result<()>;

    /// Applies one event. Return [`Error::InvalidInput`] for an event that can
    /// never be applied (it is dead-lettered and processing goes on); any
    /// other error is [`Error::Failed`]. Either way, every write the event made
    /// is rolled back and nothing it emitted is published.
    fn handle(event: Event) -> Result<()>;
}

/// Exports a [`Processor`] implementation as the component's entry points.
///
/// Use it exactly once, at the root of the processor crate:
///
/// ```no_run
/// # use rewind_guest::{Event, Processor, Result};
/// # struct Payments;
/// # impl Processor for Payments {
/// #     fn init() -> Result<()> { Ok(()) }
/// #     fn handle(_event: Event) -> Result<()> { Ok(()) }
/// # }
/// rewind_guest::export!(Payments);
/// # fn main() {}
/// ```
#[macro_export]
macro_rules! export {
    ($processor:ty) => {
        #[doc(hidden)]
        struct __RewindExport;

        impl $crate::__private::Guest for __RewindExport {
            fn init() -> ::core::result::Result<(), $crate::__private::WitError> {
                $crate::__private::run_init::<$processor>()
            }

            fn handle(
                event: $crate::__private::WitEvent,
            ) -> ::core::result::Result<(), $crate::__private::WitError> {
                $crate::__private::run_handle::<$processor>(event)
            }
        }

        $crate::__private::export_world!(__RewindExport with_types_in $crate::__private::bindings);
    };
}

/// Generated bindings and glue used by [`export!`]; not a public API.
#[doc(hidden)]
pub mod __private {
    // Generated code; its lowered signatures are not ours to shape.
    #[allow(clippy::too_many_arguments, missing_docs)]
    pub mod bindings {
        wit_bindgen::generate!({
            path: "../wit/processor-0.2.0",
            world: "rewind:processor/processor@0.2.0",
            pub_export_macro: true,
            export_macro_name: "__rewind_export_world",
            default_bindings_module: "rewind_guest::__private::bindings",
            // SQL parameters are passed borrowed, so binding a `&str` copies nothing.
            ownership: Borrowing { duplicate_if_necessary: true },
        });
    }

    pub use bindings::__rewind_export_world as export_world;
    pub use bindings::Guest;
    pub use bindings::rewind::processor::types::{Error as WitError, Event as WitEvent};

    use crate::{Event, Processor};

    #[allow(missing_docs)]
    pub fn run_init<P: Processor>() -> Result<(), WitError> {
        crate::determinism::enter_init();
        P::init().map_err(Into::into)
    }

    #[allow(missing_docs)]
    pub fn run_handle<P: Processor>(event: WitEvent) -> Result<(), WitError> {
        crate::determinism::enter_event(event.timestamp_ms.unwrap_or(0), event.random_prefix);
        P::handle(Event::from_wit(event)).map_err(Into::into)
    }
}
