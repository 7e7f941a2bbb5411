//! `rewind replay`, `verify` and `diff`: reports in every format, and the
//! approved-baseline gate.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use indicatif::ProgressBar;
use rewind_host::{DEFAULT_FUEL, DEFAULT_MEMORY_MB, RuntimeConfig, default_cache_dir};

use rewind_host::findings::Findings;
use rewind_host::report::{Report, Source};

use crate::{ReplayArgs, Reports};

impl Reports {
    /// Writes each report asked for: the JSON streamed whole, Markdown and
    /// HTML from a brief report (they show the first rows, and say how many
    /// more the JSON holds).
    /// On a terminal (unless `quiet`), the JSON's writing shows its bytes:
    /// a replay that changed much writes hundreds of megabytes.
    fn write(&self, report: &Report<'_>, quiet: bool) -> anyhow::Result<()> {
        if let Some(path) = &self.json {
            let bar = super::progress_bar(
                quiet,
                "{spinner} [{elapsed_precise}] writing {msg}: {binary_bytes} ({binary_bytes_per_sec})",
            );
            bar.set_message(rewind_host::printable_str(&path.display().to_string()).into_owned());
            let written = super::write_file_with(path, |file| {
                Ok(rewind_host::report::write_json(
                    report,
                    false,
                    bar.wrap_write(file),
                )?)
            });
            bar.finish_and_clear();
            written?;
        }
        if self.markdown.is_none() && self.html.is_none() {
            return Ok(());
        }
        let brief = report.brief(
            rewind_host::report::HTML_ROWS,
            rewind_host::report::HTML_CAUSES,
        )?;
        let text = |path: &PathBuf, text: String| super::write_file(path, text.as_bytes());
        if let Some(path) = &self.markdown {
            text(path, rewind_host::report::markdown(&brief))?;
        }
        if let Some(path) = &self.html {
            text(path, rewind_host::report::html(&brief))?;
        }
        Ok(())
    }
}

/// Colour on a terminal, unless NO_COLOR is set.
fn color() -> bool {
    use std::io::IsTerminal;
    std::env::var_os("NO_COLOR").is_none() && std::io::stdout().is_terminal()
}

/// Writes a report as JSON, streamed (`gated`: the approved baseline's form).
fn write_json(path: &std::path::Path, report: &dyn Source, gated: bool) -> anyhow::Result<()> {
    super::write_file_with(path, |file| {
        Ok(rewind_host::report::write_json(report, gated, file)?)
    })
}

/// The terminal summary of a report: its first few rows.
fn summary(report: &Report<'_>) -> anyhow::Result<String> {
    let brief = report.brief(5, 5)?;
    Ok(rewind_host::report::summary_text(&brief, color()))
}

/// A replay's (or verify's) progress: a bar through the tape, and the
/// events compared.
struct Counter(ProgressBar);

impl rewind_host::replay::ReplayProgress for Counter {
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
    fn finishing(&self) {
        self.0.set_message("comparing the final states");
    }
}

/// The bar of a command that goes through a tape (hidden with `--quiet`).
fn tape_bar(quiet: bool) -> ProgressBar {
    super::progress_bar(
        quiet,
        "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} of the tape, {msg}",
    )
}

/// Says which `--ignore` rules left nothing out (even with `--quiet`: the
/// command line is likely wrong, and a gate would pass on a misspelt rule's
/// intent only by luck).
fn warn_unmatched(diff: &rewind_host::diff::StateDiff) {
    use rewind_host::diff::Ignore;
    for rule in &diff.unmatched {
        let what = match rule {
            Ignore::Table(_) => "table",
            Ignore::Column { .. } => "column",
        };
        eprintln!(
            "rewind: warning: --ignore {rule} names no {what} of either state; it leaves nothing out"
        );
    }
}

pub fn replay(args: ReplayArgs) -> anyhow::Result<ExitCode> {
    use rewind_host::replay::ReplayConfig;
    let work_dir = match &args.keep {
        Some(dir) if dir.exists() && !dir.is_dir() => {
            anyhow::bail!("--keep {} is a file; it takes a directory", dir.display())
        }
        Some(dir) => dir.clone(),
        None => std::env::temp_dir().join(format!("rewind-replay-{}", std::process::id())),
    };
    // Kept states are left as they are (incomplete: see --keep).
    super::discard_on_interrupt(
        "replay",
        args.keep
            .is_none()
            .then(|| work_dir.clone())
            .into_iter()
            .collect(),
    )?;
    rewind_host::limit_sql_memory(args.sql_memory_mb << 20);
    // The limits the tape was recorded with, unless told otherwise: with
    // others, an event near a limit would end differently from the live run.
    // The same goes for deduplication.
    let recorded = if rewind_host::is_tape(&args.tape) {
        rewind_host::tapes::recorded_run(&args.tape)?
    } else {
        None
    };
    let fuel = args
        .fuel
        .or(recorded.as_ref().map(|run| run.fuel))
        .unwrap_or(DEFAULT_FUEL);
    let memory_mb = args
        .memory_mb
        .or(recorded.as_ref().map(|run| run.memory_bytes >> 20))
        .unwrap_or(DEFAULT_MEMORY_MB);
    let dedup_header = match recorded {
        Some(run) => run.dedup_header,
        None => Some(rewind_host::ID_HEADER.to_owned()),
    };
    let config = ReplayConfig {
        tape: args.tape.clone(),
        old: args.old.clone(),
        new: args.new.clone(),
        from: args.from.clone(),
        until: args.until,
        ignore: args.ignore.clone(),
        runtime: RuntimeConfig {
            fuel,
            memory_bytes: (memory_mb << 20) as usize,
            cache_dir: Some(args.cache_dir.clone().unwrap_or_else(default_cache_dir)),
            max_instances: args.max_instances,
            sql_stall: super::stall_limit(args.sql_stall_secs),
        },
        dedup_header,
        work_dir: work_dir.clone(),
    };
    let bar = tape_bar(args.quiet);
    let replayed = if args.tape.is_dir() {
        replay_dir(&config, &Counter(bar.clone()))
    } else {
        rewind_host::replay::replay(&config, &Counter(bar.clone())).map_err(anyhow::Error::from)
    };
    bar.finish_and_clear();
    // The states and findings go afterwards, unless kept.
    let discard = || {
        if args.keep.is_none() {
            let _ = std::fs::remove_dir_all(&work_dir);
        }
    };
    let replayed = replayed.inspect_err(|_| discard())?;
    for error in &replayed.cache_errors {
        super::warn_uncached(error);
    }
    for warning in &replayed.warnings {
        eprintln!("rewind: warning: {warning}");
    }
    warn_unmatched(&replayed.state);
    let (old, new) = (
        args.old.display().to_string(),
        args.new.display().to_string(),
    );
    let report = Report::replay(&replayed, &old, &new)?;
    args.reports.write(&report, args.quiet)?;
    if !args.quiet {
        out!("{}", summary(&report)?)?;
        if let Some(dir) = &args.keep {
            outln!("states kept: {}", dir.display())?;
        }
    }
    let exit = gate(
        &report,
        replayed.differs(),
        args.expect.as_deref(),
        args.accept,
        args.quiet,
    );
    drop(report);
    drop(replayed);
    discard();
    exit
}

/// A Kafka run's tape directory: each `partition-N.tape` replayed on its own
/// (from `--from DIR/partition-N.db` when `--from` is a state directory),
/// one combined result.
fn replay_dir(
    config: &rewind_host::replay::ReplayConfig,
    progress: &dyn rewind_host::replay::ReplayProgress,
) -> anyhow::Result<rewind_host::replay::Replay> {
    let tapes = rewind_host::kafka::tapes(&config.tape)
        .with_context(|| format!("reading {}", config.tape.display()))?;
    if tapes.is_empty() {
        anyhow::bail!("{} holds no partition-N.tape tapes", config.tape.display());
    }
    let mut combined: Option<rewind_host::replay::Replay> = None;
    for (partition, tape) in tapes {
        let mut one = config.clone();
        one.tape = tape;
        one.work_dir = config.work_dir.join(format!("partition-{partition}"));
        one.from = match &config.from {
            Some(dir) if dir.is_dir() => {
                Some(rewind_host::kafka::state_path(dir, partition)).filter(|p| p.exists())
            }
            other => other.clone(),
        };
        match combined.as_mut() {
            Some(all) => all.replay_more(&one, progress)?,
            None => combined = Some(rewind_host::replay::replay(&one, progress)?),
        }
    }
    Ok(combined.expect("at least one tape"))
}

/// The approved-baseline gate: exit 0 when there is no difference, or it
/// equals the approved one; `accept` records the current one.
fn gate(
    report: &Report<'_>,
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
    if accept {
        write_json(path, report, true)?;
        if !quiet {
            outln!("approved baseline written to {}", path.display())?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    let unreadable = || {
        format!(
            "cannot read the approved baseline {} (create it with --accept)",
            path.display()
        )
    };
    let equal = || {
        if !quiet {
            outln!("differences equal the approved baseline {}", path.display())?;
        }
        Ok(ExitCode::SUCCESS)
    };
    use rewind_host::report::{Baseline, BaselineError, Hashing, baseline_digest, gate_digest};
    // A baseline as --accept wrote it is compared byte for byte, streamed;
    // one written otherwise (or differing) is read with its long lists kept
    // in a scratch file, not in memory.
    let mut file = std::fs::File::open(path).with_context(unreadable)?;
    let mut hashing = Hashing::default();
    std::io::copy(&mut file, &mut hashing).with_context(unreadable)?;
    if hashing.finish() == baseline_digest(report)? {
        return equal();
    }
    let approved = match Baseline::read(path) {
        Ok(approved) => approved,
        Err(BaselineError::Read(e)) => return Err(anyhow::Error::new(e).context(unreadable())),
        Err(BaselineError::NotJson(e)) => {
            return Err(
                anyhow::Error::new(e).context(format!("{} is not a JSON report", path.display()))
            );
        }
        Err(BaselineError::Scratch(e)) => return Err(e.into()),
    };
    // Any JSON would "differ"; one that is no report at all is the wrong file.
    let head = rewind_host::report::Source::head(&approved);
    if !(head["summary"].is_object() && head["tables"].is_array()) {
        anyhow::bail!(
            "{} is not a rewind report (it has no \"summary\" and \"tables\"); pass a baseline \
             that --accept wrote, or write one with --accept",
            path.display()
        );
    }
    if gate_digest(&approved)? == gate_digest(report)? {
        return equal();
    }
    if !quiet {
        outln!(
            "differences do NOT equal the approved baseline {}; review them, then rerun with --accept:",
            path.display()
        )?;
        for line in rewind_host::report::gate_changes(&approved, report, 20)? {
            outln!("  {line}")?;
        }
    }
    Ok(ExitCode::from(1))
}

pub fn diff(
    old: &std::path::Path,
    new: &std::path::Path,
    reports: &Reports,
    ignore: &[rewind_host::diff::Ignore],
) -> anyhow::Result<ExitCode> {
    // What differs is kept in a scratch file, removed on Ctrl-C too.
    let findings = Findings::temporary()?;
    super::discard_on_interrupt(
        "diff",
        findings
            .path()
            .parent()
            .map(std::path::Path::to_owned)
            .into_iter()
            .collect(),
    )?;
    let d = match (old.is_dir(), new.is_dir()) {
        (true, true) => rewind_host::kafka::diff_dirs(old, new, ignore, &findings)
            .map_err(|e| anyhow::anyhow!("{e}"))?,
        (false, false) => rewind_host::diff::diff_states(old, new, ignore, &findings)?,
        _ => anyhow::bail!(
            "compare a state DB with a state DB, or a state directory with a state directory"
        ),
    };
    warn_unmatched(&d);
    let (o, n) = (old.display().to_string(), new.display().to_string());
    let report = Report::diff(&d, &findings, &o, &n);
    reports.write(&report, false)?;
    out!("{}", summary(&report)?)?;
    Ok(if d.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

pub fn verify(
    tape: &std::path::Path,
    processor: &std::path::Path,
    cache_dir: Option<PathBuf>,
    quiet: bool,
) -> anyhow::Result<ExitCode> {
    let runtime = RuntimeConfig {
        cache_dir: Some(cache_dir.unwrap_or_else(default_cache_dir)),
        ..RuntimeConfig::default()
    };
    let work = std::env::temp_dir().join(format!("rewind-verify-{}.db", std::process::id()));
    super::discard_on_interrupt("verify", rewind_host::db_files(&work).to_vec())?;
    let bar = tape_bar(quiet);
    let result = rewind_host::verify::verify_with_progress(
        tape,
        processor,
        &runtime,
        &work,
        &Counter(bar.clone()),
    );
    bar.finish_and_clear();
    rewind_host::remove_db_files(&work);
    let verified = result?;
    if let Some(error) = &verified.cache_error {
        super::warn_uncached(error);
    }
    match verified.first_mismatch {
        None => {
            outln!(
                "identical: {} events reproduce their recorded results",
                verified.events
            )?;
            Ok(ExitCode::SUCCESS)
        }
        Some(mismatch) => {
            outln!("mismatch at {}", mismatch.describe())?;
            Ok(ExitCode::from(1))
        }
    }
}
