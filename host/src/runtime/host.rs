//! The host side of the processor world's imports: SQL, outputs, logging.

use rusqlite::types::Value as SqlValue;
use wasmtime::component::ResourceTable;
use wasmtime::{ResourceLimiter, Result, bail};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::event::Output;
use crate::state::{GuestSqlError, StateDb};
use crate::wit::rewind::processor::{log, sql, types};

/// Outputs one event may emit.
pub const MAX_OUTPUTS_PER_EVENT: usize = 10_000;
/// Output bytes (keys, payloads, headers) one event may emit.
pub const MAX_OUTPUT_BYTES_PER_EVENT: usize = 16 << 20;
/// Log lines kept per event; the rest are counted.
const MAX_LOG_LINES_PER_EVENT: usize = 100;
/// Bytes of one log line kept.
const MAX_LOG_LINE: usize = 4096;

/// Something outside the guest failed during a call: not the guest's fault,
/// so the run stops instead of dead-lettering the event.
#[derive(Debug, thiserror::Error)]
pub enum HostFault {
    /// The state DB failed underneath guest SQL.
    #[error("state DB failed during guest SQL: {0}")]
    State(#[source] rusqlite::Error),
    /// No instance could be made for the call: every slot of the instance
    /// pool is in use (a limit of this process, not of the guest).
    #[error(
        "no WebAssembly instance could be made ({error}): this process runs at most {max} \
         processor instances at once, one per partition a Kafka run is assigned; raise \
         --max-instances or run more processes in the consumer group"
    )]
    Instances { max: u32, error: String },
    /// One step of the guest's SQL ran for `seconds` (see `state/stall.rs`).
    #[error(
        "{}; fix the statement, or rerun with a larger --sql-stall-secs",
        crate::state::stalled_for(*seconds)
    )]
    SqlStalled { seconds: u64 },
    /// The guest's SQL needed more memory than SQLite may hold (see
    /// `state/memory.rs`).
    #[error(
        "it needed more than the {mib} MiB SQLite may hold (a sort, or a row, keeping many \
         large values at once); fix the statement, or rerun with a larger --sql-memory-mb"
    )]
    SqlMemory { mib: u64 },
}

/// The event used up its SQL budget.
#[derive(Debug, thiserror::Error)]
#[error("SQL ran more than {budget} SQLite VM steps in one event")]
pub struct SqlBudgetExhausted {
    pub budget: u64,
}

/// A guest statement stored what SQLite would follow up with values of its
/// process-wide random generator (see `StateDb::check_stored`).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SqlUnreplayable(pub String);

/// The guest tried to grow memory past its cap.
#[derive(Debug, thiserror::Error)]
#[error("memory limit exceeded: the guest asked for {desired} bytes, the cap is {cap} bytes")]
pub struct MemoryCapExceeded {
    pub desired: usize,
    pub cap: usize,
}

/// Caps guest memory and tables. Failing with an error (rather than
/// refusing the growth) turns the growth into a trap at that exact point,
/// so the failure is deterministic and its cause is clear.
pub struct GuestLimiter {
    pub memory_bytes: usize,
}

impl ResourceLimiter for GuestLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> Result<bool> {
        if desired > self.memory_bytes {
            return Err(wasmtime::Error::new(MemoryCapExceeded {
                desired,
                cap: self.memory_bytes,
            }));
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> Result<bool> {
        // Tables hold function references; a million is far beyond any real guest.
        Ok(desired <= 1_000_000)
    }
}

/// A line a guest logged.
pub struct LogLine {
    pub level: log::Level,
    pub message: String,
}

/// Everything a guest call can reach. Lives in the call's `Store`.
pub struct HostState {
    pub wasi: WasiCtx,
    pub table: ResourceTable,
    pub limiter: GuestLimiter,
    /// Lent by the caller for the length of one call.
    pub db: Option<Box<StateDb>>,
    pub outputs: Vec<Output>,
    pub output_bytes: usize,
    pub logs: Vec<LogLine>,
    pub logs_dropped: usize,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl types::Host for HostState {}

impl crate::wit::v0_1::rewind::processor::types::Host for HostState {}

fn from_sqlite(value: SqlValue) -> sql::Value {
    match value {
        SqlValue::Null => sql::Value::Null,
        SqlValue::Integer(i) => sql::Value::Integer(i),
        SqlValue::Real(r) => sql::Value::Real(r),
        SqlValue::Text(s) => sql::Value::Text(s),
        SqlValue::Blob(b) => sql::Value::Blob(b),
    }
}

/// Statement errors go back to the guest; budget exhaustion and database
/// failures stop the guest with a trap.
pub(super) fn guest_result<T>(result: Result<T, GuestSqlError>) -> Result<Result<T, String>> {
    match result {
        Ok(value) => Ok(Ok(value)),
        Err(GuestSqlError::Statement(message)) => Ok(Err(message)),
        Err(GuestSqlError::NotUtf8) => bail!("invalid utf-8 in a string the guest passed"),
        Err(GuestSqlError::BudgetExhausted { budget }) => {
            Err(wasmtime::Error::new(SqlBudgetExhausted { budget }))
        }
        Err(GuestSqlError::Host(error)) => Err(wasmtime::Error::new(HostFault::State(error))),
        Err(GuestSqlError::Stalled { limit }) => Err(wasmtime::Error::new(HostFault::SqlStalled {
            seconds: limit.as_secs(),
        })),
        Err(GuestSqlError::OutOfMemory { limit_mib }) => {
            Err(wasmtime::Error::new(HostFault::SqlMemory {
                mib: limit_mib,
            }))
        }
        Err(GuestSqlError::Unreplayable(message)) => {
            Err(wasmtime::Error::new(SqlUnreplayable(message)))
        }
    }
}

/// A guest query's rows in the world's terms.
pub(super) fn to_rows(rows: crate::state::GuestRows) -> sql::Rows {
    sql::Rows {
        columns: rows.columns,
        rows: rows
            .rows
            .into_iter()
            .map(|row| row.into_iter().map(from_sqlite).collect())
            .collect(),
    }
}

impl HostState {
    pub(super) fn db(&self) -> Result<&StateDb> {
        self.db
            .as_deref()
            .ok_or_else(|| wasmtime::Error::msg("guest SQL outside of a host call"))
    }

    /// Queues an output of the current event, unless it breaks a limit.
    pub(super) fn emit(&mut self, output: Output) -> Result<(), String> {
        if !valid_stream(&output.stream) {
            return Err(format!(
                "output stream {:?} is not a valid name: 1 to 249 characters of \
                 A-Z a-z 0-9 . _ - (it becomes a Kafka topic)",
                output.stream
            ));
        }
        if self.outputs.len() >= MAX_OUTPUTS_PER_EVENT {
            return Err(format!(
                "output limit: at most {MAX_OUTPUTS_PER_EVENT} outputs per event"
            ));
        }
        let size = output.stream.len()
            + output.key.as_ref().map_or(0, Vec::len)
            + output.payload.as_ref().map_or(0, Vec::len)
            + output
                .headers
                .iter()
                .map(|h| h.name.len() + h.value.as_ref().map_or(0, Vec::len))
                .sum::<usize>();
        if self.output_bytes + size > MAX_OUTPUT_BYTES_PER_EVENT {
            return Err(format!(
                "output limit: at most {MAX_OUTPUT_BYTES_PER_EVENT} bytes of outputs per event"
            ));
        }
        self.output_bytes += size;
        self.outputs.push(output);
        Ok(())
    }
}

impl log::Host for HostState {
    fn log(&mut self, level: log::Level, message: String) -> Result<()> {
        if self.logs.len() >= MAX_LOG_LINES_PER_EVENT {
            self.logs_dropped += 1;
            return Ok(());
        }
        let message = super::truncate(message, MAX_LOG_LINE);
        self.logs.push(LogLine { level, message });
        Ok(())
    }
}

/// Links `log.log` into `linker` for every world version (the interface
/// is the same in each; its `level` checks against each by structure).
pub(super) fn add_log_to_linker(linker: &mut wasmtime::component::Linker<HostState>) -> Result<()> {
    for world in crate::wit::World::ALL {
        linker.instance(&world.interface("log"))?.func_wrap(
            "log",
            |mut store: wasmtime::StoreContextMut<'_, HostState>,
             (level, message): (log::Level, String)| {
                log::Host::log(store.data_mut(), level, message)
            },
        )?;
    }
    Ok(())
}

/// Whether `stream` is a legal Kafka topic name, as output streams become
/// topics.
fn valid_stream(stream: &str) -> bool {
    (1..=249).contains(&stream.len())
        && stream
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}
