//! Snapshots: consistent copies of a state DB, its offsets included, taken
//! in one read transaction (so a live run can go on writing meanwhile).

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    #[error("state DB {path} does not exist")]
    Missing { path: PathBuf },
    #[error("{path} already exists; choose a new --out")]
    Exists { path: PathBuf },
    #[error("could not write snapshot {path} ({source}); make room and take the snapshot again")]
    Storage {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    /// (SQLite's message names the OS error; its code adds nothing.)
    #[error(
        "cannot create snapshot {path} ({cause}); check that its directory exists \
         and can be written"
    )]
    Create { path: PathBuf, cause: String },
    #[error(
        "snapshot path {path} is not valid UTF-8, which SQLite needs for a file name; \
         choose another --out"
    )]
    NotUtf8 { path: PathBuf },
    #[error(
        "{path} is not a SQLite database (or its header is damaged); pass a state DB \
         that `rewind run` made, or a snapshot of one"
    )]
    NotADatabase {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("snapshot of {path}: {source}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
}

/// Copies the state DB at `state` to a new file `out`.
pub fn snapshot(state: &Path, out: &Path) -> Result<(), SnapshotError> {
    if !state.exists() {
        return Err(SnapshotError::Missing {
            path: state.to_owned(),
        });
    }
    if out.exists() {
        return Err(SnapshotError::Exists {
            path: out.to_owned(),
        });
    }
    let err = |source| SnapshotError::Sqlite {
        path: state.to_owned(),
        source,
    };
    let conn = Connection::open_with_flags(
        state,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(err)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(err)?;
    let Some(target) = out.to_str() else {
        return Err(SnapshotError::NotUtf8 {
            path: out.to_owned(),
        });
    };
    if let Err(source) = conn.execute("VACUUM INTO ?1", [target]) {
        let source = crate::state::with_os_error(&conn, source);
        // Nothing half-written stays behind: the file did not exist before.
        let _ = std::fs::remove_file(out);
        return Err(match source.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DiskFull | rusqlite::ErrorCode::SystemIoFailure) => {
                SnapshotError::Storage {
                    path: out.to_owned(),
                    source,
                }
            }
            Some(rusqlite::ErrorCode::CannotOpen) => SnapshotError::Create {
                path: out.to_owned(),
                cause: match &source {
                    rusqlite::Error::SqliteFailure(_, Some(message)) => message.clone(),
                    other => other.to_string(),
                },
            },
            Some(rusqlite::ErrorCode::NotADatabase) => SnapshotError::NotADatabase {
                path: state.to_owned(),
                source,
            },
            _ => err(source),
        });
    }
    Ok(())
}
