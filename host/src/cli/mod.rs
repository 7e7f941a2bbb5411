//! The implementations of `rewind`'s commands (their arguments live in
//! `main.rs`).

pub mod compare;
pub mod kafka;
pub mod run;
pub mod state;
pub mod tape;

/// `--sql-stall-secs`: 0 means never.
fn stall_limit(secs: u64) -> Option<std::time::Duration> {
    (secs > 0).then(|| std::time::Duration::from_secs(secs))
}
