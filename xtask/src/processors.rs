//! `cargo xtask build-processors`: every processor, built from source for
//! wasm32-wasip2 and copied to `target/processors/<name>.wasm`.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result};

use crate::{cargo, cmd, target_dir};

const TARGET: &str = "wasm32-wasip2";
/// The cargo profile processors are built with (see the workspace Cargo.toml).
const PROFILE: &str = "wasm";

/// (package, features, artifact built, name under target/processors)
const BUILDS: &[(&str, &str, &str, &str)] = &[
    ("payments", "", "payments.wasm", "payments-v2"),
    ("payments", "v1", "payments.wasm", "payments-v1"),
    ("payments", "v3", "payments.wasm", "payments-v3"),
    ("hostile", "", "hostile.wasm", "hostile"),
    ("hostile", "bad-init", "hostile.wasm", "hostile-bad-init"),
    ("hostile", "", "other-world.wasm", "other-world"),
    // A processor of the released world 0.1.0, which the SDK has left.
    ("legacy", "", "legacy.wasm", "legacy-0.1"),
    // The README's "write your first processor", as printed there.
    ("counter", "", "counter.wasm", "counter"),
];

/// The processor crates (each once, in build order): WebAssembly-only, so
/// left out of the host-side `--workspace` builds, lints and tests.
pub fn packages() -> Vec<&'static str> {
    let mut packages: Vec<&str> = Vec::new();
    for &(package, ..) in BUILDS {
        if !packages.contains(&package) {
            packages.push(package);
        }
    }
    packages
}

/// `--exclude P` for each processor crate.
pub fn excluded() -> Vec<&'static str> {
    packages()
        .into_iter()
        .flat_map(|p| ["--exclude", p])
        .collect()
}

/// Installs the wasm32-wasip2 target through rustup when it is missing.
pub fn ensure_target() -> Result<()> {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .context("cannot run rustup; install Rust with rustup (https://rustup.rs)")?;
    if !String::from_utf8_lossy(&installed.stdout)
        .lines()
        .any(|l| l.trim() == TARGET)
    {
        eprintln!("xtask: installing the {TARGET} target");
        cmd("rustup", &["target", "add", TARGET])?;
    }
    Ok(())
}

/// Builds every processor; returns the directory holding them.
pub fn build() -> Result<PathBuf> {
    ensure_target()?;
    let out = target_dir().join("processors");
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    for &(package, features, artifact, name) in BUILDS {
        let mut args = vec![
            "build",
            "--quiet",
            "--profile",
            PROFILE,
            "--target",
            TARGET,
            "--package",
            package,
        ];
        if !features.is_empty() {
            args.extend(["--features", features]);
        }
        cmd(&cargo(), &args)?;
        let built = target_dir().join(TARGET).join(PROFILE).join(artifact);
        let dest = out.join(format!("{name}.wasm"));
        std::fs::copy(&built, &dest)
            .with_context(|| format!("cannot copy {} to {}", built.display(), dest.display()))?;
    }
    eprintln!("xtask: processors are in {}", out.display());
    Ok(out)
}
