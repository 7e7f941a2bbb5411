//! `cargo xtask test`: everything CI runs, in the order that fails fastest.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::{cargo, cmd, processors, root};

pub fn run() -> Result<()> {
    let cargo = cargo();
    cmd(&cargo, &["fmt", "--all", "--check"])?;
    system_tools()?;
    // The Kafka tests start their own tansu broker; build it once per machine.
    crate::broker::tansu()?;
    crate::broker::kafka_client()?;
    processors::build()?;
    let host_side = [&["clippy", "--workspace"][..], &processors::excluded()].concat();
    cmd(
        &cargo,
        &[&host_side[..], &["--all-targets", "--", "-D", "warnings"]].concat(),
    )?;
    let guest_side: Vec<&str> = processors::packages()
        .into_iter()
        .chain(["rewind-guest"])
        .flat_map(|p| ["--package", p])
        .collect();
    cmd(
        &cargo,
        &[
            &["clippy", "--target", "wasm32-wasip2"][..],
            &guest_side,
            &["--", "-D", "warnings"],
        ]
        .concat(),
    )?;
    // The guest SDK's docs are how processors get written: broken links or
    // undocumented items fail here, not on a reader.
    let status = Command::new(&cargo)
        .args([
            "doc",
            "--no-deps",
            "--package",
            "rewind-guest",
            "--package",
            "rewind-host",
        ])
        .env("RUSTDOCFLAGS", "-D warnings")
        .current_dir(root())
        .status()
        .context("cannot start cargo doc")?;
    if !status.success() {
        bail!("`cargo doc` found broken documentation ({status})");
    }
    // The integration tests drive the `rewind` binary as a child process.
    cmd(
        &cargo,
        &["build", "--package", "rewind-host", "--bin", "rewind"],
    )?;
    let (passed, failed) = cargo_test(&cargo)?;
    // One closing line for the whole run, whatever order cargo printed in.
    println!("tests: {passed} passed, {failed} failed");
    if failed > 0 {
        bail!("{failed} tests failed");
    }
    Ok(())
}

/// The Debian packages the tests use: Chromium renders the HTML report,
/// sqldiff is the diff benchmark's baseline, Python runs the Kafka tests'
/// independent client, `script` gives a command a terminal to show its
/// progress on (Debian's essential `bsdutils`). Installed when missing and
/// possible (root with apt-get), else a clear error.
fn system_tools() -> Result<()> {
    let mut missing: Vec<&str> = [
        ("chromium", "chromium"),
        ("sqldiff", "sqlite3-tools"),
        ("python3", "python3"),
        ("script", "bsdutils"),
    ]
    .into_iter()
    .filter(|(program, _)| crate::which(program).is_none())
    .map(|(_, package)| package)
    .collect();
    // The Kafka tests' independent client lives in a venv.
    let venv = Command::new("python3")
        .args(["-c", "import ensurepip, venv"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !venv {
        missing.push("python3-venv");
    }
    if missing.is_empty() {
        return Ok(());
    }
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    if !root || crate::which("apt-get").is_none() {
        bail!(
            "the tests need {}: install them (`sudo apt-get install {}`) and rerun",
            missing.join(", "),
            missing.join(" ")
        );
    }
    eprintln!("xtask: installing {}", missing.join(", "));
    let mut args = vec!["install", "-y", "--no-install-recommends"];
    args.extend(&missing);
    if cmd("apt-get", &args).is_err() {
        cmd("apt-get", &["update"])?;
        cmd("apt-get", &args)?;
    }
    Ok(())
}

/// Runs the workspace's tests, echoing their output, and totals the results.
fn cargo_test(cargo: &str) -> Result<(u64, u64)> {
    let mut child = Command::new(cargo)
        .args(["test", "--workspace"])
        .args(processors::excluded())
        .current_dir(root())
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot start cargo test")?;
    let stdout = child.stdout.take().context("cargo test has no stdout")?;
    let (mut passed, mut failed) = (0, 0);
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading cargo test's output")?;
        println!("{line}");
        if let Some(result) = line.strip_prefix("test result: ") {
            passed += count(result, " passed");
            failed += count(result, " failed");
        }
    }
    let status = child.wait()?;
    if !status.success() && failed == 0 {
        bail!("cargo test failed ({status})");
    }
    Ok((passed, failed))
}

/// The number before `label` in "ok. 3 passed; 0 failed; …".
fn count(result: &str, label: &str) -> u64 {
    result
        .split(';')
        .find_map(|part| {
            part.trim()
                .trim_start_matches("ok. ")
                .trim_start_matches("FAILED. ")
                .strip_suffix(label.trim_start())
        })
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::count;

    #[test]
    fn counts_come_from_cargo_result_lines() {
        let line =
            "ok. 27 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 7.13s";
        assert_eq!((count(line, " passed"), count(line, " failed")), (27, 0));
        let line = "FAILED. 20 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out";
        assert_eq!((count(line, " passed"), count(line, " failed")), (20, 1));
    }
}
