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
    conn.execute("VACUUM INTO ?1", [out.to_string_lossy()])
        .map_err(err)?;
    Ok(())
}
