//! The implementations of `rewind`'s commands (their arguments live in
//! `main.rs`).

pub mod compare;
pub mod kafka;
pub mod run;
pub mod state;
pub mod tape;
