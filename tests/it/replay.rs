//! Side-by-side replay and state diffs: what a fix changes, and which
//! events caused each difference, checked against an independent model.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use proptest::prelude::*;
use rewind_host::diff::{Ignore, RowChange, diff_states};
use rewind_host::findings::Findings;
use rewind_host::replay::{ReplayConfig, replay};
use rewind_tests::{
    XorShift, cache_dir, completed_orders, config, envelope, processor, rewind_bin, rewind_run,
    text,
};
use rusqlite::types::Value;

const TS: i64 = 1_700_000_000_000;

enum Ev {
    Completed {
        order: u64,
        customer: u64,
        amount: i64,
    },
    Cancelled {
        order: u64,
    },
}

/// Orders, re-deliveries of earlier completions, and cancels (some of
/// unknown orders), as kcat envelopes with offset = seq.
fn stream(n: usize, seed: u64) -> (Vec<Ev>, Vec<u8>) {
    let mut rng = XorShift(seed | 1);
    let mut evs: Vec<Ev> = Vec::new();
    let mut completed: Vec<(u64, u64, i64)> = Vec::new();
    for _ in 0..n {
        let roll = rng.below(10);
        let ev = if roll < 2 && !completed.is_empty() {
            let (order, customer, amount) = completed[rng.below(completed.len() as u64) as usize];
            Ev::Completed {
                order,
                customer,
                amount,
            }
        } else if roll < 4 {
            Ev::Cancelled {
                order: rng.below(n as u64 / 2 + 1),
            }
        } else {
            let order = rng.below(n as u64 / 2 + 1);
            let customer = rng.below(7);
            let amount = 100 + rng.below(900) as i64;
            completed.push((order, customer, amount));
            Ev::Completed {
                order,
                customer,
                amount,
            }
        };
        evs.push(ev);
    }
    let mut bytes = Vec::new();
    for (i, ev) in evs.iter().enumerate() {
        let payload = match ev {
            Ev::Completed {
                order,
                customer,
                amount,
            } => format!(
                r#"{{"type":"order_completed","order_id":"o-{order}","customer_id":"c-{customer}","amount_cents":{amount},"currency":"EUR"}}"#
            ),
            Ev::Cancelled { order } => {
                format!(r#"{{"type":"order_cancelled","order_id":"o-{order}"}}"#)
            }
        };
        bytes.extend_from_slice(
            envelope("orders", i as i64, TS + i as i64, "k", &payload).as_bytes(),
        );
        bytes.push(b'\n');
    }
    (evs, bytes)
}

#[derive(Clone, PartialEq, Debug)]
struct Payment {
    customer: u64,
    amount: i64,
    status: &'static str,
    updated: i64,
    /// The seq whose randomness made the gateway_ref.
    charged_by: usize,
}

#[derive(Default)]
struct Model {
    payments: BTreeMap<u64, Payment>,
    totals: BTreeMap<u64, (i64, i64, i64)>,
    /// The seqs where v1 charged an order again.
    recharged: Vec<usize>,
}

/// The payments processor, independently: v1 charges a re-delivered order
/// again, v2 does not.
fn model(evs: &[Ev], v1: bool) -> Model {
    let mut m = Model::default();
    for (seq, ev) in evs.iter().enumerate() {
        let ts = TS + seq as i64;
        match *ev {
            Ev::Completed {
                order,
                customer,
                amount,
            } => {
                if m.payments.contains_key(&order) {
                    if !v1 {
                        continue;
                    }
                    m.recharged.push(seq);
                }
                m.payments.insert(
                    order,
                    Payment {
                        customer,
                        amount,
                        status: "charged",
                        updated: ts,
                        charged_by: seq,
                    },
                );
                let t = m.totals.entry(customer).or_default();
                t.0 += amount;
                t.2 += 1;
            }
            Ev::Cancelled { order } => {
                let Some(p) = m.payments.get_mut(&order) else {
                    continue;
                };
                if p.status != "charged" {
                    continue;
                }
                p.status = "refunded";
                p.updated = ts;
                m.totals.entry(p.customer).or_default().1 += p.amount;
            }
        }
    }
    m
}

fn record_tape(dir: &Path, bytes: &[u8]) -> std::path::PathBuf {
    let input = dir.join("orders.jsonl");
    std::fs::write(&input, bytes).unwrap();
    let tape = dir.join("orders.tape");
    let mut cfg = config(&processor("payments-v1"), &input, &dir.join("live.db"));
    cfg.tape = Some(tape.clone());
    rewind_host::run(&cfg, &()).unwrap();
    tape
}

fn replay_config(dir: &Path, tape: &Path, old: &str, new: &str) -> ReplayConfig {
    ReplayConfig {
        tape: tape.to_owned(),
        old: processor(old),
        new: processor(new),
        from: None,
        until: None,
        ignore: Vec::new(),
        runtime: config(&processor(old), tape, dir).runtime,
        dedup_header: Some("rewind-id".to_owned()),
        work_dir: dir.join(format!("work-{old}-{new}")),
    }
}

/// A JSONL input file replays exactly as the tape recorded from it does:
/// the same events at the same positions, the same report.
/// A replay's whole JSON report, as `--json` writes it.
fn full_report(r: &rewind_host::replay::Replay, old: &str, new: &str) -> serde_json::Value {
    let mut buf = Vec::new();
    let report = rewind_host::report::Report::replay(r, old, new).unwrap();
    rewind_host::report::write_json(&report, false, &mut buf).unwrap();
    serde_json::from_slice(&buf).unwrap()
}

#[test]
fn a_jsonl_file_replays_as_its_tape_does() {
    let dir = tempfile::tempdir().unwrap();
    let (_, bytes) = stream(500, 41);
    let tape = record_tape(dir.path(), &bytes);
    let jsonl = dir.path().join("orders.jsonl");
    let report = |recording: &Path, work: &str| {
        let mut cfg = replay_config(dir.path(), recording, "payments-v1", "payments-v2");
        cfg.work_dir = dir.path().join(work);
        let r = replay(&cfg, &()).unwrap();
        assert!(r.differs(), "v1 charges re-deliveries again");
        full_report(&r, "old", "new")
    };
    assert_eq!(report(&jsonl, "from-jsonl"), report(&tape, "from-tape"));
}

/// v1 against v2 on a stream with re-deliveries: the differing rows and
/// their old and new values are exactly the model's, and every differing
/// row's causes include the re-deliveries that charged it again.
#[test]
fn v1_against_v2_points_at_exactly_the_redelivered_orders() {
    let dir = tempfile::tempdir().unwrap();
    let (evs, bytes) = stream(1500, 11);
    let tape = record_tape(dir.path(), &bytes);
    let r = replay(
        &replay_config(dir.path(), &tape, "payments-v1", "payments-v2"),
        &(),
    )
    .unwrap();
    let (v1, v2) = (model(&evs, true), model(&evs, false));
    assert!(!v1.recharged.is_empty(), "the stream has re-deliveries");
    assert_eq!(r.events, evs.len() as u64);
    assert!(r.differs());
    assert!(r.state.schema.is_empty());

    // customer_totals: exact old and new values.
    let expected_totals: BTreeMap<String, Vec<(String, i64, i64)>> = v1
        .totals
        .iter()
        .filter_map(|(c, old)| {
            let new = v2.totals[c];
            let cols: Vec<(String, i64, i64)> = [
                ("charged_cents", old.0, new.0),
                ("refunded_cents", old.1, new.1),
                ("charges", old.2, new.2),
            ]
            .into_iter()
            .filter(|(_, o, n)| o != n)
            .map(|(name, o, n)| (name.to_owned(), o, n))
            .collect();
            (!cols.is_empty()).then(|| (format!("c-{c}"), cols))
        })
        .collect();
    let totals = r
        .state
        .tables
        .iter()
        .find(|t| t.name == "customer_totals")
        .unwrap();
    let got_totals: BTreeMap<String, Vec<(String, i64, i64)>> = r
        .findings
        .rows(&totals.name)
        .unwrap()
        .iter()
        .map(|row| {
            assert_eq!(row.change, RowChange::Changed);
            let cols = row
                .columns
                .iter()
                .map(|(c, o, n)| match (o, n) {
                    (Some(Value::Integer(o)), Some(Value::Integer(n))) => (c.clone(), *o, *n),
                    other => panic!("{other:?}"),
                })
                .collect();
            (text(&row.key[0].1), cols)
        })
        .collect();
    assert_eq!(got_totals, expected_totals);

    // payments: the changed columns, and status/updated_at_ms values.
    let mut expected_payments = BTreeMap::new();
    for (o, old) in &v1.payments {
        let new = &v2.payments[o];
        let mut cols = BTreeSet::new();
        if old.charged_by != new.charged_by {
            cols.insert("gateway_ref".to_owned());
        }
        if old.customer != new.customer {
            cols.insert("customer_id".to_owned());
        }
        if old.amount != new.amount {
            cols.insert("amount_cents".to_owned());
        }
        if old.status != new.status {
            cols.insert("status".to_owned());
        }
        if old.updated != new.updated {
            cols.insert("updated_at_ms".to_owned());
        }
        if !cols.is_empty() {
            expected_payments.insert(format!("o-{o}"), cols);
        }
    }
    let payments = r
        .state
        .tables
        .iter()
        .find(|t| t.name == "payments")
        .unwrap();
    let got_payments: BTreeMap<String, BTreeSet<String>> = r
        .findings
        .rows(&payments.name)
        .unwrap()
        .iter()
        .map(|row| {
            let key = text(&row.key[0].1);
            let order: u64 = key[2..].parse().unwrap();
            for (c, o, n) in &row.columns {
                let (o, n) = (o.clone().unwrap(), n.clone().unwrap());
                match c.as_str() {
                    "status" => {
                        assert_eq!(text(&o), v1.payments[&order].status);
                        assert_eq!(text(&n), v2.payments[&order].status);
                    }
                    "updated_at_ms" => {
                        assert_eq!(o, Value::Integer(v1.payments[&order].updated));
                        assert_eq!(n, Value::Integer(v2.payments[&order].updated));
                    }
                    _ => {}
                }
            }
            (key, row.columns.iter().map(|(c, _, _)| c.clone()).collect())
        })
        .collect();
    assert_eq!(got_payments, expected_payments);

    // Causes: every re-charge is among the causes of its order's payment
    // row and its customer's totals row.
    for &seq in &v1.recharged {
        let Ev::Completed {
            order, customer, ..
        } = evs[seq]
        else {
            unreachable!("re-charges are completions")
        };
        for (table, key) in [
            ("payments", format!("o-{order}")),
            ("customer_totals", format!("c-{customer}")),
        ] {
            let differing = r
                .findings
                .rows(table)
                .unwrap()
                .iter()
                .any(|row| text(&row.key[0].1) == key);
            if differing {
                let causes: Vec<u64> = r
                    .findings
                    .causes(
                        table,
                        &rewind_host::replay::encode_key(&[Value::Text(key.clone())]),
                        usize::MAX,
                    )
                    .unwrap()
                    .listed
                    .iter()
                    .map(|(seq, _)| *seq)
                    .collect();
                assert!(
                    causes.contains(&(seq as u64)),
                    "{table} {key}: {causes:?} lacks {seq}"
                );
            }
        }
    }
    // The first divergence is the first re-charge (or a cancel v1 accepts).
    assert_eq!(
        r.first_divergence.as_ref().unwrap().event.seq,
        v1.recharged[0] as u64
    );
    // Its record, read back from the tape: the input line (an envelope) it was.
    let first = &r.first_divergence.as_ref().unwrap().event;
    let line = bytes
        .split(|&b| b == b'\n')
        .filter(|line| !line.is_empty())
        .find(|line| {
            let envelope: serde_json::Value = serde_json::from_slice(line).unwrap();
            envelope["offset"] == first.position.offset
        })
        .unwrap();
    let envelope: serde_json::Value = serde_json::from_slice(line).unwrap();
    assert_eq!(
        first.payload.as_deref(),
        Some(envelope["payload"].as_str().unwrap().as_bytes())
    );
    assert!(first.result.is_none() && first.malformed.is_none());
    // Outputs differ exactly on the re-charges and the cancels only v1 accepted.
    let mut output_seqs = Vec::new();
    r.findings
        .each_output(None, |o| {
            output_seqs.push(o.seq);
            Ok::<_, rewind_host::findings::FindingsError>(())
        })
        .unwrap();
    assert!(output_seqs.contains(&(v1.recharged[0] as u64)));
    // The sides' scratch DBs compared the outputs without queuing them.
    for db in [&r.old_db, &r.new_db] {
        let conn = rusqlite::Connection::open(db).unwrap();
        let queued: i64 = conn
            .query_row("SELECT count(*) FROM _rewind_outbox", [], |r| r.get(0))
            .unwrap();
        assert_eq!(queued, 0, "{}", db.display());
    }
}

fn cli(args: &[&str]) -> std::process::Output {
    Command::new(rewind_bin())
        .args(args)
        .env("NO_COLOR", "1")
        .env("REWIND_CACHE_DIR", cache_dir())
        .output()
        .unwrap()
}

/// `rewind replay --tape TAPE --old OLD --new NEW` and `extra`.
fn replay_cli(tape: &Path, old: &Path, new: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "replay",
        "--tape",
        tape.to_str().unwrap(),
        "--old",
        old.to_str().unwrap(),
        "--new",
        new.to_str().unwrap(),
    ];
    args.extend(extra);
    cli(&args)
}

/// Checks a command's exit code, showing its stderr if it is not `code`.
fn assert_exit(out: &std::process::Output, code: i32) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A version against itself changes nothing (exit 0), and the same holds
/// from the CLI; v1 against v2 exits 1.
#[test]
fn a_version_against_itself_has_no_differences() {
    let dir = tempfile::tempdir().unwrap();
    let (_, bytes) = stream(400, 3);
    let tape = record_tape(dir.path(), &bytes);
    for v in ["payments-v1", "payments-v2"] {
        let r = replay(&replay_config(dir.path(), &tape, v, v), &()).unwrap();
        assert!(!r.differs(), "{v}");
        assert_eq!(r.diverged_events, 0);
        let json = dir.path().join(format!("{v}.json"));
        let p = processor(v);
        let out = replay_cli(&tape, &p, &p, &["--json", json.to_str().unwrap()]);
        assert_exit(&out, 0);
        let report: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
        assert_eq!(report["summary"]["diverged_events"], 0);
        assert_eq!(report["tables"], serde_json::json!([]));
    }
    let (v1, v2) = (processor("payments-v1"), processor("payments-v2"));
    assert_exit(&replay_cli(&tape, &v1, &v2, &["--quiet"]), 1);
}

/// Ignore rules drop exactly what they name; the approved-baseline gate
/// passes when equal, fails on anything else, and --accept round-trips.
#[test]
fn ignore_rules_and_the_approved_baseline_gate() {
    let dir = tempfile::tempdir().unwrap();
    let (_, bytes) = stream(600, 5);
    let tape = record_tape(dir.path(), &bytes);
    let mut cfg = replay_config(dir.path(), &tape, "payments-v1", "payments-v2");
    let full = replay(&cfg, &()).unwrap();
    cfg.ignore = vec![Ignore::Table("customer_totals".into())];
    let no_totals = replay(&cfg, &()).unwrap();
    assert!(
        full.state
            .tables
            .iter()
            .any(|t| t.name == "customer_totals")
    );
    assert!(
        no_totals
            .state
            .tables
            .iter()
            .all(|t| t.name != "customer_totals")
    );
    assert_eq!(
        full.state.tables.iter().find(|t| t.name == "payments"),
        no_totals.state.tables.iter().find(|t| t.name == "payments")
    );
    cfg.ignore = vec!["payments.gateway_ref".parse().unwrap()];
    let no_ref = replay(&cfg, &()).unwrap();
    let payments = no_ref.state.tables.iter().find(|t| t.name == "payments");
    assert!(payments.is_none_or(|t| {
        no_ref
            .findings
            .rows(&t.name)
            .unwrap()
            .iter()
            .all(|r| r.columns.iter().all(|(c, _, _)| c != "gateway_ref"))
    }));
    assert_eq!(
        full.state
            .tables
            .iter()
            .find(|t| t.name == "customer_totals"),
        no_ref
            .state
            .tables
            .iter()
            .find(|t| t.name == "customer_totals")
    );
    assert!(full.state.unmatched.is_empty() && no_ref.state.unmatched.is_empty());
    // A rule that names nothing leaves nothing out, and is said to.
    let misspelt: Vec<Ignore> = ["paymnts", "payments.gatway_ref", "customer_totals"]
        .map(|r| r.parse().unwrap())
        .to_vec();
    cfg.ignore = misspelt.clone();
    let typo = replay(&cfg, &()).unwrap();
    assert_eq!(typo.state.unmatched, misspelt[..2]);
    assert_eq!(typo.state.tables, no_totals.state.tables);
    let out = replay_cli(
        &tape,
        &processor("payments-v1"),
        &processor("payments-v2"),
        &[
            "--quiet",
            "--ignore",
            "paymnts",
            "--ignore",
            "payments.gatway_ref",
        ],
    );
    assert_exit(&out, 1);
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "rewind: warning: --ignore paymnts names no table of either state; it leaves nothing out\n\
         rewind: warning: --ignore payments.gatway_ref names no column of either state; it leaves \
         nothing out\n"
    );

    let (v1, v2) = (processor("payments-v1"), processor("payments-v2"));
    let approved = dir.path().join("approved.json");
    let args = |extra: &[&str]| -> Vec<String> {
        let mut a = vec![
            "--quiet".to_owned(),
            "--expect".to_owned(),
            approved.to_str().unwrap().to_owned(),
        ];
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let run = |a: Vec<String>| {
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        replay_cli(&tape, &v1, &v2, &a).status.code()
    };
    // No baseline yet: an error (2) that says how to make one.
    assert_eq!(run(args(&[])), Some(2));
    assert_eq!(run(args(&["--accept"])), Some(0));
    assert_eq!(run(args(&[])), Some(0), "equal to the approved baseline");
    // Any other change fails: here, ignoring a table changes the diff,
    // and the gate says where.
    assert_eq!(run(args(&["--ignore", "customer_totals"])), Some(1));
    let out = replay_cli(
        &tape,
        &v1,
        &v2,
        &[
            "--expect",
            approved.to_str().unwrap(),
            "--ignore",
            "customer_totals",
        ],
    );
    assert_exit(&out, 1);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let gate = stdout
        .split_once("differences do NOT equal the approved baseline")
        .map(|(_, after)| after)
        .unwrap_or_else(|| panic!("{stdout}"));
    let totals = full
        .state
        .tables
        .iter()
        .find(|t| t.name == "customer_totals")
        .unwrap();
    assert!(
        gate.contains(&format!(
            "table customer_totals: {} rows approved, none differ now (first {{\"customer_id\":",
            full.findings.rows(&totals.name).unwrap().len()
        )),
        "{gate}"
    );
    assert!(!gate.contains("table payments"), "{gate}");
    // A baseline written otherwise (compact, where the modules were kept:
    // a whole report) is compared by content, not text.
    let mut baseline: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&approved).unwrap()).unwrap();
    let mut whole = baseline.clone();
    whole["old"] = serde_json::json!({"path": "elsewhere.wasm"});
    std::fs::write(&approved, whole.to_string()).unwrap();
    assert_eq!(run(args(&[])), Some(0), "equal in content");
    // Tampering with the baseline fails.
    baseline["summary"]["diverged_events"] = serde_json::json!(0);
    std::fs::write(&approved, baseline.to_string()).unwrap();
    assert_eq!(run(args(&[])), Some(1));
    // JSON that is no report at all is the wrong file, not a difference.
    std::fs::write(&approved, r#"{"name": "payments", "version": "1.0.0"}"#).unwrap();
    let out = replay_cli(&tape, &v1, &v2, &["--expect", approved.to_str().unwrap()]);
    assert_exit(&out, 2);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("approved.json is not a rewind report") && stderr.contains("--accept"),
        "{stderr}"
    );
}

/// The gate checks a baseline without holding it in memory: one `--accept`
/// wrote by the digest of its bytes against the report streamed, any other
/// (here the same reformatted, then one with a row and an output changed)
/// with its long lists kept in a scratch file. The baseline is 22 MB (every
/// order delivered twice, so v1 and v2 differ in 22,000 rows and 20,000
/// outputs); read into memory whole it took ~165 MiB.
#[test]
fn a_large_baseline_is_checked_without_holding_it() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("twice.jsonl");
    let orders: String = completed_orders(20_000, 2_000)
        .iter()
        .map(|order| order.repeat(2))
        .collect();
    std::fs::write(&input, orders).unwrap();
    let approved = dir.path().join("approved.json");
    let args = |extra: &[&str]| -> Vec<std::ffi::OsString> {
        let mut args = rewind_tests::replay_args(&input, "payments-v1", "payments-v2");
        args.extend(["--expect".into(), approved.clone().into()]);
        args.extend(extra.iter().map(Into::into));
        args
    };
    let measure = |args: Vec<std::ffi::OsString>| {
        let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
        rewind_tests::peak_rss_kib(&rewind_bin(), &args)
    };
    let (code, accepting) = measure(args(&["--accept"]));
    assert_eq!(code, Some(0));
    assert!(
        std::fs::metadata(&approved).unwrap().len() > 20 << 20,
        "a large baseline"
    );
    let (code, checking) = measure(args(&[]));
    assert_eq!(code, Some(0), "equal to the approved baseline");
    assert!(
        checking < 128 << 10,
        "checking peaked at {checking} KiB (accepting: {accepting} KiB)"
    );

    // The same baseline written otherwise: compared entry by entry.
    let text = std::fs::read(&approved).unwrap();
    let mut baseline: serde_json::Value = serde_json::from_slice(&text).unwrap();
    drop(text);
    std::fs::write(&approved, serde_json::to_vec(&baseline).unwrap()).unwrap();
    let (code, reformatted) = measure(args(&[]));
    assert_eq!(code, Some(0), "the same differences, written compactly");
    assert!(
        reformatted < 128 << 10,
        "checking a reformatted baseline peaked at {reformatted} KiB"
    );

    // One row and one output event no longer as approved.
    let payments = baseline["tables"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|t| t["name"] == "payments")
        .unwrap();
    let rows = payments["rows"].as_array_mut().unwrap();
    let middle = rows.len() / 2;
    let row = &mut rows[middle];
    let key = row["key"].to_string();
    row["columns"]["amount_cents"]["new"] = serde_json::json!(-1);
    let events = baseline["outputs"]["events"].as_array_mut().unwrap();
    let seq = events[0]["seq"].clone();
    events.remove(0);
    std::fs::write(&approved, serde_json::to_vec(&baseline).unwrap()).unwrap();
    drop(baseline);
    let checked = args(&[]);
    let checked: Vec<&std::ffi::OsStr> = checked.iter().map(|a| a.as_os_str()).collect();
    let (code, differing, stdout) = rewind_tests::peak_rss_kib_and_stdout(&rewind_bin(), &checked);
    assert_eq!(code, Some(1), "not as approved");
    assert!(
        differing < 128 << 10,
        "checking a differing baseline peaked at {differing} KiB"
    );
    let (_, gate) = stdout
        .split_once("do NOT equal the approved baseline")
        .unwrap_or_else(|| panic!("the gate's verdict in:\n{stdout}"));
    let lines: Vec<&str> = gate.lines().skip(1).map(str::trim).collect();
    assert_eq!(
        lines,
        [
            format!("outputs: 1 events differ from the approved ones (first seq {seq})"),
            format!("table payments: 1 rows differ from the approved ones (first {key})"),
        ],
        "exactly what was changed"
    );
}

/// Replaying from a snapshot equals replaying from empty over the same
/// events: the snapshot carries its offsets, so consumed records are skipped.
#[test]
fn replay_from_a_snapshot_equals_replay_from_empty() {
    let dir = tempfile::tempdir().unwrap();
    let (_, bytes) = stream(800, 9);
    let lines: Vec<&[u8]> = bytes.split_inclusive(|&b| b == b'\n').collect();
    // The live run consumes the first half, is snapshotted, then the rest.
    let input = dir.path().join("orders.jsonl");
    std::fs::write(&input, lines[..400].concat()).unwrap();
    let tape = dir.path().join("orders.tape");
    let live = dir.path().join("live.db");
    let mut cfg = config(&processor("payments-v1"), &input, &live);
    cfg.tape = Some(tape.clone());
    rewind_host::run(&cfg, &()).unwrap();
    let snap = dir.path().join("snap.db");
    rewind_host::snapshot::snapshot(&live, &snap).unwrap();
    std::fs::write(&input, lines.concat()).unwrap();
    rewind_host::run(&cfg, &()).unwrap();

    let mut from_empty = replay_config(dir.path(), &tape, "payments-v1", "payments-v2");
    from_empty.work_dir = dir.path().join("empty");
    let a = replay(&from_empty, &()).unwrap();
    let mut from_snap = from_empty.clone();
    from_snap.work_dir = dir.path().join("snap");
    from_snap.from = Some(snap.clone());
    let b = replay(&from_snap, &()).unwrap();
    // The snapshot was v1's state for the first half, so the new side starts
    // with v1's first-half differences already in; compare the old sides.
    let findings = Findings::temporary().unwrap();
    assert!(
        diff_states(&a.old_db, &b.old_db, &[], &findings)
            .unwrap()
            .is_empty()
    );
    assert_eq!(b.events, 400);
    assert!(b.warnings.is_empty(), "{:?}", b.warnings);
    // A snapshot neither version wrote is likely the wrong file: said, not
    // refused (an earlier version's is a fair start too).
    let mut neither = from_snap.clone();
    neither.old = processor("payments-v2");
    neither.work_dir = dir.path().join("neither");
    let c = replay(&neither, &()).unwrap();
    assert!(
        c.warnings.len() == 1
            && c.warnings[0].contains("snap.db was written by module sha256:")
            && c.warnings[0].contains("neither --old nor --new"),
        "{:?}",
        c.warnings
    );
}

/// A table of random rows, keyed or not.
fn db_with(path: &Path, rows: &[(i64, Option<String>, i64)], keyed: bool) {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.execute_batch(if keyed {
        "CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT, n INTEGER)"
    } else {
        "CREATE TABLE t (id INTEGER, name TEXT, n INTEGER)"
    })
    .unwrap();
    for (id, name, n) in rows {
        conn.execute(
            "INSERT OR REPLACE INTO t VALUES (?1, ?2, ?3)",
            rusqlite::params![id, name, n],
        )
        .unwrap();
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// diff(a, a) is empty; diff(a, b) mirrors diff(b, a): added and
    /// removed swap, old and new swap.
    #[test]
    fn diffs_are_empty_on_equal_states_and_mirror(
        a in proptest::collection::vec((0i64..30, proptest::option::of("[a-c]{0,2}"), 0i64..3), 0..25),
        b in proptest::collection::vec((0i64..30, proptest::option::of("[a-c]{0,2}"), 0i64..3), 0..25),
        keyed in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let (pa, pb) = (dir.path().join("a.db"), dir.path().join("b.db"));
        db_with(&pa, &a, keyed);
        db_with(&pb, &b, keyed);
        let (fa, fab, fba) = (Findings::temporary().unwrap(), Findings::temporary().unwrap(), Findings::temporary().unwrap());
        prop_assert!(diff_states(&pa, &pa, &[], &fa).unwrap().is_empty());
        let ab = diff_states(&pa, &pb, &[], &fab).unwrap();
        let ba = diff_states(&pb, &pa, &[], &fba).unwrap();
        let flip = |c: RowChange| match c {
            RowChange::Added => RowChange::Removed,
            RowChange::Removed => RowChange::Added,
            RowChange::Changed => RowChange::Changed,
        };
        let norm = |d: &rewind_host::diff::StateDiff, f: &Findings, mirror: bool| -> Vec<String> {
            let mut rows: Vec<String> = d.tables.iter().flat_map(|t| f.rows(&t.name).unwrap().into_iter().map(move |r| {
                let cols: Vec<_> = r.columns.iter().map(|(c, o, n)| if mirror { (c.clone(), n.clone(), o.clone()) } else { (c.clone(), o.clone(), n.clone()) }).collect();
                format!("{:?} {:?} {:?}", r.key, if mirror { flip(r.change) } else { r.change }, cols)
            })).collect();
            rows.sort();
            rows
        };
        prop_assert_eq!(norm(&ab, &fab, false), norm(&ba, &fba, true));
        prop_assert_eq!(ab.is_empty(), ba.is_empty());
    }
}

/// The HTML report is one self-contained page that Chromium renders with
/// every differing key of the JSON report, each changed cell marked.
#[test]
fn the_html_report_renders_the_differing_keys_in_chromium() {
    let dir = tempfile::tempdir().unwrap();
    let (_, bytes) = stream(500, 13);
    let tape = record_tape(dir.path(), &bytes);
    let (json, html, md) = (
        dir.path().join("r.json"),
        dir.path().join("r.html"),
        dir.path().join("r.md"),
    );
    let (v1, v2) = (processor("payments-v1"), processor("payments-v2"));
    let out = replay_cli(
        &tape,
        &v1,
        &v2,
        &[
            "--quiet",
            "--json",
            json.to_str().unwrap(),
            "--html",
            html.to_str().unwrap(),
            "--markdown",
            md.to_str().unwrap(),
        ],
    );
    assert_exit(&out, 1);
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(
        !page.contains("http://") && !page.contains("https://") && !page.contains("<script"),
        "self-contained"
    );

    let chromium = which("chromium").expect(
        "Debian's chromium is needed to render the HTML report: `apt-get install chromium` (cargo xtask test does)",
    );
    let rendered = Command::new(chromium)
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--dump-dom"])
        .arg(format!("file://{}", html.display()))
        .output()
        .unwrap();
    assert!(
        rendered.status.success(),
        "{}",
        String::from_utf8_lossy(&rendered.stderr)
    );
    let dom = String::from_utf8_lossy(&rendered.stdout);
    let mut keys = 0;
    for table in report["tables"].as_array().unwrap() {
        for row in table["rows"].as_array().unwrap() {
            let key: Vec<String> = row["key"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap()))
                .collect();
            let cell = format!(
                "<td rowspan=\"{}\" class=\"mono key\">{}</td>",
                row["columns"].as_object().unwrap().len(),
                key.join(", ")
            );
            assert!(dom.contains(&cell), "the page lacks {cell}");
            keys += 1;
        }
    }
    assert!(keys > 0);
    assert_eq!(
        dom.matches("class=\"mono new\"").count(),
        report["tables"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|t| t["rows"].as_array().unwrap())
            .map(|r| r["columns"].as_object().unwrap().len())
            .sum::<usize>()
    );
    // The Markdown report has the per-table counts.
    let markdown = std::fs::read_to_string(&md).unwrap();
    for table in report["tables"].as_array().unwrap() {
        assert!(markdown.contains(&format!(
            "| `{}` | {} | {} | {} |",
            table["name"].as_str().unwrap(),
            table["added"],
            table["removed"],
            table["changed"]
        )));
    }
}

fn which(program: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_string_lossy()
        .split(':')
        .map(|dir| Path::new(dir).join(program))
        .find(|p| p.is_file())
}

/// A version that adds a column is a schema difference plus the row
/// differences, not a crash; against v2 (same logic) only the schema differs.
#[test]
fn a_schema_change_is_reported_not_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let (_, bytes) = stream(400, 17);
    let tape = record_tape(dir.path(), &bytes);
    let r = replay(
        &replay_config(dir.path(), &tape, "payments-v1", "payments-v3"),
        &(),
    )
    .unwrap();
    assert_eq!(r.state.schema.columns.len(), 1);
    assert_eq!(r.state.schema.columns[0].table, "payments");
    assert_eq!(
        r.state.schema.columns[0].only_new,
        vec!["channel".to_owned()]
    );
    assert!(
        r.state
            .tables
            .iter()
            .any(|t| t.name == "payments" && t.changed > 0)
    );
    let same = replay(
        &replay_config(dir.path(), &tape, "payments-v2", "payments-v3"),
        &(),
    )
    .unwrap();
    assert_eq!(
        same.state.schema.columns[0].only_new,
        vec!["channel".to_owned()]
    );
    assert!(same.state.tables.is_empty(), "{:?}", same.state.tables);
    assert!(same.differs(), "a schema difference is a difference");
    // The column only v3 has is that schema difference, not a divergence
    // of every event that writes a payment.
    assert_eq!(same.diverged_events, 0);
    assert!(same.first_divergence.is_none());
}

/// A snapshot taken while a run is writing is consistent: its offsets match
/// its state, so continuing from it ends exactly where the run ended.
#[test]
fn a_snapshot_of_a_live_run_is_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let (_, bytes) = stream(40_000, 23);
    let input = dir.path().join("orders.jsonl");
    std::fs::write(&input, &bytes).unwrap();
    let live = dir.path().join("live.db");
    let mut child = rewind_run("payments-v1", &input, &live)
        .args(["--quiet", "--batch-size", "64"])
        .spawn()
        .unwrap();
    // Wait until the run has committed something, then copy it mid-run.
    let snap = dir.path().join("snap.db");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let committed = rusqlite::Connection::open_with_flags(
            &live,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .and_then(|c| {
            c.query_row("SELECT count(*) FROM _rewind_offsets", [], |r| {
                r.get::<_, i64>(0)
            })
        })
        .is_ok_and(|n| n > 0);
        if committed {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the run never committed"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    rewind_host::snapshot::snapshot(&live, &snap).unwrap();
    let still_running = child.try_wait().unwrap().is_none();
    assert!(child.wait().unwrap().success());
    assert!(
        still_running,
        "the snapshot was taken while the run was live"
    );
    // Continuing the snapshot over the same input reaches the same state.
    rewind_host::run(&config(&processor("payments-v1"), &input, &snap), &()).unwrap();
    let findings = Findings::temporary().unwrap();
    assert!(
        diff_states(&live, &snap, &[], &findings)
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        rewind_tests::rows(&live, "SELECT * FROM _rewind_offsets"),
        rewind_tests::rows(&snap, "SELECT * FROM _rewind_offsets")
    );
}

/// `--until SEQ` stops both versions after that event.
#[test]
fn replay_until_stops_after_the_given_seq() {
    let dir = tempfile::tempdir().unwrap();
    let (_, bytes) = stream(300, 29);
    let tape = record_tape(dir.path(), &bytes);
    let mut cfg = replay_config(dir.path(), &tape, "payments-v1", "payments-v2");
    cfg.until = Some(99);
    let r = replay(&cfg, &()).unwrap();
    assert_eq!(r.events, 100);
    assert!(
        r.first_divergence
            .as_ref()
            .is_none_or(|d| d.event.seq <= 99)
    );
    let consumed = rewind_tests::rows(
        &r.old_db,
        "SELECT value FROM _rewind_meta WHERE key = 'next_seq'",
    );
    assert_eq!(consumed[0][0], Value::Text("100".into()));
}

/// A tape remembers the fuel and memory cap it was recorded with, and
/// `verify` and `replay` use them: an event that ran out of a lowered
/// `--fuel` live does so again. Regression: `verify` replayed with the
/// default fuel and reported the event as a mismatch.
#[test]
fn verify_and_replay_use_the_limits_the_tape_was_recorded_with() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("acts.jsonl");
    let acts = |acts: &[&str]| -> String {
        acts.iter()
            .enumerate()
            .map(|(offset, act)| {
                let payload = serde_json::json!({ "do": act }).to_string();
                envelope("acts", offset as i64, 1_767_225_600_000, "k", &payload) + "\n"
            })
            .collect()
    };
    std::fs::write(&input, acts(&["normal", "loop", "normal"])).unwrap();
    let tape = dir.path().join("acts.tape");
    let hostile = processor("hostile");
    let mut cfg = config(&hostile, &input, &dir.path().join("live.db"));
    cfg.runtime.fuel = 2_000_000;
    cfg.tape = Some(tape.clone());
    rewind_host::run(&cfg, &()).unwrap();
    let recorded = rewind_host::tapes::recorded_run(&tape).unwrap().unwrap();
    assert_eq!(
        (
            recorded.fuel,
            recorded.memory_bytes,
            recorded.dedup_header.as_deref()
        ),
        (2_000_000, 64 << 20, Some("rewind-id"))
    );

    let old = verify_and_replay_as_recorded(dir.path(), &tape, &hostile);
    let dead = rewind_tests::rows(&old, "SELECT message FROM _rewind_dlq");
    assert!(
        matches!(&dead[..], [row] if format!("{row:?}").contains("(2000000 units)")),
        "{dead:?}"
    );

    // A second run with other limits: verify says it cannot replay both.
    std::fs::write(&input, acts(&["normal", "loop", "normal", "normal"])).unwrap();
    cfg.runtime.fuel = 3_000_000;
    rewind_host::run(&cfg, &()).unwrap();
    let defaults = config(&hostile, &input, &dir.path().join("unused.db")).runtime;
    let work = dir.path().join("verify.db");
    let err = rewind_host::verify::verify(&tape, &hostile, &defaults, &work)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("events from seq 3 were recorded with --fuel 3000000"),
        "{err}"
    );
}

/// The tape records whether its run deduplicated, and by which header:
/// `verify` and `replay` do as it did. Three events carrying the same
/// `rewind-id`, recorded with deduplication off, are all applied again.
#[test]
fn verify_and_replay_deduplicate_as_the_recorded_run_did() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("acts.jsonl");
    let lines: String = (0..3)
        .map(|offset| {
            serde_json::json!({
                "topic": "acts", "partition": 0, "offset": offset, "ts": 1_767_225_600_000i64,
                "headers": ["rewind-id", "the-same-id"], "key": "k",
                "payload": r#"{"do":"normal"}"#,
            })
            .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(&input, lines).unwrap();
    let tape = dir.path().join("acts.tape");
    let hostile = processor("hostile");
    let mut cfg = config(&hostile, &input, &dir.path().join("live.db"));
    cfg.dedup_header = None;
    cfg.tape = Some(tape.clone());
    assert_eq!(rewind_host::run(&cfg, &()).unwrap().duplicates, 0);

    let old = verify_and_replay_as_recorded(dir.path(), &tape, &hostile);
    let seen = rewind_tests::rows(&old, "SELECT count(*) FROM seen");
    assert_eq!(seen, [vec![Value::Integer(3)]]);
}

/// Verifies `tape` with `processor`, given the default settings, and replays
/// it with `processor` on both sides: both must reproduce the recording.
/// Returns the old side's final state DB.
fn verify_and_replay_as_recorded(dir: &Path, tape: &Path, processor: &Path) -> PathBuf {
    let defaults = config(processor, tape, &dir.join("unused.db")).runtime;
    let verified =
        rewind_host::verify::verify(tape, processor, &defaults, &dir.join("verify.db")).unwrap();
    assert!(
        verified.first_mismatch.is_none(),
        "{:?}",
        verified.first_mismatch
    );
    let kept = dir.join("kept");
    let out = replay_cli(
        tape,
        processor,
        processor,
        &["--keep", kept.to_str().unwrap()],
    );
    assert_exit(&out, 0);
    kept.join("old.db")
}

/// Ctrl-C or SIGTERM stops `replay` and `verify` with exit 130 and takes
/// their scratch states (kept in the temporary directory) with them:
/// nothing unfinished is reported, and nothing is left behind.
#[test]
fn an_interrupted_replay_or_verify_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("acts.jsonl");
    // Events that each run until their fuel is gone (five times the default,
    // which replay and verify take from the tape): slow enough to be
    // interrupted mid-way on any machine.
    let acts: Vec<String> = (0..30)
        .map(|i| envelope("acts", i, TS + i, "k", r#"{"do":"loop"}"#) + "\n")
        .collect();
    std::fs::write(&input, acts.concat()).unwrap();
    let tape = dir.path().join("acts.tape");
    let recorded = rewind_run("hostile", &input, &dir.path().join("live.db"))
        .args([
            "--quiet",
            "--fuel",
            "500000000",
            "--tape",
            tape.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(recorded.status.success(), "{recorded:?}");

    let scratch = dir.path().join("tmp");
    std::fs::create_dir(&scratch).unwrap();
    let hostile = processor("hostile");
    let commands: [(&str, Vec<&std::ffi::OsStr>); 2] = [
        (
            "-INT",
            vec![
                "replay".as_ref(),
                "--tape".as_ref(),
                tape.as_os_str(),
                "--old".as_ref(),
                hostile.as_os_str(),
                "--new".as_ref(),
                hostile.as_os_str(),
            ],
        ),
        (
            "-TERM",
            vec![
                "verify".as_ref(),
                "--tape".as_ref(),
                tape.as_os_str(),
                "--processor".as_ref(),
                hostile.as_os_str(),
            ],
        ),
    ];
    for (signal, args) in commands {
        let child = Command::new(rewind_bin())
            .args(&args)
            .arg("--cache-dir")
            .arg(cache_dir())
            .env("TMPDIR", &scratch)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Once its states exist in the temporary directory.
        let states = || {
            walk(&scratch)
                .iter()
                .any(|p| p.extension().is_some_and(|e| e == "db"))
        };
        let out = rewind_tests::signal_when(child, states, signal);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(130), "{args:?}: {stderr}");
        assert!(stderr.contains("interrupted: nothing reported"), "{stderr}");
        assert!(out.stdout.is_empty(), "{args:?}: nothing reported");
        assert_eq!(
            walk(&scratch),
            Vec::<PathBuf>::new(),
            "{args:?}: left behind"
        );
    }
}

/// Every file and directory below `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(walk(&path));
        }
        found.push(path);
    }
    found
}

/// A row that many events changed lists its first thousand causes (those
/// matter most) and counts the rest, in the JSON report and in every
/// human rendering.
#[test]
fn a_row_with_thousands_of_causes_lists_the_first_and_counts_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    // One customer; every order delivered twice: v1 charges each again.
    let orders = 1_500;
    let line = |i: usize| {
        format!(
            "{{\"type\":\"order_completed\",\"order_id\":\"o-{i}\",\"customer_id\":\"c-hot\",\
             \"amount_cents\":1,\"currency\":\"EUR\"}}\n"
        )
    };
    let bytes: String = (0..2 * orders).map(|i| line(i % orders)).collect();
    let tape = record_tape(dir.path(), bytes.as_bytes());
    let replayed = replay(
        &replay_config(dir.path(), &tape, "payments-v1", "payments-v2"),
        &(),
    )
    .unwrap();
    let report = full_report(&replayed, "v1", "v2");
    let totals = report["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "customer_totals")
        .unwrap();
    let row = &totals["rows"][0];
    let listed: Vec<u64> = row["caused_by"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_u64().unwrap())
        .collect();
    // The re-deliveries, seqs 1500.., in order: the first thousand listed.
    assert_eq!(
        listed,
        (orders as u64..orders as u64 + 1000).collect::<Vec<_>>()
    );
    assert_eq!(row["caused_by_unlisted"], 500);
    assert_eq!(row["caused_by_positions"].as_array().unwrap().len(), 1000);
    // Rows with all their causes listed carry no count.
    let payment = &report["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "payments")
        .unwrap()["rows"][0];
    assert!(payment.get("caused_by_unlisted").is_none(), "{payment}");

    // The renderings, from brief reports as the CLI makes them.
    use rewind_host::report::{HTML_CAUSES, HTML_ROWS, Report, html, markdown, summary_text};
    let streamed = Report::replay(&replayed, "v1", "v2").unwrap();
    let terminal = summary_text(&streamed.brief(5, 5).unwrap(), false);
    assert!(
        terminal.contains("orders.jsonl/0@1505) and 1495 more"),
        "{terminal}"
    );
    let brief = streamed.brief(HTML_ROWS, HTML_CAUSES).unwrap();
    assert!(markdown(&brief).contains("1509 … and 1490 more"));
    assert!(html(&brief).contains(&format!(
        "{} … and {} more",
        orders + HTML_CAUSES - 1,
        orders - HTML_CAUSES
    )));
}
