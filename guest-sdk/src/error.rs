//! The error a processor returns, and how it reaches the host.

use std::fmt;

use crate::__private::WitError;
use crate::sql::SqlError;

/// The result type of processor code.
pub type Result<T, E = Error> = core::result::Result<T, E>;

/// Why a processor could not apply an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The event itself is wrong: malformed payload, unknown type, an
    /// impossible transition. The host dead-letters it and goes on.
    ///
    /// Return it before writing anything for the event, where you can: an
    /// event that wrote nothing has nothing to undo, while one that fails
    /// after a write makes the host run its batch again with a savepoint
    /// per event.
    InvalidInput(String),
    /// Anything else. The host applies its error policy (dead-letter and go
    /// on, or halt).
    Failed(String),
}

impl Error {
    /// An [`Error::InvalidInput`] with the given reason.
    pub fn invalid(reason: impl fmt::Display) -> Self {
        Error::InvalidInput(reason.to_string())
    }

    /// An [`Error::Failed`] with the given reason.
    pub fn failed(reason: impl fmt::Display) -> Self {
        Error::Failed(reason.to_string())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidInput(reason) => write!(f, "invalid input: {reason}"),
            Error::Failed(reason) => write!(f, "failed: {reason}"),
        }
    }
}

impl std::error::Error for Error {}

/// A SQL error is the processor's failure, not the event's: a constraint
/// violation or a typo in a statement should halt under the `halt` policy.
impl From<SqlError> for Error {
    fn from(error: SqlError) -> Self {
        Error::Failed(error.to_string())
    }
}

impl From<Error> for WitError {
    fn from(error: Error) -> Self {
        match error {
            Error::InvalidInput(reason) => WitError::InvalidInput(reason),
            Error::Failed(reason) => WitError::Failed(reason),
        }
    }
}
