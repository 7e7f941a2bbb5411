//! `cargo xtask test`: everything CI runs, in the order that fails fastest.

use anyhow::Result;

use crate::{cargo, cmd, processors};

pub fn run() -> Result<()> {
    let cargo = cargo();
    cmd(&cargo, &["fmt", "--all", "--check"])?;
    processors::build()?;
    cmd(
        &cargo,
        &[
            "clippy",
            "--workspace",
            "--exclude",
            "payments",
            "--exclude",
            "hostile",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
    )?;
    cmd(
        &cargo,
        &[
            "clippy",
            "--target",
            "wasm32-wasip2",
            "--package",
            "payments",
            "--package",
            "hostile",
            "--package",
            "rewind-guest",
            "--",
            "-D",
            "warnings",
        ],
    )?;
    // The integration tests drive the `rewind` binary as a child process.
    cmd(
        &cargo,
        &["build", "--package", "rewind-host", "--bin", "rewind"],
    )?;
    cmd(
        &cargo,
        &[
            "test",
            "--workspace",
            "--exclude",
            "payments",
            "--exclude",
            "hostile",
        ],
    )?;
    Ok(())
}
