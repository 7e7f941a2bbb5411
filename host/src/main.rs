//! The `rewind` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rewind_host::{
    DEFAULT_FUEL, DEFAULT_MEMORY_MB, ErrorPolicy, Position, Progress, RunConfig, RuntimeConfig,
    StateDb, default_cache_dir,
};

/// Runs WebAssembly stream processors over their own SQLite state,
/// deterministically: the same module, input and starting state always give
/// byte-identical state, outputs and dead letters.
#[derive(Parser)]
#[command(name = "rewind", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Process an input file with a processor into its state DB.
    ///
    /// Safe to stop at any point: running the same command again resumes after
    /// the last committed batch and applies nothing twice. Ctrl-C commits what
    /// is done and exits with 130; a second Ctrl-C or kill -9 stops at once.
    Run(RunArgs),
    /// Show a state DB: module, tables and row counts, offsets, dead letters.
    Inspect {
        /// The state DB.
        #[arg(long, value_name = "DB")]
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
    /// given with --expect); 1: differences; 2: error.
    Replay(ReplayArgs),
    /// Compare two state DBs: schema, and rows added, removed and changed
    /// per table by primary key (host tables left out). Exit 0: equal; 1:
    /// different; 2: error.
    Diff {
        /// The old state DB.
        old: PathBuf,
        /// The new state DB.
        new: PathBuf,
        #[command(flatten)]
        reports: Reports,
        /// Leave out a table, or a column of a table (TABLE or TABLE.COLUMN); repeatable.
        #[arg(long, value_name = "TABLE[.COLUMN]")]
        ignore: Vec<rewind_host::diff::Ignore>,
    },
    /// Replay a tape with the processor that recorded it and check every
    /// event's result against the digests recorded live. Prints "identical",
    /// or the first mismatching seq and what differs (nondeterminism, or a
    /// tampered tape). Exit 0: identical; 1: mismatch; 2: error.
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
    },
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

impl Reports {
    fn any(&self) -> bool {
        self.json.is_some() || self.markdown.is_some() || self.html.is_some()
    }

    fn write(&self, report: &serde_json::Value) -> anyhow::Result<()> {
        if let Some(path) = &self.json {
            write_json(path, report)?;
        }
        let text = |path: &PathBuf, text: String| {
            std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
        };
        if let Some(path) = &self.markdown {
            text(path, rewind_host::report::markdown(report))?;
        }
        if let Some(path) = &self.html {
            text(path, rewind_host::report::html(report))?;
        }
        Ok(())
    }
}

#[derive(Args)]
struct ReplayArgs {
    /// The tape to replay.
    #[arg(long, value_name = "TAPE")]
    tape: PathBuf,
    /// The old processor version.
    #[arg(long, value_name = "WASM")]
    old: PathBuf,
    /// The new processor version.
    #[arg(long, value_name = "WASM")]
    new: PathBuf,
    /// Start both versions from a copy of this snapshot (see `rewind
    /// snapshot`) instead of an empty state; tape records it already
    /// consumed are skipped.
    #[arg(long, value_name = "SNAPSHOT")]
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
    #[arg(long, value_name = "DIR")]
    keep: Option<PathBuf>,
    /// Fuel per event (as for `run`).
    #[arg(long, default_value_t = DEFAULT_FUEL)]
    fuel: u64,
    /// Linear memory cap per processor instance, in MiB (as for `run`).
    #[arg(long, default_value_t = DEFAULT_MEMORY_MB, value_parser = clap::value_parser!(u64).range(1..=4096))]
    memory_mb: u64,
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
    /// line), or a tape.
    #[arg(long, value_name = "FILE")]
    input: PathBuf,
    /// The processor's state DB (created if missing).
    #[arg(long, value_name = "DB")]
    state: PathBuf,
    /// Write outputs here as kcat -J JSONL, exactly once per output.
    #[arg(long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// Record every consumed input, with what the processor made of it,
    /// onto this tape (created if missing; a rerun continues it).
    #[arg(long, value_name = "TAPE")]
    tape: Option<PathBuf>,
    /// Stream name for bare lines [default: the input file's name].
    #[arg(long)]
    stream: Option<String>,
    /// Events per committed batch, rounded up to an instance epoch (64 events).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    batch_size: u64,
    /// Commit a batch after this many milliseconds even if it is not full.
    #[arg(long, default_value_t = 500, value_name = "MS")]
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
    let cli = Cli::parse();
    let ok = |r: anyhow::Result<()>| r.map(|()| ExitCode::SUCCESS);
    let result = match cli.command {
        Command::Run(args) => ok(run(args)),
        Command::Inspect { state, json } => ok(inspect(state, json)),
        Command::Dlq {
            command: DlqCommand::List { state, json },
        } => ok(dlq_list(state, json)),
        Command::Tape { command } => ok(tape(command)),
        Command::Replay(args) => replay(args),
        Command::Diff {
            old,
            new,
            reports,
            ignore,
        } => diff(&old, &new, &reports, &ignore),
        Command::Verify {
            tape,
            processor,
            cache_dir,
        } => verify(&tape, &processor, cache_dir),
        Command::Snapshot { state, out } => ok(rewind_host::snapshot::snapshot(&state, &out)
            .map_err(anyhow::Error::from)
            .map(|()| {
                eprintln!(
                    "snapshot of {} written to {}",
                    state.display(),
                    out.display()
                )
            })),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("rewind: error: {error:#}");
            ExitCode::from(2)
        }
    }
}

/// Progress on stderr: a byte bar when the input size is known, events/s always.
struct Bar {
    bar: ProgressBar,
    quiet: bool,
    /// Set by the first Ctrl-C.
    stop: Arc<AtomicBool>,
}

impl Progress for Bar {
    fn start(&self, total_bytes: Option<u64>) {
        if let Some(total) = total_bytes {
            self.bar.set_length(total);
        }
    }

    fn advance(&self, bytes: u64, events: u64) {
        self.bar.set_position(bytes);
        let secs = self.bar.elapsed().as_secs_f64().max(1e-9);
        self.bar.set_message(format!(
            "{events} events, {:.0} events/s",
            events as f64 / secs
        ));
    }

    fn guest_log(&self, position: &Position, line: &str) {
        if !self.quiet {
            self.bar.println(format!("[guest {position}] {line}"));
        }
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }

    fn should_stop(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let mut config = RunConfig::new(&args.processor, &args.input, &args.state);
    config.output = args.output;
    config.tape = args.tape;
    config.stream = args.stream;
    config.batch_size = args.batch_size as usize;
    config.batch_time = Duration::from_millis(args.batch_ms);
    config.on_error = match args.on_error {
        OnError::Dlq => ErrorPolicy::Dlq,
        OnError::Halt => ErrorPolicy::Halt,
    };
    config.allow_module_change = args.allow_module_change;
    config.dedup_header = (!args.no_dedup).then_some(args.dedup_header);
    config.runtime = RuntimeConfig {
        fuel: args.fuel,
        memory_bytes: (args.memory_mb << 20) as usize,
        cache_dir: if args.no_cache {
            None
        } else {
            Some(args.cache_dir.unwrap_or_else(default_cache_dir))
        },
    };

    let target = if args.quiet {
        ProgressDrawTarget::hidden()
    } else {
        ProgressDrawTarget::stderr()
    };
    let bar = ProgressBar::with_draw_target(None, target);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {msg}",
        )
        .expect("the template is valid"),
    );
    // The first Ctrl-C stops at the next epoch boundary, committed; a second
    // one exits at once, which is safe too (the state DB is crash-safe).
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::Relaxed) {
            std::process::exit(130);
        }
    })
    .context("cannot install the Ctrl-C handler")?;
    let progress = Bar {
        bar,
        quiet: args.quiet,
        stop,
    };
    let summary = rewind_host::run(&config, &progress)?;
    if summary.interrupted {
        eprintln!(
            "interrupted after {} events; everything processed is committed: \
             run the same command to continue",
            summary.consumed
        );
        std::process::exit(130);
    }
    if !args.quiet {
        let secs = summary.elapsed.as_secs_f64();
        eprintln!(
            "processed {} events in {:.2}s ({:.0} events/s): {} applied, {} dead-lettered, {} outputs; \
             {} duplicates skipped, {} already consumed earlier",
            summary.consumed,
            secs,
            summary.consumed as f64 / secs.max(1e-9),
            summary.applied,
            summary.dead_lettered,
            summary.outputs,
            summary.duplicates,
            summary.skipped,
        );
        eprintln!(
            "module {} ({} in {:.0} ms)",
            summary.module_digest,
            if summary.load.compiled {
                "compiled"
            } else {
                "loaded from cache"
            },
            summary.load.duration.as_secs_f64() * 1000.0,
        );
    }
    Ok(())
}

fn inspect(state: PathBuf, json: bool) -> anyhow::Result<()> {
    let db = StateDb::open_existing(&state)?;
    let summary = db.summary()?;
    if json {
        let value = serde_json::json!({
            "state": state,
            "module_digest": summary.module_digest,
            "consumed": summary.consumed,
            "tables": summary.tables.iter().map(|t| serde_json::json!({"name": t.name, "rows": t.rows})).collect::<Vec<_>>(),
            "offsets": summary.offsets.iter().map(|(s, p, o)| serde_json::json!({"stream": s, "partition": p, "next_offset": o})).collect::<Vec<_>>(),
            "dead_letters": summary.dead_letters,
            "outbox_pending": summary.outbox_pending,
            "event_ids": summary.event_ids,
            "outputs_delivered": summary.outputs_delivered,
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    println!("state         {}", state.display());
    println!(
        "module        {}",
        summary.module_digest.as_deref().unwrap_or("(none yet)")
    );
    println!("consumed      {} records", summary.consumed);
    let width = summary
        .tables
        .iter()
        .map(|t| t.name.len())
        .max()
        .unwrap_or(0);
    for (i, table) in summary.tables.iter().enumerate() {
        let label = if i == 0 { "tables" } else { "" };
        println!("{label:<13} {:<width$}  {} rows", table.name, table.rows);
    }
    if summary.tables.is_empty() {
        println!("tables        (none)");
    }
    for (i, (stream, partition, next)) in summary.offsets.iter().enumerate() {
        let label = if i == 0 { "offsets" } else { "" };
        println!("{label:<13} {stream}/{partition}  next offset {next}");
    }
    println!("dead letters  {}", summary.dead_letters);
    println!(
        "outbox        {} pending, {} delivered",
        summary.outbox_pending, summary.outputs_delivered
    );
    println!(
        "event ids     {} remembered for deduplication",
        summary.event_ids
    );
    Ok(())
}

fn dlq_list(state: PathBuf, json: bool) -> anyhow::Result<()> {
    let db = StateDb::open_existing(&state)?;
    let letters = db
        .dead_letters()
        .with_context(|| format!("reading dead letters of {}", state.display()))?;
    if json {
        for dl in &letters {
            let text =
                |b: &Option<Vec<u8>>| b.as_ref().map(|b| String::from_utf8_lossy(b).into_owned());
            let line = serde_json::json!({
                "seq": dl.seq,
                "stream": dl.position.stream,
                "partition": dl.position.partition,
                "offset": dl.position.offset,
                "module_digest": dl.module_digest,
                "error_class": dl.error_class,
                "message": dl.message,
                "key": text(&dl.key),
                "payload": text(&dl.payload),
                "timestamp_ms": dl.timestamp_ms,
                "raw_hex": hex::encode(&dl.raw),
            });
            println!("{line}");
        }
        return Ok(());
    }
    if letters.is_empty() {
        println!("no dead letters in {}", state.display());
        return Ok(());
    }
    println!("{:>6}  {:<24} {:<15} message", "seq", "position", "class");
    for dl in &letters {
        let raw = String::from_utf8_lossy(&dl.raw);
        let raw: String = raw.chars().take(60).collect();
        println!(
            "{:>6}  {:<24} {:<15} {}",
            dl.seq,
            dl.position.to_string(),
            dl.error_class,
            dl.message
        );
        println!("{:>6}  {:<24} {:<15} raw: {raw}", "", "", "");
    }
    println!("{} dead letters", letters.len());
    Ok(())
}

fn tape(command: TapeCommand) -> anyhow::Result<()> {
    use rewind_host::tapes;
    match command {
        TapeCommand::Info { tape, json } => {
            let info = tapes::info(&tape)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&info)?);
                return Ok(());
            }
            println!("tape          {}", tape.display());
            println!("bytes         {}", info.bytes);
            match info.seqs {
                Some((first, last)) => {
                    println!("events        {} (seq {first}..={last})", info.events)
                }
                None => println!("events        0"),
            }
            println!("malformed     {}", info.malformed);
            println!("with results  {}", info.with_results);
            for (i, p) in info.partitions.iter().enumerate() {
                println!(
                    "{}{}/{}  {} events, offsets {}..={}",
                    if i == 0 {
                        "partitions    "
                    } else {
                        "              "
                    },
                    p.stream,
                    p.partition,
                    p.events,
                    p.first_offset,
                    p.last_offset
                );
            }
            if info.runs.is_empty() {
                println!("runs          none (imported)");
            }
            for (i, r) in info.runs.iter().enumerate() {
                println!(
                    "{}from seq {}: module {}, {} events",
                    if i == 0 {
                        "runs          "
                    } else {
                        "              "
                    },
                    r.first_seq,
                    r.module_digest,
                    r.events
                );
            }
            Ok(())
        }
        TapeCommand::Import { file, out, stream } => {
            let n = tapes::import(&file, &out, stream.as_deref())?;
            eprintln!("recorded {n} records onto {}", out.display());
            Ok(())
        }
        TapeCommand::Export { tape, out } => {
            let n = match &out {
                Some(path) => {
                    let file = std::fs::File::create_new(path)
                        .with_context(|| format!("cannot create {}", path.display()))?;
                    let mut w = std::io::BufWriter::new(file);
                    tapes::export(&tape, &mut w, path)?
                }
                None => {
                    let stdout = std::io::stdout();
                    let mut w = std::io::BufWriter::new(stdout.lock());
                    tapes::export(&tape, &mut w, std::path::Path::new("stdout"))?
                }
            };
            if out.is_some() {
                eprintln!("exported {n} records");
            }
            Ok(())
        }
    }
}

/// Colour on a terminal, unless NO_COLOR is set.
fn color() -> bool {
    use std::io::IsTerminal;
    std::env::var_os("NO_COLOR").is_none() && std::io::stdout().is_terminal()
}

fn write_json(path: &std::path::Path, report: &serde_json::Value) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(report)? + "\n";
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

fn replay(args: ReplayArgs) -> anyhow::Result<ExitCode> {
    use rewind_host::replay::{ReplayConfig, ReplayProgress};
    struct Counter(ProgressBar);
    impl ReplayProgress for Counter {
        fn start(&self, tape_bytes: Option<u64>) {
            if let Some(total) = tape_bytes {
                self.0.set_length(total);
            }
        }
        fn read(&self, bytes: u64) {
            self.0.set_position(bytes);
        }
        fn compared(&self, events: u64) {
            self.0.set_message(format!("{events} events compared"));
        }
    }
    let work_dir = match &args.keep {
        Some(dir) => dir.clone(),
        None => std::env::temp_dir().join(format!("rewind-replay-{}", std::process::id())),
    };
    let config = ReplayConfig {
        tape: args.tape.clone(),
        old: args.old.clone(),
        new: args.new.clone(),
        from: args.from.clone(),
        until: args.until,
        ignore: args.ignore.clone(),
        runtime: RuntimeConfig {
            fuel: args.fuel,
            memory_bytes: (args.memory_mb << 20) as usize,
            cache_dir: Some(args.cache_dir.clone().unwrap_or_else(default_cache_dir)),
        },
        work_dir: work_dir.clone(),
    };
    let bar = ProgressBar::with_draw_target(
        None,
        if args.quiet {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        },
    );
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} of the tape, {msg}",
        )
        .expect("the template is valid"),
    );
    let replayed = rewind_host::replay::replay(&config, &Counter(bar.clone()));
    bar.finish_and_clear();
    if args.keep.is_none() {
        let _ = std::fs::remove_dir_all(&work_dir);
    }
    let replayed = replayed?;
    use rewind_host::report::Rows;
    let (old, new) = (
        args.old.display().to_string(),
        args.new.display().to_string(),
    );
    // The whole report only for files and the gate; the terminal needs a few rows.
    let full = (args.reports.any() || args.expect.is_some())
        .then(|| rewind_host::report::replay_json(&replayed, &old, &new, Rows::All));
    if let Some(report) = &full {
        args.reports.write(report)?;
    }
    if !args.quiet {
        let brief = rewind_host::report::replay_json(&replayed, &old, &new, Rows::First(5));
        print!("{}", rewind_host::report::summary_text(&brief, color()));
        if let Some(dir) = &args.keep {
            println!("states kept: {}", dir.display());
        }
    }
    let report = full.unwrap_or(serde_json::Value::Null);
    gate(
        &report,
        replayed.differs(),
        args.expect.as_deref(),
        args.accept,
        args.quiet,
    )
}

/// The approved-baseline gate: exit 0 when there is no difference, or it
/// equals the approved one; `accept` records the current one.
fn gate(
    report: &serde_json::Value,
    differs: bool,
    expect: Option<&std::path::Path>,
    accept: bool,
    quiet: bool,
) -> anyhow::Result<ExitCode> {
    let Some(path) = expect else {
        return Ok(if differs {
            ExitCode::from(1)
        } else {
            ExitCode::SUCCESS
        });
    };
    let current = rewind_host::report::gated(report);
    if accept {
        write_json(path, &current)?;
        if !quiet {
            println!("approved baseline written to {}", path.display());
        }
        return Ok(ExitCode::SUCCESS);
    }
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "cannot read the approved baseline {} (create it with --accept)",
            path.display()
        )
    })?;
    let approved: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a JSON report", path.display()))?;
    if rewind_host::report::gated(&approved) == current {
        if !quiet {
            println!("differences equal the approved baseline {}", path.display());
        }
        Ok(ExitCode::SUCCESS)
    } else {
        if !quiet {
            println!(
                "differences do NOT equal the approved baseline {}; review them, then rerun with --accept",
                path.display()
            );
        }
        Ok(ExitCode::from(1))
    }
}

fn diff(
    old: &std::path::Path,
    new: &std::path::Path,
    reports: &Reports,
    ignore: &[rewind_host::diff::Ignore],
) -> anyhow::Result<ExitCode> {
    let d = rewind_host::diff::diff_states(old, new, ignore)?;
    use rewind_host::report::Rows;
    let (o, n) = (old.display().to_string(), new.display().to_string());
    // The whole report only for files; the terminal needs a few rows.
    if reports.any() {
        reports.write(&rewind_host::report::diff_json(&d, &o, &n, Rows::All))?;
    }
    let brief = rewind_host::report::diff_json(&d, &o, &n, Rows::First(5));
    print!("{}", rewind_host::report::summary_text(&brief, color()));
    Ok(if d.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn verify(
    tape: &std::path::Path,
    processor: &std::path::Path,
    cache_dir: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    let runtime = RuntimeConfig {
        cache_dir: Some(cache_dir.unwrap_or_else(default_cache_dir)),
        ..RuntimeConfig::default()
    };
    let work = std::env::temp_dir().join(format!("rewind-verify-{}.db", std::process::id()));
    let result = rewind_host::verify::verify(tape, processor, &runtime, &work);
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", work.display()));
    }
    let verified = result?;
    match verified.first_mismatch {
        None => {
            println!(
                "identical: {} events reproduce their recorded results",
                verified.events
            );
            Ok(ExitCode::SUCCESS)
        }
        Some(mismatch) => {
            println!("mismatch at {}", mismatch.describe());
            Ok(ExitCode::from(1))
        }
    }
}
