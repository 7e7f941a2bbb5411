//! Diagnostics for the operator, written to the host's log.
//!
//! Logging is not part of a processor's results: it is capped per event and
//! never stored in the state.

use std::fmt::Display;

use crate::__private::bindings::rewind::processor::log::{Level, log};

/// Logs at trace level.
pub fn trace(message: impl Display) {
    log(Level::Trace, &message.to_string());
}

/// Logs at debug level.
pub fn debug(message: impl Display) {
    log(Level::Debug, &message.to_string());
}

/// Logs at info level.
pub fn info(message: impl Display) {
    log(Level::Info, &message.to_string());
}

/// Logs at warn level.
pub fn warn(message: impl Display) {
    log(Level::Warn, &message.to_string());
}

/// Logs at error level.
pub fn error(message: impl Display) {
    log(Level::Error, &message.to_string());
}
