//! rewind's host: runs WebAssembly stream processors over their own SQLite
//! state, deterministically, fed from files.
//!
//! The data flow is `source` → `pipeline` (which calls the `runtime` for each
//! event inside a savepoint of the `state` DB) → `sink`. See ARCHITECTURE.md.

mod codec;
pub mod diff;
mod envelope;
mod event;
pub mod findings;
pub mod kafka;
mod pipeline;
mod printable;
pub mod produce;
pub mod replay;
pub mod report;
mod runtime;
mod sink;
pub mod snapshot;
mod source;
mod state;
mod tape;
pub mod verify;
mod wit;

pub use event::{Entropy, Event, Header, Output, Position, Seed};
pub use pipeline::{
    DEFAULT_BATCH_MS, DEFAULT_BATCH_SIZE, DLQ_STREAM, ErrorPolicy, EventRecord, INSTANCE_EPOCH,
    Progress, RunConfig, RunError, RunSummary, run,
};
pub use printable::{printable, printable_str};
pub use runtime::{
    CallOutcome, DEFAULT_FUEL, DEFAULT_MAX_INSTANCES, DEFAULT_MEMORY_MB, DEFAULT_SQL_STALL_SECS,
    GUEST_THREAD_STACK, HostFault, Instance, LoadError, LoadStats, Module, Rejection, Runtime,
    RuntimeConfig, default_cache_dir,
};
pub use sink::ID_HEADER;
pub use source::{FileSource, MAX_LINE, Record};
pub use state::{
    Change, ChangeLog, Checkpointer, DEFAULT_SQL_MEMORY_MB, DeadLetter, EventChanges,
    FORMAT as STATE_FORMAT, OutboxRow, StateDb, StateError, Summary, TableCount, db_files,
    exit_when_stuck, limit_sql_memory, remove_db_files,
};
pub use tape::{
    EventResult, Frame, OLDEST_TAPE_VERSION, Outcome, RunInfo, TAPE_VERSION, TapeError, TapeEvent,
    TapeMark, TapeReader, TapeWriter, is_tape, outputs_digest,
};
pub use wit::World;
/// Tape tools: `import`, `export`, `info`.
pub mod tapes {
    pub use crate::tape::{
        MALFORMED_HEADER, PartitionInfo, TapeInfo, TapeRun, ToolError, export, export_line, import,
        info, recorded_run, settings_flags,
    };
}
