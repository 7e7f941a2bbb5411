//! The state DB: a processor's own SQLite database, with the host's tables
//! (`_rewind_*`) beside the processor's.
//!
//! One connection, owned by the run. The host commits in batches: events
//! run inside the batch transaction (in savepoints of their own when the
//! pipeline asks), and the batch's input offsets, outputs and dead letters
//! commit with the state they describe.

/// A host statement: every statement the host prepares through the cache
/// starts with this mark, and guest statements may not (see `guard`).
macro_rules! host_sql {
    ($sql:literal) => {
        concat!("/* rewind:host */ ", $sql)
    };
}

mod changes;
mod checkpoint;
mod guard;
mod memory;
mod outbox;
mod stall;
mod statements;
mod tables;
mod vfs;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use rusqlite::types::{Value as SqlValue, ValueRef};
use rusqlite::{Connection, OpenFlags, params};

pub(crate) use changes::put_value;
pub use changes::{Change, ChangeLog, EventChanges};

pub use checkpoint::Checkpointer;
pub use memory::{DEFAULT_SQL_MEMORY_MB, limit_sql_memory};
pub use stall::{exit_when_stuck, stalled_for};
pub use tables::{DeadLetter, OutboxRow, SinkMark, Summary, TableCount};
pub use vfs::EventClock;

use crate::event::{Position, Seed};
use guard::Guard;

/// The state DB format this host writes; a DB with another is refused.
pub const FORMAT: &str = "rewind-state-3";
/// The previous format (outputs a row each), migrated on open.
const FORMAT_2: &str = "rewind-state-2";

/// How many bytes (roughly) one guest query may return before it is
/// refused: the whole result is built in host memory before the guest gets it.
const MAX_QUERY_BYTES: usize = 64 << 20;

/// The largest value SQLite accepts on a state DB's connection.
const MAX_VALUE: usize = crate::source::MAX_LINE + (1 << 20);

/// SQLite calls the progress handler every this many VM instructions.
const PROGRESS_PERIOD: i32 = 1000;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    #[error("state DB {path}: {source}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("state DB {path} does not exist; `rewind run` creates it")]
    Missing { path: PathBuf },
    #[error(
        "{path} is not a rewind state DB (format {found:?}, expected {FORMAT:?}); \
         choose another --state"
    )]
    WrongFormat { path: PathBuf, found: String },
    #[error("state DB {path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error(
        "state DB {path} is being written by another process (another `rewind run`?); \
         wait for it to finish, or use another --state"
    )]
    Busy { path: PathBuf },
    #[error(
        "{path} is not a SQLite database (or its header is damaged); \
         pass a state DB that `rewind run` made, or a new path"
    )]
    NotADatabase { path: PathBuf },
    #[error(
        "state DB {path} could not be written ({source}); make room and rerun \
         (a run continues from its last committed batch)"
    )]
    Storage {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error(
        "state DB {path} is damaged ({source}); restore it from a `rewind snapshot`, \
         or rebuild it by running its tape into a new --state"
    )]
    Damaged {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
}

impl StateError {
    /// What went wrong with the state DB at `path`, with what to do where
    /// there is something to do.
    pub(crate) fn from_sqlite(path: &Path, source: rusqlite::Error) -> StateError {
        match source.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
                StateError::Busy {
                    path: path.to_owned(),
                }
            }
            Some(rusqlite::ErrorCode::NotADatabase) => StateError::NotADatabase {
                path: path.to_owned(),
            },
            Some(rusqlite::ErrorCode::DiskFull | rusqlite::ErrorCode::SystemIoFailure) => {
                StateError::Storage {
                    path: path.to_owned(),
                    source,
                }
            }
            Some(rusqlite::ErrorCode::DatabaseCorrupt) => StateError::Damaged {
                path: path.to_owned(),
                source,
            },
            _ => StateError::Sqlite {
                path: path.to_owned(),
                source,
            },
        }
    }
}

/// `error`, failed on `conn`, with the operating system's error behind it
/// ("disk I/O error: File too large") when it is one of I/O.
pub(crate) fn with_os_error(conn: &Connection, error: rusqlite::Error) -> rusqlite::Error {
    use rusqlite::ErrorCode as C;
    let rusqlite::Error::SqliteFailure(code, message) = error else {
        return error;
    };
    if !matches!(
        code.code,
        C::SystemIoFailure | C::DiskFull | C::CannotOpen | C::FileLockingProtocolFailed
    ) {
        return rusqlite::Error::SqliteFailure(code, message);
    }
    // SAFETY: the handle is of `conn`, open while it is borrowed.
    let errno = unsafe { rusqlite::ffi::sqlite3_system_errno(conn.handle()) };
    if errno == 0 {
        return rusqlite::Error::SqliteFailure(code, message);
    }
    let said = message.unwrap_or_else(|| code.to_string());
    let os = std::io::Error::from_raw_os_error(errno);
    rusqlite::Error::SqliteFailure(code, Some(format!("{said}: {os}")))
}

/// The files a state DB at `path` may consist of: the database, its
/// rollback journal, its write-ahead log and that log's index.
pub fn db_files(path: &Path) -> [PathBuf; 4] {
    ["", "-journal", "-wal", "-shm"].map(|suffix| {
        let mut file = path.as_os_str().to_owned();
        file.push(suffix);
        PathBuf::from(file)
    })
}

/// Removes a state DB's files (see [`db_files`]), those that exist.
pub fn remove_db_files(path: &Path) {
    for file in db_files(path) {
        let _ = std::fs::remove_file(file);
    }
}

/// The digest of the module that wrote the state DB at `path`, if it can
/// be read (a state DB no module wrote yet, or no state DB, has none).
pub fn module_digest(path: &Path) -> Option<String> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY).ok()?;
    conn.query_row(
        "SELECT value FROM _rewind_meta WHERE key = 'module_digest'",
        [],
        |r| r.get(0),
    )
    .ok()
}

/// Offsets to resume from: the next offset to consume, per stream partition.
pub type Offsets = BTreeMap<(String, i32), i64>;

/// A failure of guest SQL.
#[derive(Debug)]
pub enum GuestSqlError {
    /// The statement failed; the guest gets the message.
    Statement(String),
    /// The statement's text is not UTF-8, which the canonical ABI makes a
    /// trap.
    NotUtf8,
    /// The event used up its SQL budget: the guest is stopped.
    BudgetExhausted { budget: u64 },
    /// One step of the statement ran for `limit` (see `stall`): the run stops.
    Stalled { limit: Duration },
    /// The statement needed more memory than SQLite may hold in this process
    /// (`limit_mib`, see `memory`): the run stops.
    OutOfMemory { limit_mib: u64 },
    /// The database itself failed (I/O, disk full, corruption): the run stops.
    Host(rusqlite::Error),
    /// The statement stored something SQLite would follow up with values of
    /// its process-wide random generator, which no replay could repeat: the
    /// event fails (whatever the guest does with the error).
    Unreplayable(String),
}

/// Rows a guest query returned.
pub struct GuestRows {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<SqlValue>>,
}

/// A processor's state DB.
pub struct StateDb {
    /// Declared (so dropped) before `conn`: the writer closes last, and its
    /// close checkpoints what is left.
    checkpointer: Option<checkpoint::Checkpointer>,
    /// Stops guest SQL stuck in one step, when started (`watch_stalls`).
    stall: Option<stall::StallWatch>,
    /// Row changes of processor tables, when a tape records them. Declared
    /// before `conn`: it unregisters its hook before the connection closes.
    changes: Option<changes::Changes>,
    /// The guest's statements and the host's per-event ones. Declared
    /// before `conn`, which is boxed: they point into it (see `statements`).
    guest_statements: statements::Statements,
    /// The guest's statements run by `execute`, bound in place.
    guest_direct: statements::Statements<statements::Direct>,
    host_statements: statements::Statements,
    conn: Box<Connection>,
    path: PathBuf,
    guard: Arc<Guard>,
    /// SQLite VM instructions (in progress-handler periods) the current guest
    /// event has used, and the budget it may use.
    sql_periods: Arc<AtomicU64>,
    sql_budget_periods: Arc<AtomicU64>,
    /// The current guest event ran a statement that may write (one that is
    /// not `sqlite3_stmt_readonly`), whether or not it succeeded.
    event_wrote: AtomicBool,
    /// Outputs of the open transaction not written yet (see `outbox`).
    outbox: outbox::Outbox,
}

impl std::fmt::Debug for StateDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateDb").field("path", &self.path).finish()
    }
}

impl StateDb {
    /// Opens (creating if needed) the state DB at `path` for a run.
    pub fn open(path: &Path) -> Result<StateDb, StateError> {
        Self::open_with(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE,
        )
    }

    /// Opens an existing state DB, for inspection.
    pub fn open_existing(path: &Path) -> Result<StateDb, StateError> {
        if !path.exists() {
            return Err(StateError::Missing {
                path: path.to_owned(),
            });
        }
        Self::open_with(path, OpenFlags::SQLITE_OPEN_READ_WRITE)
    }

    fn open_with(path: &Path, flags: OpenFlags) -> Result<StateDb, StateError> {
        let err = |source| StateError::from_sqlite(path, source);
        memory::ensure_limit();
        vfs::register().map_err(|message| StateError::Invalid {
            path: path.to_owned(),
            message,
        })?;
        let flags = flags | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI;
        let mut conn = Connection::open_with_flags_and_vfs(path, flags, vfs::NAME).map_err(err)?;
        // A file that is not a database shows up on the first read.
        // temp_store = MEMORY keeps the per-event savepoints' sub-journal in
        // memory: on disk it costs a write per page per event.
        // 16 KiB pages (a new database only): a batch writes each page it
        // touched to the WAL once, and bigger pages mean fewer, larger
        // writes (measured: 15% faster runs than with 4 KiB).
        conn.execute_batch(
            "PRAGMA page_size = 16384;
             PRAGMA journal_mode = WAL;
             PRAGMA synchronous = NORMAL;
             PRAGMA busy_timeout = 1000;
             PRAGMA cache_size = -65536;
             PRAGMA temp_store = MEMORY;
             PRAGMA trusted_schema = OFF;",
        )
        .map_err(err)?;
        conn.set_prepared_statement_cache_capacity(256);
        // Bounds on what one statement can make SQLite allocate: a value is at
        // most 65 MiB (the longest input line a dead letter keeps, with its
        // framing in an outbox page; outputs are capped at 16 MiB per event),
        // a statement's text at most 1 MiB, and nothing can be attached.
        use rusqlite::limits::Limit;
        for (limit, value) in [
            (Limit::SQLITE_LIMIT_LENGTH, MAX_VALUE as i32),
            (Limit::SQLITE_LIMIT_SQL_LENGTH, 1 << 20),
            (Limit::SQLITE_LIMIT_ATTACHED, 0),
        ] {
            conn.set_limit(limit, value).map_err(err)?;
        }
        let guard = Guard::install(&mut conn).map_err(err)?;

        let sql_periods = Arc::new(AtomicU64::new(0));
        let sql_budget_periods = Arc::new(AtomicU64::new(u64::MAX));
        let (used, budget) = (Arc::clone(&sql_periods), Arc::clone(&sql_budget_periods));
        let progress = Arc::clone(&guard);
        conn.progress_handler(
            PROGRESS_PERIOD,
            Some(move || {
                progress.tick();
                // Returning true interrupts the statement.
                used.fetch_add(1, Ordering::Relaxed) + 1 > budget.load(Ordering::Relaxed)
            }),
        )
        .map_err(err)?;

        let db = StateDb {
            stall: None,
            checkpointer: None,
            changes: None,
            guest_statements: Default::default(),
            guest_direct: Default::default(),
            host_statements: Default::default(),
            conn: Box::new(conn),
            path: path.to_owned(),
            guard,
            sql_periods,
            sql_budget_periods,
            event_wrote: AtomicBool::new(false),
            outbox: Default::default(),
        };
        db.create_host_tables()?;
        Ok(db)
    }

    /// Makes this a scratch state DB, one that is made afresh for each use
    /// and never continued after a crash (a replay's side): its rollback
    /// journal lives in memory and nothing is synced. Each page a batch
    /// writes is then written once, into the database file, instead of into
    /// the WAL and again by a checkpoint. A crash may leave the file
    /// unusable, which for a scratch copy costs nothing.
    pub fn make_scratch(&self) -> Result<(), StateError> {
        self.conn
            .execute_batch("PRAGMA journal_mode = MEMORY; PRAGMA synchronous = OFF;")
            .map_err(|e| self.err(e))
    }

    /// Stops guest SQL that spends `limit` in one SQLite step (see `stall`):
    /// the guest statement fails with `GuestSqlError::Stalled`.
    pub fn watch_stalls(&mut self, limit: Duration) -> Result<(), StateError> {
        let watch = stall::StallWatch::start(
            Arc::clone(&self.guard),
            self.conn.get_interrupt_handle(),
            limit,
        )
        .map_err(|e| StateError::Invalid {
            path: self.path.clone(),
            message: format!("cannot start the SQL watch thread: {e}"),
        })?;
        self.stall = Some(watch);
        Ok(())
    }

    /// Sets the page cache size (the default is 64 MiB).
    pub fn set_cache_mib(&self, mib: u32) -> Result<(), StateError> {
        self.conn
            .execute_batch(&format!("PRAGMA cache_size = -{}", u64::from(mib) * 1024))
            .map_err(|e| self.err(e))
    }

    /// Moves WAL checkpoints to a background thread (for a long run: the
    /// writer then never waits on `fsync`). See `checkpoint`.
    pub fn checkpoint_in_background(&mut self) -> Result<(), StateError> {
        if self.checkpointer.is_none() {
            // Nothing may point into the connection while it is borrowed mutably.
            self.guest_statements.clear();
            self.guest_direct.clear();
            self.host_statements.clear();
            let checkpointer =
                checkpoint::Checkpointer::start(&mut self.conn, &self.path, Some(vfs::NAME))
                    .map_err(|e| self.err(e))?;
            self.checkpointer = Some(checkpointer);
        }
        Ok(())
    }

    /// Starts counting the row changes of processor tables (see
    /// [`StateDb::take_changes`]); `keep` keeps every change in full,
    /// `digest` digests them.
    pub fn capture_changes(&mut self, keep: bool, digest: bool) {
        // Unknown reads as not UTF-8: texts are then read the slower way.
        let utf8 = self
            .conn
            .pragma_query_value(None, "encoding", |row| row.get::<_, String>(0))
            .is_ok_and(|encoding| encoding == "UTF-8");
        // SAFETY: `changes` is dropped before `conn` (field order).
        self.changes = None;
        self.changes =
            Some(unsafe { changes::Changes::register(self.conn.handle(), keep, digest, utf8) });
    }

    /// Rows of processor tables changed since the last call, a digest of the
    /// changes and (when kept) the changes; `None` unless
    /// [`StateDb::capture_changes`] was called.
    pub fn take_changes(&self) -> Option<EventChanges> {
        self.changes.as_ref().map(changes::Changes::take)
    }

    /// Forgets the changes since the last [`StateDb::take_changes`].
    pub fn reset_changes(&self) {
        if let Some(changes) = &self.changes {
            changes.reset();
        }
    }

    /// The file this DB lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn err(&self, source: rusqlite::Error) -> StateError {
        StateError::from_sqlite(&self.path, self.with_os_error(source))
    }

    /// `error` with the operating system's reason appended when SQLite
    /// failed on a system call ("disk I/O error" alone does not say that
    /// the disk is full or a file size limit was reached).
    fn with_os_error(&self, error: rusqlite::Error) -> rusqlite::Error {
        with_os_error(&self.conn, error)
    }

    /// The DB holds something the host cannot read back.
    pub(crate) fn invalid(&self, message: String) -> StateError {
        StateError::Invalid {
            path: self.path.clone(),
            message: format!("{message}; the DB is damaged"),
        }
    }

    fn create_host_tables(&self) -> Result<(), StateError> {
        self.conn
            .execute_batch(tables::HOST_SCHEMA)
            .map_err(|e| self.err(e))?;
        // A format-2 DB killed while being created has its outbox table but
        // no format yet.
        let rows_outbox = || -> Result<bool, StateError> {
            self.conn
                .query_row(
                    "SELECT count(*) FROM pragma_table_info('_rewind_outbox') WHERE name = 'slot'",
                    [],
                    |r| r.get::<_, i64>(0),
                )
                .map(|n| n > 0)
                .map_err(|e| self.err(e))
        };
        match self.meta("format")? {
            None if !rows_outbox()? => {
                self.conn
                    .execute_batch(outbox::OUTBOX_SCHEMA)
                    .map_err(|e| self.err(e))?;
                self.set_meta("format", FORMAT)
            }
            Some(found) if found == FORMAT => Ok(()),
            None => self.migrate_from_2(),
            Some(found) if found == FORMAT_2 => self.migrate_from_2(),
            Some(found) => Err(StateError::WrongFormat {
                path: self.path.clone(),
                found,
            }),
        }
    }

    /// Migrates a `rewind-state-2` DB, in one transaction.
    fn migrate_from_2(&self) -> Result<(), StateError> {
        // Only the outbox changed: its rows move into pages.
        self.begin()?;
        let migrated = self
            .migrate_outbox_from_rows()
            .and_then(|()| self.set_meta("format", FORMAT))
            .and_then(|()| self.commit());
        if migrated.is_err() {
            let _ = self.rollback();
        }
        migrated
    }

    /// Reads a host metadata value.
    pub fn meta(&self, key: &str) -> Result<Option<String>, StateError> {
        use rusqlite::OptionalExtension;
        self.conn
            .prepare_cached(host_sql!("SELECT value FROM _rewind_meta WHERE key = ?1"))
            .and_then(|mut s| s.query_row([key], |r| r.get(0)).optional())
            .map_err(|e| self.err(e))
    }

    /// Writes a host metadata value (inside the current transaction, if any).
    pub fn set_meta(&self, key: &str, value: &str) -> Result<(), StateError> {
        self.conn
            .prepare_cached(host_sql!(
                "INSERT OR REPLACE INTO _rewind_meta (key, value) VALUES (?1, ?2)"
            ))
            .and_then(|mut s| s.execute([key, value]))
            .map(drop)
            .map_err(|e| self.err(e))
    }

    /// A numeric metadata value, 0 when absent.
    pub fn meta_u64(&self, key: &str) -> Result<u64, StateError> {
        match self.meta(key)? {
            None => Ok(0),
            Some(v) => v.parse().map_err(|_| StateError::Invalid {
                path: self.path.clone(),
                message: format!("host metadata {key} is {v:?}, not a number"),
            }),
        }
    }

    /// Where to resume: the next offset per stream partition.
    pub fn offsets(&self) -> Result<Offsets, StateError> {
        let mut stmt = self
            .conn
            .prepare_cached(host_sql!(
                "SELECT stream, partition, next_offset FROM _rewind_offsets"
            ))
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| Ok(((r.get(0)?, r.get(1)?), r.get(2)?)))
            .and_then(|rows| rows.collect::<rusqlite::Result<Offsets>>());
        rows.map_err(|e| self.err(e))
    }

    /// Records where to resume (inside the batch transaction).
    pub fn save_offsets<'a>(
        &self,
        offsets: impl IntoIterator<Item = (&'a (String, i32), &'a i64)>,
    ) -> Result<(), StateError> {
        let mut stmt = self
            .conn
            .prepare_cached(host_sql!(
                "INSERT OR REPLACE INTO _rewind_offsets (stream, partition, next_offset)
                 VALUES (?1, ?2, ?3)"
            ))
            .map_err(|e| self.err(e))?;
        for ((stream, partition), next) in offsets {
            stmt.execute(params![stream, partition, next])
                .map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    fn exec_cached(&self, sql: &'static str) -> Result<(), StateError> {
        self.conn
            .prepare_cached(sql)
            .and_then(|mut s| s.execute([]))
            .map(drop)
            .map_err(|e| self.err(e))
    }

    /// Starts a batch transaction.
    pub fn begin(&self) -> Result<(), StateError> {
        self.exec_cached(host_sql!("BEGIN IMMEDIATE"))
    }

    /// Commits the batch transaction.
    pub fn commit(&self) -> Result<(), StateError> {
        self.write_outbox_page()?;
        self.exec_cached(host_sql!("COMMIT"))
    }

    /// Abandons the batch transaction.
    pub fn rollback(&self) -> Result<(), StateError> {
        self.discard_outbox_page();
        if self.conn.is_autocommit() {
            return Ok(());
        }
        self.exec_cached(host_sql!("ROLLBACK"))
    }

    /// Opens the savepoint one event runs in.
    pub fn savepoint(&self) -> Result<(), StateError> {
        self.exec_cached(host_sql!("SAVEPOINT rewind_event"))
    }

    /// Keeps the event's writes.
    pub fn release(&self) -> Result<(), StateError> {
        self.exec_cached(host_sql!("RELEASE rewind_event"))
    }

    /// Discards the event's writes.
    pub fn rollback_event(&self) -> Result<(), StateError> {
        self.exec_cached(host_sql!("ROLLBACK TO rewind_event"))?;
        self.exec_cached(host_sql!("RELEASE rewind_event"))
    }

    /// Prepares guest SQL for the event at `position`: SQL randomness is
    /// reseeded and the SQL budget reset. Pair with an `EventClock`.
    pub fn enter_event(&self, position: &Position, seed: Seed, sql_budget: u64) {
        self.event_wrote.store(false, Ordering::Relaxed);
        self.guard.reseed(seed);
        self.guard.enter_event(&self.conn);
        if let Some(stall) = &self.stall {
            stall.enter_event(position);
        }
        self.sql_periods.store(0, Ordering::Relaxed);
        self.sql_budget_periods.store(
            sql_budget.div_ceil(PROGRESS_PERIOD as u64),
            Ordering::Relaxed,
        );
    }

    /// Lifts the SQL budget for the host's own statements.
    pub fn leave_event(&self) {
        self.sql_budget_periods.store(u64::MAX, Ordering::Relaxed);
    }

    /// Whether the last guest event ran a statement that may have written
    /// (see [`StateDb::enter_event`]); if not, it changed nothing in the
    /// database, whatever became of it.
    pub fn event_wrote(&self) -> bool {
        self.event_wrote.load(Ordering::Relaxed)
    }

    fn guest_error(&self, error: rusqlite::Error) -> GuestSqlError {
        use rusqlite::ErrorCode as C;
        match &error {
            rusqlite::Error::SqliteFailure(code, _) => match code.code {
                // The stall watch's interrupt, or the SQL budget's.
                C::OperationInterrupted => match self.stall.as_ref().filter(|s| s.take_stalled()) {
                    Some(stall) => GuestSqlError::Stalled {
                        limit: stall.limit(),
                    },
                    None => GuestSqlError::BudgetExhausted {
                        budget: self.sql_budget_periods.load(Ordering::Relaxed)
                            * PROGRESS_PERIOD as u64,
                    },
                },
                C::OutOfMemory => GuestSqlError::OutOfMemory {
                    limit_mib: memory::limit_mib(),
                },
                C::SystemIoFailure
                | C::DiskFull
                | C::DatabaseCorrupt
                | C::CannotOpen
                | C::NotADatabase
                | C::ReadOnly
                | C::FileLockingProtocolFailed => GuestSqlError::Host(self.with_os_error(error)),
                _ => GuestSqlError::Statement(error.to_string()),
            },
            _ => GuestSqlError::Statement(error.to_string()),
        }
    }

    /// Runs a guest statement to completion; returns the rows it changed.
    /// `sql` is its text as the guest passed it: checked as UTF-8 only
    /// when it is not a statement kept already (`GuestSqlError::NotUtf8`).
    pub fn guest_execute(&self, sql: &[u8], params: &[ValueRef<'_>]) -> Result<u64, GuestSqlError> {
        let before = self.conn.total_changes();
        let result = self.guard.as_guest(|| {
            guard::guest_statement(sql)?;
            self.guest_direct.with_text(&self.conn, sql, false, |stmt| {
                if !stmt.readonly() {
                    self.event_wrote.store(true, Ordering::Relaxed);
                }
                stmt.run(params)
            })
        });
        let (ran, created) = result.map_err(|e| self.guest_error(e))?;
        ran.map_err(|_| GuestSqlError::NotUtf8)?;
        self.check_stored(created)?;
        Ok(self.conn.total_changes().saturating_sub(before))
    }

    /// Runs a guest query and collects its rows (`sql` as for
    /// [`StateDb::guest_execute`]).
    pub fn guest_query(
        &self,
        sql: &[u8],
        params: &[ValueRef<'_>],
    ) -> Result<GuestRows, GuestSqlError> {
        let result = self.guard.as_guest(|| {
            guard::guest_statement(sql)?;
            let large = holds_large_value(params);
            self.guest_statements
                .with_text(&self.conn, sql, large, |stmt| {
                    if !stmt.readonly() {
                        self.event_wrote.store(true, Ordering::Relaxed);
                    }
                    collect_rows(stmt, params)
                })
        });
        let (rows, created) = result.map_err(|e| self.guest_error(e))?;
        let rows = rows.map_err(|_| GuestSqlError::NotUtf8)?;
        self.check_stored(created)?;
        Ok(rows)
    }

    /// Fails the event if the guest statement that just ran stored what
    /// would make SQLite draw on its process-wide random generator later:
    /// a row with the largest rowid (the table's next rowids are then
    /// picked at random), or a table (`created`) with a column name SQLite
    /// made up at random.
    fn check_stored(&self, created: Option<String>) -> Result<(), GuestSqlError> {
        if let Some(table) = self.guard.take_largest_rowid() {
            return Err(GuestSqlError::Unreplayable(format!(
                "a row of table {table} got rowid {max}, the largest there is: SQLite then \
                 picks the table's next rowids at random, which no replay could repeat; keep \
                 rowids below it (or declare the key AUTOINCREMENT, which fails instead)",
                max = i64::MAX
            )));
        }
        let Some(table) = created else {
            return Ok(());
        };
        let names = self
            .host_statements
            .with(
                &self.conn,
                host_sql!("SELECT name FROM pragma_table_info(?1, 'main')"),
                false,
                |s| {
                    s.query_map([&table], |row| row.get::<_, String>(0))?
                        .collect::<rusqlite::Result<Vec<String>>>()
                },
            )
            .map_err(|e| GuestSqlError::Host(self.with_os_error(e)))?;
        match guard::made_up_column(&names) {
            None => Ok(()),
            Some((stem, alike)) => Err(GuestSqlError::Unreplayable(format!(
                "table {table} would have {alike} columns named {stem:?}: once {stem}:1 … \
                 {stem}:4 are taken, SQLite numbers the next alike name from its random \
                 generator, which no replay could repeat; name the columns of its SELECT apart \
                 (… AS name)"
            ))),
        }
    }
}

/// Whether binding `params` copies enough bytes into a statement that they
/// should not stay bound to it until its next use.
fn holds_large_value(params: &[ValueRef<'_>]) -> bool {
    params.iter().any(|value| match value {
        ValueRef::Text(b) | ValueRef::Blob(b) => b.len() > LARGE_BINDING,
        _ => false,
    })
}

/// Bytes of a bound text or blob past which it is released after the statement runs.
const LARGE_BINDING: usize = 64 << 10;

/// The error for a text in a query's result that is not UTF-8.
fn not_utf8(column: &str, row: usize) -> rusqlite::Error {
    rusqlite::Error::SqliteFailure(
        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_MISMATCH),
        Some(format!(
            "column {column:?} of result row {} holds text that is not valid UTF-8; \
             select it as a blob (CAST({column} AS BLOB)) to read its bytes",
            row + 1
        )),
    )
}

/// Runs a guest query and collects its rows, up to [`MAX_QUERY_BYTES`].
fn collect_rows(
    stmt: &mut rusqlite::Statement<'_>,
    params: &[ValueRef<'_>],
) -> rusqlite::Result<GuestRows> {
    let columns: Vec<String> = stmt.column_names().map(str::to_owned).collect();
    if let Some((stem, alike)) = guard::made_up_column(&columns) {
        return Err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ERROR),
            Some(format!(
                "the result has {alike} columns named {stem:?}: once {stem}:1 … {stem}:4 are \
                 taken, SQLite numbers the next alike column of a subquery or view from its \
                 random generator, which no replay could repeat; name them apart (… AS name)"
            )),
        ));
    }
    let width = columns.len();
    let mut rows = stmt.query(rusqlite::params_from_iter(
        params
            .iter()
            .map(|&v| rusqlite::types::ToSqlOutput::Borrowed(v)),
    ))?;
    let mut out = Vec::new();
    let mut bytes = 0usize;
    while let Some(row) = rows.next()? {
        let mut values = Vec::with_capacity(width);
        for (i, column) in columns.iter().enumerate() {
            let value = match row.get_ref(i)? {
                // SQL can store a text that is not UTF-8 (`CAST(x'ff' AS
                // TEXT)`); the world's `text` is a string, so say which.
                ValueRef::Text(t) => SqlValue::Text(
                    String::from_utf8(t.to_vec()).map_err(|_| not_utf8(column, out.len()))?,
                ),
                ValueRef::Null => SqlValue::Null,
                ValueRef::Integer(i) => SqlValue::Integer(i),
                ValueRef::Real(r) => SqlValue::Real(r),
                ValueRef::Blob(b) => SqlValue::Blob(b.to_vec()),
            };
            bytes += 16
                + match &value {
                    SqlValue::Text(s) => s.len(),
                    SqlValue::Blob(b) => b.len(),
                    _ => 0,
                };
            values.push(value);
        }
        if bytes > MAX_QUERY_BYTES {
            return Err(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_TOOBIG),
                Some(format!(
                    "query result is larger than {} MiB; add a LIMIT",
                    MAX_QUERY_BYTES >> 20
                )),
            ));
        }
        out.push(values);
    }
    Ok(GuestRows { columns, rows: out })
}
