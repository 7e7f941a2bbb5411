//! Tapes: recording every consumed input with its result, crash-consistent
//! with the state DB; import, export and info; tapes as input; corrupt and
//! truncated tapes are clear errors.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use proptest::prelude::*;
use rewind_host::{Frame, Header, Position, TapeEvent, TapeReader, tapes};
use rewind_tests::{
    XorShift, cache_dir, config, envelope, file_len, kill_when_grown, processor, rewind_bin,
    rewind_run, rows,
};

/// Every frame of a tape, in order.
fn frames(tape: &Path) -> Vec<Frame> {
    read_whole(tape).unwrap()
}

/// Every frame of the tape at `path`, or the first error reading it.
fn read_whole(path: &Path) -> Result<Vec<Frame>, rewind_host::TapeError> {
    let mut reader = TapeReader::open(path)?;
    let mut out = Vec::new();
    while let Some(frame) = reader.next_frame()? {
        out.push(frame);
    }
    Ok(out)
}

fn events(tape: &Path) -> Vec<TapeEvent> {
    frames(tape)
        .into_iter()
        .filter_map(|f| match f {
            Frame::Event(e) => Some(*e),
            Frame::Run(_) => None,
        })
        .collect()
}

/// A payments stream with re-deliveries, cancels and malformed lines.
fn orders(n: usize, seed: u64) -> Vec<u8> {
    let mut rng = XorShift(seed | 1);
    let mut out = Vec::new();
    for i in 0..n as i64 {
        let order = rng.below(n as u64 / 2 + 1);
        let payload = match rng.below(12) {
            0 => "{\"broken".to_owned(),
            1..=2 => format!(r#"{{"type":"order_cancelled","order_id":"o-{order}"}}"#),
            _ => format!(
                r#"{{"type":"order_completed","order_id":"o-{order}","customer_id":"c-{}","amount_cents":{},"currency":"EUR"}}"#,
                order % 5,
                100 + order
            ),
        };
        let line = if payload.starts_with("{\"broken") {
            payload
        } else {
            envelope("orders", i, 1_700_000_000_000 + i, "k", &payload)
        };
        out.extend_from_slice(line.as_bytes());
        out.push(b'\n');
    }
    out
}

fn user_state(db: &Path) -> Vec<Vec<Vec<rusqlite::types::Value>>> {
    [
        "SELECT * FROM payments ORDER BY order_id",
        "SELECT * FROM customer_totals ORDER BY customer_id",
        "SELECT seq, stream, partition, \"offset\", error_class, message FROM _rewind_dlq ORDER BY seq",
        "SELECT * FROM _rewind_offsets ORDER BY stream, partition",
    ]
    .iter()
    .map(|sql| rows(db, sql))
    .collect()
}

/// A tape records every consumed record in order, malformed ones included,
/// each with its result; a tape is a valid input giving the same state.
#[test]
fn a_run_records_everything_and_its_tape_replays_to_the_same_state() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("orders.jsonl");
    std::fs::write(&input, orders(500, 7)).unwrap();
    let (live, tape) = (dir.path().join("live.db"), dir.path().join("orders.tape"));
    let mut cfg = config(&processor("payments-v1"), &input, &live);
    cfg.tape = Some(tape.clone());
    let summary = rewind_host::run(&cfg, &()).unwrap();

    let recorded = events(&tape);
    assert_eq!(recorded.len() as u64, summary.consumed);
    assert!(recorded.iter().enumerate().all(|(i, e)| e.seq == i as u64));
    let malformed = recorded.iter().filter(|e| e.malformed.is_some()).count();
    assert_eq!(malformed as u64, {
        let dead = rows(
            &live,
            "SELECT count(*) FROM _rewind_dlq WHERE error_class = 'malformed'",
        );
        match dead[0][0] {
            rusqlite::types::Value::Integer(n) => n as u64,
            ref other => panic!("{other:?}"),
        }
    });
    // Results: applied events wrote rows; dead letters carry their class.
    let applied = recorded
        .iter()
        .filter(|e| {
            matches!(
                e.result.as_ref().unwrap().outcome,
                rewind_host::Outcome::Applied
            )
        })
        .count() as u64;
    assert_eq!(applied, summary.applied);
    assert!(recorded.iter().any(|e| e.result.as_ref().unwrap().rows > 0));

    let info = tapes::info(&tape).unwrap();
    assert_eq!(info.events, summary.consumed);
    // The CLI shows both ends of the link.
    let bytes = std::fs::metadata(&tape).unwrap().len();
    let inspect = cli(&["inspect", "--state", live.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&inspect.stdout);
    assert!(text.contains(&format!("{bytes} bytes committed")), "{text}");
    let shown = cli(&["tape", "info", tape.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(
        text.contains(&format!("events        {}", summary.consumed)),
        "{text}"
    );
    assert!(text.contains(&summary.module_digest), "{text}");
    assert_eq!(info.runs.len(), 1);
    assert_eq!(info.runs[0].module_digest, summary.module_digest);

    // The tape as input: the same state as the JSONL input.
    let replayed = dir.path().join("replayed.db");
    rewind_host::run(&config(&processor("payments-v1"), &tape, &replayed), &()).unwrap();
    assert_eq!(user_state(&live), user_state(&replayed));
}

fn run_cli(input: &Path, state: &Path, tape: &Path, batch: usize) -> std::process::Child {
    rewind_run("payments-v1", input, state)
        .arg("--quiet")
        .arg("--tape")
        .arg(tape)
        .args(["--batch-size", &batch.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4, ..ProptestConfig::default() })]

    /// kill -9 at random points: the tape never runs ahead of the state
    /// (rerunning cuts an uncommitted tail), and once finished it holds the
    /// same events with the same results as an uninterrupted run's tape.
    #[test]
    fn kill_9_leaves_tape_and_state_in_agreement(
        seed in any::<u64>(),
        batch in 1usize..40,
        mut kills in proptest::collection::vec((0u64..800, 0u64..5), 1..4),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("orders.jsonl");
        std::fs::write(&input, orders(5000, seed)).unwrap();
        let (clean, killed) = (dir.path().join("clean.db"), dir.path().join("killed.db"));
        let (clean_tape, killed_tape) = (dir.path().join("clean.tape"), dir.path().join("killed.tape"));
        let mut cfg = config(&processor("payments-v1"), &input, &clean);
        cfg.tape = Some(clean_tape.clone());
        rewind_host::run(&cfg, &()).unwrap();
        let whole = file_len(&clean_tape);

        // Kill points are fractions of the tape (per mille), a few
        // milliseconds later: mid-run however fast the machine is.
        kills.sort_unstable();
        let mut interrupted = false;
        for (per_mille, after_ms) in kills {
            let mut child = run_cli(&input, &killed, &killed_tape, batch);
            interrupted |= kill_when_grown(
                &mut child,
                &killed_tape,
                whole * per_mille / 1000,
                Duration::from_millis(after_ms),
            );
        }
        prop_assert!(interrupted, "no kill landed before the run finished");
        let finished = run_cli(&input, &killed, &killed_tape, batch).wait_with_output().unwrap();
        prop_assert!(finished.status.success(), "rerun failed: {}", String::from_utf8_lossy(&finished.stderr));
        prop_assert_eq!(events(&clean_tape), events(&killed_tape));
        prop_assert_eq!(user_state(&clean), user_state(&killed));
    }

    /// import → export → import is byte-identical, on arbitrary bytes in
    /// keys, payloads and header values (invalid UTF-8, nulls, newlines), and
    /// the records read back are the records written.
    #[test]
    fn import_export_import_is_byte_identical(
        records in proptest::collection::vec(
            (
                "[a-z]{1,8}",
                0i32..4,
                any::<i64>(),
                proptest::option::of(any::<i64>()),
                proptest::option::of(proptest::collection::vec(any::<u8>(), 0..20)),
                proptest::option::of(proptest::collection::vec(any::<u8>(), 0..60)),
                proptest::collection::vec(
                    ("[a-z-]{1,6}", proptest::option::of(proptest::collection::vec(any::<u8>(), 0..10))),
                    0..3,
                ),
            ),
            1..40,
        )
    ) {
        let dir = tempfile::tempdir().unwrap();
        let written: Vec<TapeEvent> = records
            .into_iter()
            .enumerate()
            .map(|(seq, (stream, partition, offset, ts, key, payload, headers))| TapeEvent {
                seq: seq as u64,
                position: Position { stream, partition, offset },
                timestamp_ms: ts,
                key,
                payload,
                headers: headers
                    .into_iter()
                    .map(|(name, value)| Header { name, value })
                    .collect(),
                malformed: None,
                result: None,
            })
            .collect();
        let dump = dir.path().join("dump.jsonl");
        std::fs::write(&dump, written.iter().flat_map(tapes::export_line).collect::<Vec<u8>>()).unwrap();
        let (a, b) = (dir.path().join("a.tape"), dir.path().join("b.tape"));
        tapes::import(&dump, &a, None).unwrap();
        prop_assert_eq!(&events(&a), &written);
        let exported = dir.path().join("exported.jsonl");
        let mut out = Vec::new();
        tapes::export(&a, &mut out, &exported).unwrap();
        std::fs::write(&exported, &out).unwrap();
        tapes::import(&exported, &b, None).unwrap();
        prop_assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    }
}

/// Malformed lines survive import → export → import as malformed records
/// with their raw bytes and reasons.
#[test]
fn malformed_lines_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let mut bytes = b"{\"a\":1}\n{\"broken\n".to_vec();
    bytes.extend_from_slice(&[0xff, 0xfe, b'\n']);
    std::fs::write(&input, &bytes).unwrap();
    let (a, b) = (dir.path().join("a.tape"), dir.path().join("b.tape"));
    tapes::import(&input, &a, Some("in")).unwrap();
    let first = events(&a);
    assert_eq!(first.len(), 3);
    assert!(first[0].malformed.is_none());
    assert_eq!(first[1].payload.as_deref(), Some(&b"{\"broken"[..]));
    assert!(
        first[1]
            .malformed
            .as_deref()
            .unwrap()
            .contains("not valid JSON")
    );
    assert_eq!(first[2].payload.as_deref(), Some(&[0xff, 0xfe][..]));
    let exported = dir.path().join("exported.jsonl");
    let mut out = Vec::new();
    tapes::export(&a, &mut out, &exported).unwrap();
    std::fs::write(&exported, &out).unwrap();
    tapes::import(&exported, &b, Some("ignored: envelopes carry their stream")).unwrap();
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
}

fn cli(args: &[&str]) -> std::process::Output {
    Command::new(rewind_bin()).args(args).output().unwrap()
}

/// Truncated, corrupt, foreign-version and non-tape files are clear errors
/// naming the file and the byte position, from the CLI too (exit 2).
#[test]
fn damaged_tapes_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    std::fs::write(&input, orders(50, 3)).unwrap();
    let tape = dir.path().join("t.tape");
    tapes::import(&input, &tape, None).unwrap();
    let good = std::fs::read(&tape).unwrap();
    // A tape imported as if it were JSONL would become garbage records.
    let again = dir.path().join("again.tape");
    let err = tapes::import(&tape, &again, None).unwrap_err().to_string();
    assert!(err.contains("is already a tape"), "{err}");
    assert!(!again.exists());

    let check = |name: &str, bytes: &[u8], expect: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        let err = tapes::info(&path).unwrap_err().to_string();
        assert!(err.contains(expect), "{name}: {err}");
        assert!(err.contains(name), "{name}: {err}");
        let out = cli(&["tape", "info", path.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(2), "{name}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expect), "{name}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{name}: {stderr}");
    };
    check("cut.tape", &good[..good.len() - 5], "is truncated at byte");
    let mut flipped = good.clone();
    let middle = good.len() / 2;
    flipped[middle] ^= 0x40;
    check("flipped.tape", &flipped, "is corrupt at byte");
    let mut future = good.clone();
    future[12] = 9;
    check("future.tape", &future, "has format version 9");
    check("text.tape", b"{\"a\":1}\n", "is not a rewind tape");
    // A truncated tape is refused as input too, before anything is written.
    let cut = dir.path().join("cut.tape");
    let state = dir.path().join("s.db");
    let err = rewind_host::run(&config(&processor("payments-v1"), &cut, &state), &())
        .unwrap_err()
        .to_string();
    assert!(err.contains("truncated"), "{err}");
}

/// Exhaustively: every single-bit flip of a recorded tape (run frames and
/// results included) is an error naming the file, from the reader and from
/// `tape info`, save in the tape id, which names the tape and is checked
/// where it matters (a state appends only to its own tape, above); every cut
/// is an error, or a cut at a frame boundary, which reads as the frames
/// before it (what a crash mid-batch leaves, and the next run cuts back).
#[test]
fn every_flipped_bit_and_every_cut_of_a_tape_is_found() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    std::fs::write(&input, orders(6, 11)).unwrap();
    let (state, tape) = (dir.path().join("s.db"), dir.path().join("t.tape"));
    let mut cfg = config(&processor("payments-v1"), &input, &state);
    cfg.tape = Some(tape.clone());
    rewind_host::run(&cfg, &()).unwrap();
    let good = std::fs::read(&tape).unwrap();
    let whole = read_whole(&tape).unwrap();
    assert!(whole.iter().any(|f| matches!(f, Frame::Run(_))));
    assert!(
        whole
            .iter()
            .any(|f| matches!(f, Frame::Event(e) if e.result.is_some()))
    );

    let damaged = dir.path().join("damaged.tape");
    let name = "damaged.tape";
    const TAPE_ID: std::ops::Range<usize> = 16..32;
    for at in (0..good.len()).filter(|at| !TAPE_ID.contains(at)) {
        for bit in 0..8 {
            let mut bytes = good.clone();
            bytes[at] ^= 1 << bit;
            std::fs::write(&damaged, &bytes).unwrap();
            let read = read_whole(&damaged).map(|_| ()).map_err(|e| e.to_string());
            let info = tapes::info(&damaged).map(|_| ()).map_err(|e| e.to_string());
            for (what, result) in [("reader", read), ("info", info)] {
                let err = result
                    .err()
                    .unwrap_or_else(|| panic!("{what}: bit {bit} of byte {at} flipped, unseen"));
                assert!(err.contains(name), "{what}: byte {at}: {err}");
            }
        }
    }

    for len in 0..good.len() {
        std::fs::write(&damaged, &good[..len]).unwrap();
        match read_whole(&damaged) {
            Ok(frames) => assert_eq!(
                frames[..],
                whole[..frames.len()],
                "cut at {len}: reads as other frames"
            ),
            Err(err) => {
                let err = err.to_string();
                assert!(
                    err.contains(name) && (err.contains("truncated") || len < 32),
                    "cut at {len}: {err}"
                );
            }
        }
    }
}

/// A state DB only appends to the tape it recorded: an existing tape it did
/// not write, or a different one, is refused.
#[test]
fn a_state_refuses_a_tape_it_did_not_record() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    std::fs::write(&input, orders(100, 5)).unwrap();
    let imported = dir.path().join("imported.tape");
    tapes::import(&input, &imported, None).unwrap();
    let state = dir.path().join("s.db");
    let mut cfg = config(&processor("payments-v1"), &input, &state);
    cfg.tape = Some(imported.clone());
    let err = rewind_host::run(&cfg, &()).unwrap_err().to_string();
    assert!(err.contains("not recorded by this state DB"), "{err}");

    let mine = dir.path().join("mine.tape");
    cfg.tape = Some(mine.clone());
    rewind_host::run(&cfg, &()).unwrap();
    let other = dir.path().join("other.tape");
    let mut other_cfg = config(&processor("payments-v1"), &input, &dir.path().join("o.db"));
    other_cfg.tape = Some(other.clone());
    rewind_host::run(&other_cfg, &()).unwrap();
    std::fs::copy(&other, &mine).unwrap();
    let err = rewind_host::run(&cfg, &()).unwrap_err().to_string();
    assert!(err.contains("not the tape this state DB recorded"), "{err}");
}

/// `verify` reproduces a recorded run exactly, and catches a tampered
/// result at exactly the tampered seq; a tape without results, or recorded
/// by another module, cannot be verified (a clear error).
#[test]
fn verify_finds_identical_runs_and_tampered_results() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("orders.jsonl");
    std::fs::write(&input, orders(600, 21)).unwrap();
    let tape = dir.path().join("orders.tape");
    let mut cfg = config(
        &processor("payments-v1"),
        &input,
        &dir.path().join("live.db"),
    );
    cfg.tape = Some(tape.clone());
    rewind_host::run(&cfg, &()).unwrap();
    let runtime = cfg.runtime.clone();
    let work = dir.path().join("verify.db");

    /// What verify said of its progress: the tape's size, the bytes read,
    /// the events compared.
    #[derive(Default)]
    struct Seen(std::sync::Mutex<(Option<u64>, u64, u64)>);
    impl rewind_host::replay::ReplayProgress for Seen {
        fn start(&self, bytes: Option<u64>) {
            self.0.lock().unwrap().0 = bytes;
        }
        fn read(&self, bytes: u64) {
            self.0.lock().unwrap().1 = bytes;
        }
        fn compared(&self, events: u64) {
            self.0.lock().unwrap().2 = events;
        }
    }
    let seen = Seen::default();
    let verified = rewind_host::verify::verify_with_progress(
        &tape,
        &processor("payments-v1"),
        &runtime,
        &work,
        &seen,
    )
    .unwrap();
    assert_eq!(verified.events, 600);
    assert!(verified.first_mismatch.is_none());
    let size = std::fs::metadata(&tape).unwrap().len();
    assert_eq!(*seen.0.lock().unwrap(), (Some(size), size, 600));

    for (seq, part) in [(137u64, "rows written"), (411, "outputs"), (512, "outcome")] {
        let tampered = dir.path().join(format!("tampered-{seq}.tape"));
        let mut writer = rewind_host::TapeWriter::create(&tampered, [7; 16]).unwrap();
        for frame in frames(&tape) {
            match frame {
                Frame::Run(run) => writer.run(&run),
                Frame::Event(mut e) => {
                    if e.seq == seq {
                        let r = e.result.as_mut().unwrap();
                        match part {
                            "rows written" => r.rows_digest[0] ^= 1,
                            "outputs" => r.outputs += 1,
                            _ => r.outcome = rewind_host::Outcome::Duplicate,
                        }
                    }
                    writer.event(&e);
                }
            }
        }
        writer.flush().unwrap();
        let verified =
            rewind_host::verify::verify(&tampered, &processor("payments-v1"), &runtime, &work)
                .unwrap();
        let mismatch = verified.first_mismatch.expect("the tampering is caught");
        assert_eq!(mismatch.event.seq, seq);
        assert!(
            mismatch.describe().contains(part),
            "{}",
            mismatch.describe()
        );
        let out = cli(&[
            "verify",
            "--tape",
            tampered.to_str().unwrap(),
            "--processor",
            processor("payments-v1").to_str().unwrap(),
            "--cache-dir",
            cache_dir().to_str().unwrap(),
        ]);
        assert_eq!(out.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("seq {seq} ")));
    }

    let err = rewind_host::verify::verify(&tape, &processor("payments-v2"), &runtime, &work)
        .unwrap_err()
        .to_string();
    assert!(err.contains("recorded by module"), "{err}");
    let imported = dir.path().join("imported.tape");
    tapes::import(&input, &imported, None).unwrap();
    let err = rewind_host::verify::verify(&imported, &processor("payments-v1"), &runtime, &work)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no recorded results"), "{err}");
}

/// A crash right after a run created its tape, before the state DB claimed
/// it, leaves a tape with a header and no frames: the rerun adopts it. A
/// tape with frames the state never claimed stays refused.
#[test]
fn an_unclaimed_empty_tape_is_adopted() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("orders.jsonl");
    std::fs::write(&input, orders(200, 9)).unwrap();
    let tape = dir.path().join("orders.tape");
    drop(rewind_host::TapeWriter::create(&tape, [9; 16]).unwrap());
    let mut cfg = config(&processor("payments-v1"), &input, &dir.path().join("s.db"));
    cfg.tape = Some(tape.clone());
    let summary = rewind_host::run(&cfg, &()).unwrap();
    assert_eq!(events(&tape).len() as u64, summary.consumed);
}
