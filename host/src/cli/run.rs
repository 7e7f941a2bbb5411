//! `rewind run`: the live loop with a progress bar and Ctrl-C handling.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rewind_host::{ErrorPolicy, Position, Progress, RunConfig, RuntimeConfig, default_cache_dir};

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

pub fn run(args: RunArgs) -> anyhow::Result<()> {
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
