//! The `rewind` command line: help everywhere, one-line errors with exit 2,
//! and the inspect and dlq views.

use std::path::{Path, PathBuf};
use std::process::Command;

use rewind_tests::{
    completed_orders, file_len, processor, replay_args, rewind_bin, rewind_run, run_args,
};

fn rewind(args: &[&str]) -> std::process::Output {
    Command::new(rewind_bin()).args(args).output().unwrap()
}

/// A command's error: exit 2 and one line on stderr (never a panic),
/// which is returned.
fn one_line_error(out: &std::process::Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

/// `rewind run` (see [`run_args`]) with `extra` arguments.
fn run(module: &str, input: &Path, state: &Path, extra: &[&str]) -> std::process::Output {
    rewind_run(module, input, state)
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn every_command_has_help() {
    for args in [
        &["--help"][..],
        &["run", "--help"],
        &["inspect", "--help"],
        &["dlq", "--help"],
        &["dlq", "list", "--help"],
    ] {
        let out = rewind(args);
        assert!(out.status.success(), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("Usage"),
            "{args:?}"
        );
    }
    // The environment rewind reads is named where a user looks first.
    let top = String::from_utf8(rewind(&["--help"]).stdout).unwrap();
    for name in ["REWIND_CACHE_DIR", "REWIND_PROFILE", "NO_COLOR"] {
        assert!(top.contains(name), "{name} in:\n{top}");
    }
}

#[test]
fn errors_are_one_line_with_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.db");
    let out = rewind(&["inspect", "--state", missing.to_str().unwrap()]);
    let stderr = one_line_error(&out);
    assert!(stderr.contains("missing.db"), "{stderr}");

    // A cause the message already names is not repeated.
    let out = rewind(&[
        "run",
        "--processor",
        processor("payments-v2").to_str().unwrap(),
        "--input",
        dir.path().join("missing.jsonl").to_str().unwrap(),
        "--state",
        dir.path().join("s.db").to_str().unwrap(),
    ]);
    let stderr = one_line_error(&out);
    assert!(stderr.contains("missing.jsonl"), "{stderr}");
    assert_eq!(stderr.matches("No such file").count(), 1, "{stderr}");

    // A replay runs two versions at once.
    let out = rewind(&[
        "replay",
        "--tape",
        "t.tape",
        "--old",
        "a.wasm",
        "--new",
        "b.wasm",
        "--max-instances",
        "1",
    ]);
    // (Refused by clap, in its own words and lines.)
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--max-instances"), "{stderr}");
}

/// `rewind ARGS` with files limited to `kib` KiB (`ulimit -f`, the signal
/// it raises ignored, so writes past it fail as on a full disk): it must stop
/// with exit 2 and a one-line error saying what to do, never a panic; the
/// error is returned.
fn under_file_limit(kib: u64, args: &[std::ffi::OsString]) -> String {
    let out = Command::new("bash")
        .args([
            "-c",
            "trap '' XFSZ; ulimit -f \"$0\" && shift && exec \"$@\"",
        ])
        .arg(kib.to_string())
        .arg("--")
        .arg(rewind_bin())
        .args(args)
        .output()
        .unwrap();
    let stderr = one_line_error(&out);
    assert!(stderr.contains("File too large"), "{stderr}");
    stderr
}

/// A file that is not a state DB, or one damaged past its header, gets the
/// same one-line error from every command that reads it, with what to do,
/// and SQLite's code is not repeated.
#[test]
fn not_a_database_and_a_damaged_one_say_so_and_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.db");
    std::fs::write(&junk, b"hello\n").unwrap();
    let junk_arg = junk.to_str().unwrap();
    let input = dir.path().join("orders.jsonl");
    let lines = completed_orders(3000, 700).concat();
    std::fs::write(&input, &lines).unwrap();

    // SQLite's code is not repeated.
    let one_line_error = |out: std::process::Output| {
        let stderr = one_line_error(&out);
        assert!(!stderr.contains("Error code"), "{stderr}");
        stderr
    };
    for out in [
        run("payments-v2", &input, &junk, &[]),
        rewind(&["inspect", "--state", junk_arg]),
        rewind(&["dlq", "list", "--state", junk_arg]),
        rewind(&["diff", junk_arg, junk_arg]),
        rewind(&[
            "snapshot",
            "--state",
            junk_arg,
            "--out",
            dir.path().join("s.db").to_str().unwrap(),
        ]),
        rewind(&[
            "replay",
            "--tape",
            input.to_str().unwrap(),
            "--old",
            processor("payments-v1").to_str().unwrap(),
            "--new",
            processor("payments-v2").to_str().unwrap(),
            "--from",
            junk_arg,
        ]),
    ] {
        let stderr = one_line_error(out);
        assert!(
            stderr.contains("junk.db is not a SQLite database")
                && stderr.contains("pass a state DB that `rewind run` made"),
            "{stderr}"
        );
    }
    assert_eq!(std::fs::read(&junk).unwrap(), b"hello\n", "left as it was");

    // A real state DB whose table pages were overwritten.
    let state = dir.path().join("state.db");
    assert!(
        run("payments-v2", &input, &state, &["--quiet"])
            .status
            .success()
    );
    let intact = dir.path().join("intact.db");
    std::fs::copy(&state, &intact).unwrap();
    let mut bytes = std::fs::read(&state).unwrap();
    assert!(bytes.len() > 4 * 16384, "{} bytes", bytes.len());
    bytes[16384..].fill(0x5a);
    std::fs::write(&state, &bytes).unwrap();
    let more = dir.path().join("more.jsonl");
    std::fs::write(&more, lines.replace("o-", "p-")).unwrap();
    let stderr = one_line_error(run("payments-v2", &more, &state, &[]));
    assert!(
        stderr.contains("state.db is damaged")
            && stderr.contains("restore it from a `rewind snapshot`"),
        "{stderr}"
    );
    let state_arg = state.to_str().unwrap();
    let stderr = one_line_error(rewind(&["diff", state_arg, state_arg]));
    assert!(stderr.contains("state.db is damaged"), "{stderr}");
    // Each side is read on a thread of its own: the error names the side.
    let intact_arg = intact.to_str().unwrap();
    for args in [[intact_arg, state_arg], [state_arg, intact_arg]] {
        let stderr = one_line_error(rewind(&[&["diff"][..], &args].concat()));
        assert!(
            stderr.contains("state.db is damaged") && !stderr.contains("intact.db"),
            "{args:?}: {stderr}"
        );
    }
    let missing = dir.path().join("missing.db");
    let stderr = one_line_error(rewind(&["diff", missing.to_str().unwrap(), junk_arg]));
    assert!(stderr.contains("missing.db does not exist"), "{stderr}");
}

/// Files that cannot grow (a full disk, here a file size limit, with the
/// signal it raises ignored: the kernel's own write failures) stop the run
/// with a one-line error naming the file, the cause and what to do, never a
/// panic; rerunning once there is room delivers every output exactly once,
/// as an uninterrupted run does. First the state DB's log fills up, then
/// (with the log fresh and the output file near the limit) the output file.
#[test]
fn a_full_disk_stops_the_run_cleanly_and_the_rerun_delivers_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let lines = completed_orders(25_000, 500);
    // The outputs name their input's stream, the file's name: the same for both.
    std::fs::create_dir_all(dir.path().join("reference")).unwrap();
    std::fs::create_dir_all(dir.path().join("live")).unwrap();
    let reference_input = dir.path().join("reference/orders.jsonl");
    std::fs::write(&reference_input, lines.concat()).unwrap();
    let reference = dir.path().join("reference/out.jsonl");
    let out = run(
        "payments-v2",
        &reference_input,
        &dir.path().join("reference/state.db"),
        &["--quiet", "--output", reference.to_str().unwrap()],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let expected = std::fs::read(&reference).unwrap();

    let input = dir.path().join("live/orders.jsonl");
    let (state, output) = (
        dir.path().join("live/state.db"),
        dir.path().join("live/out.jsonl"),
    );
    let args = || {
        let mut args = run_args("payments-v2", &input, &state);
        args.extend(["--batch-size".into(), "1024".into(), "--quiet".into()]);
        args.extend(["--output".into(), output.clone().into_os_string()]);
        args
    };
    let limited = |kib: u64| under_file_limit(kib, &args());
    let rerun = || {
        let out = Command::new(rewind_bin()).args(args()).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };

    std::fs::write(&input, lines[..20_000].concat()).unwrap();
    let stderr = limited(2048);
    assert!(stderr.contains("state DB"), "{stderr}");
    assert!(stderr.contains("make room and rerun"), "{stderr}");
    rerun();

    std::fs::write(&input, lines.concat()).unwrap();
    let stderr = limited(file_len(&output) / 1024 + 100);
    assert!(stderr.contains("could not write outputs to"), "{stderr}");
    assert!(stderr.contains("make room and rerun"), "{stderr}");
    assert!(file_len(&output) < expected.len() as u64);
    rerun();
    assert!(
        std::fs::read(&output).unwrap() == expected,
        "exactly once, in order"
    );
}

/// A tape that cannot grow stops the run the same way (the tape is the
/// file near the limit: recorded earlier, its run's state log since
/// removed); the rerun repairs and continues it, so tape, state and
/// outputs end as those of an uninterrupted run, and `verify` agrees.
#[test]
fn a_full_disk_under_the_tape_stops_the_run_and_the_rerun_continues_it() {
    let dir = tempfile::tempdir().unwrap();
    let lines = completed_orders(12_000, 300);
    let files = |name: &str| {
        let at = dir.path().join(name);
        std::fs::create_dir_all(&at).unwrap();
        let input = at.join("orders.jsonl");
        let args = [
            run_args("payments-v2", &input, &at.join("state.db")),
            ["--quiet", "--batch-size", "512", "--tape"]
                .map(Into::into)
                .to_vec(),
            vec![
                at.join("t.tape").into(),
                "--output".into(),
                at.join("out.jsonl").into(),
            ],
        ]
        .concat();
        (input, args, at)
    };
    let ok = |args: &[std::ffi::OsString]| {
        let out = Command::new(rewind_bin()).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let (input, reference, expected) = files("reference");
    std::fs::write(&input, lines.concat()).unwrap();
    ok(&reference);

    let (input, live, at) = files("live");
    std::fs::write(&input, lines[..8_000].concat()).unwrap();
    ok(&live);
    std::fs::write(&input, lines.concat()).unwrap();
    let stderr = under_file_limit(file_len(&at.join("t.tape")) / 1024 + 64, &live);
    assert!(
        stderr.contains("tape") && stderr.contains("t.tape could not be written"),
        "{stderr}"
    );
    assert!(stderr.contains("make room and rerun"), "{stderr}");
    ok(&live);

    let text = |args: &[&std::ffi::OsStr]| {
        let out = Command::new(rewind_bin()).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    let (tape, tape_ref) = (at.join("t.tape"), expected.join("t.tape"));
    assert!(
        text(&["tape".as_ref(), "export".as_ref(), tape.as_os_str()])
            == text(&["tape".as_ref(), "export".as_ref(), tape_ref.as_os_str()]),
        "the tape holds every record once, in order"
    );
    let diff = rewind(&[
        "diff",
        expected.join("state.db").to_str().unwrap(),
        at.join("state.db").to_str().unwrap(),
    ]);
    assert_eq!(diff.status.code(), Some(0), "{diff:?}");
    assert!(
        std::fs::read(at.join("out.jsonl")).unwrap()
            == std::fs::read(expected.join("out.jsonl")).unwrap(),
        "outputs exactly once, in order"
    );
    let verify = text(&[
        "verify".as_ref(),
        "--tape".as_ref(),
        tape.as_os_str(),
        "--processor".as_ref(),
        processor("payments-v2").as_os_str(),
    ]);
    assert!(String::from_utf8_lossy(&verify).contains("identical"));
}

/// A replay whose states cannot grow says where to make room, and that the
/// replay starts again (it does not continue, as a run does).
#[test]
fn a_full_disk_under_a_replay_says_where_to_make_room() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("orders.jsonl");
    std::fs::write(&input, completed_orders(20_000, 500).concat()).unwrap();
    let keep = dir.path().join("kept");
    let mut args = replay_args(&input, "payments-v1", "payments-v2");
    args.extend(["--quiet".into(), "--keep".into(), keep.clone().into()]);
    // A file where --keep wants a directory says so.
    std::fs::write(&keep, b"a file").unwrap();
    let out = Command::new(rewind_bin()).args(&args).output().unwrap();
    let stderr = one_line_error(&out);
    assert!(
        stderr.contains("is a file; it takes a directory"),
        "{stderr}"
    );
    std::fs::remove_file(&keep).unwrap();

    let stderr = under_file_limit(512, &args);
    assert!(stderr.contains(" version: state DB "), "{stderr}");
    assert!(
        stderr.contains(&format!("make room in {}", keep.display())),
        "{stderr}"
    );
    assert!(stderr.contains("replay again"), "{stderr}");
    assert!(!stderr.contains("continues"), "{stderr}");
}

/// Two state DBs of payments v2 over `a` and `b` orders, and the tape of
/// the first.
fn two_states(dir: &Path, a: usize, b: usize) -> (std::path::PathBuf, std::path::PathBuf) {
    let lines = completed_orders(a.max(b), 50);
    let state = |n: usize, name: &str| {
        let input = dir.join(format!("{name}.jsonl"));
        std::fs::write(&input, lines[..n].concat()).unwrap();
        let db = dir.join(format!("{name}.db"));
        let tape = dir.join(format!("{name}.tape"));
        let out = run(
            "payments-v2",
            &input,
            &db,
            &["--quiet", "--tape", tape.to_str().unwrap()],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        db
    };
    (state(a, "a"), state(b, "b"))
}

/// Stdout on a full disk (here `/dev/full`) ends a command with a one-line
/// error and exit 2, where `println!` would have panicked.
#[test]
fn stdout_that_cannot_be_written_is_a_one_line_error() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = two_states(dir.path(), 300, 200);
    let tape = dir.path().join("a.tape");
    let (a, b, tape) = (
        a.to_str().unwrap(),
        b.to_str().unwrap(),
        tape.to_str().unwrap(),
    );
    for args in [
        &["inspect", "--state", a][..],
        &["dlq", "list", "--state", a],
        &["tape", "info", tape],
        &["tape", "export", tape],
        &["diff", a, b],
    ] {
        let out = Command::new(rewind_bin())
            .args(args)
            .stdout(std::fs::File::create("/dev/full").unwrap())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(
            stderr.contains("No space left on device"),
            "{args:?}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

/// Reports, snapshots and exports are written whole or not at all: a write that
/// fails (a file size limit, as a full disk) leaves the report it would
/// have replaced (an approved baseline, say) as it was, and no partial
/// file.
#[test]
fn reports_snapshots_and_exports_are_written_whole_or_not_at_all() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = two_states(dir.path(), 2_000, 200);
    let reports = dir.path().join("reports");
    std::fs::create_dir(&reports).unwrap();
    let approved = reports.join("approved.json");
    std::fs::write(&approved, "{\"approved\": true}\n").unwrap();
    // 64 KiB: room for the states' shared-memory files (32 KiB), not the report.
    let stderr = under_file_limit(
        64,
        &[
            "diff".into(),
            a.clone().into(),
            b.into(),
            "--json".into(),
            approved.clone().into(),
        ],
    );
    assert!(
        stderr.contains("cannot write") && stderr.contains("approved.json"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(&approved).unwrap(),
        "{\"approved\": true}\n"
    );
    let left: Vec<_> = std::fs::read_dir(&reports)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["approved.json"], "no partial report is left behind");

    let snapshot = dir.path().join("snap.db");
    let stderr = under_file_limit(
        64,
        &[
            "snapshot".into(),
            "--state".into(),
            a.clone().into(),
            "--out".into(),
            snapshot.clone().into(),
        ],
    );
    assert!(
        stderr.contains("make room and take the snapshot again"),
        "{stderr}"
    );
    assert!(!snapshot.exists(), "no partial snapshot is left behind");
    let nowhere = dir.path().join("no-such-dir/snap.db");
    let out = rewind(&[
        "snapshot",
        "--state",
        a.to_str().unwrap(),
        "--out",
        nowhere.to_str().unwrap(),
    ]);
    let stderr = one_line_error(&out);
    assert!(
        stderr.contains("cannot create snapshot")
            && stderr.contains("check that its directory exists"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");

    let export = dir.path().join("export.jsonl");
    under_file_limit(
        64,
        &[
            "tape".into(),
            "export".into(),
            dir.path().join("a.tape").into(),
            "--out".into(),
            export.clone().into(),
        ],
    );
    assert!(!export.exists(), "no partial export is left behind");
}

/// `dlq list` reads dead letters one at a time: a flood of large malformed
/// lines (100 MiB of them here) costs it no more memory than a few.
#[test]
fn dlq_list_memory_does_not_grow_with_the_dead_letters() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("flood.jsonl");
    let line = [&b"{\"broken\": \""[..], &vec![b'x'; 1 << 20], b"\n"].concat();
    let mut file = std::fs::File::create(&input).unwrap();
    for _ in 0..100 {
        std::io::Write::write_all(&mut file, &line).unwrap();
    }
    drop(file);
    let state = dir.path().join("state.db");
    assert!(
        run("payments-v2", &input, &state, &["--quiet"])
            .status
            .success()
    );
    for json in [false, true] {
        let mut args = ["dlq", "list", "--state", state.to_str().unwrap()]
            .map(std::ffi::OsStr::new)
            .to_vec();
        if json {
            args.push("--json".as_ref());
        }
        let (code, kib) = rewind_tests::peak_rss_kib(&rewind_bin(), &args);
        assert_eq!(code, Some(0));
        assert!(
            kib < 64 << 10,
            "dlq list (json: {json}) peaked at {kib} KiB"
        );
    }
}

/// `rewind diff` keeps what differs on disk and streams its reports: two
/// states differing in every one of 200,000 rows (a report of ~60 MB, which
/// held in memory took ~1 GB) cost it no more memory than a few rows.
#[test]
fn diff_memory_does_not_grow_with_the_differences() {
    let dir = tempfile::tempdir().unwrap();
    let rows: i64 = 200_000;
    let (a, b) = (dir.path().join("a.db"), dir.path().join("b.db"));
    for (path, version) in [(&a, "old"), (&b, "new")] {
        let conn = rusqlite::Connection::open(path).unwrap();
        conn.execute_batch(
            "CREATE TABLE t (id INTEGER PRIMARY KEY, label TEXT, n INTEGER); BEGIN;",
        )
        .unwrap();
        let mut insert = conn.prepare("INSERT INTO t VALUES (?1, ?2, ?3)").unwrap();
        for i in 0..rows {
            insert
                .execute(rusqlite::params![
                    i,
                    format!("{version} label of row {i}"),
                    i
                ])
                .unwrap();
        }
        drop(insert);
        conn.execute_batch("COMMIT").unwrap();
    }
    let (json, md, html) = (
        dir.path().join("d.json"),
        dir.path().join("d.md"),
        dir.path().join("d.html"),
    );
    let args: Vec<&std::ffi::OsStr> = vec![
        "diff".as_ref(),
        a.as_os_str(),
        b.as_os_str(),
        "--json".as_ref(),
        json.as_os_str(),
        "--markdown".as_ref(),
        md.as_os_str(),
        "--html".as_ref(),
        html.as_os_str(),
    ];
    let (code, kib) = rewind_tests::peak_rss_kib(&rewind_bin(), &args);
    assert_eq!(code, Some(1), "the states differ");
    assert!(kib < 64 << 10, "diff peaked at {kib} KiB");
    let report = std::fs::read_to_string(&json).unwrap();
    assert_eq!(
        report.matches("\"change\": \"changed\"").count() as i64,
        rows
    );
    assert!(report.contains("\"new\": \"new label of row 199999\""));
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.contains("… and 195000 more rows (see the JSON report)."));
    assert!(
        std::fs::read_to_string(&md)
            .unwrap()
            .contains("200000 differing rows")
    );
    // What differs needs disk instead: without room, the error says where
    // to make it.
    let stderr = under_file_limit(1024, &["diff".into(), a.into(), b.into()]);
    assert!(
        stderr.contains("cannot keep the differences") && stderr.contains("make room in"),
        "{stderr}"
    );
}

/// `--max-instances` sizes the instance pool, whose address space is
/// reserved up front: under an address-space limit (`ulimit -v`) the
/// default pool cannot be reserved and a small one can.
#[test]
fn max_instances_sizes_the_pool_an_address_space_limit_must_hold() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("orders.jsonl");
    std::fs::write(
        &input,
        "{\"type\":\"order_cancelled\",\"order_id\":\"o-404\"}\n",
    )
    .unwrap();
    let run = |name: &str, extra: &[&str]| {
        Command::new("sh")
            // 64 GiB of address space: the default pool reserves far more.
            .args(["-c", "ulimit -v 67108864 && exec \"$0\" \"$@\""])
            .arg(rewind_bin())
            .args(run_args("payments-v2", &input, &dir.path().join(name)))
            .arg("--quiet")
            .args(extra)
            .output()
            .unwrap()
    };
    let out = run("default.db", &[]);
    let stderr = one_line_error(&out);
    assert!(stderr.contains("memory pool"), "{stderr}");
    let out = run("small.db", &["--max-instances", "1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn run_inspect_and_dlq_list() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("orders.jsonl");
    std::fs::write(
        &input,
        "{\"type\":\"order_completed\",\"order_id\":\"o-1\",\"customer_id\":\"c-1\",\"amount_cents\":5,\"currency\":\"EUR\"}\n\
         {\"type\":\"order_cancelled\",\"order_id\":\"o-404\"}\n\
         {broken\n",
    )
    .unwrap();
    let state = dir.path().join("p.db");
    // A run needs one instance at a time: `init`'s is gone before the first event's.
    let out = run("payments-v2", &input, &state, &["--max-instances", "1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("1 applied, 2 dead-lettered"));

    let out = rewind(&["inspect", "--state", state.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("payments") && text.contains("customer_totals"),
        "{text}"
    );
    assert!(text.contains("dead letters  2"), "{text}");
    assert!(text.contains("event ids     0 remembered"), "{text}");
    assert!(text.contains("orders.jsonl/0  next offset 4"), "{text}");

    let out = rewind(&["dlq", "list", "--state", state.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("invalid-input") && text.contains("cancel of unknown order o-404"),
        "{text}"
    );
    assert!(
        text.contains("malformed") && text.contains("{broken"),
        "{text}"
    );

    let out = rewind(&["dlq", "list", "--json", "--state", state.to_str().unwrap()]);
    let first: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().next().unwrap()).unwrap();
    assert_eq!(first["error_class"], "invalid-input");
    assert_eq!(first["offset"], 2);
}

/// What a guest logs or fails with, and what an input line holds, reaches
/// the terminal escaped: no escape sequence of theirs clears the screen or
/// retitles the window.
#[test]
fn guest_text_and_input_bytes_reach_the_terminal_escaped() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("acts.jsonl");
    std::fs::write(&input, b"{\"do\":\"escape\"}\n\x1b[2J{oops \xff\n").unwrap();
    let state = dir.path().join("h.db");
    let out = run("hostile", &input, &state, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!out.stderr.contains(&0x1b), "{stderr:?}");
    assert!(
        stderr.contains(r"info: \u{1b}[2J\u{1b}]0;owned\u{7} log"),
        "{stderr}"
    );
    assert!(stderr.contains(r"stderr: \u{1b}[31m stderr"), "{stderr}");

    let out = rewind(&["dlq", "list", "--state", state.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.stdout.contains(&0x1b), "{stdout:?}");
    assert!(stdout.contains(r"\u{1b}[2J message"), "{stdout}");
    assert!(stdout.contains(r"raw: \u{1b}[2J{oops \xff"), "{stdout}");
}

/// `--input -` reads standard input, a pipe, whole: the same state and
/// outputs as from the file (bare lines get stream `stdin`). A tape or a
/// replay through a pipe is refused before anything is written: a tape's
/// header would be read from the pipe and lost, and a replay's versions
/// would split it between them.
#[test]
fn standard_input_is_read_whole_and_what_cannot_be_piped_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let lines = completed_orders(500, 30).concat();
    let input = dir.path().join("stdin");
    std::fs::write(&input, &lines).unwrap();
    let from_file = dir.path().join("file.db");
    let out = run("payments-v2", &input, &from_file, &["--quiet"]);
    assert!(out.status.success(), "{out:?}");
    let taped = run(
        "payments-v2",
        &input,
        &dir.path().join("taped.db"),
        &[
            "--quiet",
            "--tape",
            dir.path().join("t.tape").to_str().unwrap(),
        ],
    );
    assert!(taped.status.success(), "{taped:?}");

    let piped = |args: Vec<std::ffi::OsString>, bytes: &[u8]| {
        let mut child = Command::new(rewind_bin())
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        // The reader may refuse before reading it all.
        let _ = std::io::Write::write_all(&mut stdin, bytes);
        drop(stdin);
        child.wait_with_output().unwrap()
    };
    let from_pipe = dir.path().join("pipe.db");
    let mut args = run_args("payments-v2", Path::new("-"), &from_pipe);
    args.push("--quiet".into());
    let out = piped(args, lines.as_bytes());
    assert!(out.status.success(), "{out:?}");
    let diff = rewind(&[
        "diff",
        from_file.to_str().unwrap(),
        from_pipe.to_str().unwrap(),
    ]);
    assert_eq!(diff.status.code(), Some(0), "{diff:?}");
    assert_eq!(
        rewind_tests::dump_hash(&from_file),
        rewind_tests::dump_hash(&from_pipe),
        "the same records, offsets and stream"
    );

    let tape = std::fs::read(dir.path().join("t.tape")).unwrap();
    let refused = dir.path().join("refused.db");
    let out = piped(run_args("payments-v2", Path::new("-"), &refused), &tape);
    let stderr = one_line_error(&out);
    assert!(stderr.contains("tapes are read from files"), "{stderr}");
    assert!(!refused.exists(), "nothing written");

    let out = piped(
        ["replay", "--tape", "/dev/stdin", "--old"]
            .map(Into::into)
            .into_iter()
            .chain([
                processor("payments-v1").into(),
                "--new".into(),
                processor("payments-v2").into(),
            ])
            .collect(),
        lines.as_bytes(),
    );
    let stderr = one_line_error(&out);
    assert!(
        stderr.contains("each version reads the input on its own"),
        "{stderr}"
    );
}

/// A run that cannot open its tape or output file writes no state DB: the
/// rerun with the right path starts afresh, with whichever module.
#[test]
fn a_run_that_cannot_start_leaves_no_state_behind() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("orders.jsonl");
    std::fs::write(&input, completed_orders(50, 5).concat()).unwrap();
    let state = dir.path().join("state.db");
    let nowhere = |file: &str| dir.path().join("no-such-dir").join(file);
    let tape = dir.path().join("t.tape");
    // The last: the tape is made, then the output cannot be; the tape goes too.
    for (flags, file) in [
        (vec!["--tape".into(), nowhere("t.tape")], "t.tape"),
        (vec!["--output".into(), nowhere("out.jsonl")], "out.jsonl"),
        (
            vec![
                "--tape".into(),
                tape.clone(),
                "--output".into(),
                nowhere("out.jsonl"),
            ],
            "out.jsonl",
        ),
    ] {
        let flags: Vec<&str> = flags
            .iter()
            .map(|f: &PathBuf| f.to_str().unwrap())
            .collect();
        let out = run("payments-v2", &input, &state, &flags);
        let stderr = one_line_error(&out);
        assert!(
            stderr.contains(file) && stderr.contains("No such file"),
            "{stderr}"
        );
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["orders.jsonl"], "{flags:?}: nothing left behind");
    }
    let out = run("payments-v1", &input, &state, &["--quiet"]);
    assert!(out.status.success(), "{out:?}");
}

/// A compile cache that cannot be written costs a compile, not the run, and
/// says so: here the cache directory would be inside a regular file.
#[test]
fn a_cache_that_cannot_be_written_is_a_warning_not_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("orders.jsonl");
    std::fs::write(&input, completed_orders(20, 5).concat()).unwrap();
    let blocker = dir.path().join("a-file");
    std::fs::write(&blocker, b"not a directory").unwrap();
    let cache = blocker.join("cache");
    let tape = dir.path().join("one.tape");
    let warned = |out: &std::process::Output| {
        assert!(out.status.success(), "{out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("rewind: warning: could not cache the compiled processor"),
            "{stderr}"
        );
        stderr.into_owned()
    };
    for state in ["one.db", "two.db"] {
        let out = Command::new(rewind_bin())
            .arg("run")
            .arg("--processor")
            .arg(processor("payments-v2"))
            .arg("--input")
            .arg(&input)
            .arg("--state")
            .arg(dir.path().join(state))
            .arg("--tape")
            .arg(dir.path().join(state).with_extension("tape"))
            .arg("--cache-dir")
            .arg(&cache)
            .output()
            .unwrap();
        assert!(warned(&out).contains("(compiled in"));
        assert!(warned(&out).contains(", world rewind:processor@0.2.0 ("));
    }
    // `verify` and `replay` compile too, and say so the same way.
    let v2 = processor("payments-v2");
    let verify = Command::new(rewind_bin())
        .args(["verify", "--tape"])
        .arg(&tape)
        .arg("--processor")
        .arg(&v2)
        .arg("--cache-dir")
        .arg(&cache)
        .output()
        .unwrap();
    warned(&verify);
    let replay = Command::new(rewind_bin())
        .args(["replay", "--quiet", "--tape"])
        .arg(&tape)
        .arg("--old")
        .arg(&v2)
        .arg("--new")
        .arg(&v2)
        .arg("--cache-dir")
        .arg(&cache)
        .output()
        .unwrap();
    warned(&replay);
}

/// On a terminal, long commands show how far they are on stderr: a run its
/// bar through the input and its events/s, a replay its bar through the
/// tape, the comparison of the final states and the writing of its JSON
/// report. With `--quiet`, or when stderr is no terminal, nothing. (Through
/// `script`, which runs the command on a pseudo-terminal and keeps what it
/// showed.)
#[test]
fn a_terminal_shows_progress_and_a_pipe_does_not() {
    use std::ffi::OsString;
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("orders.jsonl");
    std::fs::write(&input, completed_orders(20_000, 100).concat()).unwrap();
    let tape = dir.path().join("orders.tape");
    let report = dir.path().join("report.json");
    let mut run = run_args("payments-v1", &input, &dir.path().join("live.db"));
    run.extend(["--tape".into(), tape.clone().into()]);
    let mut replay = replay_args(&tape, "payments-v1", "payments-v2");
    replay.extend(["--json".into(), report.clone().into()]);
    let quote =
        |arg: &std::ffi::OsStr| format!("'{}'", arg.to_str().unwrap().replace('\'', r"'\''"));
    let on_terminal = |args: &[OsString]| -> String {
        let mut line = quote(rewind_bin().as_os_str());
        for arg in args {
            line.push(' ');
            line.push_str(&quote(arg));
        }
        let out = Command::new("script")
            .args(["-qefc", &line, "/dev/null"])
            .output()
            .expect("script (util-linux) runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };

    let shown = on_terminal(&run);
    assert!(shown.contains("events/s"), "{shown:?}");
    let shown = on_terminal(&replay);
    for part in [
        "of the tape".to_owned(),
        "comparing the final states".to_owned(),
        format!("writing {}", report.display()),
    ] {
        assert!(shown.contains(&part), "{part:?} in {shown:?}");
    }
    assert!(file_len(&report) > 0);

    let mut quiet = replay.clone();
    quiet.push("--quiet".into());
    let shown = on_terminal(&quiet);
    assert!(
        !shown.contains("of the tape") && !shown.contains("writing"),
        "{shown:?}"
    );
    let piped = Command::new(rewind_bin()).args(&replay).output().unwrap();
    let stderr = String::from_utf8_lossy(&piped.stderr);
    assert!(
        !stderr.contains("of the tape") && !stderr.contains("writing"),
        "{stderr}"
    );
}

/// `REWIND_PROFILE=perfmap` names the guest's functions for `perf` (from a
/// cached compile too) and changes nothing the run writes; an unknown
/// profiler is a one-line error before anything is written.
#[test]
fn a_perf_map_names_the_guests_functions_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("orders.jsonl");
    std::fs::write(&input, completed_orders(50, 5).concat()).unwrap();
    let plain = dir.path().join("plain.db");
    let out = run("payments-v2", &input, &plain, &["--quiet"]);
    assert!(out.status.success(), "{out:?}");

    let profiled = dir.path().join("profiled.db");
    let child = rewind_run("payments-v2", &input, &profiled)
        .arg("--quiet")
        .env("REWIND_PROFILE", "perfmap")
        .spawn()
        .unwrap();
    let map = PathBuf::from(format!("/tmp/perf-{}.map", child.id()));
    let out = child.wait_with_output().unwrap();
    let names = std::fs::read_to_string(&map);
    let _ = std::fs::remove_file(&map);
    assert!(out.status.success(), "{out:?}");
    let names = names.expect("the perf map is written");
    // perf's format: start address, size (both hex), name.
    let line = names
        .lines()
        .find(|l| l.contains("<payments::Payments as rewind_guest::Processor>::handle"))
        .unwrap_or_else(|| panic!("no payments function named in:\n{names}"));
    let fields: Vec<&str> = line.splitn(3, ' ').collect();
    assert!(u64::from_str_radix(fields[0].trim_start_matches("0x"), 16).is_ok());
    assert!(u64::from_str_radix(fields[1], 16).is_ok());
    assert_eq!(
        rewind_tests::dump_hash(&plain),
        rewind_tests::dump_hash(&profiled)
    );

    let never = dir.path().join("never.db");
    let out = rewind_run("payments-v2", &input, &never)
        .env("REWIND_PROFILE", "vtune")
        .output()
        .unwrap();
    let stderr = one_line_error(&out);
    assert!(
        stderr.contains("REWIND_PROFILE=vtune") && stderr.contains("perfmap"),
        "{stderr}"
    );
    assert!(!never.exists());
}
