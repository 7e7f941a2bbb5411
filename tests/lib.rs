//! Helpers shared by the integration tests: where the built processors and
//! binary are, run configurations, and an ordered dump of a state DB.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use rewind_host::{RunConfig, RuntimeConfig};
use sha2::{Digest, Sha256};

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the workspace")
        .to_owned()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

/// A processor built by `cargo xtask build-processors`.
pub fn processor(name: &str) -> PathBuf {
    let path = target_dir().join("processors").join(format!("{name}.wasm"));
    assert!(
        path.is_file(),
        "{} is missing: run `cargo xtask build-processors` first (`cargo xtask test` does)",
        path.display()
    );
    path
}

/// Lets the `rewind` processes the tests start be stopped as a user would
/// stop them: a test run started in the background by a script (`&`), or
/// under `nohup`, inherits SIGINT or SIGHUP ignored, and `rewind` rightly
/// keeps signals ignored at its start ignored, so the tests that stop it
/// with them would wait for ever. Once per test process, before the first
/// child is started.
pub fn default_stop_signals() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        for signal in [libc::SIGINT, libc::SIGHUP, libc::SIGTERM] {
            // SAFETY: setting a signal's disposition to the default, before
            // this process has started children that could race it.
            unsafe {
                libc::signal(signal, libc::SIG_DFL);
            }
        }
    });
}

/// The `rewind` binary built by `cargo build -p rewind-host`.
pub fn rewind_bin() -> PathBuf {
    default_stop_signals();
    let path = target_dir().join("debug").join("rewind");
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build -p rewind-host` first (`cargo xtask test` does)",
        path.display()
    );
    path
}

/// A compile cache shared by the tests, so each processor compiles once.
pub fn cache_dir() -> PathBuf {
    target_dir().join("test-cache")
}

/// The arguments of `rewind run` of the built processor `module` over
/// `input` into `state`, with the tests' compile cache.
pub fn run_args(module: &str, input: &Path, state: &Path) -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> = vec!["run".into(), "--processor".into()];
    args.push(processor(module).into());
    args.extend([
        "--input".into(),
        input.into(),
        "--state".into(),
        state.into(),
        "--cache-dir".into(),
        cache_dir().into(),
    ]);
    args
}

/// `rewind replay` of `tape` with the modules `old` and `new` (as
/// [`processor`] names them), with the tests' cache: arguments to extend.
pub fn replay_args(tape: &Path, old: &str, new: &str) -> Vec<std::ffi::OsString> {
    vec![
        "replay".into(),
        "--tape".into(),
        tape.into(),
        "--old".into(),
        processor(old).into(),
        "--new".into(),
        processor(new).into(),
        "--cache-dir".into(),
        cache_dir().into(),
    ]
}

/// `rewind run` (see [`run_args`]), for more arguments and to be run.
pub fn rewind_run(module: &str, input: &Path, state: &Path) -> std::process::Command {
    let mut command = std::process::Command::new(rewind_bin());
    command.args(run_args(module, input, state));
    command
}

/// A run configuration with the tests' cache.
pub fn config(processor: &Path, input: &Path, state: &Path) -> RunConfig {
    let mut config = RunConfig::new(processor, input, state);
    config.runtime = RuntimeConfig {
        cache_dir: Some(cache_dir()),
        ..RuntimeConfig::default()
    };
    config
}

/// Every table of a SQLite file, host tables included, in a canonical text
/// form: tables by name, rows ordered by every column; the outbox as the
/// outputs it holds.
pub fn dump(db: &Path) -> String {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap_or_else(|e| panic!("open {}: {e}", db.display()));
    let tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_schema WHERE type = 'table' ORDER BY name")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let mut out = String::new();
    for table in tables {
        if table == "_rewind_outbox" {
            // Pending outputs, not pages: how outputs are split into pages
            // follows the batches, which may differ between equal runs.
            let pending = rewind_host::StateDb::open_existing(db)
                .and_then(|state| state.pending_outbox(None, usize::MAX))
                .unwrap_or_else(|e| panic!("outbox of {}: {e}", db.display()));
            writeln!(out, "table {table} (pending outputs)").unwrap();
            for row in pending {
                writeln!(out, "  {row:?}").unwrap();
            }
            continue;
        }
        let mut stmt = conn.prepare(&format!("SELECT * FROM \"{table}\"")).unwrap();
        let width = stmt.column_count();
        let order: Vec<String> = (1..=width).map(|i| i.to_string()).collect();
        drop(stmt);
        stmt = conn
            .prepare(&format!(
                "SELECT * FROM \"{table}\" ORDER BY {}",
                order.join(", ")
            ))
            .unwrap();
        writeln!(out, "table {table}").unwrap();
        let mut rows = stmt.query([]).unwrap();
        while let Some(row) = rows.next().unwrap() {
            let values: Vec<String> = (0..width)
                .map(|i| format!("{:?}", row.get::<_, rusqlite::types::Value>(i).unwrap()))
                .collect();
            writeln!(out, "  {}", values.join(" | ")).unwrap();
        }
    }
    out
}

/// A hash of [`dump`].
pub fn dump_hash(db: &Path) -> String {
    hex::encode(Sha256::digest(dump(db).as_bytes()))
}

/// Rows of a query, each value formatted with `Debug`.
pub fn rows(db: &Path, sql: &str) -> Vec<Vec<rusqlite::types::Value>> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    let mut stmt = conn.prepare(sql).unwrap();
    let width = stmt.column_count();
    stmt.query_map([], |r| (0..width).map(|i| r.get(i)).collect())
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// A SQLite text value (any other type fails the test).
pub fn text(v: &rusqlite::types::Value) -> String {
    match v {
        rusqlite::types::Value::Text(s) => s.clone(),
        other => panic!("expected text, got {other:?}"),
    }
}

/// A SQLite integer value (any other type fails the test).
pub fn int(v: &rusqlite::types::Value) -> i64 {
    match v {
        rusqlite::types::Value::Integer(i) => *i,
        other => panic!("expected an integer, got {other:?}"),
    }
}

/// Lets `child` run until `reached()` says it has made the progress wanted
/// (polled every 200 µs). Returns false if the child finished first.
pub fn run_until(child: &mut std::process::Child, mut reached: impl FnMut() -> bool) -> bool {
    while !reached() {
        if child
            .try_wait()
            .expect("the child can be waited on")
            .is_some()
        {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
    true
}

/// Lets `child` [`run_until`] `reached()`, then `after` longer, and kills it
/// with SIGKILL: no destructor, no flush, no commit. Returns whether the kill
/// landed, i.e. the child had not already finished.
///
/// Kill points measured in progress rather than in time land mid-run however
/// fast the machine is: a kill after a fixed delay misses a run that got
/// faster.
pub fn kill_when(
    child: &mut std::process::Child,
    reached: impl FnMut() -> bool,
    after: std::time::Duration,
) -> bool {
    if !run_until(child, reached) {
        return false;
    }
    std::thread::sleep(after);
    let _ = child.kill();
    // A child that finished before the kill exits successfully.
    !child.wait().expect("the child can be waited on").success()
}

/// Lets `child` (its output piped) [`run_until`] `reached()`, then sends it
/// `signal` (`-INT`, `-TERM`: as `kill` takes it) and returns its output.
/// Panics when the child finished first.
pub fn signal_when(
    mut child: std::process::Child,
    reached: impl FnMut() -> bool,
    signal: &str,
) -> std::process::Output {
    assert!(
        run_until(&mut child, reached),
        "finished before it could be signalled: {:?}",
        child.wait_with_output()
    );
    let sent = std::process::Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(sent.success());
    child
        .wait_with_output()
        .expect("the child can be waited on")
}

/// Runs `program` with `args` to its end (its output discarded) and
/// returns its exit code and peak resident memory in KiB, as the kernel
/// counted it. Through a small Python parent: a child's peak counts the
/// memory of the process it was spawned from (the address space it starts
/// in), and a test process holds whatever the tests beside it do.
pub fn peak_rss_kib(program: &Path, args: &[&std::ffi::OsStr]) -> (Option<i32>, u64) {
    let (code, kib, _) = peak_rss_kib_and_stdout(program, args);
    (code, kib)
}

/// [`peak_rss_kib`], and what the program wrote to its standard output.
pub fn peak_rss_kib_and_stdout(
    program: &Path,
    args: &[&std::ffi::OsStr],
) -> (Option<i32>, u64, String) {
    const MEASURE: &str = "import resource, subprocess, sys\n\
        r = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)\n\
        print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n\
        sys.stdout.flush()\n\
        sys.stdout.buffer.write(r.stdout)";
    let out = std::process::Command::new("python3")
        .args(["-c", MEASURE])
        .arg(program)
        .args(args)
        .output()
        .expect("python3 runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let (first, rest) = text.split_once('\n').unwrap_or((&text, ""));
    let mut words = first.split_whitespace().map(|w| w.parse::<i64>().ok());
    match (words.next().flatten(), words.next().flatten()) {
        (Some(code), Some(kib)) => (
            i32::try_from(code).ok().filter(|c| *c >= 0),
            kib as u64,
            rest.to_owned(),
        ),
        _ => panic!("measuring {}: {out:?}", program.display()),
    }
}

/// The length of `path`, 0 while it does not exist.
pub fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// [`kill_when`] the file `watched` (a run's tape or output file: they grow
/// as batches commit) has grown to `bytes`.
pub fn kill_when_grown(
    child: &mut std::process::Child,
    watched: &Path,
    bytes: u64,
    after: std::time::Duration,
) -> bool {
    kill_when(child, || file_len(watched) >= bytes, after)
}

/// A small deterministic generator for test streams.
pub struct XorShift(pub u64);

impl XorShift {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// `n` completed orders (JSONL lines) of `customers` customers, none repeated.
pub fn completed_orders(n: usize, customers: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            format!(
                "{{\"type\":\"order_completed\",\"order_id\":\"o-{i}\",\"customer_id\":\"c-{}\",\"amount_cents\":{},\"currency\":\"EUR\"}}\n",
                i % customers,
                i % 997
            )
        })
        .collect()
}

/// A kcat -J line.
pub fn envelope(topic: &str, offset: i64, ts: i64, key: &str, payload: &str) -> String {
    serde_json::json!({
        "topic": topic, "partition": 0, "offset": offset, "tstype": "create", "ts": ts,
        "broker": 0, "key": key, "payload": payload,
    })
    .to_string()
}

/// A real Kafka-API broker (tansu, in memory) on a free port, for one test;
/// stopped when dropped. `cargo xtask test` builds tansu first.
/// Where xtask keeps the tools it builds once per machine.
fn tools_dir() -> PathBuf {
    std::env::var_os("REWIND_TOOLS")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("CARGO_HOME").map(|h| PathBuf::from(h).join("rewind-tools")))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/rewind-tools")))
        .expect("HOME is set")
}

/// Runs the independent Kafka client (confluent-kafka in a venv that
/// `cargo xtask test` installs): `produce` or `consume` `topic` from or to
/// `file`; returns how many records it handled.
pub fn kafka_client(command: &str, broker: &Broker, topic: &str, file: &Path) -> u64 {
    let python = tools_dir().join("venv/bin/python");
    assert!(
        python.is_file(),
        "{} is missing: `cargo xtask test` installs it",
        python.display()
    );
    let out = std::process::Command::new(python)
        .arg(root().join("tests/client/kafka_client.py"))
        .args([command, &broker.address(), topic])
        .arg(file)
        .output()
        .expect("the Kafka client runs");
    assert!(
        out.status.success(),
        "kafka_client {command} {topic} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("the client prints a count")
}

pub struct Broker {
    child: std::process::Child,
    pub port: u16,
    tansu: PathBuf,
    storage: Option<PathBuf>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

impl Broker {
    /// A broker keeping everything in memory.
    pub fn start() -> Broker {
        let port = free_port();
        Broker::launch(port, None)
    }

    /// A broker keeping its log in SQLite under `dir`, so it survives
    /// [`Broker::restart`].
    pub fn start_durable(dir: &Path) -> Broker {
        Broker::launch(free_port(), Some(dir.to_owned()))
    }

    /// Stops the broker and starts it again on the same port and storage.
    pub fn restart(&mut self) {
        self.stop();
        *self = Broker::launch(self.port, self.storage.clone());
    }

    /// Stops the broker (kill -9).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn launch(port: u16, storage: Option<PathBuf>) -> Broker {
        let tansu = tools_dir().join("bin/tansu");
        assert!(
            tansu.is_file(),
            "{} is missing: `cargo xtask test` (or `cargo xtask broker start`) builds it",
            tansu.display()
        );
        let url = format!("tcp://127.0.0.1:{port}");
        let mut command = std::process::Command::new(&tansu);
        command.args([
            "broker",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &url,
        ]);
        match &storage {
            // tansu resolves a sqlite:// path against its working directory.
            Some(dir) => command
                .current_dir(dir)
                .args(["--storage-engine", "sqlite://tansu.db"]),
            None => command.args(["--storage-engine", "memory://tansu/"]),
        };
        let child = command
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("tansu starts");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "tansu did not come up on {port}"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Broker {
            child,
            port,
            tansu,
            storage,
        }
    }

    /// `host:port` for clients.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Creates a topic with `partitions` partitions.
    pub fn create_topic(&self, name: &str, partitions: u32) {
        let status = std::process::Command::new(&self.tansu)
            .args([
                "topic",
                "create",
                name,
                "--partitions",
                &partitions.to_string(),
            ])
            .args(["--broker", &format!("tcp://127.0.0.1:{}", self.port)])
            .status()
            .expect("tansu topic create runs");
        assert!(status.success(), "creating topic {name} failed");
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
