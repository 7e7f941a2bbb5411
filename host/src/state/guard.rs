//! What guest SQL may do: SQLite's authorizer, and deterministic replacements
//! for SQLite's nondeterministic functions.
//!
//! The authorizer is installed once on the connection and consults a flag
//! that is set only while a guest statement is prepared or stepped, so the
//! host's own statements are never restricted. SQLite consults the authorizer
//! at prepare time (and again if it re-prepares a statement after a schema
//! change, which happens inside the step), so host statements are kept in the
//! statement cache under a key no guest statement may have.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rand_chacha::ChaCha20Rng;
use rand_core::Rng;
use rusqlite::functions::FunctionFlags;
use rusqlite::hooks::{Action, AuthAction, AuthContext, Authorization};
use rusqlite::{Connection, Error as SqlError};

use crate::event::{Position, Seed};

/// Every host statement prepared through the statement cache starts with
/// this mark, and guest statements may not: so a guest can never hit a host
/// statement in the cache, which was authorised with host rights.
pub const HOST_STATEMENT_MARK: &str = "/* rewind:host */ ";

/// Checks a guest statement can be prepared through the shared cache.
pub fn guest_statement(sql: &[u8]) -> rusqlite::Result<()> {
    if sql.starts_with(HOST_STATEMENT_MARK.as_bytes()) {
        return Err(SqlError::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_AUTH),
            Some("guest SQL may not start with the host's statement mark".into()),
        ));
    }
    Ok(())
}

/// State shared between the connection's callbacks and the host.
pub struct Guard {
    guest: AtomicBool,
    /// Counts guest statements begun and progress-handler calls: the
    /// stall watch (`stall.rs`) sees a guest statement move by it.
    progress: AtomicU64,
    /// Held while a guest statement ends and while the stall watch
    /// interrupts one, so an interrupt meant for a stuck statement cannot
    /// land on the host's statement after it (see `interrupt_if_stuck`).
    turn: Mutex<()>,
    /// Whether the stall watch interrupted the guest statement running.
    stalled: AtomicBool,
    /// What the authorizer noted of the guest statement being prepared,
    /// and whether it noted anything: a statement from the cache is not
    /// authorised again, and then costs no lock.
    noted: Mutex<Noted>,
    noted_any: AtomicBool,
    rng: Mutex<LazyRng>,
    /// The connection's `total_changes` when the current event began: SQL's
    /// `changes()` and `total_changes()` count from there (see `enter_event`).
    changes_base: AtomicU64,
    /// A processor table that got a row with the largest rowid (see
    /// `install`), flagged first for a cheap check.
    largest: AtomicBool,
    largest_in: Mutex<Option<String>>,
}

/// What the authorizer noted while a guest statement was prepared.
#[derive(Default)]
struct Noted {
    /// What the statement has shown itself to be so far.
    kind: StatementKind,
    /// Why it refused an action.
    denial: Option<String>,
    /// A table the statement creates (`CREATE TABLE`, `… AS SELECT` among
    /// them): its column names are checked once the statement ran.
    created: Option<String>,
}

/// A generator built on first use: most events never call SQL `random()`.
struct LazyRng {
    seed: Seed,
    rng: Option<ChaCha20Rng>,
}

impl LazyRng {
    fn new(seed: Seed) -> Self {
        LazyRng { seed, rng: None }
    }

    fn get(&mut self) -> &mut ChaCha20Rng {
        let seed = self.seed;
        self.rng.get_or_insert_with(|| seed.rng(Seed::SQL))
    }
}

impl Guard {
    /// Installs the authorizer and the deterministic functions on `conn`.
    pub fn install(conn: &mut Connection) -> rusqlite::Result<Arc<Guard>> {
        let guard = Arc::new(Guard {
            guest: AtomicBool::new(false),
            progress: AtomicU64::new(0),
            turn: Mutex::new(()),
            stalled: AtomicBool::new(false),
            noted: Mutex::new(Noted::default()),
            noted_any: AtomicBool::new(false),
            rng: Mutex::new(LazyRng::new(Position::init().seed())),
            changes_base: AtomicU64::new(0),
            largest: AtomicBool::new(false),
            largest_in: Mutex::new(None),
        });

        let auth = Arc::clone(&guard);
        conn.authorizer(Some(move |ctx: AuthContext<'_>| {
            if !auth.guest.load(Ordering::Relaxed) {
                return Authorization::Allow;
            }
            if std::env::var_os("REWIND_DEBUG_AUTH").is_some() {
                eprintln!(
                    "auth: {:?} db={:?} accessor={:?}",
                    ctx.action, ctx.database_name, ctx.accessor
                );
            }
            auth.noted_any.store(true, Ordering::Relaxed);
            let mut noted = auth.noted.lock().unwrap_or_else(|p| p.into_inner());
            noted.kind.observe(&ctx.action);
            match refusal(&ctx.action, noted.kind) {
                None => {
                    if let AuthAction::CreateTable { table_name } = ctx.action {
                        noted.created = Some(table_name.to_owned());
                    }
                    Authorization::Allow
                }
                Some(reason) => {
                    noted.denial = Some(reason);
                    Authorization::Deny
                }
            }
        }))?;

        // `random()` and `randomblob(N)` draw from the current event's stream,
        // replacing SQLite's own (which reads the OS's entropy).
        let flags = FunctionFlags::SQLITE_UTF8 | FunctionFlags::SQLITE_DIRECTONLY;
        let rng = Arc::clone(&guard);
        conn.create_scalar_function("random", 0, flags, move |_| {
            Ok(rng
                .rng
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get()
                .next_u64() as i64)
        })?;
        let rng = Arc::clone(&guard);
        conn.create_scalar_function("randomblob", 1, flags, move |ctx| {
            // SQLite's randomblob treats anything below 1 as 1.
            let n = ctx.get::<i64>(0).unwrap_or(1).clamp(1, 1 << 20) as usize;
            let mut bytes = vec![0; n];
            rng.rng
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get()
                .fill_bytes(&mut bytes);
            Ok(bytes)
        })?;

        // `changes()` and `total_changes()` read the connection, which the
        // host's own statements (offsets, outbox, dead letters) share and a
        // restart renews: they would tell a guest where batches end. Theirs
        // count the current event's statements only. (`last_insert_rowid()`
        // is reset per event instead: `enter_event`.)
        let base = Arc::clone(&guard);
        conn.create_scalar_function("total_changes", 0, flags, move |ctx| {
            // SAFETY: the connection is used on this thread only, for this call.
            let total = unsafe { ctx.get_connection() }?.total_changes();
            Ok(total.saturating_sub(base.changes_base.load(Ordering::Relaxed)) as i64)
        })?;
        let base = Arc::clone(&guard);
        conn.create_scalar_function("changes", 0, flags, move |ctx| {
            // SAFETY: as above.
            let conn = unsafe { ctx.get_connection() }?;
            // Until a statement of this event changed a row, the last
            // statement that did may be the host's or another event's; once
            // one did, it is this event's (no host statement runs within one).
            // A statement of the event that changed nothing leaves 0 either way.
            let changed = conn.total_changes() != base.changes_base.load(Ordering::Relaxed);
            Ok(if changed { conn.changes() as i64 } else { 0 })
        })?;

        // A row stored with the largest rowid (i64::MAX) makes SQLite pick
        // the table's next rowids at random, from its process-wide generator
        // that the host cannot seed per event. The update hook sees the
        // rowid of every insert and update of a rowid table (tables WITHOUT
        // ROWID, which cannot get there, do not call it); the statement that
        // stored it fails its event (`StateDb::check_stored`).
        let watch = Arc::clone(&guard);
        conn.update_hook(Some(
            move |action: Action, db: &str, table: &str, rowid: i64| {
                if rowid == i64::MAX
                    && action != Action::SQLITE_DELETE
                    && db == "main"
                    && !is_host_table(table)
                {
                    *watch.largest_in.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some(table.to_owned());
                    watch.largest.store(true, Ordering::Relaxed);
                }
            },
        ))?;
        Ok(guard)
    }

    /// Notes that SQL made progress (the progress handler calls this).
    pub fn tick(&self) {
        self.progress.fetch_add(1, Ordering::Relaxed);
    }

    /// How far the running guest statement got, or `None` when none runs.
    pub fn guest_progress(&self) -> Option<u64> {
        self.guest
            .load(Ordering::Relaxed)
            .then(|| self.progress.load(Ordering::Relaxed))
    }

    /// Interrupts the guest statement running on the connection of
    /// `interrupt` if its progress is still `seen`; returns whether it did.
    ///
    /// Holding the turn, the statement cannot end in between: an interrupt
    /// given once it had ended would stop whichever statement runs next,
    /// the host's own among them. One given as the stuck step returns
    /// (SQLite looks for it between steps) stops nothing: SQLite clears it
    /// when the next statement starts.
    pub fn interrupt_if_stuck(&self, seen: u64, interrupt: &rusqlite::InterruptHandle) -> bool {
        let _turn = self.turn.lock().unwrap_or_else(|p| p.into_inner());
        if self.guest_progress() != Some(seen) {
            return false;
        }
        self.stalled.store(true, Ordering::Relaxed);
        interrupt.interrupt();
        true
    }

    /// Whether the stall watch interrupted the last guest statement.
    pub fn take_stalled(&self) -> bool {
        self.stalled.swap(false, Ordering::Relaxed)
    }

    /// The processor table that got a row with the largest rowid since the
    /// last call, if one did.
    pub fn take_largest_rowid(&self) -> Option<String> {
        if !self.largest.swap(false, Ordering::Relaxed) {
            return None;
        }
        self.largest_in
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// Starts an event's view of the connection: SQL `changes()`,
    /// `total_changes()` and `last_insert_rowid()` begin at 0.
    pub fn enter_event(&self, conn: &Connection) {
        self.changes_base
            .store(conn.total_changes(), Ordering::Relaxed);
        // SAFETY: a plain setter on the open connection this guard serves.
        unsafe { rusqlite::ffi::sqlite3_set_last_insert_rowid(conn.handle(), 0) };
    }

    /// Reseeds SQL randomness for an event.
    pub fn reseed(&self, seed: Seed) {
        *self.rng.lock().unwrap_or_else(|p| p.into_inner()) = LazyRng::new(seed);
    }

    /// Runs `f` with guest restrictions on; a denial's reason replaces
    /// SQLite's terse "not authorized" in the error. Also returns the table
    /// the statement was prepared to create, if any (prepared now: a
    /// statement from the cache was checked when it was prepared).
    pub fn as_guest<T>(
        &self,
        f: impl FnOnce() -> rusqlite::Result<T>,
    ) -> Result<(T, Option<String>), SqlError> {
        self.tick();
        // An interrupt of the statement before, if it returned regardless.
        self.stalled.store(false, Ordering::Relaxed);
        self.guest.store(true, Ordering::Relaxed);
        let result = f();
        {
            let _turn = self.turn.lock().unwrap_or_else(|p| p.into_inner());
            self.guest.store(false, Ordering::Relaxed);
        }
        // Taken whole, so the next statement starts from nothing noted.
        let noted = if self.noted_any.swap(false, Ordering::Relaxed) {
            std::mem::take(&mut *self.noted.lock().unwrap_or_else(|p| p.into_inner()))
        } else {
            Noted::default()
        };
        match (result, noted.denial) {
            (Err(SqlError::SqliteFailure(code, _)), Some(reason))
                if code.code == rusqlite::ErrorCode::AuthorizationForStatementDenied =>
            {
                Err(SqlError::SqliteFailure(code, Some(reason)))
            }
            (result, _) => result.map(|value| (value, noted.created)),
        }
    }
}

/// A column name SQLite made up at random, among the names of one result or
/// table: its stem and how many names share that stem.
///
/// SQLite names the columns of a subquery, view or `CREATE TABLE … AS
/// SELECT` apart by appending `:1` … `:4` to a repeated name; once those are
/// taken it appends a number from its process-wide random generator, which
/// the host cannot seed per event. Such a name is `STEM:N` with N outside
/// 1..=4 while `STEM:1` … `STEM:4` are all names too (compared without
/// case, stems taken as SQLite takes them; `every_name_sqlite_makes_up_is_found`
/// checks this against SQLite).
pub fn made_up_column(names: &[String]) -> Option<(String, usize)> {
    // Nearly every result has no name with a colon in it.
    if !names.iter().any(|name| name.contains(':')) {
        return None;
    }
    let stems: Vec<(&str, Option<&str>)> = names.iter().map(|name| stem(name)).collect();
    stems.iter().find_map(|&(stem, number)| {
        // A name numbered past 4 (or at 0)…
        number.filter(|n| !n.is_empty() && !matches!(*n, "1" | "2" | "3" | "4"))?;
        // …that SQLite drew, which it does only once `STEM:1` … `STEM:4` are taken.
        let alike = || stems.iter().filter(|(s, _)| s.eq_ignore_ascii_case(stem));
        let taken = ["1", "2", "3", "4"]
            .iter()
            .all(|k| alike().any(|(_, n)| *n == Some(*k)));
        taken.then(|| (stem.to_owned(), alike().count()))
    })
}

/// A column name's stem and number, by SQLite's own rule: drop trailing
/// digits (never the first character), then a colon before them, if there
/// is one; otherwise the whole name, without a number.
fn stem(name: &str) -> (&str, Option<&str>) {
    let bytes = name.as_bytes();
    let Some(mut j) = bytes.len().checked_sub(1) else {
        return (name, None);
    };
    while j > 0 && bytes[j].is_ascii_digit() {
        j -= 1;
    }
    if bytes[j] == b':' {
        (&name[..j], Some(&name[j + 1..]))
    } else {
        (name, None)
    }
}

fn is_host_table(name: &str) -> bool {
    name.len() >= 8 && name[..8].eq_ignore_ascii_case("_rewind_")
}

fn is_schema_table(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    matches!(
        name.as_str(),
        "sqlite_master" | "sqlite_schema" | "sqlite_temp_master" | "sqlite_temp_schema"
    ) || name.starts_with("pragma_")
}

/// What the authorizer has seen of the statement being prepared.
///
/// ALTER and DROP read the schema table to rewrite it, so those reads are
/// allowed for them. CREATE only reads the schema's rowid, which is allowed
/// for everyone; it is not trusted with more, because `CREATE TABLE … AS
/// SELECT` could copy the schema (and the host tables in it) out.
#[derive(Debug, Default, Clone, Copy)]
struct StatementKind {
    alters_schema: bool,
}

impl StatementKind {
    fn observe(&mut self, action: &AuthAction<'_>) {
        use AuthAction as A;
        if let A::DropTable { .. }
        | A::DropIndex { .. }
        | A::DropTrigger { .. }
        | A::DropView { .. }
        | A::AlterTable { .. } = action
        {
            self.alters_schema = true;
        }
    }

    fn may_read_schema(self) -> bool {
        self.alters_schema
    }
}

/// Why guest SQL may not perform `action`, or `None` if it may.
fn refusal(action: &AuthAction<'_>, kind: StatementKind) -> Option<String> {
    use AuthAction as A;
    let host = |table: &str, verb: &str| {
        is_host_table(table).then(|| format!("guest SQL may not {verb} host table {table}"))
    };
    match action {
        // DDL itself reads the schema table (see `StatementKind`); otherwise
        // guests cannot list the schema and the host tables in it. Writes to
        // the schema table need writable_schema, a PRAGMA, so only DDL can
        // make them.
        // The storage statistics table lists every table's pages, the
        // host's among them (and their layout, which batching decides).
        A::Read { table_name, .. } if table_name.eq_ignore_ascii_case("dbstat") => Some(
            "guest SQL may not read dbstat: it describes the host's tables and pages too".into(),
        ),
        // The database's raw pages, readable and writable: the host's too.
        A::Read { table_name, .. }
        | A::Insert { table_name }
        | A::Update { table_name, .. }
        | A::Delete { table_name }
            if table_name.eq_ignore_ascii_case("sqlite_dbpage") =>
        {
            Some(
                "guest SQL may not use sqlite_dbpage: it reads and writes the database's raw \
                 pages, the host's among them"
                    .into(),
            )
        }
        A::Read {
            table_name,
            column_name,
        } => host(table_name, "read").or_else(|| {
            (is_schema_table(table_name)
                && !column_name.eq_ignore_ascii_case("rowid")
                && !kind.may_read_schema())
            .then(|| {
                format!(
                    "guest SQL may not read {table_name}: the schema includes host tables; \
                     use CREATE TABLE IF NOT EXISTS to create yours"
                )
            })
        }),
        A::Insert { table_name } => host(table_name, "write"),
        A::Update { table_name, .. } => host(table_name, "write"),
        A::Delete { table_name } => host(table_name, "delete from"),
        A::CreateTable { table_name } => host(table_name, "create"),
        A::DropTable { table_name } => host(table_name, "drop"),
        A::AlterTable { table_name, .. } => host(table_name, "alter"),
        A::Analyze { table_name } => host(table_name, "analyze"),
        A::CreateIndex {
            index_name,
            table_name,
        }
        | A::DropIndex {
            index_name,
            table_name,
        } => host(table_name, "index").or_else(|| host(index_name, "name an index after")),
        A::CreateTrigger {
            trigger_name,
            table_name,
        }
        | A::DropTrigger {
            trigger_name,
            table_name,
        } => host(table_name, "add triggers to")
            .or_else(|| host(trigger_name, "name a trigger after")),
        A::CreateView { view_name } | A::DropView { view_name } => {
            host(view_name, "name a view after")
        }
        A::CreateTempTable { .. }
        | A::CreateTempIndex { .. }
        | A::CreateTempTrigger { .. }
        | A::CreateTempView { .. }
        | A::DropTempTable { .. }
        | A::DropTempIndex { .. }
        | A::DropTempTrigger { .. }
        | A::DropTempView { .. } => Some(
            "guest SQL may not use TEMP objects: they would keep state outside the database".into(),
        ),
        A::Pragma { pragma_name, .. } => Some(format!(
            "guest SQL may not run PRAGMA {pragma_name}: the host owns the connection"
        )),
        A::Transaction { .. } | A::Savepoint { .. } => Some(
            "guest SQL may not control transactions: each event already runs in its own savepoint"
                .into(),
        ),
        A::Attach { .. } | A::Detach { .. } => {
            Some("guest SQL may not ATTACH or DETACH databases".into())
        }
        A::CreateVtable { .. } | A::DropVtable { .. } => {
            Some("guest SQL may not create or drop virtual tables".into())
        }
        A::Function { function_name } if function_name.eq_ignore_ascii_case("load_extension") => {
            Some("guest SQL may not load extensions".into())
        }
        // FTS3's tokenizer registry trades in raw pointers (a bound blob
        // becomes one); guests cannot make FTS tables to use one anyway.
        A::Function { function_name } if function_name.eq_ignore_ascii_case("fts3_tokenizer") => {
            Some("guest SQL may not call fts3_tokenizer".into())
        }
        A::Function { .. } | A::Select | A::Recursive | A::Reindex { .. } => None,
        A::Unknown { code, .. } => Some(format!("guest SQL may not perform action {code}")),
        // The enum is non-exhaustive: refuse whatever a future SQLite adds.
        #[allow(unreachable_patterns)]
        _ => Some("guest SQL may not perform this action".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::{Guard, made_up_column};

    /// The stall watch interrupts a guest statement only while it runs,
    /// and one it interrupts as it ends stops no statement after it.
    #[test]
    fn a_stall_interrupt_reaches_only_the_statement_it_was_meant_for() {
        let mut conn = rusqlite::Connection::open_in_memory().unwrap();
        let guard = Guard::install(&mut conn).unwrap();
        let interrupt = conn.get_interrupt_handle();
        let mut seen = None;
        let ((), _) = guard
            .as_guest(|| {
                let progress = guard.guest_progress().expect("a guest statement runs");
                seen = Some(progress);
                // Its step "returns" right after, with the interrupt given.
                assert!(guard.interrupt_if_stuck(progress, &interrupt));
                Ok(())
            })
            .unwrap();
        assert!(guard.guest_progress().is_none());
        assert!(
            !guard.interrupt_if_stuck(seen.unwrap(), &interrupt),
            "the statement ended: nothing to interrupt"
        );
        conn.execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);")
            .expect("the host's next statements run");
        // The next guest statement does not count the last one's interrupt.
        let (stalled, _) = guard.as_guest(|| Ok(guard.take_stalled())).unwrap();
        assert!(!stalled);
    }

    /// The names SQLite gives the columns of `SELECT * FROM (subquery)`.
    fn subquery_names(columns: &[&str]) -> Vec<String> {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        let select: Vec<String> = columns
            .iter()
            .enumerate()
            .map(|(i, name)| format!("{i} AS \"{name}\""))
            .collect();
        let sql = format!("SELECT * FROM (SELECT {})", select.join(", "));
        let stmt = conn.prepare(&sql).unwrap();
        stmt.column_names().map(str::to_owned).collect()
    }

    /// Whatever the names, when SQLite's names for a subquery's columns
    /// differ between two prepares (so it drew on its random generator and
    /// a guest could see it), `made_up_column` flags them.
    #[test]
    fn every_name_sqlite_makes_up_is_found() {
        const NAMES: [&str; 11] = [
            "a", "A", "a:1", "a:3", "A:4", "a:5", ":1", "b", "a:", "1", ":",
        ];
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut flagged = 0;
        for _ in 0..10_000 {
            let columns: Vec<&str> = (0..6 + state % 4)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    NAMES[(state % NAMES.len() as u64) as usize]
                })
                .collect();
            let (first, second) = (subquery_names(&columns), subquery_names(&columns));
            let found = made_up_column(&first);
            if first != second {
                assert!(found.is_some(), "{columns:?}: {first:?} / {second:?}");
            }
            if found.is_some() {
                flagged += 1;
            }
        }
        // The sample reaches the random names at all.
        assert!(flagged > 100, "{flagged}");
    }

    #[test]
    fn names_sqlite_made_up_are_found_and_names_a_person_chose_are_not() {
        for alike in 1..=12 {
            let names = subquery_names(&vec!["Amount"; alike]);
            let found = made_up_column(&names);
            if alike < 6 {
                assert_eq!(found, None, "{names:?}");
            } else {
                assert_eq!(found, Some(("Amount".to_owned(), alike)), "{names:?}");
            }
        }
        // A repeated name that already carries a number, in any case.
        let names = subquery_names(&["x:1", "X:1", "x:1", "x:1", "x:1", "x:1"]);
        assert_eq!(made_up_column(&names), Some(("x".to_owned(), 6)));
        let names = subquery_names(&[":5"; 6]);
        assert_eq!(
            made_up_column(&names),
            Some((String::new(), 6)),
            "{names:?}"
        );
        for chosen in [
            &["ratio:10", "ratio", "a"][..],
            &["a", "a:1", "a:2", "a:3", "a:4", "b:9"],
            &["t:", "t:", "t", "t", "t:0"],
            &["10:30", "11:30", "12:30"],
        ] {
            let names: Vec<String> = chosen.iter().map(|n| n.to_string()).collect();
            assert_eq!(made_up_column(&names), None, "{chosen:?}");
        }
    }
}
