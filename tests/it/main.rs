//! rewind's integration tests: one binary, a module per area. They need the
//! processors and the `rewind` binary built first; `cargo xtask test` does that.

mod bad_files;
mod cli;
mod determinism;
mod hostile;
mod kafka;
mod kafka_run;
mod outbox;
mod payments;
mod readme;
mod replay;
mod tape;
mod tidy;
mod worlds;
