//! `cargo xtask bench`: performance goals, measured against baselines in the same run.

use anyhow::Result;

pub fn run(_args: &[String]) -> Result<()> {
    anyhow::bail!("the benchmark is not written yet")
}
