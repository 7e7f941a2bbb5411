//! Hostile guests: each act is followed by a normal event that must still be
//! processed, and the host never panics.

use std::collections::BTreeMap;
use std::path::Path;

use rewind_host::{ErrorPolicy, RunError};
use rewind_tests::{config, dump, processor, rows};
use rusqlite::types::Value;

const TS: i64 = 1_767_225_600_123;

fn act_line(offset: i64, act: &str, statement: Option<&str>) -> String {
    let payload = match statement {
        Some(s) => serde_json::json!({ "do": act, "statement": s }),
        None => serde_json::json!({ "do": act }),
    };
    rewind_tests::envelope("acts", offset, TS + offset, "k", &payload.to_string())
}

const SQL_PROBES: &[(&str, bool)] = &[
    ("SELECT * FROM _rewind_offsets", false),
    ("SELECT count(*) FROM _REWIND_DLQ", false),
    (
        "INSERT INTO _rewind_meta (key, value) VALUES ('x', 'y')",
        false,
    ),
    ("UPDATE _rewind_offsets SET next_offset = 0", false),
    ("DELETE FROM _rewind_outbox", false),
    ("DROP TABLE _rewind_meta", false),
    ("CREATE TABLE _rewind_mine (x)", false),
    (
        "CREATE TRIGGER t AFTER INSERT ON _rewind_outbox BEGIN SELECT 1; END",
        false,
    ),
    // A view's body is only authorised when the view is used, so creating
    // one over a host table succeeds, and reading through it is refused.
    ("CREATE VIEW v AS SELECT * FROM _rewind_dlq", true),
    ("SELECT * FROM v", false),
    ("SELECT name FROM sqlite_master", false),
    ("SELECT sql FROM sqlite_schema", false),
    (
        "CREATE TABLE copied AS SELECT sql FROM sqlite_schema",
        false,
    ),
    ("ATTACH DATABASE 'elsewhere.db' AS other", false),
    ("DETACH DATABASE main", false),
    ("PRAGMA journal_mode = DELETE", false),
    ("PRAGMA table_info(_rewind_meta)", false),
    ("SELECT * FROM pragma_table_info('_rewind_meta')", false),
    ("SELECT load_extension('/tmp/evil.so')", false),
    ("BEGIN", false),
    ("COMMIT", false),
    ("SAVEPOINT mine", false),
    ("CREATE TEMP TABLE scratch (x)", false),
    ("SELECT 1; DROP TABLE seen", false),
    // Storage statistics: pages of the host tables among them.
    ("SELECT name, pageno FROM dbstat", false),
    // Raw pages, readable and writable.
    ("SELECT pgno, data FROM sqlite_dbpage", false),
    ("SELECT count(*) FROM sqlite_dbpage('main')", false),
    (
        "UPDATE sqlite_dbpage SET data = zeroblob(16384) WHERE pgno = 1",
        false,
    ),
    (
        "INSERT INTO sqlite_dbpage (pgno, data) VALUES (1, zeroblob(16384))",
        false,
    ),
    // SQLite names a subquery's sixth alike column at random.
    ("SELECT * FROM (SELECT 1 a, 2 a, 3 a, 4 a, 5 a, 6 a)", false),
    ("SELECT * FROM (SELECT 1 a, 2 a, 3 a, 4 a, 5 a)", true),
    // Values are bounded, so SQL cannot make the host allocate gigabytes.
    ("SELECT zeroblob(500000000)", false),
    ("SELECT length(printf('%.*c', 300000000, 'x'))", false),
    (
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n LIMIT 100) \
         SELECT i, zeroblob(1000000) FROM n",
        false,
    ),
    // The host's own offsets query, verbatim: it must not be served from the
    // statement cache with the host's rights.
    (
        "/* rewind:host */ SELECT stream, partition, next_offset FROM _rewind_offsets",
        false,
    ),
    // A text SQL can store but the world's `text` (a string) cannot carry.
    ("SELECT CAST(x'ff' AS TEXT) AS bad", false),
    ("SELECT CAST(CAST(x'ff' AS TEXT) AS BLOB) AS bytes", true),
    // What a processor legitimately does still works.
    (
        "CREATE TABLE IF NOT EXISTS mine (id INTEGER PRIMARY KEY, v TEXT)",
        true,
    ),
    ("ALTER TABLE mine ADD COLUMN w INTEGER", true),
    ("CREATE INDEX IF NOT EXISTS mine_v ON mine (v)", true),
    ("INSERT INTO mine (v) VALUES ('x') RETURNING id", true),
    ("SELECT * FROM mine", true),
    ("DROP INDEX mine_v", true),
    // A trigger's body is authorised with the statement that fires it.
    (
        "CREATE TRIGGER sneaky AFTER INSERT ON mine BEGIN DELETE FROM _rewind_outbox; END",
        true,
    ),
    ("INSERT INTO mine (v) VALUES ('fires') RETURNING id", false),
    ("DROP TRIGGER sneaky", true),
    ("INSERT INTO mine (v) VALUES ('quiet') RETURNING id", true),
    // Raw pointers, from a bound blob or not.
    ("SELECT fts3_tokenizer('simple')", false),
];

/// Calls of `sql.execute` through its canonical ABI (the hostile `abi`
/// act): one well-formed, then arguments no well-formed guest passes, which
/// must trap the guest without reaching SQL.
/// Each case with what its dead letter says.
const ABI_CASES: &[(&str, &str)] = &[
    ("ok", ""),
    ("statement-out-of-bounds", "out of bounds of memory"),
    ("statement-not-utf8", "invalid utf-8"),
    ("params-out-of-bounds", "out of bounds of memory"),
    ("params-misaligned", "not aligned to 8"),
    ("params-too-many", "out of bounds of memory"),
    ("unknown-case", "invalid variant discriminant 9"),
    ("text-not-utf8", "invalid utf-8"),
    ("blob-out-of-bounds", "out of bounds of memory"),
    ("emit-ok", ""),
    ("emit-stream-out-of-bounds", "out of bounds of memory"),
    ("emit-stream-not-utf8", "invalid utf-8"),
    ("emit-key-unknown-case", "invalid option discriminant 7"),
    ("emit-payload-out-of-bounds", "out of bounds of memory"),
];

fn hostile_input(dir: &Path, listening: &str) -> (std::path::PathBuf, Vec<(i64, String)>) {
    let mut acts: Vec<(String, Option<String>)> = [
        "loop",
        "alloc",
        "stack",
        "panic",
        "read-file",
        "list-dir",
        "socket",
        "env",
        "clock-random",
        "write-then-fail",
        "sleep",
        "invalid",
        "print",
        "emit-flood",
        "emit-headers",
    ]
    .iter()
    .map(|a| {
        (
            a.to_string(),
            (*a == "socket").then(|| listening.to_owned()),
        )
    })
    .collect();
    acts.extend(
        SQL_PROBES
            .iter()
            .map(|(s, _)| ("sql".to_string(), Some(s.to_string()))),
    );
    acts.extend(
        ABI_CASES
            .iter()
            .map(|(c, _)| ("abi".to_string(), Some(c.to_string()))),
    );
    let mut lines = Vec::new();
    let mut offsets = Vec::new();
    let mut offset = 0;
    for (act, statement) in acts {
        lines.push(act_line(offset, &act, statement.as_deref()));
        offsets.push(match statement {
            Some(case) if act == "abi" => (offset, format!("abi {case}")),
            _ => (offset, act),
        });
        offset += 1;
        // Every hostile act is followed by a normal event.
        lines.push(act_line(offset, "normal", None));
        offset += 1;
    }
    let input = dir.join("acts.jsonl");
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    (input, offsets)
}

fn text(v: &Value) -> String {
    match v {
        Value::Text(s) => s.clone(),
        other => format!("{other:?}"),
    }
}

#[test]
fn the_sandbox_holds_and_every_following_event_is_processed() {
    let dir = tempfile::tempdir().unwrap();
    // A real listener, so the socket act could succeed if the sandbox let it.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let (input, acts) = hostile_input(dir.path(), &listener.local_addr().unwrap().to_string());
    let state = dir.path().join("hostile.db");
    let mut cfg = config(&processor("hostile"), &input, &state);
    // A small cap, so runaway allocation reaches it well before the fuel runs out.
    cfg.runtime.memory_bytes = 16 << 20;
    let summary = rewind_host::run(&cfg, &()).expect("hostile guests never stop the host");
    assert_eq!(summary.consumed, acts.len() as u64 * 2);

    // Every normal event was processed.
    let seen: Vec<i64> = rows(&state, "SELECT offset FROM seen ORDER BY offset")
        .into_iter()
        .map(|r| match r[0] {
            Value::Integer(i) => i,
            _ => unreachable!(),
        })
        .collect();
    for (offset, act) in &acts {
        assert!(
            seen.contains(&(offset + 1)),
            "the normal event after {act:?} was not processed"
        );
    }

    let dead: BTreeMap<String, (String, String)> = rows(
        &state,
        r#"SELECT "offset", error_class, message FROM _rewind_dlq"#,
    )
    .into_iter()
    .map(|r| (text(&r[0]), (text(&r[1]), text(&r[2]))))
    .collect();
    let dead_of = |act: &str| {
        let offset = acts.iter().find(|(_, a)| a == act).unwrap().0;
        dead.get(&format!("Integer({offset})"))
            .cloned()
            .unwrap_or_else(|| panic!("{act} was not dead-lettered: {dead:?}"))
    };
    assert_eq!(dead_of("loop").0, "fuel-exhausted");
    assert_eq!(dead_of("alloc").0, "memory-limit");
    assert_eq!(dead_of("stack").0, "stack-overflow");
    let (class, message) = dead_of("panic");
    assert_eq!(class, "panic");
    assert!(message.contains("panics on purpose"), "{message}");
    assert_eq!(dead_of("write-then-fail").0, "failed");
    // Regression: WASI timers really slept, so `sleep` hung the host.
    let (class, message) = dead_of("sleep");
    assert_eq!(class, "trap");
    assert!(message.contains("must not wait"), "{message}");
    assert_eq!(dead_of("invalid").0, "invalid-input");
    let (class, message) = dead_of("emit-flood");
    assert_eq!(class, "failed");
    assert!(message.contains("output limit"), "{message}");
    for (case, says) in ABI_CASES.iter().filter(|(_, says)| !says.is_empty()) {
        let (class, message) = dead_of(&format!("abi {case}"));
        assert_eq!(class, "trap", "abi {case}: {message}");
        assert!(message.contains(says), "abi {case}: {message}");
    }
    for ok in ["abi ok", "abi emit-ok"] {
        assert!(
            !dead.contains_key(&format!(
                "Integer({})",
                acts.iter().find(|(_, a)| a == ok).unwrap().0
            )),
            "{ok}: {dead:?}"
        );
    }
    // The failed event's write was rolled back and its output never left.
    let failed_at = acts.iter().find(|(_, a)| a == "write-then-fail").unwrap().0;
    assert!(!seen.contains(&failed_at));
    let queued = rewind_host::StateDb::open_existing(&state)
        .unwrap()
        .pending_outbox(None, usize::MAX)
        .unwrap();
    // The normal events' outputs are queued (no sink ran); none of the flood's.
    assert!(queued.iter().any(|row| row.output.stream == "seen"));
    assert!(queued.iter().all(|row| row.output.stream != "flood"));
    // The well-formed raw emit's output, as given; the malformed ones' none.
    let raw: Vec<_> = queued
        .iter()
        .filter(|row| row.output.stream == "abi")
        .map(|row| (row.output.key.clone(), row.output.payload.clone()))
        .collect();
    assert_eq!(raw, vec![(Some(b"k".to_vec()), Some(vec![0, 255]))]);
    // Headers come through whole, in order.
    let with_headers: Vec<_> = queued
        .iter()
        .filter(|row| row.output.stream == "with-headers")
        .map(|row| &row.output)
        .collect();
    assert_eq!(with_headers.len(), 1);
    let (key, payload) = (&with_headers[0].key, &with_headers[0].payload);
    assert_eq!(
        (key.as_deref(), payload.as_deref()),
        (None, Some(&b"p"[..]))
    );
    let headers: Vec<(&str, Option<&[u8]>)> = with_headers[0]
        .headers
        .iter()
        .map(|h| (h.name.as_str(), h.value.as_deref()))
        .collect();
    assert_eq!(
        headers,
        [
            ("h1", Some(&b"v1"[..])),
            ("empty", Some(&[][..])),
            ("h3", Some(&[0u8, 255][..]))
        ]
    );

    let probes: BTreeMap<String, String> = rows(&state, "SELECT act, outcome FROM probes")
        .into_iter()
        .map(|r| (text(&r[0]), text(&r[1])))
        .collect();
    assert!(
        listener.accept().is_err(),
        "the guest reached a host socket"
    );
    for act in ["read-file", "list-dir", "socket"] {
        assert!(
            probes[act].starts_with("err"),
            "{act} should fail in the sandbox: {}",
            probes[act]
        );
    }
    assert_eq!(probes["env"], "ok: vars=[] args=[]");
    for (statement, allowed) in SQL_PROBES {
        let outcome = &probes[*statement];
        assert_eq!(
            outcome.starts_with("ok"),
            *allowed,
            "{statement}: {outcome}"
        );
    }
    assert!(probes["SELECT * FROM _rewind_offsets"].contains("host table _rewind_offsets"));
    assert!(probes["BEGIN"].contains("transactions"));
    assert!(probes["SELECT name, pageno FROM dbstat"].contains("may not read dbstat"));
    for raw in [
        "SELECT pgno, data FROM sqlite_dbpage",
        "UPDATE sqlite_dbpage SET data = zeroblob(16384) WHERE pgno = 1",
        "INSERT INTO sqlite_dbpage (pgno, data) VALUES (1, zeroblob(16384))",
    ] {
        assert!(
            probes[raw].contains("may not use sqlite_dbpage"),
            "{raw}: {}",
            probes[raw]
        );
    }
    assert!(
        probes["INSERT INTO mine (v) VALUES ('fires') RETURNING id"]
            .contains("host table _rewind_outbox"),
        "{probes:?}"
    );
    assert!(
        probes["SELECT CAST(x'ff' AS TEXT) AS bad"]
            .contains(r#"column "bad" of result row 1 holds text that is not valid UTF-8"#),
        "{probes:?}"
    );
    let big = probes
        .iter()
        .find(|(k, _)| k.contains("zeroblob(1000000)"))
        .unwrap()
        .1;
    assert!(big.contains("larger than 64 MiB"), "{big}");

    // The well-formed raw call bound its parameters as given; the malformed
    // ones reached nothing.
    let abi = rows(
        &state,
        "SELECT offset, value FROM observed WHERE what = 'abi'",
    );
    let abi_ok = acts.iter().find(|(_, a)| a == "abi ok").unwrap().0;
    assert_eq!(
        abi,
        vec![vec![Value::Integer(abi_ok), Value::Blob(vec![0, 255])]]
    );

    // Clocks are the event's timestamp; randomness differs per draw.
    let observed: BTreeMap<String, String> = rows(&state, "SELECT what, value FROM observed")
        .into_iter()
        .map(|r| (text(&r[0]), text(&r[1])))
        .collect();
    let at = acts.iter().find(|(_, a)| a == "clock-random").unwrap().0;
    let ts = TS + at;
    assert_eq!(observed["now-1"], format!("Integer({ts})"));
    assert_eq!(observed["now-2"], format!("Integer({ts})"));
    assert_eq!(observed["wasi-wall-clock-ms"], format!("Integer({ts})"));
    assert_eq!(observed["instant-elapsed-ns"], "Integer(0)");
    assert_ne!(observed["random-1"], observed["random-2"]);
    // The event brought its stream's first 16 bytes (the SDK's first two
    // draws); WASI went on from the 17th, and the SDK's third draw after it.
    let position = rewind_host::Position {
        stream: "acts".into(),
        partition: 0,
        offset: at,
    };
    let mut stream = [0u8; 32];
    rand_core::Rng::fill_bytes(
        &mut position.seed().rng(rewind_host::Seed::WASI),
        &mut stream,
    );
    let word = |i: usize| {
        let w = i64::from_le_bytes(stream[8 * i..8 * i + 8].try_into().unwrap());
        format!("Integer({w})")
    };
    assert_eq!(observed["random-1"], word(0));
    assert_eq!(observed["random-2"], word(1));
    assert_eq!(observed["wasi-random"], word(2));
    assert_eq!(observed["random-3"], word(3));
    assert_eq!(
        observed["sql-now"],
        format!("2026-01-01 00:00:00.{:03}", 123 + at)
    );
    assert_eq!(observed["sql-current-timestamp"], "2026-01-01 00:00:00");

    // Everything, randomness included, is the same on a rerun.
    let again = dir.path().join("again.db");
    let mut cfg2 = cfg.clone();
    cfg2.state = again.clone();
    rewind_host::run(&cfg2, &()).unwrap();
    assert_eq!(dump(&state), dump(&again));
}

/// A guest is handed an event's headers as they came: names, values,
/// a header without a value, an empty name; none when there are none.
#[test]
fn a_guest_sees_the_headers_an_event_came_with() {
    let dir = tempfile::tempdir().unwrap();
    let line = |offset: i64, headers: Option<serde_json::Value>| {
        let mut line = serde_json::json!({
            "topic": "acts", "partition": 0, "offset": offset, "ts": TS,
            "key": "k", "payload": r#"{"do":"observe-headers"}"#,
        });
        if let Some(headers) = headers {
            line["headers"] = headers;
        }
        line.to_string()
    };
    let lines = [
        line(0, Some(serde_json::json!(["a", "1", "b", null, "", "x"]))),
        line(1, None),
        line(2, Some(serde_json::json!([]))),
    ];
    let input = dir.path().join("headers.jsonl");
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let state = dir.path().join("headers.db");
    rewind_host::run(&config(&processor("hostile"), &input, &state), &()).unwrap();
    let seen: Vec<(i64, String)> = rows(
        &state,
        "SELECT offset, value FROM observed WHERE what = 'headers' ORDER BY offset",
    )
    .iter()
    .map(|r| (rewind_tests::int(&r[0]), text(&r[1])))
    .collect();
    assert_eq!(
        seen,
        [
            (
                0,
                r#"[Header { name: "a", value: Some([49]) }, Header { name: "b", value: None }, Header { name: "", value: Some([120]) }]"#
                    .to_owned()
            ),
            (1, "[]".to_owned()),
            (2, "[]".to_owned()),
        ]
    );
}

/// What SQL tells a guest of its connection, and what SQLite would decide
/// with its process-wide random generator, cannot depend on batches,
/// restarts, outputs or the process: `changes()`, `total_changes()` and
/// `last_insert_rowid()` count the event's own statements, and a statement
/// that would let SQLite pick rowids or column names at random fails its
/// event. Regression: `total_changes()` counted the host's statements,
/// `last_insert_rowid()` carried the host's last insert over a restart, and
/// rowids after the largest one differed on every run.
#[test]
fn what_sql_tells_a_guest_does_not_depend_on_batches_restarts_or_chance() {
    let dir = tempfile::tempdir().unwrap();
    const READ: &str = "SELECT changes() || ',' || total_changes() || ',' || last_insert_rowid()";
    const AFTER_MAX: &str = "INSERT INTO auto (v) VALUES ('after') RETURNING rowid";
    let acts: Vec<(&str, Option<&str>)> = vec![
        (
            "sql-counters",
            Some("CREATE TABLE IF NOT EXISTS auto (v TEXT)"),
        ),
        ("normal", None),
        ("sql-value", Some(READ)),
        ("invalid", None),
        ("sql-value", Some(READ)),
        (
            "sql-counters",
            Some("INSERT INTO auto (v) VALUES ('a'), ('b')"),
        ),
        ("sql-counters", Some("UPDATE auto SET v = v || '!'")),
        ("sql-counters", Some("UPDATE auto SET v = v WHERE 0")),
        ("sql-value", Some(READ)),
        (
            "sql-value",
            Some("INSERT INTO auto (rowid, v) VALUES (9223372036854775807, 'max') RETURNING rowid"),
        ),
        ("sql-value", Some(AFTER_MAX)),
        ("sql-value", Some(AFTER_MAX)),
        (
            "sql-value",
            Some("SELECT * FROM (SELECT 1 a, 2 a, 3 a, 4 a, 5 a, 6 a)"),
        ),
        (
            "sql-value",
            Some("CREATE TABLE copied AS SELECT 1 a, 2 a, 3 a, 4 a, 5 a, 6 a"),
        ),
        (
            "sql-value",
            Some("CREATE TABLE five AS SELECT 1 a, 2 a, 3 a, 4 a, 5 a"),
        ),
        ("sql-value", Some("SELECT count(*) FROM five")),
        ("sql-value", Some(READ)),
    ];
    let lines: Vec<String> = acts
        .iter()
        .enumerate()
        .map(|(offset, (act, statement))| act_line(offset as i64, act, *statement))
        .collect();
    let write_input = |path: &Path, n: usize| {
        std::fs::write(path, lines[..n].join("\n") + "\n").unwrap();
    };

    // Uninterrupted, in one batch, outputs queued in the outbox.
    let whole = dir.path().join("whole.jsonl");
    write_input(&whole, lines.len());
    let one_go = dir.path().join("one-go.db");
    let mut cfg = config(&processor("hostile"), &whole, &one_go);
    cfg.batch_size = 1000;
    rewind_host::run(&cfg, &()).unwrap();

    // A batch per event, and a new process (connection) after every third
    // event: the input grows between the runs, each continuing the last.
    let growing = dir.path().join("growing.jsonl");
    let stepped = dir.path().join("stepped.db");
    let mut cfg = config(&processor("hostile"), &growing, &stepped);
    cfg.batch_size = 1;
    for n in (3..lines.len()).step_by(3).chain([lines.len()]) {
        write_input(&growing, n);
        rewind_host::run(&cfg, &()).unwrap();
    }
    let observed = |db: &Path| -> Vec<(i64, String)> {
        rows(db, "SELECT offset, value FROM observed ORDER BY rowid")
            .iter()
            .map(|r| (rewind_tests::int(&r[0]), text(&r[1])))
            .collect()
    };
    assert_eq!(observed(&one_go), observed(&stepped));
    let dead = |db: &Path| {
        rows(
            db,
            r#"SELECT "offset", error_class, message FROM _rewind_dlq ORDER BY seq"#,
        )
    };
    assert_eq!(dead(&one_go), dead(&stepped));

    let at = |offset: i64| -> String {
        observed(&one_go)
            .into_iter()
            .find(|(o, _)| *o == offset)
            .map(|(_, value)| value)
            .unwrap_or_else(|| panic!("nothing observed at offset {offset}"))
    };
    // An event starts at 0, whatever ran before it: the host's statements,
    // another event's, a dead letter's.
    for offset in [0, 2, 4, 8, 16] {
        assert_eq!(at(offset), "0,0,0", "offset {offset}");
    }
    // Within an event they count its statements as SQLite does.
    assert_eq!(at(5), "2,2,2");
    assert_eq!(at(6), "2,2,0");
    assert_eq!(at(7), "0,0,0");
    // The row with the largest rowid fails its event; rowids go on from the
    // largest one left.
    assert_eq!(at(10), "Integer(3)");
    assert_eq!(at(11), "Integer(4)");
    assert!(
        at(12).contains(r#"the result has 6 columns named "a""#),
        "{}",
        at(12)
    );
    assert_eq!(at(15), "Integer(1)");
    let dead: Vec<(i64, String, String)> = dead(&one_go)
        .iter()
        .map(|r| (rewind_tests::int(&r[0]), text(&r[1]), text(&r[2])))
        .collect();
    assert_eq!(
        dead.iter()
            .map(|(o, c, _)| (*o, c.as_str()))
            .collect::<Vec<_>>(),
        [
            (3, "invalid-input"),
            (9, "nondeterministic-sql"),
            (13, "nondeterministic-sql")
        ]
    );
    assert!(
        dead[1]
            .2
            .contains("table auto got rowid 9223372036854775807"),
        "{}",
        dead[1].2
    );
    assert!(
        dead[2]
            .2
            .contains(r#"table copied would have 6 columns named "a""#),
        "{}",
        dead[2].2
    );
    let tables: Vec<String> = rows(
        &one_go,
        "SELECT name FROM sqlite_schema WHERE type = 'table'",
    )
    .iter()
    .map(|r| text(&r[0]))
    .collect();
    assert!(tables.contains(&"five".to_owned()) && !tables.contains(&"copied".to_owned()));
}

#[test]
fn halt_policy_stops_at_the_failing_event_and_keeps_the_epochs_before_it() {
    let dir = tempfile::tempdir().unwrap();
    // An epoch and six normal events, a panic, then one more normal event.
    let epoch = rewind_host::INSTANCE_EPOCH as i64;
    let panic_at = epoch + 6;
    let mut lines: Vec<String> = (0..panic_at).map(|i| act_line(i, "normal", None)).collect();
    lines.push(act_line(panic_at, "panic", None));
    lines.push(act_line(panic_at + 1, "normal", None));
    let input = dir.path().join("acts.jsonl");
    std::fs::write(&input, lines.join("\n")).unwrap();
    let state = dir.path().join("h.db");
    let mut cfg = config(&processor("hostile"), &input, &state);
    cfg.on_error = ErrorPolicy::Halt;
    // Batches of one event end at every epoch boundary.
    cfg.batch_size = 1;
    for _ in 0..2 {
        // A rerun halts at the same event, from the same epoch start.
        match rewind_host::run(&cfg, &()) {
            Err(RunError::Halted {
                position,
                rejection,
            }) => {
                assert_eq!(position.offset, panic_at);
                assert_eq!(rejection.class, "panic");
            }
            other => panic!("expected a halt, got {other:?}"),
        }
        // Everything the last commit (at the failing event's epoch start) kept.
        assert_eq!(
            rows(&state, "SELECT count(*) FROM seen")[0][0],
            Value::Integer(epoch)
        );
        assert_eq!(
            rows(&state, "SELECT count(*) FROM _rewind_dlq")[0][0],
            Value::Integer(0)
        );
        assert_eq!(
            rows(&state, "SELECT next_offset FROM _rewind_offsets")[0][0],
            Value::Integer(epoch)
        );
    }

    // Invalid input is dead-lettered even under halt.
    let invalid = dir.path().join("invalid.jsonl");
    std::fs::write(
        &invalid,
        [act_line(0, "invalid", None), act_line(1, "normal", None)].join("\n"),
    )
    .unwrap();
    let mut cfg = config(&processor("hostile"), &invalid, &dir.path().join("i.db"));
    cfg.on_error = ErrorPolicy::Halt;
    let summary = rewind_host::run(&cfg, &()).unwrap();
    assert_eq!((summary.applied, summary.dead_lettered), (1, 1));
}

/// Instances come from a pool of fixed size. A call that finds every slot
/// taken has met a limit of the host, not a fault of its event: it is a host
/// fault that stops the run, never a trap that would dead-letter the event.
#[test]
fn an_exhausted_instance_pool_is_a_host_fault_not_a_dead_letter() {
    use rewind_host::{Entropy, Event, HostFault, Position, Runtime, RuntimeConfig, StateDb};

    let dir = tempfile::tempdir().unwrap();
    const MAX: u32 = 5;
    let runtime = Runtime::new(RuntimeConfig {
        cache_dir: Some(rewind_tests::cache_dir()),
        max_instances: MAX,
        ..RuntimeConfig::default()
    })
    .unwrap();
    let module = runtime.load(&processor("payments-v2")).unwrap();
    let db = Box::new(StateDb::open(&dir.path().join("state.db")).unwrap());
    db.begin().unwrap();
    let (mut db, outcome) = runtime.instance(&module).init(db);
    assert!(outcome.unwrap().result.is_ok());
    let event = Event {
        position: Position {
            stream: "orders".into(),
            partition: 0,
            offset: 1,
        },
        key: None,
        payload: Some(br#"{"type":"order_cancelled","order_id":"o-1"}"#.to_vec()),
        headers: Vec::new(),
        timestamp_ms: Some(TS),
    };
    let entropy = Entropy::of(&event.position);
    // Each instance stays live after its call, holding its slot.
    let mut held = Vec::new();
    let message = loop {
        let mut instance = runtime.instance(&module);
        let (back, outcome) = instance.handle(db, &event, &entropy);
        db = back;
        match outcome {
            Ok(outcome) => {
                let rejection = outcome.result.unwrap_err();
                assert_eq!(rejection.class, "invalid-input", "{}", rejection.message);
                held.push(instance);
            }
            Err(fault @ HostFault::Instances { .. }) => break fault.to_string(),
            Err(other) => panic!("expected the pool to run out, got {other}"),
        }
        assert!(
            held.len() <= MAX as usize,
            "the instance pool never ran out"
        );
    };
    assert!(message.contains("concurrent limit"), "{message}");
    assert!(
        message.contains("at most 5 processor instances"),
        "{message}"
    );
    // Every slot the pool promises was usable.
    assert_eq!(held.len(), MAX as usize);
    // Freeing a slot makes the next call work again.
    held.pop();
    let (_db, outcome) = runtime.instance(&module).handle(db, &event, &entropy);
    assert!(outcome.is_ok());
}

/// `emit_json` called while `emit_json` serialises (from a `Serialize`
/// impl) writes into a buffer of its own: both outputs arrive whole, the
/// inner one first.
#[test]
fn an_output_emitted_while_another_is_serialised_arrives_whole() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("acts.jsonl");
    std::fs::write(&input, act_line(0, "emit-nested", None)).unwrap();
    let state = dir.path().join("nested.db");
    let summary = rewind_host::run(&config(&processor("hostile"), &input, &state), &()).unwrap();
    assert_eq!((summary.applied, summary.dead_lettered), (1, 0));
    let queued = rewind_host::StateDb::open_existing(&state)
        .unwrap()
        .pending_outbox(None, usize::MAX)
        .unwrap();
    let outputs: Vec<(&str, &[u8])> = queued
        .iter()
        .map(|row| {
            let output = &row.output;
            (output.stream.as_str(), output.payload.as_deref().unwrap())
        })
        .collect();
    assert_eq!(
        outputs,
        [
            ("inner", &br#"{"inner":true}"#[..]),
            ("outer", &br#""outer""#[..])
        ]
    );
}

/// A LIKE that runs long in a single SQLite step: `LENGTH` bytes of `a`
/// against `%`, 5,000 `a`s and a `b` (`LENGTH` × 5,000 comparisons).
fn slow_like(length: u32) -> String {
    format!("SELECT printf('%.*c', {length}, 'a') LIKE ('%' || printf('%.*c', 5000, 'a') || 'b')")
}

/// Guest SQL that keeps making progress runs as long as its budget allows;
/// a step that runs past `--sql-stall-secs` stops the run with an error
/// naming the event, nothing of its batch committed. (Fuel meters SQLite
/// by steps, and some functions do quadratic work in one.)
#[test]
fn sql_stuck_in_one_step_stops_the_run_and_long_progressing_sql_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("acts.jsonl");
    let counted = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n LIMIT 3000000) \
                   SELECT count(*) FROM n";
    // The stuck step returns by itself after some seconds: a library caller
    // waits for it, then the interrupt fails the statement.
    // Batches end with instance epochs: the stuck event begins the second.
    let epoch = rewind_host::INSTANCE_EPOCH as i64;
    let mut lines = vec![act_line(0, "sql-value", Some(counted))];
    lines.extend((1..epoch).map(|offset| act_line(offset, "normal", None)));
    lines.push(act_line(epoch, "sql-value", Some(&slow_like(600_000))));
    lines.push(act_line(epoch + 1, "normal", None));
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let state = dir.path().join("stuck.db");
    let mut cfg = config(&processor("hostile"), &input, &state);
    cfg.batch_size = 1;
    cfg.runtime.fuel = 1_000_000_000;
    cfg.runtime.sql_stall = Some(std::time::Duration::from_millis(200));
    let error = rewind_host::run(&cfg, &()).expect_err("the stuck step stops the run");
    assert!(
        matches!(&error, RunError::SqlStopped { position, .. } if position.offset == epoch),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(
        message.contains(&format!("stopped at acts/0@{epoch}")),
        "{message}"
    );
    assert!(message.contains("--sql-stall-secs"), "{message}");
    // The long query before it, which progressed all along, ran to its end.
    assert_eq!(
        rows(&state, "SELECT offset, value FROM observed"),
        [vec![Value::Integer(0), Value::Integer(3_000_000)]]
    );
    assert_eq!(
        rows(&state, "SELECT count(*), max(offset) FROM seen"),
        [vec![Value::Integer(epoch - 1), Value::Integer(epoch - 1)]]
    );
    assert_eq!(
        rows(&state, "SELECT next_offset FROM _rewind_offsets"),
        [vec![Value::Integer(epoch)]]
    );
}

/// The binary does not wait for a step an interrupt cannot stop: it says
/// why and exits (2) a moment after the limit, as a kill would stop it, and
/// the state keeps every batch committed before.
#[test]
fn the_binary_exits_when_a_stuck_step_cannot_be_interrupted() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("acts.jsonl");
    // A committed epoch, then minutes of work in one step (16M × 5,000
    // character comparisons).
    after_an_epoch(&input, &slow_like(16_000_000));
    let started = std::time::Instant::now();
    let stderr = stopped_after_an_epoch(
        &input,
        &["--sql-stall-secs", "1"],
        &["cannot be interrupted", "--sql-stall-secs"],
    );
    // Not a benchmark: the step alone runs for minutes.
    assert!(
        started.elapsed() < std::time::Duration::from_secs(60),
        "{stderr}"
    );
}

/// Runs the binary over `input` (see `after_an_epoch`) with `args`; checks
/// it stopped (2) at the statement, saying `said`, with the first epoch
/// committed. Returns what it printed.
fn stopped_after_an_epoch(input: &Path, args: &[&str], said: &[&str]) -> String {
    let state = input.with_extension("db");
    let out = rewind_tests::rewind_run("hostile", input, &state)
        .args(["--batch-size", "1", "--quiet"])
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let at = format!(
        "processor SQL stopped at acts/0@{}",
        rewind_host::INSTANCE_EPOCH
    );
    for said in std::iter::once(at.as_str()).chain(said.iter().copied()) {
        assert!(stderr.contains(said), "{said:?} in {stderr}");
    }
    assert_committed_epoch(&state);
    stderr
}

/// Writes to `input` an epoch of normal events (a batch that commits), then
/// `statement`, then one more normal event.
fn after_an_epoch(input: &Path, statement: &str) {
    let epoch = rewind_host::INSTANCE_EPOCH as i64;
    let mut lines: Vec<String> = (0..epoch).map(|o| act_line(o, "normal", None)).collect();
    lines.push(act_line(epoch, "sql-value", Some(statement)));
    lines.push(act_line(epoch + 1, "normal", None));
    std::fs::write(input, lines.join("\n") + "\n").unwrap();
}

/// The state holds the first epoch of `after_an_epoch`, and nothing after.
fn assert_committed_epoch(state: &Path) {
    let epoch = rewind_host::INSTANCE_EPOCH as i64;
    assert_eq!(
        rows(state, "SELECT count(*), max(offset) FROM seen"),
        [vec![Value::Integer(epoch), Value::Integer(epoch - 1)]]
    );
    assert_eq!(
        rows(state, "SELECT next_offset FROM _rewind_offsets"),
        [vec![Value::Integer(epoch)]]
    );
}

/// Guest SQL cannot make SQLite exhaust the machine's memory: a statement
/// that needs more than `--sql-memory-mb` (a sort of twenty 50 MB strings)
/// stops the run, named, with the batches before it committed.
#[test]
fn sql_needing_more_memory_than_allowed_stops_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("acts.jsonl");
    after_an_epoch(
        &input,
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n LIMIT 20) \
         SELECT length(x) FROM (SELECT printf('%.*c', 50000000, 'x') || i AS x FROM n \
         ORDER BY x DESC) LIMIT 1",
    );
    stopped_after_an_epoch(
        &input,
        &["--sql-memory-mb", "256"],
        &[
            "needed more than the 256 MiB SQLite may hold",
            "--sql-memory-mb",
        ],
    );
}

/// A guest's frames and the host's SQL share the thread's stack: the
/// deepest guest (its stack is capped) running the deepest expression
/// SQLite accepts still fits in 1 MiB, half the stack of the threads the
/// host spawns (a replay's sides, a Kafka run's partitions): deeper guests
/// are dead letters, never a crash.
#[test]
fn the_deepest_guest_running_the_deepest_sql_fits_a_small_thread_stack() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("deep.jsonl");
    let depths = deep_sql_input(&input);
    let state = dir.path().join("deep.db");
    let cfg = config(&processor("hostile"), &input, &state);
    std::thread::Builder::new()
        .stack_size(1 << 20)
        .spawn(move || rewind_host::run(&cfg, &()).map(|_| ()))
        .unwrap()
        .join()
        .expect("the run's thread survives")
        .unwrap();
    assert_deep_guests_ran_or_overflowed(&state, depths);
}

/// The binary runs guests on a thread of its own, so a small main-thread
/// stack (`ulimit -s 512`) changes nothing. Regression: it overflowed.
#[test]
fn the_binary_does_not_depend_on_the_main_threads_stack() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("deep.jsonl");
    let depths = deep_sql_input(&input);
    let state = dir.path().join("deep.db");
    let args: Vec<String> = rewind_tests::run_args("hostile", &input, &state)
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let out = std::process::Command::new("bash")
        .args(["-c", "ulimit -s 512 && exec \"$0\" \"$@\" --quiet"])
        .arg(rewind_tests::rewind_bin())
        .args(&args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_deep_guests_ran_or_overflowed(&state, depths);
}

/// Writes to `input` events that each run the deepest expression SQLite
/// accepts from deeper and deeper guest calls; returns the depths.
fn deep_sql_input(input: &Path) -> usize {
    // 490 nested pairs of calls: SQLite refuses expressions deeper than 1,000.
    let deep = format!("SELECT {}1{}", "abs(-(".repeat(490), "))".repeat(490));
    let lines: Vec<String> = (0..8000)
        .step_by(250)
        .enumerate()
        .map(|(offset, depth)| {
            let payload =
                serde_json::json!({ "do": "deep-sql", "statement": deep, "depth": depth });
            rewind_tests::envelope("acts", offset as i64, TS, "k", &payload.to_string())
        })
        .collect();
    std::fs::write(input, lines.join("\n") + "\n").unwrap();
    lines.len()
}

/// Shallow guests of `deep_sql_input` ran the statement; from some depth
/// on, guests overflowed their own stack before they got there.
fn assert_deep_guests_ran_or_overflowed(state: &Path, events: usize) {
    let ran: Vec<(i64, String)> = rows(state, "SELECT offset, value FROM observed")
        .iter()
        .map(|r| (rewind_tests::int(&r[0]), text(&r[1])))
        .collect();
    let overflowed: Vec<(i64, String)> =
        rows(state, r#"SELECT "offset", error_class FROM _rewind_dlq"#)
            .iter()
            .map(|r| (rewind_tests::int(&r[0]), text(&r[1])))
            .collect();
    assert!(
        ran.len() > 4 && !overflowed.is_empty(),
        "{ran:?} {overflowed:?}"
    );
    assert_eq!(ran.len() + overflowed.len(), events);
    assert!(ran.iter().all(|(_, value)| value == "1 rows"), "{ran:?}");
    let deepest_ran = ran.iter().map(|(o, _)| *o).max().unwrap();
    assert!(
        overflowed
            .iter()
            .all(|(o, class)| *o > deepest_ran && class == "stack-overflow"),
        "{overflowed:?} {:?}",
        rows(state, "SELECT message FROM _rewind_dlq LIMIT 1")
    );
}

/// A statement that fails after rewriting ~3 MB of existing pages, in a
/// batch that takes a savepoint per event (an event before it failed),
/// leaves every page as it was, and the failing events' writes are undone:
/// what SQLite keeps to restore them (the sub-journal) holds far more than
/// an event usually writes.
#[test]
fn a_large_rewrite_that_fails_is_restored_whole() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("acts.jsonl");
    let fill = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 3000) \
                INSERT INTO observed (offset, what, value) SELECT x, 'filler', printf('%0900d', x) FROM c";
    // Rows in rowid order: the last one fails NOT NULL after all the others
    // were rewritten.
    let rewrite = "UPDATE observed SET value = zeroblob(900), \
                   offset = CASE WHEN what = 'last' THEN NULL ELSE offset END";
    let acts = [
        ("sql", Some(fill)),
        (
            "sql",
            Some("INSERT INTO observed (offset, what, value) VALUES (0, 'last', 'x')"),
        ),
        ("invalid", None),
        ("sql", Some(rewrite)),
        ("write-then-fail", None),
        ("normal", None),
    ];
    let lines: Vec<String> = acts
        .iter()
        .enumerate()
        .map(|(o, (act, statement))| act_line(o as i64, act, *statement))
        .collect();
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let state = dir.path().join("acts.db");
    let out = rewind_tests::rewind_run("hostile", &input, &state)
        .arg("--quiet")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");

    // Far more pages than an event usually touches.
    let pages = rows(
        &state,
        "SELECT count(*) FROM dbstat WHERE name = 'observed'",
    );
    assert!(
        matches!(pages[0][0], Value::Integer(n) if n > 150),
        "{pages:?} pages"
    );
    assert_eq!(
        rows(
            &state,
            "SELECT count(*) FROM observed WHERE what = 'filler' AND value = printf('%0900d', offset)"
        ),
        [vec![Value::Integer(3000)]]
    );
    assert_eq!(
        rows(
            &state,
            "SELECT offset, value FROM observed WHERE what = 'last'"
        ),
        [vec![Value::Integer(0), Value::Text("x".into())]]
    );
    let probe = rows(&state, "SELECT outcome FROM probes WHERE offset = 3");
    assert!(
        text(&probe[0][0]).contains("NOT NULL constraint failed"),
        "{probe:?}"
    );
    // The failing events' writes are undone; the normal event's kept.
    assert_eq!(
        rows(&state, "SELECT offset FROM seen"),
        [vec![Value::Integer(5)]]
    );
    assert_eq!(
        rows(
            &state,
            "SELECT offset, error_class FROM _rewind_dlq ORDER BY offset"
        ),
        [
            vec![Value::Integer(2), Value::Text("invalid-input".into())],
            vec![Value::Integer(4), Value::Text("failed".into())]
        ]
    );
}

/// An event that fails having run no statement that may write changed
/// nothing, so it is dead-lettered where it stands; one that fails after
/// writing has its batch redone with a savepoint per event, which undoes it
/// alone, and the run says so. Both end as an event-by-event run would.
#[test]
fn only_an_event_that_failed_after_writing_costs_a_redo() {
    let dir = tempfile::tempdir().unwrap();
    let run = |name: &str, acts: &[&str]| {
        let input = dir.path().join(format!("{name}.jsonl"));
        let lines: Vec<String> = (0..)
            .zip(acts)
            .map(|(o, act)| act_line(o, act, None))
            .collect();
        std::fs::write(&input, lines.join("\n") + "\n").unwrap();
        let state = dir.path().join(format!("{name}.db"));
        let summary =
            rewind_host::run(&config(&processor("hostile"), &input, &state), &()).unwrap();
        (summary, state)
    };
    let seen = |state: &Path| rows(state, "SELECT offset FROM seen ORDER BY offset");
    // Rejected before any write: no redo, and the batch stays optimistic.
    let (summary, state) = run("read", &["normal", "invalid", "normal", "panic", "normal"]);
    assert_eq!((summary.dead_lettered, summary.redone_batches), (2, 0));
    assert_eq!(
        seen(&state),
        [
            [Value::Integer(0)],
            [Value::Integer(2)],
            [Value::Integer(4)]
        ]
    );
    // A write, then the failure: the batch is redone and the write undone.
    let (summary, state) = run("wrote", &["normal", "write-then-fail", "normal"]);
    assert_eq!((summary.dead_lettered, summary.redone_batches), (1, 1));
    assert_eq!(seen(&state), [[Value::Integer(0)], [Value::Integer(2)]]);

    let input = dir.path().join("wrote.jsonl");
    let out = rewind_tests::rewind_run("hostile", &input, &dir.path().join("cli.db"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("1 batch redone event by event (an event failed after writing"),
        "{stderr}"
    );
}
