//! A processor that misbehaves on request, to prove the host's sandbox holds.
//!
//! Each event's payload names one act: `{"do": "loop"}`, `{"do": "alloc"}`,
//! `{"do": "sql", "statement": "ATTACH …"}` and so on. Acts that the sandbox
//! should refuse record what the guest saw in the `probes` table, so tests can
//! assert the refusal; acts that break the guest (loops, panics, runaway
//! memory) become dead letters. `{"do": "normal"}` records the event in `seen`.

use std::hint::black_box;

use rewind_guest::{Error, Event, Output, Processor, Result, log, now_ms, random_u64, sql};
use serde::Deserialize;

struct Hostile;

/// Calls handled by this instance: state a guest keeps in memory.
static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

#[derive(Deserialize)]
struct Act {
    #[serde(rename = "do")]
    act: String,
    statement: Option<String>,
    /// How deep `deep-sql` recurses before its statement.
    depth: Option<u32>,
}

fn probe(event: &Event, act: &str, outcome: std::result::Result<String, String>) -> Result<()> {
    let outcome = match outcome {
        Ok(ok) => format!("ok: {ok}"),
        Err(err) => format!("err: {err}"),
    };
    sql::execute(
        "INSERT INTO probes (offset, act, outcome) VALUES (?1, ?2, ?3)",
        &[&event.offset(), &act, &outcome],
    )?;
    Ok(())
}

/// Runs `statement` after `depth` nested calls and records the outcome in
/// `observed`. Like `recurse`, the calls keep their state in wasm locals (the
/// native stack the host's SQL runs on too), not in linear memory.
#[inline(never)]
fn descend(depth: u32, statement: &str, offset: i64, a: u64, b: u64, c: u64) -> Result<u64> {
    if depth == 0 {
        let outcome = match sql::query(statement, &[]) {
            Ok(rows) => format!("{} rows", rows.len()),
            Err(e) => format!("err: {}", e.message()),
        };
        sql::execute(
            "INSERT INTO observed (offset, what, value) VALUES (?1, 'deep-sql', ?2)",
            &[&offset, &outcome],
        )?;
        return Ok(a);
    }
    let r = descend(
        black_box(depth - 1),
        statement,
        offset,
        a.wrapping_add(1),
        b ^ a,
        c.wrapping_mul(3),
    )?;
    Ok(r ^ a ^ b ^ c)
}

/// Records what the guest saw in `observed`.
fn observe(event: &Event, what: &str, value: &dyn sql::ToSql) -> Result<()> {
    sql::execute(
        "INSERT INTO observed (offset, what, value) VALUES (?1, ?2, ?3)",
        &[&event.offset(), &what, value],
    )?;
    Ok(())
}

/// Recursion that lives in wasm locals (the native stack), not in the
/// shadow stack in linear memory, so it reaches the host's stack limit.
#[inline(never)]
#[allow(clippy::too_many_arguments)]
fn recurse(a: u64, b: u64, c: u64, d: u64, e: u64, f: u64, g: u64, h: u64) -> u64 {
    if a == u64::MAX {
        return b;
    }
    let r = recurse(
        a.wrapping_add(1),
        b ^ a,
        c.wrapping_mul(3),
        d + 1,
        e ^ b,
        f + c,
        g ^ d,
        h + e,
    );
    r ^ a ^ b ^ c ^ d ^ e ^ f ^ g ^ h
}

impl Processor for Hostile {
    fn init() -> Result<()> {
        if cfg!(feature = "bad-init") {
            return Err(Error::failed(
                "refusing to migrate: schema version 7 is newer than 3",
            ));
        }
        sql::execute(
            "CREATE TABLE IF NOT EXISTS seen (offset INTEGER PRIMARY KEY)",
            &[],
        )?;
        sql::execute(
            "CREATE TABLE IF NOT EXISTS probes (offset INTEGER NOT NULL, act TEXT NOT NULL, outcome TEXT NOT NULL)",
            &[],
        )?;
        sql::execute(
            "CREATE TABLE IF NOT EXISTS observed (offset INTEGER NOT NULL, what TEXT NOT NULL, value)",
            &[],
        )?;
        Ok(())
    }

    fn handle(event: Event) -> Result<()> {
        let calls = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        let act: Act = event.json()?;
        match act.act.as_str() {
            "sleep" => {
                std::thread::sleep(std::time::Duration::from_secs(3600));
                sql::execute("INSERT INTO seen (offset) VALUES (?1)", &[&event.offset()])?;
            }
            // Does nothing: measures the host's own cost per event.
            "noop" => {}
            "remember" => {
                // Writes what the instance remembers: how many events it saw.
                sql::execute(
                    "INSERT INTO observed (offset, what, value) VALUES (?1, 'calls', ?2)",
                    &[&event.offset(), &(calls as i64)],
                )?;
            }
            // One log line: shows each event is logged once.
            "say" => log::info(format!("event {} says hello", event.offset())),
            "normal" => {
                sql::execute("INSERT INTO seen (offset) VALUES (?1)", &[&event.offset()])?;
                rewind_guest::emit("seen", event.offset().to_string(), "ok")?;
            }
            "loop" => {
                let mut i: u64 = 0;
                loop {
                    i = black_box(i.wrapping_add(1));
                }
            }
            "alloc" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1; 1 << 20]);
                    black_box(&hoard);
                }
            }
            "stack" => {
                let o = event.offset() as u64;
                black_box(recurse(o, o, o, o, o, o, o, o));
            }
            "panic" => panic!(
                "hostile guest panics on purpose at offset {}",
                event.offset()
            ),
            "write-then-fail" => {
                sql::execute("INSERT INTO seen (offset) VALUES (?1)", &[&event.offset()])?;
                rewind_guest::emit("seen", event.offset().to_string(), "never published")?;
                return Err(Error::failed("failing after a write"));
            }
            "invalid" => return Err(Error::invalid("this event is wrong on purpose")),
            "read-file" => {
                let outcome = std::fs::read("/etc/passwd")
                    .map(|b| format!("{} bytes", b.len()))
                    .map_err(|e| e.to_string());
                probe(&event, "read-file", outcome)?;
            }
            "list-dir" => {
                let outcome = std::fs::read_dir(".")
                    .map(|d| format!("{} entries", d.count()))
                    .map_err(|e| e.to_string());
                probe(&event, "list-dir", outcome)?;
            }
            "socket" => {
                // The test listens on the address it passes, so a refusal
                // here is the sandbox's, not an empty port's.
                let address = act.statement.unwrap_or_else(|| "127.0.0.1:9".to_owned());
                let outcome = std::net::TcpStream::connect(address.as_str())
                    .map(|_| "connected".to_owned())
                    .map_err(|e| e.to_string());
                probe(&event, "socket", outcome)?;
            }
            "env" => {
                let vars: Vec<String> = std::env::vars().map(|(k, v)| format!("{k}={v}")).collect();
                let args: Vec<String> = std::env::args().collect();
                probe(&event, "env", Ok(format!("vars={vars:?} args={args:?}")))?;
            }
            "clock-random" => {
                let observations = [
                    ("now-1", now_ms()),
                    ("now-2", now_ms()),
                    ("wasi-wall-clock-ms", {
                        let since =
                            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
                        since.map_or(-1, |d| d.as_millis() as i64)
                    }),
                    ("instant-elapsed-ns", {
                        let start = std::time::Instant::now();
                        black_box(start.elapsed().as_nanos() as i64)
                    }),
                    // The event brings the first 16 bytes of its stream:
                    // these two draws take them, WASI gives the rest.
                    ("random-1", random_u64() as i64),
                    ("random-2", random_u64() as i64),
                    ("wasi-random", getrandom::u64().map_or(-1, |w| w as i64)),
                    ("random-3", random_u64() as i64),
                    ("hashmap-order", {
                        // std's HashMap seeds itself from WASI randomness.
                        let map: std::collections::HashMap<u32, ()> =
                            (0..32).map(|i| (i, ())).collect();
                        i64::from(*map.keys().next().unwrap_or(&0))
                    }),
                ];
                for (what, value) in observations {
                    observe(&event, what, &value)?;
                }
                sql::execute(
                    "INSERT INTO observed (offset, what, value)
                     VALUES (?1, 'sql-random', random()), (?1, 'sql-randomblob', randomblob(8)),
                            (?1, 'sql-now', strftime('%Y-%m-%d %H:%M:%f', 'now')),
                            (?1, 'sql-current-timestamp', CURRENT_TIMESTAMP),
                            (?1, 'sql-julianday', julianday('now'))",
                    &[&event.offset()],
                )?;
            }
            // Records the first value the statement returns (or its error)
            // in `observed`: what a guest can learn from SQL must not depend
            // on batches, restarts or the host's own tables.
            "sql-value" => {
                let statement = act.statement.unwrap_or_default();
                let value = match sql::query(&statement, &[]) {
                    Ok(rows) => rows
                        .iter()
                        .next()
                        .and_then(|row| row.values().first().cloned())
                        .unwrap_or(sql::Value::Null),
                    Err(e) => sql::Value::Text(format!("err: {}", e.message())),
                };
                observe(&event, &statement, &value)?;
            }
            // Runs the statement, then records what SQL says of the
            // connection: `changes(),total_changes(),last_insert_rowid()`.
            "sql-counters" => {
                let statement = act.statement.unwrap_or_default();
                sql::execute(&statement, &[])?;
                let counters = sql::query_row(
                    "SELECT changes() || ',' || total_changes() || ',' || last_insert_rowid()",
                    &[],
                )?
                .map(|row| row.get::<String>(0))
                .transpose()?;
                observe(&event, &statement, &counters)?;
            }
            // Runs the statement `depth` calls deep: guest frames and the
            // host's SQL share the thread's stack.
            "deep-sql" => {
                let statement = act.statement.unwrap_or_default();
                let o = event.offset() as u64;
                black_box(descend(
                    act.depth.unwrap_or(0),
                    &statement,
                    event.offset(),
                    o,
                    o,
                    o,
                )?);
            }
            "sql" => {
                let statement = act.statement.unwrap_or_default();
                let outcome = sql::query(&statement, &[])
                    .map(|rows| format!("{} rows", rows.len()))
                    .map_err(|e| e.message().to_owned());
                probe(&event, &statement, outcome)?;
            }
            "print" => {
                for i in 0..100_000 {
                    println!("hostile guest floods stdout, line {i}");
                    eprintln!("hostile guest floods stderr, line {i}");
                }
                log::info("done flooding");
                sql::execute("INSERT INTO seen (offset) VALUES (?1)", &[&event.offset()])?;
            }
            // Terminal escapes in a log line, on stderr and in an error
            // message: clear the screen, retitle the window.
            "escape" => {
                log::info("\x1b[2J\x1b]0;owned\x07 log");
                eprintln!("\x1b[31m stderr");
                return Err(Error::invalid("\x1b[2J message"));
            }
            "emit-flood" => {
                let mut emitted = 0u64;
                let outcome = loop {
                    match Output::new("flood").payload(vec![0u8; 4096]).emit() {
                        Ok(()) => emitted += 1,
                        Err(e) => break Err(format!("after {emitted}: {e}")),
                    }
                    if emitted > 1_000_000 {
                        break Ok("no limit".to_owned());
                    }
                };
                // Fails the event, so nothing it emitted is published.
                return Err(Error::failed(format!("flooded: {outcome:?}")));
            }
            // `sql.execute` and `output.emit` called through their
            // canonical ABI with what no well-formed guest passes (see `abi`).
            "abi" => abi(&event, act.statement.as_deref().unwrap_or_default())?,
            // An output with headers, one of them empty, and no key.
            "emit-headers" => Output::new("with-headers")
                .payload(b"p".to_vec())
                .header("h1", b"v1".to_vec())
                .header("empty", Vec::new())
                .header("h3", vec![0u8, 255])
                .emit()?,
            // The headers as the guest was handed them.
            "observe-headers" => observe(&event, "headers", &format!("{:?}", event.headers()))?,
            // An output whose serialisation emits another output first.
            "emit-nested" => rewind_guest::emit_json("outer", "k", &EmitsWhileSerialised)?,
            other => return Err(Error::invalid(format!("unknown act {other:?}"))),
        }
        Ok(())
    }
}

// `sql.execute` as the canonical ABI lowers it: the statement's pointer
// and length, the parameters' pointer and count, and where the result goes.
// The same import the SDK's bindings call, declared raw.
#[cfg(target_arch = "wasm32")]
#[link(wasm_import_module = "rewind:processor/sql@0.2.0")]
unsafe extern "C" {
    #[link_name = "execute"]
    fn raw_execute(
        statement: *const u8,
        len: usize,
        params: *const Value,
        count: usize,
        out: *mut u8,
    );
}

// `output.emit` as the canonical ABI lowers it: the output event's ten flat
// values (stream pointer and length; key and payload as a case, pointer and
// length each; headers pointer and count), and where the result goes.
#[cfg(target_arch = "wasm32")]
#[link(wasm_import_module = "rewind:processor/output@0.2.0")]
unsafe extern "C" {
    #[link_name = "emit"]
    fn raw_emit(
        stream: *const u8,
        stream_len: usize,
        key_case: u32,
        key: *const u8,
        key_len: usize,
        payload_case: u32,
        payload: *const u8,
        payload_len: usize,
        headers: *const u8,
        headers_len: usize,
        out: *mut u8,
    );
}

/// One `value` of the world as laid out in memory: its case, then its
/// payload at offset 8.
#[repr(C, align(8))]
#[derive(Clone, Copy)]
struct Value {
    case: u8,
    _pad: [u8; 7],
    payload: [u32; 2],
}

impl Value {
    fn new(case: u8, payload: [u32; 2]) -> Value {
        Value {
            case,
            _pad: [0; 7],
            payload,
        }
    }

    fn bytes(case: u8, bytes: &[u8]) -> Value {
        Value::new(case, [bytes.as_ptr() as u32, bytes.len() as u32])
    }
}

/// Far past the end of any guest memory the host allows.
const FAR: u32 = 0xffff_ff00;

/// Calls `sql.execute` with arguments the `case` names: one well-formed
/// call (`ok`: it records a text and a blob parameter in `observed`), the
/// others malformed, which the host must refuse with a trap. Cases named
/// `emit-…` call `output.emit` instead (see `abi_emit`).
fn abi(event: &Event, case: &str) -> Result<()> {
    if let Some(case) = case.strip_prefix("emit-") {
        return abi_emit(case);
    }
    let insert = b"INSERT INTO observed (offset, what, value) VALUES (?1, ?2, ?3)";
    let (statement, abi, blob, not_utf8) = (&insert[..], b"abi", [0u8, 255], [0xffu8, 0xfe]);
    let offset = event.offset() as u64;
    let mut values = [
        Value::new(1, [offset as u32, (offset >> 32) as u32]),
        Value::bytes(3, abi),
        Value::bytes(4, &blob),
    ];
    let (mut text, mut len) = (statement.as_ptr(), statement.len());
    let (mut params, mut count) = (values.as_ptr(), values.len());
    match case {
        "ok" => {}
        "statement-out-of-bounds" => text = FAR as *const u8,
        "statement-not-utf8" => (text, len) = (not_utf8.as_ptr(), not_utf8.len()),
        "params-out-of-bounds" => params = FAR as *const Value,
        "params-misaligned" => params = (params as usize + 4) as *const Value,
        "params-too-many" => count = usize::MAX / 64,
        "unknown-case" => values[0].case = 9,
        "text-not-utf8" => values[1] = Value::bytes(3, &not_utf8),
        "blob-out-of-bounds" => values[2] = Value::new(4, [FAR, 4096]),
        other => return Err(Error::invalid(format!("unknown abi case {other:?}"))),
    }
    // result<u64, string>: a case byte, then the payload at offset 8.
    let mut out = [0u64; 3];
    #[cfg(target_arch = "wasm32")]
    // SAFETY: the import reads the arguments (or traps) and writes `out`,
    // which is large and aligned enough for its result.
    unsafe {
        raw_execute(text, len, black_box(params), count, out.as_mut_ptr().cast());
    }
    black_box((&values, text, len, params, count));
    match out[0] & 0xff {
        0 => Ok(()),
        _ => Err(Error::failed("the well-formed raw execute failed")),
    }
}

/// Calls `output.emit` with arguments the `case` names: one well-formed call
/// (`ok`: an output on stream `abi` keyed `k` with the payload `[0, 255]`),
/// the others malformed, which the host must refuse with a trap.
fn abi_emit(case: &str) -> Result<()> {
    let (stream, key, payload, not_utf8) = (b"abi", b"k", [0u8, 255], [0xffu8, 0xfe]);
    let (mut stream, mut stream_len) = (stream.as_ptr(), stream.len());
    let (mut key_case, mut payload_ptr) = (1u32, payload.as_ptr());
    match case {
        "ok" => {}
        "stream-out-of-bounds" => stream = FAR as *const u8,
        "stream-not-utf8" => (stream, stream_len) = (not_utf8.as_ptr(), not_utf8.len()),
        "key-unknown-case" => key_case = 7,
        "payload-out-of-bounds" => payload_ptr = FAR as *const u8,
        other => return Err(Error::invalid(format!("unknown abi case emit-{other:?}"))),
    }
    // result<_, string>: a case byte, then the message at offset 4.
    let mut out = [0u32; 3];
    #[cfg(target_arch = "wasm32")]
    // SAFETY: the import reads the arguments (or traps) and writes `out`,
    // which is large and aligned enough for its result.
    unsafe {
        raw_emit(
            black_box(stream),
            stream_len,
            key_case,
            key.as_ptr(),
            key.len(),
            1,
            black_box(payload_ptr),
            payload.len(),
            std::ptr::null(),
            0,
            out.as_mut_ptr().cast(),
        );
    }
    black_box((&stream, &key, &payload, &not_utf8));
    match out[0] & 0xff {
        0 => Ok(()),
        _ => Err(Error::failed("the well-formed raw emit failed")),
    }
}

/// Serialises as `"outer"`, emitting `{"inner":true}` on `inner` while it does.
struct EmitsWhileSerialised;

impl serde::Serialize for EmitsWhileSerialised {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        rewind_guest::emit_json("inner", "k", &serde_json::json!({ "inner": true }))
            .map_err(serde::ser::Error::custom)?;
        s.serialize_str("outer")
    }
}

rewind_guest::export!(Hostile);
