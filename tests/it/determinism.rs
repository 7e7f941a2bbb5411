//! The invariant everything rests on: state, outputs and dead letters are a
//! pure function of (module, input, starting state, host configuration).
//! Batch sizes, restarts and kill -9 change none of it.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use proptest::prelude::*;
use rewind_tests::{
    XorShift, cache_dir, config, dump, dump_hash, envelope, file_len, kill_when, kill_when_grown,
    processor, rewind_bin, rewind_run,
};

/// A random payments stream with duplicates, cancels and malformed lines.
fn stream(events: usize, seed: u64) -> Vec<u8> {
    let mut rng = XorShift(seed | 1);
    let mut out = Vec::new();
    for i in 0..events {
        let order = rng.below(events as u64 / 2 + 1);
        let line = match rng.below(20) {
            0 => "{\"truncated\":".to_owned(),
            1..=4 => envelope(
                "orders",
                i as i64,
                1_700_000_000_000 + i as i64,
                "k",
                &format!(r#"{{"type":"order_cancelled","order_id":"o-{order}"}}"#),
            ),
            _ => envelope(
                "orders",
                i as i64,
                1_700_000_000_000 + i as i64,
                "k",
                &format!(
                    r#"{{"type":"order_completed","order_id":"o-{order}","customer_id":"c-{}","amount_cents":{},"currency":"EUR"}}"#,
                    order % 7,
                    100 + order
                ),
            ),
        };
        out.extend_from_slice(line.as_bytes());
        out.push(b'\n');
    }
    out
}

fn run_lib(module: &str, input: &Path, state: &Path, output: &Path, batch_size: usize) {
    let mut cfg = config(&processor(module), input, state);
    cfg.batch_size = batch_size;
    cfg.output = Some(output.to_owned());
    rewind_host::run(&cfg, &()).unwrap();
}

fn run_cli(
    module: &str,
    input: &Path,
    state: &Path,
    output: &Path,
    batch_size: usize,
) -> std::process::Child {
    rewind_run(module, input, state)
        .arg("--quiet")
        .arg("--output")
        .arg(output)
        .args(["--batch-size", &batch_size.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 6, ..ProptestConfig::default() })]

    /// Different batch sizes give byte-identical state (host tables included)
    /// and outputs.
    #[test]
    fn batch_size_changes_nothing(seed in any::<u64>(), events in 20usize..300, batch in 1usize..64) {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("orders.jsonl");
        std::fs::write(&input, stream(events, seed)).unwrap();
        let (a, b) = (dir.path().join("a.db"), dir.path().join("b.db"));
        let (out_a, out_b) = (dir.path().join("a.jsonl"), dir.path().join("b.jsonl"));
        run_lib("payments-v1", &input, &a, &out_a, 1000);
        run_lib("payments-v1", &input, &b, &out_b, batch);
        prop_assert_eq!(dump(&a), dump(&b));
        prop_assert_eq!(std::fs::read(&out_a).unwrap(), std::fs::read(&out_b).unwrap());
    }

    /// kill -9 at random points, then rerunning the same command to the end,
    /// gives the same state and the same output file as one uninterrupted run.
    /// The kill points are fractions of the run's output (per mille), each a
    /// few milliseconds later: mid-run on any machine, also before the first
    /// output is written.
    #[test]
    fn kill_9_and_restart_changes_nothing(
        seed in any::<u64>(),
        batch in 1usize..40,
        mut kills in proptest::collection::vec((0u64..800, 0u64..5), 1..4),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("orders.jsonl");
        std::fs::write(&input, stream(6000, seed)).unwrap();
        let (clean, killed) = (dir.path().join("clean.db"), dir.path().join("killed.db"));
        let (out_clean, out_killed) = (dir.path().join("clean.jsonl"), dir.path().join("killed.jsonl"));
        run_lib("payments-v1", &input, &clean, &out_clean, 1000);
        let whole = file_len(&out_clean);

        kills.sort_unstable();
        let mut interrupted = false;
        for (per_mille, after_ms) in kills {
            let mut child = run_cli("payments-v1", &input, &killed, &out_killed, batch);
            interrupted |= kill_when_grown(
                &mut child,
                &out_killed,
                whole * per_mille / 1000,
                Duration::from_millis(after_ms),
            );
        }
        prop_assert!(interrupted, "no kill landed before the run finished");
        let finished = run_cli("payments-v1", &input, &killed, &out_killed, batch).wait_with_output().unwrap();
        prop_assert!(finished.status.success(), "rerun failed: {}", String::from_utf8_lossy(&finished.stderr));
        prop_assert_eq!(dump_hash(&clean), dump_hash(&killed));
        prop_assert_eq!(std::fs::read(&out_clean).unwrap(), std::fs::read(&out_killed).unwrap());
    }
}

/// Running the same input twice into the same state applies nothing twice.
#[test]
fn rerunning_a_finished_input_applies_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("orders.jsonl");
    std::fs::write(&input, stream(200, 99)).unwrap();
    let state = dir.path().join("s.db");
    let output = dir.path().join("out.jsonl");
    run_lib("payments-v1", &input, &state, &output, 16);
    let (before, out_before) = (dump(&state), std::fs::read(&output).unwrap());
    let mut cfg = config(&processor("payments-v1"), &input, &state);
    cfg.output = Some(output.clone());
    let summary = rewind_host::run(&cfg, &()).unwrap();
    assert_eq!(summary.consumed, 0);
    assert_eq!(summary.skipped, 200);
    assert_eq!(dump(&state), before);
    assert_eq!(std::fs::read(&output).unwrap(), out_before);
}

/// An input that grows between runs continues where the last run stopped.
#[test]
fn appended_input_continues_where_it_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let full = stream(400, 5);
    let cut = full
        .iter()
        .enumerate()
        .filter(|(_, b)| **b == b'\n')
        .nth(149)
        .unwrap()
        .0
        + 1;
    let input = dir.path().join("orders.jsonl");
    let (one, two) = (dir.path().join("one.db"), dir.path().join("two.db"));
    let (out_one, out_two) = (dir.path().join("one.jsonl"), dir.path().join("two.jsonl"));

    std::fs::write(&input, &full).unwrap();
    run_lib("payments-v2", &input, &one, &out_one, 50);
    std::fs::write(&input, &full[..cut]).unwrap();
    run_lib("payments-v2", &input, &two, &out_two, 7);
    std::fs::write(&input, &full).unwrap();
    run_lib("payments-v2", &input, &two, &out_two, 7);
    assert_eq!(dump(&one), dump(&two));
    assert_eq!(
        std::fs::read(&out_one).unwrap(),
        std::fs::read(&out_two).unwrap()
    );
}

/// A guest that keeps state in memory sees it reset at every instance epoch
/// (and after a trap), whatever the batch size: what it remembers is a
/// function of the input alone.
#[test]
fn guest_memory_lives_for_one_instance_epoch_whatever_the_batching() {
    let dir = tempfile::tempdir().unwrap();
    let epoch = rewind_host::INSTANCE_EPOCH as i64;
    // Three epochs and a bit, with a panic half-way through the second.
    let panic_at = epoch + epoch / 2;
    let acts: Vec<String> = (0..3 * epoch + 8)
        .map(|i| {
            let act = if i == panic_at { "panic" } else { "remember" };
            rewind_tests::envelope("acts", i, 0, "k", &format!(r#"{{"do":"{act}"}}"#))
        })
        .collect();
    let input = dir.path().join("acts.jsonl");
    std::fs::write(&input, acts.join("\n")).unwrap();
    let mut dumps = Vec::new();
    for (name, batch) in [("a", 1), ("b", 7), ("c", 10 * epoch as usize)] {
        let state = dir.path().join(format!("{name}.db"));
        let mut cfg = config(&processor("hostile"), &input, &state);
        cfg.batch_size = batch;
        rewind_host::run(&cfg, &()).unwrap();
        let calls: Vec<(i64, i64)> =
            rewind_tests::rows(&state, "SELECT offset, value FROM observed ORDER BY offset")
                .into_iter()
                .map(|r| match (&r[0], &r[1]) {
                    (rusqlite::types::Value::Integer(o), rusqlite::types::Value::Integer(c)) => {
                        (*o, *c)
                    }
                    other => panic!("{other:?}"),
                })
                .collect();
        for (offset, calls) in calls {
            // The panic discards the instance; the next event starts a
            // fresh one, which lives until the next epoch.
            let fresh_at = if offset > panic_at && offset < 2 * epoch {
                panic_at + 1
            } else {
                offset / epoch * epoch
            };
            assert_eq!(
                calls,
                offset - fresh_at + 1,
                "offset {offset} with batch size {batch}"
            );
        }
        dumps.push(dump(&state));
    }
    assert_eq!(dumps[0], dumps[1]);
    assert_eq!(dumps[1], dumps[2]);
}

/// Ctrl-C (SIGINT), or SIGTERM as a service manager sends, stops at an
/// epoch boundary with everything committed and exit code 130; the same
/// command then finishes the job exactly.
#[test]
fn ctrl_c_commits_and_the_same_command_continues() {
    stop_commits_and_the_same_command_continues("-INT");
}

/// SIGHUP too: the terminal that started the run went away.
#[test]
fn sigterm_and_sighup_commit_and_the_same_command_continues() {
    stop_commits_and_the_same_command_continues("-TERM");
    stop_commits_and_the_same_command_continues("-HUP");
}

/// Signals ignored when the run started (`nohup`, a script's background
/// job) stay ignored: the run goes on to the end, exactly as uninterrupted.
#[test]
fn signals_ignored_at_start_stay_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("orders.jsonl");
    std::fs::write(&input, stream(20_000, 5)).unwrap();
    let (clean, ignoring) = (dir.path().join("clean.db"), dir.path().join("ignoring.db"));
    let (out_clean, out_ignoring) = (
        dir.path().join("clean.jsonl"),
        dir.path().join("ignoring.jsonl"),
    );
    run_lib("payments-v2", &input, &clean, &out_clean, 1000);
    let run = rewind_run("payments-v2", &input, &ignoring);
    let mut child = Command::new("bash")
        .args(["-c", "trap '' INT TERM HUP; exec \"$@\"", "--"])
        .arg(run.get_program())
        .args(run.get_args())
        .args(["--quiet", "--batch-size", "1000", "--output"])
        .arg(&out_ignoring)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let fifth = file_len(&out_clean) / 5;
    assert!(rewind_tests::run_until(&mut child, || file_len(
        &out_ignoring
    ) >= fifth));
    for signal in ["-HUP", "-INT", "-TERM"] {
        let sent = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
    }
    let finished = child.wait_with_output().unwrap();
    assert!(
        finished.status.success(),
        "{:?}: {}",
        finished.status,
        String::from_utf8_lossy(&finished.stderr)
    );
    assert_eq!(dump_hash(&clean), dump_hash(&ignoring));
    assert_eq!(
        std::fs::read(&out_clean).unwrap(),
        std::fs::read(&out_ignoring).unwrap()
    );
}

fn stop_commits_and_the_same_command_continues(signal: &str) {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("orders.jsonl");
    std::fs::write(&input, stream(20_000, 3)).unwrap();
    let (clean, stopped) = (dir.path().join("clean.db"), dir.path().join("stopped.db"));
    let (out_clean, out_stopped) = (
        dir.path().join("clean.jsonl"),
        dir.path().join("stopped.jsonl"),
    );
    run_lib("payments-v2", &input, &clean, &out_clean, 1000);

    // Interrupted once a fifth of the outputs are out: mid-run on any machine.
    let child = run_cli("payments-v2", &input, &stopped, &out_stopped, 1000);
    let fifth = file_len(&out_clean) / 5;
    let interrupted = rewind_tests::signal_when(child, || file_len(&out_stopped) >= fifth, signal);
    assert_eq!(
        interrupted.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&interrupted.stderr)
    );
    assert!(
        String::from_utf8_lossy(&interrupted.stderr).contains("run the same command to continue")
    );

    let finished = run_cli("payments-v2", &input, &stopped, &out_stopped, 1000)
        .wait_with_output()
        .unwrap();
    assert!(
        finished.status.success(),
        "{}",
        String::from_utf8_lossy(&finished.stderr)
    );
    assert_eq!(dump_hash(&clean), dump_hash(&stopped));
    assert_eq!(
        std::fs::read(&out_clean).unwrap(),
        std::fs::read(&out_stopped).unwrap()
    );
}

/// kill -9 and restart with a guest that keeps state in memory: crashes
/// resume at epoch boundaries, where every run starts a fresh instance, so
/// what it remembers is the same as in an uninterrupted run.
#[test]
fn kill_9_with_a_memory_stateful_guest_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let total = 20_000i64;
    let acts: Vec<String> = (0..total)
        .map(|i| rewind_tests::envelope("acts", i, i, "k", r#"{"do":"remember"}"#))
        .collect();
    let input = dir.path().join("acts.jsonl");
    std::fs::write(&input, acts.join("\n")).unwrap();
    let (clean, killed) = (dir.path().join("clean.db"), dir.path().join("killed.db"));
    let (out_clean, out_killed) = (
        dir.path().join("clean.jsonl"),
        dir.path().join("killed.jsonl"),
    );
    run_lib("hostile", &input, &clean, &out_clean, 1);
    // Kill points in events committed, a few milliseconds later: mid-run
    // however fast the machine is. The state's count is read as a live
    // run's reader would (WAL): not there yet reads as nothing committed.
    let committed = || -> i64 {
        let db = rusqlite::Connection::open_with_flags(
            &killed,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        );
        db.and_then(|db| {
            db.query_row(
                "SELECT CAST(value AS INTEGER) FROM _rewind_meta WHERE key = 'next_seq'",
                [],
                |row| row.get(0),
            )
        })
        .unwrap_or(0)
    };
    let mut interrupted = false;
    for (percent, after_ms) in [(15, 3), (40, 0), (65, 1)] {
        let mut child = run_cli("hostile", &input, &killed, &out_killed, 1);
        let landed = kill_when(
            &mut child,
            || committed() >= total * percent / 100,
            Duration::from_millis(after_ms),
        );
        let n = committed();
        if landed && n < total {
            assert_eq!(
                n % rewind_host::INSTANCE_EPOCH as i64,
                0,
                "a crash resumed mid-epoch"
            );
            interrupted = true;
        }
    }
    assert!(interrupted, "no kill landed mid-run");
    let finished = run_cli("hostile", &input, &killed, &out_killed, 1)
        .wait_with_output()
        .unwrap();
    assert!(
        finished.status.success(),
        "{}",
        String::from_utf8_lossy(&finished.stderr)
    );
    assert_eq!(dump(&clean), dump(&killed));
}

/// A failing event (here invalid input in the middle of a batch, and a trap)
/// leaves exactly what a savepoint of its own would have: the events around
/// it applied, it dead-lettered, and every other event's guest log shown
/// once, in order, whatever redoing the batch took.
#[test]
fn a_failing_event_is_undone_alone_and_logs_show_once() {
    struct Logs(std::cell::RefCell<Vec<String>>);
    impl rewind_host::Progress for Logs {
        fn guest_log(&self, position: &rewind_host::Position, line: &str) {
            self.0.borrow_mut().push(format!("{position} {line}"));
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let acts: Vec<String> = (0..150i64)
        .map(|i| {
            let act = match i {
                40 => "write-then-fail",
                41 => "invalid",
                90 => "panic",
                _ if i % 2 == 0 => "say",
                _ => "normal",
            };
            envelope("acts", i, 0, "k", &format!(r#"{{"do":"{act}"}}"#))
        })
        .collect();
    let input = dir.path().join("acts.jsonl");
    std::fs::write(&input, acts.join("\n")).unwrap();
    let logs = Logs(Default::default());
    let state = dir.path().join("s.db");
    rewind_host::run(&config(&processor("hostile"), &input, &state), &logs).unwrap();

    let said: Vec<String> = logs
        .0
        .into_inner()
        .into_iter()
        .filter(|l| l.contains("says hello"))
        .collect();
    let expected: Vec<String> = (0..150)
        .filter(|i| i % 2 == 0 && ![40, 90].contains(i))
        .map(|i| format!("acts/0@{i} info: event {i} says hello"))
        .collect();
    assert_eq!(said, expected);
    let seen: Vec<i64> = rewind_tests::rows(&state, "SELECT offset FROM seen ORDER BY offset")
        .into_iter()
        .map(|r| match r[0] {
            rusqlite::types::Value::Integer(o) => o,
            ref other => panic!("{other:?}"),
        })
        .collect();
    let normal: Vec<i64> = (0..150)
        .filter(|i| i % 2 == 1 && ![41].contains(i))
        .collect();
    assert_eq!(
        seen, normal,
        "write-then-fail's write is undone, the rest kept"
    );
    let dead: Vec<Vec<rusqlite::types::Value>> = rewind_tests::rows(
        &state,
        "SELECT \"offset\", error_class FROM _rewind_dlq ORDER BY seq",
    );
    assert_eq!(
        format!("{dead:?}"),
        r#"[[Integer(40), Text("failed")], [Integer(41), Text("invalid-input")], [Integer(90), Text("panic")]]"#
    );
    let outputs = rewind_tests::rows(&state, "SELECT sum(outputs) FROM _rewind_outbox");
    assert_eq!(
        outputs[0][0],
        rusqlite::types::Value::Integer(normal.len() as i64)
    );
}

/// A run that resumes mid-epoch (its input grew after it ended) gives the
/// guest a fresh instance there; its tape records the break as a run frame,
/// and a replay of the tape breaks at the same place, so `verify` agrees
/// even for a guest that keeps state in memory.
#[test]
fn a_tape_replays_the_fresh_instance_of_a_run_resumed_mid_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let line = |i: i64| envelope("acts", i, 0, "k", r#"{"do":"remember"}"#) + "\n";
    let input = dir.path().join("acts.jsonl");
    let (state, tape) = (dir.path().join("live.db"), dir.path().join("acts.tape"));
    let mut cfg = config(&processor("hostile"), &input, &state);
    cfg.tape = Some(tape.clone());
    std::fs::write(&input, (0..10).map(line).collect::<String>()).unwrap();
    rewind_host::run(&cfg, &()).unwrap();
    std::fs::write(&input, (0..20).map(line).collect::<String>()).unwrap();
    rewind_host::run(&cfg, &()).unwrap();

    // Live: the second run started a fresh instance at offset 10.
    let calls = rewind_tests::rows(&state, "SELECT value FROM observed WHERE offset = 10");
    assert_eq!(calls, vec![vec![rusqlite::types::Value::Integer(1)]]);
    let out = Command::new(rewind_bin())
        .args(["verify", "--tape"])
        .arg(&tape)
        .arg("--processor")
        .arg(processor("hostile"))
        .arg("--cache-dir")
        .arg(cache_dir())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && said.contains("identical"), "{said}");
}
