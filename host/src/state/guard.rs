//! What guest SQL may do: SQLite's authorizer, and deterministic replacements
//! for SQLite's nondeterministic functions.
//!
//! The authorizer is installed once on the connection and consults a flag
//! that is set only while a guest statement is prepared or stepped, so the
//! host's own statements are never restricted. SQLite consults the authorizer
//! at prepare time (and again if it re-prepares a statement after a schema
//! change, which happens inside the step), so host statements are kept in the
//! statement cache under a key no guest statement may have.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use rand_chacha::ChaCha20Rng;
use rand_core::Rng;
use rusqlite::functions::FunctionFlags;
use rusqlite::hooks::{AuthAction, AuthContext, Authorization};
use rusqlite::{Connection, Error as SqlError};

use crate::event::{Position, Seed};

/// Every host statement prepared through the statement cache starts with
/// this mark, and guest statements may not: so a guest can never hit a host
/// statement in the cache, which was authorised with host rights.
pub const HOST_STATEMENT_MARK: &str = "/* rewind:host */ ";

/// Checks a guest statement can be prepared through the shared cache.
pub fn guest_statement(sql: &str) -> rusqlite::Result<&str> {
    if sql.starts_with(HOST_STATEMENT_MARK) {
        return Err(SqlError::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_AUTH),
            Some("guest SQL may not start with the host's statement mark".into()),
        ));
    }
    Ok(sql)
}

/// State shared between the connection's callbacks and the host.
pub struct Guard {
    guest: AtomicBool,
    /// What the statement being prepared has shown itself to be so far.
    statement: Mutex<StatementKind>,
    denial: Mutex<Option<String>>,
    rng: Mutex<LazyRng>,
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
            statement: Mutex::new(StatementKind::default()),
            denial: Mutex::new(None),
            rng: Mutex::new(LazyRng::new(Position::init().seed())),
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
            let kind = {
                let mut kind = auth.statement.lock().unwrap_or_else(|p| p.into_inner());
                kind.observe(&ctx.action);
                *kind
            };
            match refusal(&ctx.action, kind) {
                None => Authorization::Allow,
                Some(reason) => {
                    *auth.denial.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
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
        Ok(guard)
    }

    /// Reseeds SQL randomness for an event.
    pub fn reseed(&self, seed: Seed) {
        *self.rng.lock().unwrap_or_else(|p| p.into_inner()) = LazyRng::new(seed);
    }

    /// Runs `f` with guest restrictions on; a denial's reason replaces
    /// SQLite's terse "not authorized" in the error.
    pub fn as_guest<T>(&self, f: impl FnOnce() -> rusqlite::Result<T>) -> Result<T, SqlError> {
        *self.statement.lock().unwrap_or_else(|p| p.into_inner()) = StatementKind::default();
        self.guest.store(true, Ordering::Relaxed);
        let result = f();
        self.guest.store(false, Ordering::Relaxed);
        let denial = self.denial.lock().unwrap_or_else(|p| p.into_inner()).take();
        match (result, denial) {
            (Err(SqlError::SqliteFailure(code, _)), Some(reason))
                if code.code == rusqlite::ErrorCode::AuthorizationForStatementDenied =>
            {
                Err(SqlError::SqliteFailure(code, Some(reason)))
            }
            (result, _) => result,
        }
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
        A::Function { .. } | A::Select | A::Recursive | A::Reindex { .. } => None,
        A::Unknown { code, .. } => Some(format!("guest SQL may not perform action {code}")),
        // The enum is non-exhaustive: refuse whatever a future SQLite adds.
        #[allow(unreachable_patterns)]
        _ => Some("guest SQL may not perform this action".into()),
    }
}
