//! Project tasks: `cargo xtask <task>`. Run without a task to list them.

mod bench;
mod bench_kafka;
mod broker;
mod demo;
mod processors;
mod test;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{CommandFactory as _, Parser, Subcommand};

/// Project tasks for rewind. Run without a task to list them.
#[derive(Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Option<Task>,
}

#[derive(Subcommand)]
enum Task {
    /// Build every processor to target/processors/NAME.wasm (installs wasm32-wasip2 if missing)
    BuildProcessors,
    /// Build everything, run buggy payments v1 live onto a tape, replay it against the fix (v2), write the reports
    Demo,
    /// Run everything CI runs: formatting, clippy, docs, unit, integration and doc tests
    Test,
    /// Benchmark `rewind run` against native code, side-by-side replay, `rewind diff` against sqldiff, Kafka against a raw consumer
    Bench(bench::Args),
    /// Start, stop or ask after a local Kafka-API broker (tansu, built once per machine)
    #[command(subcommand)]
    Broker(broker::Action),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.task {
        Some(Task::BuildProcessors) => processors::build().map(drop),
        Some(Task::Demo) => demo::run(),
        Some(Task::Test) => test::run(),
        Some(Task::Bench(args)) => bench::run(&args),
        Some(Task::Broker(action)) => broker::run(action),
        None => Cli::command().print_help().map_err(Into::into),
    };
    if let Err(error) = result {
        eprintln!("xtask: error: {error:#}");
        std::process::exit(1);
    }
}

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

/// The cargo target directory.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

/// Runs a command from the workspace root, failing on a non-zero exit.
pub fn cmd(program: &str, args: &[&str]) -> Result<()> {
    let status = Command::new(program)
        .args(args)
        .current_dir(root())
        .status()
        .with_context(|| format!("cannot start {program}"))?;
    if !status.success() {
        bail!("`{program} {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

/// Builds the processors and the release `rewind`; returns their paths.
pub fn build_release() -> Result<(PathBuf, PathBuf)> {
    let wasm = processors::build()?;
    cmd(
        &cargo(),
        &[
            "build",
            "--quiet",
            "--release",
            "--package",
            "rewind-host",
            "--bin",
            "rewind",
        ],
    )?;
    Ok((wasm, target_dir().join("release").join("rewind")))
}

/// Where `program` is on the PATH, if it is.
pub fn which(program: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// The cargo that runs xtask, so toolchain overrides carry over.
pub fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned())
}
