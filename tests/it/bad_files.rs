//! Bad files: inputs and modules that must produce a clear error or dead
//! letters, never a panic, a partial result or a stray state DB.

use std::path::{Path, PathBuf};

use rewind_host::{LoadError, RunError, StateError};
use rewind_tests::{XorShift, config, dump, processor, rows};
use rusqlite::types::Value;

const ORDER: &str = r#"{"type":"order_completed","order_id":"o-1","customer_id":"c-1","amount_cents":5,"currency":"EUR"}"#;

fn run(
    dir: &Path,
    module: &Path,
    input_bytes: &[u8],
) -> (
    Result<rewind_host::RunSummary, RunError>,
    std::path::PathBuf,
) {
    let input = dir.join("in.jsonl");
    std::fs::write(&input, input_bytes).unwrap();
    let state = dir.join("state.db");
    (
        rewind_host::run(&config(module, &input, &state), &()),
        state,
    )
}

#[test]
fn empty_input_is_a_run_of_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (result, state) = run(dir.path(), &processor("payments-v2"), b"");
    assert_eq!(result.unwrap().consumed, 0);
    assert_eq!(
        rows(&state, "SELECT count(*) FROM payments")[0][0],
        Value::Integer(0)
    );
}

#[test]
fn a_truncated_last_line_is_a_dead_letter_with_its_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let input = format!("{ORDER}\n{}", &ORDER[..40]);
    let (result, state) = run(dir.path(), &processor("payments-v2"), input.as_bytes());
    let summary = result.unwrap();
    assert_eq!((summary.applied, summary.dead_lettered), (1, 1));
    let dead = rows(
        &state,
        r#"SELECT stream, "offset", error_class, raw FROM _rewind_dlq"#,
    );
    assert_eq!(dead[0][0], Value::Text("in.jsonl".into()));
    assert_eq!(dead[0][1], Value::Integer(2));
    assert_eq!(dead[0][2], Value::Text("malformed".into()));
    assert_eq!(dead[0][3], Value::Blob(ORDER.as_bytes()[..40].to_vec()));
}

/// An event the processor rejects keeps the bytes it was read as: a bare
/// line itself, an envelope line whole (not just its payload).
#[test]
fn a_rejected_event_keeps_the_line_it_was_read_as() {
    let dir = tempfile::tempdir().unwrap();
    let bare = r#"{"type":"order_refunded","order_id":"o-1"}"#;
    let envelope =
        r#"{"topic":"orders","partition":0,"offset":7,"key":null,"payload":"{\"type\":\"nope\"}"}"#;
    let input = format!("{bare}\n{envelope}\n");
    let (result, state) = run(dir.path(), &processor("payments-v2"), input.as_bytes());
    assert_eq!(result.unwrap().dead_lettered, 2);
    let dead = rows(
        &state,
        "SELECT error_class, raw FROM _rewind_dlq ORDER BY seq",
    );
    let class = Value::Text("invalid-input".into());
    assert_eq!(
        dead[0],
        vec![class.clone(), Value::Blob(bare.as_bytes().to_vec())]
    );
    assert_eq!(
        dead[1],
        vec![class, Value::Blob(envelope.as_bytes().to_vec())]
    );
}

#[test]
fn a_binary_file_becomes_dead_letters_not_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = XorShift(42);
    let bytes: Vec<u8> = (0..200_000).map(|_| rng.next_u64() as u8).collect();
    let (result, state) = run(dir.path(), &processor("payments-v2"), &bytes);
    let summary = result.unwrap();
    let lines = bytes
        .split(|&b| b == b'\n')
        .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
        .count();
    assert_eq!(summary.dead_lettered, lines as u64);
    assert_eq!(summary.applied, 0);
    // Every byte of every line is kept.
    let kept: usize = rows(&state, "SELECT length(raw) FROM _rewind_dlq")
        .iter()
        .map(|r| match r[0] {
            Value::Integer(n) => n as usize,
            _ => 0,
        })
        .sum();
    let total: usize = bytes
        .split(|&b| b == b'\n')
        .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l).len())
        .sum();
    assert_eq!(kept, total);
}

fn assert_no_state(state: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let file = format!("{}{suffix}", state.display());
        assert!(!Path::new(&file).exists(), "{file} was written");
    }
}

#[test]
fn a_core_module_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let module = dir.path().join("core.wasm");
    // The smallest valid core module: magic and version 1.
    std::fs::write(&module, b"\0asm\x01\0\0\0").unwrap();
    let (result, state) = run(dir.path(), &module, ORDER.as_bytes());
    let error = result.unwrap_err();
    assert!(
        matches!(error, RunError::Load(LoadError::CoreModule { .. })),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(
        message.contains("core.wasm") && message.contains("component"),
        "{message}"
    );
    assert_no_state(&state);
}

#[test]
fn not_wasm_at_all_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let module = dir.path().join("notes.wasm");
    std::fs::write(&module, b"hello, I am text").unwrap();
    let (result, state) = run(dir.path(), &module, ORDER.as_bytes());
    let message = result.unwrap_err().to_string();
    assert!(
        message.contains("notes.wasm") && message.contains("not a WebAssembly file"),
        "{message}"
    );
    assert_no_state(&state);
}

#[test]
fn a_component_of_another_world_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let (result, state) = run(dir.path(), &processor("other-world"), ORDER.as_bytes());
    let error = result.unwrap_err();
    assert!(
        matches!(error, RunError::Load(LoadError::WrongWorld { .. })),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(
        message.contains("other-world.wasm") && message.contains("rewind:processor"),
        "{message}"
    );
    assert_no_state(&state);
}

#[test]
fn a_failing_init_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (result, state) = run(dir.path(), &processor("hostile-bad-init"), ORDER.as_bytes());
    let message = result.unwrap_err().to_string();
    assert!(
        message.contains("hostile-bad-init.wasm") && message.contains("schema version 7"),
        "{message}"
    );
    assert_no_state(&state);

    // An existing state DB is left exactly as it was.
    let input = dir.path().join("acts.jsonl");
    std::fs::write(&input, r#"{"do":"normal"}"#).unwrap();
    let existing = dir.path().join("existing.db");
    rewind_host::run(&config(&processor("hostile"), &input, &existing), &()).unwrap();
    let before = dump(&existing);
    let mut cfg = config(&processor("hostile-bad-init"), &input, &existing);
    cfg.allow_module_change = true;
    assert!(matches!(
        rewind_host::run(&cfg, &()),
        Err(RunError::Init { .. })
    ));
    assert_eq!(dump(&existing), before);
}

#[test]
fn a_state_db_of_another_module_needs_consent() {
    let dir = tempfile::tempdir().unwrap();
    let (result, state) = run(dir.path(), &processor("payments-v1"), ORDER.as_bytes());
    result.unwrap();
    let input = dir.path().join("in.jsonl");
    let error =
        rewind_host::run(&config(&processor("payments-v2"), &input, &state), &()).unwrap_err();
    assert!(matches!(error, RunError::ModuleChanged { .. }), "{error:?}");
    assert!(error.to_string().contains("--allow-module-change"));
}

#[test]
fn a_corrupt_state_db_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.db");
    std::fs::write(&state, vec![0x5a; 8192]).unwrap();
    let input = dir.path().join("in.jsonl");
    std::fs::write(&input, ORDER).unwrap();
    let error =
        rewind_host::run(&config(&processor("payments-v2"), &input, &state), &()).unwrap_err();
    assert!(
        matches!(error, RunError::State(StateError::NotADatabase { .. })),
        "{error:?}"
    );
    assert!(error.to_string().contains("state.db"), "{error}");
    assert_eq!(
        std::fs::read(&state).unwrap(),
        vec![0x5a; 8192],
        "left alone"
    );
}

#[test]
fn an_output_file_that_is_not_ours_is_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    std::fs::write(&input, ORDER).unwrap();
    let output = dir.path().join("out.jsonl");
    std::fs::write(&output, b"somebody else's data\n").unwrap();
    let mut cfg = config(&processor("payments-v2"), &input, &dir.path().join("s.db"));
    cfg.output = Some(output.clone());
    let error = rewind_host::run(&cfg, &()).unwrap_err();
    assert!(error.to_string().contains("out.jsonl"), "{error}");
    assert_eq!(std::fs::read(&output).unwrap(), b"somebody else's data\n");
}

/// Exactly-once delivery needs a regular file: `/dev/null` or a directory is
/// a clear error, not EINVAL from a sync.
#[test]
fn an_output_that_is_not_a_regular_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    std::fs::write(&input, ORDER).unwrap();
    for output in [PathBuf::from("/dev/null"), dir.path().to_owned()] {
        let mut cfg = config(&processor("payments-v2"), &input, &dir.path().join("s.db"));
        cfg.output = Some(output.clone());
        let error = rewind_host::run(&cfg, &()).unwrap_err().to_string();
        assert!(
            error.contains(&format!(
                "output {} is not a regular file",
                output.display()
            )),
            "{error}"
        );
    }
}

/// Regression: a state DB that ran without `--output` and is then given an
/// existing file must not cut that file back to "its" recorded length (0).
#[test]
fn an_output_file_given_to_a_running_state_for_the_first_time_is_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    std::fs::write(&input, ORDER).unwrap();
    let state = dir.path().join("s.db");
    rewind_host::run(&config(&processor("payments-v2"), &input, &state), &()).unwrap();

    let output = dir.path().join("precious.jsonl");
    std::fs::write(&output, b"months of somebody's work\n").unwrap();
    let mut cfg = config(&processor("payments-v2"), &input, &state);
    cfg.output = Some(output.clone());
    let error = rewind_host::run(&cfg, &()).unwrap_err();
    assert!(error.to_string().contains("precious.jsonl"), "{error}");
    assert_eq!(
        std::fs::read(&output).unwrap(),
        b"months of somebody's work\n"
    );

    // A new file works, and receives the outputs still waiting in the outbox.
    let fresh = dir.path().join("fresh.jsonl");
    cfg.output = Some(fresh.clone());
    rewind_host::run(&cfg, &()).unwrap();
    assert_eq!(std::fs::read_to_string(&fresh).unwrap().lines().count(), 1);
}

/// Two runs on one state DB: the second gets a clear error, not a hang.
#[test]
fn a_state_db_in_use_by_another_writer_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let (result, state) = run(dir.path(), &processor("payments-v2"), ORDER.as_bytes());
    result.unwrap();
    let holder = rusqlite::Connection::open(&state).unwrap();
    holder.execute_batch("BEGIN IMMEDIATE").unwrap();
    let input = dir.path().join("in.jsonl");
    let error =
        rewind_host::run(&config(&processor("payments-v2"), &input, &state), &()).unwrap_err();
    assert!(
        matches!(error, RunError::State(StateError::Busy { .. })),
        "{error:?}"
    );
    assert!(error.to_string().contains("another process"), "{error}");
    holder.execute_batch("ROLLBACK").unwrap();
}
