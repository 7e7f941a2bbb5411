//! The `rewind` command line: help everywhere, one-line errors with exit 2,
//! and the inspect and dlq views.

use std::ffi::OsString;
use std::path::Path;
use std::process::Command;

use rewind_tests::{cache_dir, processor, rewind_bin};

fn rewind(args: &[&str]) -> std::process::Output {
    Command::new(rewind_bin()).args(args).output().unwrap()
}

/// The arguments of `rewind run` of a built processor over `input` into
/// `state`, with the tests' compile cache.
fn run_args(module: &str, input: &Path, state: &Path) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec!["run".into(), "--processor".into()];
    args.push(processor(module).into());
    args.extend([
        "--input".into(),
        input.into(),
        "--state".into(),
        state.into(),
    ]);
    args.extend(["--cache-dir".into(), cache_dir().into()]);
    args
}

/// `rewind run` (see [`run_args`]) with `extra` arguments.
fn run(module: &str, input: &Path, state: &Path, extra: &[&str]) -> std::process::Output {
    Command::new(rewind_bin())
        .args(run_args(module, input, state))
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
}

#[test]
fn errors_are_one_line_with_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.db");
    let out = rewind(&["inspect", "--state", missing.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
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
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
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
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--max-instances"), "{stderr}");
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
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
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
