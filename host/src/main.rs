//! The `rewind` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
mod cli;

/// mimalloc: a run and a replay allocate many small values on several
/// threads; it measured 20% faster than the system allocator for a replay.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use rewind_host::{
    DEFAULT_BATCH_MS, DEFAULT_BATCH_SIZE, DEFAULT_FUEL, DEFAULT_MAX_INSTANCES, DEFAULT_MEMORY_MB,
    DEFAULT_SQL_MEMORY_MB, DEFAULT_SQL_STALL_SECS,
};

/// What `rewind --help` says of the environment variables it reads.
const ENVIRONMENT: &str = "\
Environment:
  REWIND_CACHE_DIR  where compiled processors are cached when no --cache-dir is
                    given [default: $XDG_CACHE_HOME/rewind or ~/.cache/rewind]
  REWIND_PROFILE    `perfmap`: write /tmp/perf-PID.map, so that `perf report`
                    names a processor's own functions
  NO_COLOR          a replay's or diff's terminal summary without colour";

/// Runs WebAssembly stream processors over their own SQLite state,
/// deterministically: the same module, input and starting state always give
/// byte-identical state, outputs and dead letters.
#[derive(Parser)]
#[command(
    name = "rewind",
    version,
    propagate_version = true,
    after_help = ENVIRONMENT
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Process an input file with a processor into its state DB.
    ///
    /// Safe to stop at any point: running the same command again resumes after
    /// the last committed batch and applies nothing twice. Ctrl-C (or SIGTERM)
    /// commits what is done and exits with 130; a second Ctrl-C or kill -9 stops
    /// at once.
    Run(RunArgs),
    /// Show a state DB: module, tables and row counts, offsets, dead letters.
    Inspect {
        /// The state DB, or a Kafka run's state directory (every partition).
        #[arg(long, value_name = "DB|DIR")]
        state: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Work with dead letters: events that could not be processed.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Replay a tape with an old and a new processor version side by side
    /// and show exactly what the new version changes: rows, outputs, dead
    /// letters, and the events that caused each difference.
    ///
    /// Exit 0: no difference (or the differences equal the approved baseline
    /// given with --expect); 1: differences; 2: error; 130: interrupted
    /// (Ctrl-C or SIGTERM), with nothing reported and its scratch states
    /// removed.
    Replay(ReplayArgs),
    /// Compare two state DBs: schema, and rows added, removed and changed
    /// per table by primary key (host tables left out). Exit 0: equal; 1:
    /// different; 2: error.
    Diff {
        /// The old state DB (or state directory: partition by partition,
        /// one combined report).
        old: PathBuf,
        /// The new state DB (or state directory).
        new: PathBuf,
        #[command(flatten)]
        reports: Reports,
        /// Leave out a table, or a column of a table (TABLE or TABLE.COLUMN); repeatable.
        #[arg(long, value_name = "TABLE[.COLUMN]")]
        ignore: Vec<rewind_host::diff::Ignore>,
    },
    /// Replay a tape with the processor that recorded it (and the --fuel and
    /// --memory-mb it was recorded with) and check every event's result
    /// against the digests recorded live. Prints "identical", or the first
    /// mismatching seq and what differs (nondeterminism, or a tampered tape).
    /// Exit 0: identical; 1: mismatch; 2: error.
    Verify {
        /// The tape (recorded by `rewind run --tape`).
        #[arg(long, value_name = "TAPE")]
        tape: PathBuf,
        /// The processor that recorded it.
        #[arg(long, value_name = "WASM")]
        processor: PathBuf,
        /// Where compiled processors are cached [default: $REWIND_CACHE_DIR or ~/.cache/rewind].
        #[arg(long, value_name = "DIR")]
        cache_dir: Option<PathBuf>,
        /// Print nothing but the verdict and errors (no progress bar).
        #[arg(short, long)]
        quiet: bool,
    },
    /// Produce a kcat -J dump, bare JSONL or a tape to a Kafka topic, keys,
    /// headers and timestamps preserved. Records that cannot be decoded are
    /// reported (with their line) and never produced; exit 1 if any were
    /// skipped, unless --skip-invalid.
    Produce(ProduceArgs),
    /// Take a consistent copy of a state DB (with its offsets), even while a
    /// run is writing it: a starting point for `replay --from`.
    Snapshot {
        /// The state DB.
        #[arg(long, value_name = "DB")]
        state: PathBuf,
        /// The snapshot to create.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Work with tapes: recordings of every consumed input, in order.
    Tape {
        #[command(subcommand)]
        command: TapeCommand,
    },
}

/// Where to write reports, besides the terminal summary.
#[derive(Args)]
struct Reports {
    /// Write the JSON report (the contract for tools) here.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Write a Markdown report (for a pull-request comment) here.
    #[arg(long, value_name = "FILE")]
    markdown: Option<PathBuf>,
    /// Write a self-contained HTML report here.
    #[arg(long, value_name = "FILE")]
    html: Option<PathBuf>,
}

#[derive(Args)]
struct ProduceArgs {
    /// Kafka bootstrap servers.
    #[arg(long, default_value = "127.0.0.1:9092")]
    brokers: String,
    /// The topic to produce to.
    #[arg(long)]
    topic: String,
    /// The records: a kcat -J dump, bare JSONL (one payload per line) or a tape.
    #[arg(long, value_name = "FILE_OR_TAPE")]
    from: PathBuf,
    /// Send each record to the partition it came from (else its key decides).
    #[arg(long)]
    keep_partitions: bool,
    /// Exit 0 even if invalid records were skipped.
    #[arg(long)]
    skip_invalid: bool,
    /// A librdkafka setting, as kcat's -X; repeatable.
    #[arg(short = 'X', value_name = "KEY=VALUE")]
    settings: Vec<String>,
}

#[derive(Args)]
struct ReplayArgs {
    /// The tape to replay, or a Kafka run's tape directory (each
    /// partition-N.tape in turn, one combined report; its seqs are numbered
    /// tape after tape, positions stay exact). A JSONL input file is
    /// replayed too, read as `run` reads it.
    #[arg(long, value_name = "TAPE|DIR")]
    tape: PathBuf,
    /// The old processor version.
    #[arg(long, value_name = "WASM")]
    old: PathBuf,
    /// The new processor version.
    #[arg(long, value_name = "WASM")]
    new: PathBuf,
    /// Start both versions from a copy of this snapshot (see `rewind
    /// snapshot`) instead of an empty state; tape records it already
    /// consumed are skipped. With a tape directory, a state directory. A
    /// snapshot that neither version wrote is warned about.
    #[arg(long, value_name = "SNAPSHOT|DIR")]
    from: Option<PathBuf>,
    /// Stop after the event with this seq.
    #[arg(long, value_name = "SEQ")]
    until: Option<u64>,
    #[command(flatten)]
    reports: Reports,
    /// Leave out a table, or a column of a table (TABLE or TABLE.COLUMN); repeatable.
    #[arg(long, value_name = "TABLE[.COLUMN]")]
    ignore: Vec<rewind_host::diff::Ignore>,
    /// The approved baseline (a JSON report): exit 0 when the differences
    /// equal it, 1 when anything else changed.
    #[arg(long, value_name = "APPROVED.json")]
    expect: Option<PathBuf>,
    /// Write the current differences as the approved baseline (--expect).
    #[arg(long, requires = "expect")]
    accept: bool,
    /// Keep both versions' final state DBs in this directory (old.db, new.db).
    /// They are complete once the replay finishes: the sides write them
    /// without a journal on disk, so an interrupted replay may leave them
    /// unreadable (the next replay into DIR makes them afresh).
    #[arg(long, value_name = "DIR")]
    keep: Option<PathBuf>,
    /// Fuel per event (as for `run`) [default: what the tape was recorded
    /// with, so the old side reproduces the live run; else 100000000].
    #[arg(long)]
    fuel: Option<u64>,
    /// Linear memory cap per processor instance, in MiB (as for `run`)
    /// [default: what the tape was recorded with; else 64].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=4096))]
    memory_mb: Option<u64>,
    /// Stop when one step of the processor's SQL runs this many seconds
    /// (LIKE, GLOB, instr, replace and trim over large values run in a
    /// single step, which --fuel cannot meter); 0: never.
    #[arg(long, default_value_t = DEFAULT_SQL_STALL_SECS, value_name = "SECS")]
    sql_stall_secs: u64,
    /// The memory SQLite may hold in this process, in MiB: a statement of the
    /// processor's that needs more (a sort, or a row, keeping many large
    /// values at once) stops the run.
    #[arg(long, default_value_t = DEFAULT_SQL_MEMORY_MB, value_name = "MIB", value_parser = clap::value_parser!(u64).range(64..))]
    sql_memory_mb: u64,
    /// Processor instances alive at once (as for `run`); a replay uses two.
    #[arg(long, default_value_t = DEFAULT_MAX_INSTANCES, value_parser = clap::value_parser!(u32).range(2..))]
    max_instances: u32,
    /// Where compiled processors are cached [default: $REWIND_CACHE_DIR or ~/.cache/rewind].
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Print nothing but errors.
    #[arg(long, short)]
    quiet: bool,
}

#[derive(Subcommand)]
enum TapeCommand {
    /// Summarise a tape: events, stream partitions and offset ranges, runs.
    /// Reads (and checks) every frame.
    Info {
        /// The tape.
        tape: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Record a JSONL file (bare lines and/or kcat -J envelopes) onto a new
    /// tape, byte-exact, malformed lines included.
    Import {
        /// The JSONL file.
        file: PathBuf,
        /// The tape to create.
        #[arg(long, value_name = "TAPE")]
        out: PathBuf,
        /// Stream name for bare lines [default: the file's name].
        #[arg(long)]
        stream: Option<String>,
    },
    /// Write a tape's records as kcat -J JSONL, which `tape import` reads
    /// back identically (malformed records carry a `rewind-malformed` header).
    Export {
        /// The tape.
        tape: PathBuf,
        /// Write here instead of stdout.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum DlqCommand {
    /// List dead letters in consumption order.
    List {
        /// The state DB.
        #[arg(long, value_name = "DB")]
        state: PathBuf,
        /// Print JSON lines (with the raw bytes) instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct RunArgs {
    /// The processor: a WebAssembly component exporting rewind:processor/processor.
    #[arg(long, value_name = "WASM")]
    processor: PathBuf,
    /// Input: JSONL (bare JSON payloads and/or kcat -J envelopes, one per
    /// line), or a tape. `-` reads standard input (JSONL; bare lines get
    /// stream `stdin`).
    #[arg(
        long,
        value_name = "FILE",
        required_unless_present = "brokers",
        conflicts_with = "brokers"
    )]
    input: Option<PathBuf>,
    /// The processor's state DB (created if missing).
    #[arg(
        long,
        value_name = "DB",
        required_unless_present = "brokers",
        conflicts_with = "brokers"
    )]
    state: Option<PathBuf>,
    /// Consume from Kafka instead of a file: the bootstrap brokers (host:port,...).
    #[arg(long, value_name = "HOSTS", help_heading = "Kafka", requires_all = ["topic", "group", "state_dir"])]
    brokers: Option<String>,
    /// Input topic (repeat for several; they must be co-partitioned).
    #[arg(
        long,
        value_name = "TOPIC",
        help_heading = "Kafka",
        requires = "brokers"
    )]
    topic: Vec<String>,
    /// Consumer group.
    #[arg(
        long,
        value_name = "GROUP",
        help_heading = "Kafka",
        requires = "brokers"
    )]
    group: Option<String>,
    /// One state DB per input partition: DIR/partition-N.db. Processes of
    /// one group may share it on one machine.
    #[arg(long, value_name = "DIR", help_heading = "Kafka", requires = "brokers")]
    state_dir: Option<PathBuf>,
    /// Produce every output to this topic [default: the topic named by the
    /// output's stream].
    #[arg(
        long,
        value_name = "TOPIC",
        help_heading = "Kafka",
        requires = "brokers"
    )]
    output_topic: Option<String>,
    /// Also produce dead letters here, raw key and payload unchanged, with
    /// rewind.error.* and rewind.source.* headers.
    #[arg(
        long,
        value_name = "TOPIC",
        help_heading = "Kafka",
        requires = "brokers"
    )]
    dlq_topic: Option<String>,
    /// A librdkafka setting, as with kcat (repeatable): -X key=value.
    #[arg(
        short = 'X',
        value_name = "KEY=VALUE",
        help_heading = "Kafka",
        requires = "brokers"
    )]
    kafka_settings: Vec<String>,
    /// Exit once every assigned partition is consumed to its end (like kcat -e).
    #[arg(long, help_heading = "Kafka", requires = "brokers")]
    exit_at_end: bool,
    /// Write outputs here as kcat -J JSONL, exactly once per output.
    #[arg(long, value_name = "FILE", conflicts_with = "brokers")]
    output: Option<PathBuf>,
    /// Record every consumed input, with what the processor made of it,
    /// onto this tape (created if missing; a rerun continues it). With
    /// --brokers, a directory: one tape per input partition.
    #[arg(long, value_name = "TAPE")]
    tape: Option<PathBuf>,
    /// Stream name for bare lines [default: the input file's name].
    #[arg(long, conflicts_with = "brokers")]
    stream: Option<String>,
    /// Events per committed batch, rounded up to an instance epoch (256 events).
    #[arg(long, default_value_t = DEFAULT_BATCH_SIZE as u64, value_parser = clap::value_parser!(u64).range(1..))]
    batch_size: u64,
    /// Commit a batch after this many milliseconds even if it is not full (a Kafka
    /// run's batch may then end mid-epoch; the tape records where).
    #[arg(long, default_value_t = DEFAULT_BATCH_MS, value_name = "MS")]
    batch_ms: u64,
    /// What to do when the processor fails on an event (invalid input is always dead-lettered).
    #[arg(long, value_enum, default_value_t = OnError::Dlq)]
    on_error: OnError,
    /// Fuel per event: a deterministic bound on wasm instructions, and separately on SQLite VM steps.
    #[arg(long, default_value_t = DEFAULT_FUEL)]
    fuel: u64,
    /// Linear memory cap per processor instance, in MiB.
    #[arg(long, default_value_t = DEFAULT_MEMORY_MB, value_parser = clap::value_parser!(u64).range(1..=4096))]
    memory_mb: u64,
    /// Stop when one step of the processor's SQL runs this many seconds
    /// (LIKE, GLOB, instr, replace and trim over large values run in a
    /// single step, which --fuel cannot meter); 0: never.
    #[arg(long, default_value_t = DEFAULT_SQL_STALL_SECS, value_name = "SECS")]
    sql_stall_secs: u64,
    /// The memory SQLite may hold in this process, in MiB: a statement of the
    /// processor's that needs more (a sort, or a row, keeping many large
    /// values at once) stops the run.
    #[arg(long, default_value_t = DEFAULT_SQL_MEMORY_MB, value_name = "MIB", value_parser = clap::value_parser!(u64).range(64..))]
    sql_memory_mb: u64,
    /// Processor instances alive at once: a run uses one, a Kafka run one per
    /// partition it is assigned. Each reserves 8 GiB of address space (not
    /// memory): lower it where address space is limited (`ulimit -v`).
    #[arg(long, default_value_t = DEFAULT_MAX_INSTANCES, value_parser = clap::value_parser!(u32).range(1..))]
    max_instances: u32,
    /// Continue a state DB that another module version wrote.
    #[arg(long)]
    allow_module_change: bool,
    /// Skip events whose value of this header was seen before (re-produced data).
    #[arg(long, value_name = "NAME", default_value = "rewind-id")]
    dedup_header: String,
    /// Apply every event, even one whose dedup header was seen before.
    #[arg(long, conflicts_with = "dedup_header")]
    no_dedup: bool,
    /// Where compiled processors are cached [default: $REWIND_CACHE_DIR or ~/.cache/rewind].
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Do not cache compiled processors.
    #[arg(long, conflicts_with = "cache_dir")]
    no_cache: bool,
    /// Print nothing but errors.
    #[arg(long, short)]
    quiet: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum OnError {
    /// Dead-letter the event and go on.
    Dlq,
    /// Stop, keeping what the last batch commit kept; rerunning retries from there.
    Halt,
}

fn main() -> ExitCode {
    // Output piped into `head` and the like: end quietly when the reader
    // goes away, as Unix tools do, instead of failing on a broken pipe.
    // SAFETY: restoring a signal's default disposition before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    // Guest SQL stuck in one step beyond --sql-stall-secs ends the process
    // when an interrupt cannot stop it (see `state/stall.rs`).
    rewind_host::exit_when_stuck();
    // Commands run on a thread with a stack of known size: guests and their
    // SQL run on it, and the main thread's stack is whatever `ulimit -s` says.
    let result = std::thread::Builder::new()
        .name("rewind".into())
        .stack_size(rewind_host::GUEST_THREAD_STACK)
        .spawn(move || {
            let code = dispatch(cli.command)?;
            // What `print!` left in stdout's buffer: a failure to write it
            // is the command's error too.
            std::io::Write::flush(&mut std::io::stdout()).map_err(cli::stdout_error)?;
            Ok(code)
        })
        .map_err(anyhow::Error::from)
        .and_then(|thread| {
            thread
                .join()
                .map_err(|_| anyhow::anyhow!("the command panicked (a bug in rewind)"))?
        });
    // An interrupted replay or verify ends as its stop handler says, once
    // its scratch is gone (their runs fail as it goes: not their error).
    cli::wait_if_discarding();
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("rewind: error: {}", one_line(&error));
            ExitCode::from(2)
        }
    }
}

/// Runs one command.
fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    let ok = |r: anyhow::Result<()>| r.map(|()| ExitCode::SUCCESS);
    match command {
        Command::Run(args) => ok(cli::run::run(args)),
        Command::Inspect { state, json } => ok(cli::state::inspect(state, json)),
        Command::Dlq {
            command: DlqCommand::List { state, json },
        } => ok(cli::state::dlq_list(state, json)),
        Command::Tape { command } => ok(cli::tape::tape(command)),
        Command::Replay(args) => cli::compare::replay(args),
        Command::Produce(args) => cli::kafka::produce(args),
        Command::Diff {
            old,
            new,
            reports,
            ignore,
        } => cli::compare::diff(&old, &new, &reports, &ignore),
        Command::Verify {
            tape,
            processor,
            cache_dir,
            quiet,
        } => cli::compare::verify(&tape, &processor, cache_dir, quiet),
        Command::Snapshot { state, out } => ok(rewind_host::snapshot::snapshot(&state, &out)
            .map_err(anyhow::Error::from)
            .map(|()| {
                eprintln!(
                    "snapshot of {} written to {}",
                    state.display(),
                    out.display()
                )
            })),
    }
}

/// The error and its causes on one line, each cause once: most messages
/// already name their cause, which `{:#}` would print again.
fn one_line(error: &anyhow::Error) -> String {
    let mut line = error.to_string();
    for cause in error.chain().skip(1) {
        let cause = cause.to_string();
        // SQLite's own errors repeat rusqlite's message behind a code.
        let said = cause
            .strip_prefix("Error code ")
            .and_then(|rest| rest.split_once(": "))
            .map_or(cause.as_str(), |(_, message)| message);
        if !line.contains(said) {
            line.push_str(": ");
            line.push_str(&cause);
        }
    }
    line
}
