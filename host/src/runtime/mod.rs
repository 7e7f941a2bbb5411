//! The WebAssembly runtime: loading processors and calling them in a
//! deterministic sandbox.
//!
//! A processor runs in an [`Instance`] that is reused between events and
//! discarded when the caller says (at instance-epoch boundaries, which the
//! pipeline derives from the input alone) or when it traps. So what a guest
//! keeps in memory between events depends only on the input, never on batch
//! sizes, restarts or timing. `init` always runs in an instance of its own.

mod cache;
mod host;
mod output_args;
mod sandbox;
mod sql_args;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, ComponentExportIndex, Func, InstancePre, Linker, TypedFunc};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, PoolConcurrencyLimitError, PoolingAllocationConfig,
    Store, Trap,
};

pub use cache::default_dir as default_cache_dir;
pub use host::{HostFault, MAX_OUTPUTS_PER_EVENT};

use crate::event::{Entropy, Event, Output, Position};
use crate::state::{EventClock, StateDb};
use crate::wit::{self, World};
use host::{GuestLimiter, HostState, MemoryCapExceeded, SqlBudgetExhausted, SqlUnreplayable};
use sandbox::{Capture, EventCells};

/// Fuel per call unless configured: far more than any real event needs, and
/// still a fraction of a second for a runaway loop.
pub const DEFAULT_FUEL: u64 = 100_000_000;

/// Seconds one step of guest SQL may run unless configured: far longer than
/// any step of a real event (microseconds), long enough for the sort of a
/// large `CREATE INDEX` in a migration.
pub const DEFAULT_SQL_STALL_SECS: u64 = 60;
/// Memory cap per instance unless configured, in MiB.
pub const DEFAULT_MEMORY_MB: u64 = 64;
/// The native stack wasm may use: pinned (with the code compiled for the
/// architecture's baseline, see `Runtime::new`) so stack overflow happens at
/// the same call depth on every machine.
const MAX_WASM_STACK: usize = 512 * 1024;
/// The stack of a thread the host starts to run guests on (the binary's
/// commands, a replay's sides, a Kafka run's partitions): the guest's frames
/// (up to `MAX_WASM_STACK`) and the host's SQL below them share it. The
/// deepest guest running the deepest expression SQLite accepts needs between
/// 560 KiB and 1 MiB (the test
/// `the_deepest_guest_running_the_deepest_sql_fits_a_small_thread_stack`);
/// set rather than left to `RUST_MIN_STACK` or `ulimit -s`.
pub const GUEST_THREAD_STACK: usize = 4 << 20;
/// Bytes of each linear memory slot kept resident between instances.
const KEEP_RESIDENT: usize = 16 << 20;
/// Processor instances alive at once in one process unless configured: a run
/// holds one, a replay two, a Kafka run one per partition it is assigned.
/// Each slot reserves address space only (8 GiB: room for two memories of up
/// to 4 GiB each), never memory.
pub const DEFAULT_MAX_INSTANCES: u32 = 128;

/// How the runtime is set up: part of the host configuration that results
/// depend on (a larger fuel budget can turn a dead letter into a success).
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Fuel (wasm instructions, roughly) per call; the same budget also caps
    /// the SQLite VM steps of the call's SQL.
    pub fuel: u64,
    /// Linear memory cap per instance, in bytes.
    pub memory_bytes: usize,
    /// Where compiled components are cached; `None` disables the cache.
    pub cache_dir: Option<PathBuf>,
    /// Instances alive at once (the size of the instance pool).
    pub max_instances: u32,
    /// How long one step of the guest's SQL may run before the run stops
    /// (`state/stall.rs`); `None`: as long as it takes.
    pub sql_stall: Option<Duration>,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            fuel: DEFAULT_FUEL,
            memory_bytes: (DEFAULT_MEMORY_MB << 20) as usize,
            cache_dir: Some(default_cache_dir()),
            max_instances: DEFAULT_MAX_INSTANCES,
            sql_stall: Some(Duration::from_secs(DEFAULT_SQL_STALL_SECS)),
        }
    }
}

/// Why a module could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    #[error("processor {path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("processor {path}: not a WebAssembly file (no \\0asm header)")]
    NotWasm { path: PathBuf },
    #[error(
        "processor {path}: a core WebAssembly module, not a component; build it for \
         wasm32-wasip2 (or wrap it with `wasm-tools component new`)"
    )]
    CoreModule { path: PathBuf },
    #[error("processor {path}: invalid component: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("processor {path}: does not implement the rewind:processor world: {reason}")]
    WrongWorld { path: PathBuf, reason: String },
    #[error("cannot set up the WebAssembly engine: {0}")]
    Engine(String),
}

/// The environment variable that names a profiler for guest code.
const PROFILE_ENV: &str = "REWIND_PROFILE";

/// The profiler [`PROFILE_ENV`] asks for. `perfmap` writes
/// `/tmp/perf-PID.map`, which `perf report` reads to name the guest's
/// functions instead of showing bare addresses.
/// It changes nothing a guest can observe: the machine code is the same.
fn profiler_from_env() -> Result<Option<wasmtime::ProfilingStrategy>, LoadError> {
    let Some(value) = std::env::var_os(PROFILE_ENV) else {
        return Ok(None);
    };
    match value.to_str() {
        Some("") | Some("none") => Ok(None),
        Some("perfmap") => Ok(Some(wasmtime::ProfilingStrategy::PerfMap)),
        _ => Err(LoadError::Engine(format!(
            "{PROFILE_ENV}={}: unknown profiler (known: `perfmap`, which writes \
             /tmp/perf-PID.map for `perf report`); unset it to profile nothing",
            value.to_string_lossy()
        ))),
    }
}

/// How a module was loaded, for reporting cold versus warm starts.
#[derive(Debug, Clone)]
pub struct LoadStats {
    /// The version of the processor world it exports.
    pub world: World,
    /// Whether the component was compiled (cold) rather than loaded from the cache.
    pub compiled: bool,
    pub duration: Duration,
    /// Why the compiled component could not be cached, if it could not:
    /// every start then compiles it again.
    pub cache_error: Option<String>,
}

/// A processor version, compiled and linked, ready to instantiate.
pub struct Module {
    path: PathBuf,
    digest: String,
    pre: InstancePre<HostState>,
    /// The version of the processor world it exports.
    world: World,
    init: ComponentExportIndex,
    /// The `handle` export, called with a borrowed event.
    handle: ComponentExportIndex,
    stats: LoadStats,
}

impl std::fmt::Debug for Module {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Module")
            .field("path", &self.path)
            .field("digest", &self.digest)
            .field("world", &self.world)
            .finish()
    }
}

impl Module {
    /// `sha256:<hex>` of the component bytes: the processor version's identity.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn stats(&self) -> LoadStats {
        self.stats.clone()
    }

    /// The version of the processor world it was built against.
    pub fn world(&self) -> World {
        self.world
    }
}

/// Why a guest call did not apply its event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// `invalid-input`, `failed`, `trap`, `panic`, `fuel-exhausted`,
    /// `memory-limit`, `stack-overflow` or `sql-budget`.
    pub class: &'static str,
    pub message: String,
}

impl Rejection {
    /// Whether the host's error policy applies (everything but invalid input).
    pub fn is_failure(&self) -> bool {
        self.class != "invalid-input"
    }
}

/// What one guest call produced.
#[derive(Debug)]
pub struct CallOutcome {
    /// The outputs (when applied) or why not.
    pub result: Result<Vec<Output>, Rejection>,
    /// Lines the guest logged or printed.
    pub logs: Vec<String>,
}

/// The WebAssembly engine and the host functions guests link against.
pub struct Runtime {
    engine: Engine,
    linker: Linker<HostState>,
    config: RuntimeConfig,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("config", &self.config)
            .finish()
    }
}

impl Runtime {
    pub fn new(config: RuntimeConfig) -> Result<Runtime, LoadError> {
        let engine_err = |e: wasmtime::Error| LoadError::Engine(format!("{e:#}"));
        let mut wasm = Config::new();
        wasm.wasm_component_model(true)
            .consume_fuel(true)
            .cranelift_nan_canonicalization(true)
            .relaxed_simd_deterministic(true)
            .max_wasm_stack(MAX_WASM_STACK)
            .parallel_compilation(true);
        if let Some(profiler) = profiler_from_env()? {
            wasm.profiler(profiler);
        }
        // Naming the host's own triple turns off the CPU features wasmtime
        // would detect (AVX, BMI, …): every machine of an architecture then
        // runs the same machine code, so a guest's stack overflows at the
        // same call depth on each (and a compile cache can move between
        // them). Measured: 0.14% more instructions an event for payments.
        wasm.target(&target_lexicon::HOST.to_string())
            .map_err(engine_err)?;
        let mut pool = PoolingAllocationConfig::default();
        // A component is a few core instances (the processor, shims); each
        // of those may have a memory and a table.
        let max = config.max_instances.max(1);
        pool.total_component_instances(max)
            .total_core_instances(4 * max)
            .total_memories(2 * max)
            .total_tables(4 * max)
            .max_memory_size(config.memory_bytes)
            // A fresh instance per event must be cheap: keep the pages a
            // guest touched resident and reset only those (PAGEMAP_SCAN finds
            // them) instead of unmapping them and faulting them back in.
            .linear_memory_keep_resident(KEEP_RESIDENT)
            .table_keep_resident(1 << 20)
            .pagemap_scan(wasmtime::Enabled::Auto);
        wasm.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        // Threads stay off: wasmtime is built without its `threads` feature,
        // so shared memories and atomics-based waiting cannot be enabled.
        let engine = Engine::new(&wasm).map_err(engine_err)?;

        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(engine_err)?;
        sandbox::forbid_waiting(&mut linker).map_err(engine_err)?;
        // The world's imports, under every version's names: `types` (no
        // functions) through the bindings, `log` by hand, `sql` and `output`
        // (called for every event) lifted by hand.
        type Get = wasmtime::component::HasSelf<HostState>;
        wit::rewind::processor::types::add_to_linker::<_, Get>(&mut linker, |s| s)
            .and_then(|()| {
                wit::v0_1::rewind::processor::types::add_to_linker::<_, Get>(&mut linker, |s| s)
            })
            .and_then(|()| host::add_log_to_linker(&mut linker))
            .and_then(|()| sql_args::add_to_linker(&mut linker))
            .and_then(|()| output_args::add_to_linker(&mut linker))
            .map_err(engine_err)?;
        Ok(Runtime {
            engine,
            linker,
            config,
        })
    }

    pub fn config(&self) -> &RuntimeConfig {
        &self.config
    }

    /// Reads, validates, compiles (or loads from the cache) and links a processor.
    pub fn load(&self, path: &Path) -> Result<Module, LoadError> {
        let started = Instant::now();
        let bytes = std::fs::read(path).map_err(|source| LoadError::Read {
            path: path.to_owned(),
            source,
        })?;
        if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
            return Err(LoadError::NotWasm {
                path: path.to_owned(),
            });
        }
        // Core modules are version 1; components carry layer 1 in bytes 6..8.
        if bytes[4..8] == [1, 0, 0, 0] {
            return Err(LoadError::CoreModule {
                path: path.to_owned(),
            });
        }
        let digest_hex = hex::encode(Sha256::digest(&bytes));

        let cached = self
            .config
            .cache_dir
            .as_deref()
            .map(|dir| cache::entry(dir, &self.engine, &digest_hex));
        let mut cache_error = None;
        let (component, compiled) =
            match cached.as_deref().and_then(|p| cache::load(&self.engine, p)) {
                Some(component) => (component, false),
                None => {
                    let component = Component::from_binary(&self.engine, &bytes).map_err(|e| {
                        LoadError::Invalid {
                            path: path.to_owned(),
                            reason: format!("{e:#}"),
                        }
                    })?;
                    if let Some(entry) = &cached {
                        // A cache that cannot be written only costs the next
                        // start a compile: said, not fatal.
                        cache_error = cache::store(&component, entry)
                            .err()
                            .map(|e| format!("{}: {e}", entry.display()));
                    }
                    (component, true)
                }
            };

        let wrong_world = |e: wasmtime::Error| LoadError::WrongWorld {
            path: path.to_owned(),
            reason: format!("{e:#}"),
        };
        let instance_pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(wrong_world)?;
        // The newest version first; a module that exports none is
        // described by what the newest lacks.
        let world = match wit::ProcessorPre::new(instance_pre.clone()) {
            Ok(_) => World::V0_2,
            Err(newest) => match wit::v0_1::ProcessorPre::new(instance_pre.clone()) {
                Ok(_) => World::V0_1,
                Err(_) => return Err(wrong_world(newest)),
            },
        };
        // Present: `ProcessorPre::new` checked the world's exports.
        let export = |name: &str| {
            component
                .get_export(None, name)
                .map(|(_, index)| index)
                .ok_or_else(|| wrong_world(wasmtime::format_err!("no `{name}` export")))
        };
        let (init, handle) = (export("init")?, export("handle")?);
        Ok(Module {
            path: path.to_owned(),
            digest: format!("sha256:{digest_hex}"),
            pre: instance_pre,
            world,
            init,
            handle,
            stats: LoadStats {
                world,
                compiled,
                duration: started.elapsed(),
                cache_error,
            },
        })
    }

    /// A processor instance slot for `module`: it instantiates on first use
    /// and is reused until [`Instance::recycle`] or a trap.
    pub fn instance<'a>(&'a self, module: &'a Module) -> Instance<'a> {
        Instance {
            runtime: self,
            module,
            live: None,
        }
    }
}

/// A live instance: its store, its exports, and the cells its WASI reads.
struct Live {
    store: Store<HostState>,
    exports: Exports,
    capture: Capture,
    cells: EventCells,
}

/// The world's exports of a live instance, their types checked.
struct Exports {
    /// Takes nothing, returns [`Returned`].
    init: Func,
    /// Takes [`HandleParams`] (or [`HandleParamsV0_1`]), returns [`Returned`].
    handle: Func,
}

/// `handle`'s parameters as the host lowers them: the event borrowed.
type HandleParams<'a> = (wit::EventRef<'a>,);
/// The same in world 0.1.0.
type HandleParamsV0_1<'a> = (wit::EventRefV0_1<'a>,);
/// What `init` and `handle` return, in every world version (the `error`
/// variant is the same in each; component types check by structure).
type Returned = (Result<(), wit::Error>,);

/// Calls one processor version, reusing its instance between events.
///
/// Reuse is what makes calls cheap, and it is deterministic because the
/// caller decides, from the input alone, when an instance starts fresh (see
/// the pipeline's instance epochs). A trap always discards the instance.
pub struct Instance<'a> {
    runtime: &'a Runtime,
    module: &'a Module,
    live: Option<Live>,
}

impl std::fmt::Debug for Instance<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Instance")
            .field("module", &self.module.digest)
            .field("live", &self.live.is_some())
            .finish()
    }
}

impl Instance<'_> {
    /// Discards the live instance: the next call starts from a fresh one.
    pub fn recycle(&mut self) {
        self.live = None;
    }

    /// Hands back the emptied list of a call's outputs, for the next call
    /// to fill instead of allocating one.
    pub fn reuse_outputs(&mut self, mut outputs: Vec<Output>) {
        if let Some(live) = &mut self.live {
            let kept = &mut live.store.data_mut().outputs;
            if kept.capacity() == 0 {
                outputs.clear();
                *kept = outputs;
            }
        }
    }

    /// Runs the module's `init` in a fresh instance (the caller owns the transaction).
    pub fn init(&mut self, db: Box<StateDb>) -> (Box<StateDb>, Result<CallOutcome, HostFault>) {
        self.recycle();
        let outcome = self.call(
            db,
            &Position::init(),
            Entropy::init(),
            0,
            |exports, store| {
                // SAFETY: `instantiate` checked `init` against these types.
                let init = unsafe { TypedFunc::<(), Returned>::new_unchecked(exports.init) };
                init.call(store, ()).map(|(result,)| result)
            },
        );
        self.recycle();
        outcome
    }

    /// Runs the module's `handle` for one event (the caller owns the
    /// savepoint); `entropy` is the event's (see [`Entropy`]).
    pub fn handle(
        &mut self,
        db: Box<StateDb>,
        event: &Event,
        entropy: &Entropy,
    ) -> (Box<StateDb>, Result<CallOutcome, HostFault>) {
        let headers: Vec<wit::HeaderRef<'_>> = event
            .headers
            .iter()
            .map(|h| wit::HeaderRef {
                name: &h.name,
                value: h.value.as_deref(),
            })
            .collect();
        let arg = wit::EventRef {
            stream: &event.position.stream,
            partition: event.position.partition,
            offset: event.position.offset,
            key: event.key.as_deref(),
            payload: event.payload.as_deref(),
            headers: wit::HeadersRef(&headers),
            timestamp_ms: event.timestamp_ms,
            random_prefix: entropy.random_prefix(),
        };
        let world = self.module.world;
        self.call(
            db,
            &event.position,
            entropy,
            event.timestamp_ms.unwrap_or(0),
            |exports, store| {
                // SAFETY (both): `instantiate` checked `handle` against
                // these types; lifetimes are not part of a component type.
                let (result,) = match world {
                    World::V0_2 => unsafe {
                        TypedFunc::<HandleParams<'_>, Returned>::new_unchecked(exports.handle)
                    }
                    .call(store, (arg,))?,
                    World::V0_1 => unsafe {
                        TypedFunc::<HandleParamsV0_1<'_>, Returned>::new_unchecked(exports.handle)
                    }
                    .call(store, (arg.v0_1(),))?,
                };
                Ok(result)
            },
        )
    }

    fn instantiate(&self) -> wasmtime::Result<Live> {
        let capture = Capture::default();
        let cells = EventCells::new(self.module.world);
        let state = HostState {
            wasi: cells.wasi(&capture),
            table: Default::default(),
            limiter: GuestLimiter {
                memory_bytes: self.runtime.config.memory_bytes,
            },
            db: None,
            outputs: Vec::new(),
            output_bytes: 0,
            logs: Vec::new(),
            logs_dropped: 0,
        };
        let mut store = Store::new(&self.runtime.engine, state);
        store.limiter(|s| &mut s.limiter);
        // Instantiation runs start functions: it is bounded like a call.
        store.set_fuel(self.runtime.config.fuel)?;
        let instance = self.module.pre.instantiate(&mut store)?;
        let func = |store: &mut Store<HostState>, index, name| {
            instance
                .get_func(store, index)
                .ok_or_else(|| wasmtime::format_err!("the processor has no `{name}` function"))
        };
        let init = func(&mut store, self.module.init, "init")?;
        let handle = func(&mut store, self.module.handle, "handle")?;
        // Both are called unchecked: their types must be the exports'.
        init.typed::<(), Returned>(&store)?;
        match self.module.world {
            World::V0_2 => drop(handle.typed::<HandleParams<'static>, Returned>(&store)?),
            World::V0_1 => drop(handle.typed::<HandleParamsV0_1<'static>, Returned>(&store)?),
        }
        Ok(Live {
            store,
            exports: Exports { init, handle },
            capture,
            cells,
        })
    }

    fn call(
        &mut self,
        db: Box<StateDb>,
        position: &Position,
        entropy: &Entropy,
        timestamp_ms: i64,
        f: impl FnOnce(&Exports, &mut Store<HostState>) -> wasmtime::Result<Result<(), wit::Error>>,
    ) -> (Box<StateDb>, Result<CallOutcome, HostFault>) {
        let fuel = self.runtime.config.fuel;
        db.enter_event(position, entropy.seed, fuel);
        let clock = EventClock::enter(timestamp_ms);
        let mut db = Some(db);

        let live = match self.live.take() {
            Some(live) => Ok(live),
            None => self.instantiate(),
        };
        let (result, stderr, logs, live) = match live {
            Err(error) => (Err(error), Vec::new(), Vec::new(), None),
            Ok(mut live) => {
                live.cells.enter(entropy, timestamp_ms);
                // Outputs were taken after the last call; their byte count restarts.
                let data = live.store.data_mut();
                data.db = db.take();
                data.output_bytes = 0;
                let result = live
                    .store
                    .set_fuel(fuel)
                    .and_then(|()| f(&live.exports, &mut live.store));
                db = live.store.data_mut().db.take();
                let (logs, stderr) = collect_logs(&mut live);
                let outputs = std::mem::take(&mut live.store.data_mut().outputs);
                let result = result.map(|r| r.map(|()| outputs));
                (result, stderr, logs, Some(live))
            }
        };
        drop(clock);
        let db = db.expect("the state DB comes back from every call");
        db.leave_event();

        let result = match result {
            Ok(returned) => {
                self.live = live;
                returned.map_err(|error| match error {
                    wit::Error::InvalidInput(message) => Rejection {
                        class: "invalid-input",
                        message,
                    },
                    wit::Error::Failed(message) => Rejection {
                        class: "failed",
                        message,
                    },
                })
            }
            // A trapped instance cannot be entered again: `live` is dropped.
            Err(error) => match error.downcast::<HostFault>() {
                Ok(fault) => return (db, Err(fault)),
                // The pool is the host's: the event did nothing wrong.
                Err(error) if error.downcast_ref::<PoolConcurrencyLimitError>().is_some() => {
                    let max = self.runtime.config.max_instances;
                    return (
                        db,
                        Err(HostFault::Instances {
                            max,
                            error: format!("{error:#}"),
                        }),
                    );
                }
                Err(error) => Err(classify_trap(&error, &stderr, fuel)),
            },
        };
        (db, Ok(CallOutcome { result, logs }))
    }
}

fn level_name(level: crate::wit::rewind::processor::log::Level) -> &'static str {
    use crate::wit::rewind::processor::log::Level;
    match level {
        Level::Trace => "trace",
        Level::Debug => "debug",
        Level::Info => "info",
        Level::Warn => "warn",
        Level::Error => "error",
    }
}

/// Drains what the guest logged and printed during a call into log lines;
/// also returns its stderr, where a panic message would be.
fn collect_logs(live: &mut Live) -> (Vec<String>, Vec<u8>) {
    let stdout = live.capture.stdout.take();
    let stderr = live.capture.stderr.take();
    let data = live.store.data_mut();
    let silent = |(bytes, dropped): &(Vec<u8>, usize)| bytes.is_empty() && *dropped == 0;
    // The common case, a guest that said nothing, costs no formatting.
    if data.logs.is_empty() && data.logs_dropped == 0 && silent(&stdout) && silent(&stderr) {
        return (Vec::new(), Vec::new());
    }
    let mut logs: Vec<String> = data
        .logs
        .drain(..)
        .map(|l| format!("{}: {}", level_name(l.level), l.message))
        .collect();
    if data.logs_dropped > 0 {
        logs.push(format!(
            "({} more log lines dropped)",
            std::mem::take(&mut data.logs_dropped)
        ));
    }
    for (name, (bytes, dropped)) in [("stdout", &stdout), ("stderr", &stderr)] {
        logs.extend(
            String::from_utf8_lossy(bytes)
                .lines()
                .map(|l| format!("{name}: {l}")),
        );
        if *dropped > 0 {
            logs.push(format!("{name}: ({dropped} more bytes dropped)"));
        }
    }
    (logs, stderr.0)
}

/// Turns a trap into a dead-letter class and a message a person can act on.
fn classify_trap(error: &wasmtime::Error, stderr: &[u8], fuel: u64) -> Rejection {
    if let Some(cap) = error.downcast_ref::<MemoryCapExceeded>() {
        return Rejection {
            class: "memory-limit",
            message: format!("{cap}; raise --memory-mb if the processor legitimately needs more"),
        };
    }
    if let Some(budget) = error.downcast_ref::<SqlBudgetExhausted>() {
        return Rejection {
            class: "sql-budget",
            message: format!("{budget}; raise --fuel if the processor legitimately needs more"),
        };
    }
    if let Some(SqlUnreplayable(message)) = error.downcast_ref::<SqlUnreplayable>() {
        return Rejection {
            class: "nondeterministic-sql",
            message: message.clone(),
        };
    }
    match error.downcast_ref::<Trap>() {
        Some(Trap::OutOfFuel) => {
            return Rejection {
                class: "fuel-exhausted",
                message: format!(
                    "ran out of fuel ({fuel} units) in one event; raise --fuel if the processor \
                     legitimately needs more"
                ),
            };
        }
        Some(Trap::StackOverflow) => {
            return Rejection {
                class: "stack-overflow",
                message: "call stack exhausted (runaway recursion?)".to_owned(),
            };
        }
        _ => {}
    }
    let stderr = String::from_utf8_lossy(stderr);
    if let Some(at) = stderr.find("panicked at ") {
        // Rust prints "thread '…' panicked at FILE:LINE:COL:\nMESSAGE\nnote: …".
        let panic: Vec<&str> = stderr[at..]
            .lines()
            .take_while(|l| !l.starts_with("note:"))
            .collect();
        return Rejection {
            class: "panic",
            message: truncate(panic.join(" "), 2048),
        };
    }
    // Lead with the cause ("wasm trap: …"), then where it happened.
    let backtrace = error
        .downcast_ref::<wasmtime::WasmBacktrace>()
        .map(|bt| {
            let frames: Vec<String> = bt
                .to_string()
                .lines()
                .skip(1)
                .take(6)
                .map(str::trim)
                .map(str::to_owned)
                .collect();
            format!(" (at {})", frames.join(" < "))
        })
        .unwrap_or_default();
    Rejection {
        class: "trap",
        message: truncate(format!("{}{backtrace}", error.root_cause()), 2048),
    }
}

/// Cuts `text` to at most `max` bytes (on a character boundary), marking the cut.
fn truncate(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}
