//! `rewind run`: the live loop with a progress bar and Ctrl-C handling.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use indicatif::ProgressBar;
use rewind_host::kafka::{self, KafkaConfig};
use rewind_host::{
    ErrorPolicy, Position, Progress, RunConfig, RuntimeConfig, default_cache_dir, printable_str,
};

use crate::{OnError, RunArgs};

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
            let position = position.to_string();
            // Not `println`: a bar that is hidden (stderr is not a terminal,
            // as in CI or `2> log`) prints nothing with it.
            self.bar.suspend(|| {
                eprintln!(
                    "[guest {}] {}",
                    printable_str(&position),
                    printable_str(line)
                );
            });
        }
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }

    fn should_stop(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

pub fn run(mut args: RunArgs) -> anyhow::Result<()> {
    // `-`: standard input, as Unix tools take it.
    let input = match args.input.take() {
        Some(path) if path.as_os_str() == "-" => PathBuf::from("/dev/stdin"),
        other => other.unwrap_or_default(),
    };
    let state = args.state.take().unwrap_or_default();
    let mut config = RunConfig::new(&args.processor, &input, &state);
    config.output = args.output.take();
    config.tape = args.tape.take();
    config.stream = args.stream.take();
    config.batch_size = args.batch_size as usize;
    config.batch_time = Duration::from_millis(args.batch_ms);
    config.on_error = match args.on_error {
        OnError::Dlq => ErrorPolicy::Dlq,
        OnError::Halt => ErrorPolicy::Halt,
    };
    config.allow_module_change = args.allow_module_change;
    config.dedup_header = (!args.no_dedup).then(|| std::mem::take(&mut args.dedup_header));
    rewind_host::limit_sql_memory(args.sql_memory_mb << 20);
    config.runtime = RuntimeConfig {
        fuel: args.fuel,
        memory_bytes: (args.memory_mb << 20) as usize,
        max_instances: args.max_instances,
        sql_stall: super::stall_limit(args.sql_stall_secs),
        cache_dir: if args.no_cache {
            None
        } else {
            Some(args.cache_dir.take().unwrap_or_else(default_cache_dir))
        },
    };

    // The first Ctrl-C stops at the next epoch boundary, committed; a second
    // one exits at once, which is safe too (the state DB is crash-safe).
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    super::on_stop(move || {
        if flag.swap(true, Ordering::Relaxed) {
            std::process::exit(130);
        }
    })?;
    if let Some(brokers) = args.brokers.take() {
        return run_kafka(args, brokers, config, &stop);
    }

    let bar = super::progress_bar(
        args.quiet,
        "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {msg}",
    );
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
        if let Some(redone) = redone(summary.redone_batches) {
            eprintln!("{redone} (an event failed after writing; see `rewind dlq list`)");
        }
        print_module(&summary.module_digest, &summary.load);
    }
    Ok(())
}

fn print_module(digest: &str, load: &rewind_host::LoadStats) {
    eprintln!(
        "module {digest}, world {} ({} in {:.0} ms)",
        load.world,
        if load.compiled {
            "compiled"
        } else {
            "loaded from cache"
        },
        load.duration.as_secs_f64() * 1000.0,
    );
    if let Some(error) = &load.cache_error {
        super::warn_uncached(error);
    }
}

/// `rewind run --brokers …`: a consumer group, one state DB per partition.
fn run_kafka(
    args: RunArgs,
    brokers: String,
    run: RunConfig,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    let config = KafkaConfig {
        brokers,
        topics: args.topic,
        group: args.group.unwrap_or_default(),
        state_dir: args.state_dir.unwrap_or_default(),
        tape_dir: run.tape.clone(),
        output_topic: args.output_topic,
        dlq_topic: args.dlq_topic,
        settings: crate::cli::kafka::settings(&args.kafka_settings)?,
        exit_at_end: args.exit_at_end,
        quiet: args.quiet,
        run,
    };
    if !args.quiet {
        eprintln!(
            "consuming {} as group {} into {}/partition-N.db (Ctrl-C stops, committed)",
            config.topics.join(", "),
            config.group,
            config.state_dir.display()
        );
    }
    let summary = kafka::run(&config, stop)?;
    if !args.quiet {
        let mut per_partition: std::collections::BTreeMap<i32, (u64, u64, u64, u64)> =
            Default::default();
        for (partition, run) in &summary.runs {
            let entry = per_partition.entry(*partition).or_default();
            entry.0 += run.consumed;
            entry.1 += run.dead_lettered;
            entry.2 += run.outputs;
            entry.3 += run.redone_batches;
        }
        for (partition, (consumed, dead, outputs, batches)) in per_partition {
            let redone = redone(batches)
                .map(|r| format!(", {r}"))
                .unwrap_or_default();
            eprintln!(
                "partition {partition}: {consumed} events, {dead} dead-lettered, {outputs} outputs{redone}"
            );
        }
        let secs = summary.elapsed.as_secs_f64();
        eprintln!(
            "processed {} events in {secs:.2}s ({:.0} events/s)",
            summary.consumed(),
            summary.consumed() as f64 / secs.max(1e-9)
        );
        print_module(&summary.module_digest, &summary.load);
    }
    if summary.interrupted {
        eprintln!(
            "interrupted; everything processed is committed: run the same command to continue"
        );
        std::process::exit(130);
    }
    Ok(())
}

/// What the dead letters cost, if anything: a batch in which an event failed
/// after writing is run again with a savepoint per event.
fn redone(batches: u64) -> Option<String> {
    match batches {
        0 => None,
        1 => Some("1 batch redone event by event".to_owned()),
        n => Some(format!("{n} batches redone event by event")),
    }
}
