//! `rewind run --brokers`: a consumer group over a real broker (tansu),
//! inputs produced and outputs read back by an independent client
//! (confluent-kafka), state checked against a model of the payments rules.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use rewind_tests::{
    Broker, XorShift, cache_dir, dump_hash, int, kafka_client, kill_when, processor, rewind_bin,
    rows, text,
};
use rusqlite::types::Value;
use serde_json::{Value as Json, json};

const PARTITIONS: i32 = 3;
/// The producer's timestamp of the first event (the next ones a ms apart).
const BASE_TS: i64 = 1_700_000_000_000;

/// What the model expects of a payments v2 run.
#[derive(Default)]
struct Model {
    /// order → (customer, amount, status)
    payments: BTreeMap<String, (String, i64, &'static str)>,
    /// customer → (charged, refunded, charges)
    totals: BTreeMap<String, (i64, i64, i64)>,
    /// `rewind-id`s of the outputs, in no particular order.
    outputs: BTreeSet<String>,
    /// (partition, offset) of the malformed records.
    malformed: BTreeSet<(i32, i64)>,
    /// Records per partition.
    ends: Vec<i64>,
}

/// `events` orders keyed by customer (a customer's events share a
/// partition), with re-deliveries, cancels and one malformed payload in a
/// thousand; returns the client's input lines and the model.
fn generate(events: usize, seed: u64) -> (String, Model) {
    let mut rng = XorShift(seed);
    let mut model = Model::default();
    let mut lines = String::new();
    let mut next_offset = [0i64; PARTITIONS as usize];
    // Per partition: completed payloads, and orders still charged.
    let mut completed: Vec<Vec<String>> = vec![Vec::new(); PARTITIONS as usize];
    let mut charged: Vec<Vec<(String, String)>> = vec![Vec::new(); PARTITIONS as usize];
    for i in 0..events {
        let customer = format!("c-{}", rng.below(300));
        let partition = (customer.bytes().map(u64::from).sum::<u64>() % PARTITIONS as u64) as i32;
        let p = partition as usize;
        let offset = next_offset[p];
        next_offset[p] += 1;
        let id = format!("orders/{partition}@{offset}/0");
        let roll = rng.below(1000);
        let payload = if roll == 0 {
            model.malformed.insert((partition, offset));
            "{\"type\": \"order_completed\", oops".to_owned()
        } else if roll < 60 && !completed[p].is_empty() {
            // A re-delivery: v2 changes nothing and emits nothing.
            completed[p][rng.below(completed[p].len() as u64) as usize].clone()
        } else if roll < 160 && !charged[p].is_empty() {
            let pick = rng.below(charged[p].len() as u64) as usize;
            let (order, customer) = charged[p].swap_remove(pick);
            let payment = model.payments.get_mut(&order).unwrap();
            payment.2 = "refunded";
            model.totals.get_mut(&customer).unwrap().1 += payment.1;
            model.outputs.insert(id);
            json!({"type": "order_cancelled", "order_id": order}).to_string()
        } else {
            let order = format!("o-{i}");
            let amount = 100 + rng.below(9000) as i64;
            model
                .payments
                .insert(order.clone(), (customer.clone(), amount, "charged"));
            let totals = model.totals.entry(customer.clone()).or_default();
            totals.0 += amount;
            totals.2 += 1;
            model.outputs.insert(id);
            charged[p].push((order.clone(), customer.clone()));
            let payload = json!({"type": "order_completed", "order_id": order,
                "customer_id": customer, "amount_cents": amount, "currency": "EUR"})
            .to_string();
            completed[p].push(payload.clone());
            payload
        };
        lines.push_str(
            &json!({"key": customer, "payload": payload, "partition": partition,
                "timestamp": BASE_TS + i as i64})
            .to_string(),
        );
        lines.push('\n');
    }
    model.ends = next_offset.to_vec();
    (lines, model)
}

/// Every partition DB's rows, merged: payments and totals.
#[allow(clippy::type_complexity)]
fn state(
    dir: &Path,
) -> (
    BTreeMap<String, (String, i64, String)>,
    BTreeMap<String, (i64, i64, i64)>,
) {
    let (mut payments, mut totals) = (BTreeMap::new(), BTreeMap::new());
    for p in 0..PARTITIONS {
        let db = dir.join(format!("partition-{p}.db"));
        for r in rows(
            &db,
            "SELECT order_id, customer_id, amount_cents, status FROM payments",
        ) {
            payments.insert(text(&r[0]), (text(&r[1]), int(&r[2]), text(&r[3])));
        }
        for r in rows(
            &db,
            "SELECT customer_id, charged_cents, refunded_cents, charges FROM customer_totals",
        ) {
            assert!(
                totals
                    .insert(text(&r[0]), (int(&r[1]), int(&r[2]), int(&r[3])))
                    .is_none(),
                "a customer's totals live in one partition"
            );
        }
    }
    (payments, totals)
}

/// Creates the orders and payments topics and has the independent client
/// produce `events` generated orders; returns the model of what they make.
fn produce_orders(broker: &Broker, dir: &Path, events: usize, seed: u64) -> Model {
    broker.create_topic("orders", PARTITIONS as u32);
    broker.create_topic("payments", PARTITIONS as u32);
    let (lines, model) = generate(events, seed);
    let input = dir.join("input.jsonl");
    std::fs::write(&input, lines).unwrap();
    assert_eq!(
        kafka_client("produce", broker, "orders", &input),
        events as u64
    );
    model
}

fn header<'a>(record: &'a Json, name: &str) -> Option<&'a str> {
    record["headers"]
        .as_array()?
        .iter()
        .find(|h| h[0] == name)
        .and_then(|h| h[1].as_str())
}

fn read_back(broker: &Broker, topic: &str, dir: &Path) -> Vec<Json> {
    let file = dir.join(format!("{topic}.jsonl"));
    kafka_client("consume", broker, topic, &file);
    std::fs::read_to_string(&file)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn a_group_consumes_partitions_into_their_own_state_and_produces_outputs_and_dead_letters() {
    let broker = Broker::start();
    broker.create_topic("orders.dlq", 1);
    let dir = tempfile::tempdir().unwrap();
    let model = produce_orders(&broker, dir.path(), 100_000, 0x6b61_666b);

    let (state_dir, tapes) = (dir.path().join("state"), dir.path().join("tapes"));
    let out = kafka_run_verbose(&broker, "payments", &state_dir)
        .arg("--tape")
        .arg(&tapes)
        .args(["--dlq-topic", "orders.dlq", "--exit-at-end"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "rewind run failed: {stderr}");
    assert!(stderr.contains("processed 100000 events"), "{stderr}");
    // Invalid orders are rejected before any write: no batch is run again.
    for p in 0..PARTITIONS {
        let line = stderr
            .lines()
            .find(|l| l.starts_with(&format!("partition {p}: ")) && l.contains(" outputs"))
            .unwrap_or_else(|| panic!("no line for partition {p}: {stderr}"));
        assert!(
            line.contains(" dead-lettered") && !line.contains("redone"),
            "{line}"
        );
    }

    // The state, merged over the partitions, equals the model.
    let (payments, totals) = state(&state_dir);
    let want: BTreeMap<_, _> = model
        .payments
        .iter()
        .map(|(k, (c, a, s))| (k.clone(), (c.clone(), *a, s.to_string())))
        .collect();
    assert_eq!(payments.len(), want.len());
    assert!(payments == want, "payments differ from the model");
    assert!(
        totals == model.totals,
        "customer_totals differ from the model"
    );

    // Dead letters: exactly the malformed records, in the state and the DLQ topic.
    let mut dead = BTreeSet::new();
    for p in 0..PARTITIONS {
        let db = state_dir.join(format!("partition-{p}.db"));
        for r in rows(
            &db,
            r#"SELECT partition, "offset", error_class FROM _rewind_dlq"#,
        ) {
            assert_eq!(text(&r[2]), "invalid-input");
            dead.insert((int(&r[0]) as i32, int(&r[1])));
        }
        // Every output left the outbox.
        assert_eq!(
            rows(&db, "SELECT count(*) FROM _rewind_outbox")[0][0],
            Value::Integer(0)
        );
    }
    assert!(!model.malformed.is_empty());
    assert_eq!(dead, model.malformed);
    let dlq = read_back(&broker, "orders.dlq", dir.path());
    let mut dlq_positions = BTreeSet::new();
    for record in &dlq {
        assert_eq!(header(record, "rewind.error.class"), Some("invalid-input"));
        assert_eq!(header(record, "rewind.source.topic"), Some("orders"));
        assert!(header(record, "rewind.error.message").is_some_and(|m| !m.is_empty()));
        assert!(header(record, "rewind.module").is_some_and(|m| m.starts_with("sha256:")));
        assert_eq!(
            record["payload"], "{\"type\": \"order_completed\", oops",
            "raw payload kept"
        );
        let partition: i32 = header(record, "rewind.source.partition")
            .unwrap()
            .parse()
            .unwrap();
        let offset: i64 = header(record, "rewind.source.offset")
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(
            record["key"].as_str().map(|k| k.starts_with("c-")),
            Some(true),
            "raw key kept"
        );
        dlq_positions.insert((partition, offset));
    }
    assert_eq!(
        dlq.len(),
        model.malformed.len(),
        "one DLQ record per dead letter"
    );
    assert_eq!(dlq_positions, model.malformed);

    // The output topic holds every output once, each with its rewind-id.
    let outputs = read_back(&broker, "payments", dir.path());
    let ids: Vec<String> = outputs
        .iter()
        .map(|r| {
            header(r, "rewind-id")
                .expect("every output has a rewind-id")
                .to_owned()
        })
        .collect();
    let unique: BTreeSet<String> = ids.iter().cloned().collect();
    assert_eq!(ids.len(), unique.len(), "no output was produced twice");
    assert!(
        unique == model.outputs,
        "the outputs are not exactly the model's"
    );

    // Each partition's inputs are on its tape, and replaying it gives
    // exactly what the live run recorded.
    let info = Command::new(rewind_bin())
        .args(["tape", "info"])
        .arg(tapes.join("partition-0.tape"))
        .output()
        .unwrap();
    let info = String::from_utf8_lossy(&info.stdout);
    assert!(info.contains("orders/0"), "{info}");
    let verify = Command::new(rewind_bin())
        .arg("verify")
        .arg("--tape")
        .arg(tapes.join("partition-1.tape"))
        .arg("--processor")
        .arg(processor("payments-v2"))
        .arg("--cache-dir")
        .arg(cache_dir())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&verify.stdout);
    assert!(
        verify.status.success(),
        "verify: {said} {}",
        String::from_utf8_lossy(&verify.stderr)
    );
    assert!(said.contains("identical"), "{said}");
}

/// `rewind run` over Kafka into `state_dir` as group `group`.
fn kafka_run(broker: &Broker, group: &str, state_dir: &Path) -> Command {
    let mut command = kafka_run_verbose(broker, group, state_dir);
    command.arg("--quiet");
    command
}

/// As [`kafka_run`], saying what it does (assignments, closes) on stderr.
fn kafka_run_verbose(broker: &Broker, group: &str, state_dir: &Path) -> Command {
    let mut command = Command::new(rewind_bin());
    command
        .arg("run")
        .arg("--processor")
        .arg(processor("payments-v2"))
        .args([
            "--brokers",
            &broker.address(),
            "--topic",
            "orders",
            "--group",
            group,
        ])
        .arg("--state-dir")
        .arg(state_dir)
        .args(["--output-topic", "payments"])
        // A killed member leaves the group when its session times out.
        .args([
            "-X",
            "session.timeout.ms=6000",
            "-X",
            "heartbeat.interval.ms=500",
        ])
        .arg("--cache-dir")
        .arg(cache_dir());
    command
}

/// Runs `command` to success, killing it (and failing) after `limit`.
fn run_within(command: &mut Command, limit: std::time::Duration) {
    let mut child = command.spawn().unwrap();
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "{command:?} failed: {status}");
            return;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("{command:?} did not finish within {limit:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[test]
fn killed_three_times_mid_stream_the_state_equals_an_uninterrupted_run() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let model = produce_orders(&broker, dir.path(), 40_000, 0x6b69_6c6c);
    let total: i64 = model.ends.iter().sum();

    let whole = dir.path().join("whole");
    let limit = std::time::Duration::from_secs(180);
    run_within(
        kafka_run(&broker, "whole", &whole).arg("--exit-at-end"),
        limit,
    );

    let killed = dir.path().join("killed");
    // Each kill lands once the killed state has committed a further part of
    // the stream (15-30%, 40-55%, 65-80%), a few milliseconds later: mid-stream
    // however fast the machine.
    let mut rng = XorShift(0x4b11);
    for (i, start) in [15, 40, 65].into_iter().enumerate() {
        if i > 0 {
            // The killed member holds its partitions until its session
            // times out; only then is the next one given all of them.
            std::thread::sleep(std::time::Duration::from_secs(7));
        }
        let percent = start + rng.below(16) as i64;
        let mut child = kafka_run(&broker, "killed", &killed)
            .arg("--exit-at-end")
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + limit;
        let landed = kill_when(
            &mut child,
            || {
                stored_offsets(&killed) >= total * percent / 100
                    || std::time::Instant::now() > deadline
            },
            std::time::Duration::from_millis(rng.below(20)),
        );
        let committed = stored_offsets(&killed);
        assert!(
            landed && committed < total,
            "kill {i} missed the stream: {committed} of {total} events committed"
        );
    }
    // The killed members leave the group when their sessions time out;
    // until then they hold partitions, and --exit-at-end covers only what
    // this member was assigned.
    std::thread::sleep(std::time::Duration::from_secs(7));
    run_within(
        kafka_run(&broker, "killed", &killed).arg("--exit-at-end"),
        limit,
    );

    for p in 0..PARTITIONS {
        let name = format!("partition-{p}.db");
        assert_eq!(
            dump_hash(&killed.join(&name)),
            dump_hash(&whole.join(&name)),
            "partition {p} differs from the uninterrupted run"
        );
    }
    // The state directories compare as one state, partition by partition.
    let diff = Command::new(rewind_bin())
        .arg("diff")
        .arg(&whole)
        .arg(&killed)
        .output()
        .unwrap();
    assert_eq!(
        diff.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&diff.stdout)
    );
    let inspect = Command::new(rewind_bin())
        .args(["inspect", "--state"])
        .arg(&killed)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&inspect.stdout);
    assert_eq!(
        said.matches("module        sha256:").count(),
        PARTITIONS as usize,
        "{said}"
    );
    // Outputs: both runs produced to one topic. Every output of the model is
    // there; a duplicate is a copy (same rewind-id, same payload).
    let outputs = read_back(&broker, "payments", dir.path());
    let mut by_id: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for record in &outputs {
        let id = header(record, "rewind-id").expect("every output has a rewind-id");
        by_id
            .entry(id.to_owned())
            .or_default()
            .insert(record["payload"].to_string());
    }
    let ids: BTreeSet<String> = by_id.keys().cloned().collect();
    assert!(ids == model.outputs, "an output is missing or unexpected");
    assert!(
        by_id.values().all(|payloads| payloads.len() == 1),
        "outputs sharing a rewind-id differ"
    );
}

/// The next offset stored in a partition's state DB (0 before any commit).
fn stored_offset(db: &Path) -> i64 {
    if !db.exists() {
        return 0;
    }
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    conn.query_row("SELECT next_offset FROM _rewind_offsets", [], |r| r.get(0))
        .unwrap_or(0)
}

/// The next offsets the partition DBs under `state_dir` have committed,
/// summed: events consumed, as a reader beside the live run sees them.
fn stored_offsets(state_dir: &Path) -> i64 {
    (0..PARTITIONS)
        .map(|p| stored_offset(&state_dir.join(format!("partition-{p}.db"))))
        .sum()
}

/// Ctrl-C: the run commits and leaves the group.
fn interrupt(child: &mut std::process::Child) -> std::process::ExitStatus {
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    child.wait().unwrap()
}

#[test]
fn a_second_process_joins_and_leaves_mid_stream_and_the_state_equals_one_process() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let model = produce_orders(&broker, dir.path(), 100_000, 0x7265_6261);

    let limit = std::time::Duration::from_secs(180);
    let whole = dir.path().join("whole");
    run_within(
        kafka_run(&broker, "whole", &whole).arg("--exit-at-end"),
        limit,
    );

    // Two processes of one group share one state directory.
    let shared = dir.path().join("shared");
    let mut first = kafka_run_verbose(&broker, "shared", &shared)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let mut second = kafka_run_verbose(&broker, "shared", &shared)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // It leaves (Ctrl-C) soon after its first assignment.
    let lines = std::io::BufRead::lines(std::io::BufReader::new(second.stderr.take().unwrap()));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut said = Vec::new();
    while !said.iter().any(|l: &String| l.contains("assigned")) {
        let wait = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(wait) {
            Ok(line) => said.push(line),
            Err(_) => panic!("the second process never got a partition: {said:?}"),
        }
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    let left = interrupt(&mut second);
    assert_eq!(left.code(), Some(130), "{said:?}");
    // The first process takes everything back and finishes.
    let deadline = std::time::Instant::now() + limit;
    while (0..PARTITIONS)
        .any(|p| stored_offset(&shared.join(format!("partition-{p}.db"))) < model.ends[p as usize])
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the group did not finish"
        );
        assert!(
            first.try_wait().unwrap().is_none(),
            "the first process stopped"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    interrupt(&mut first);
    let mut said = String::new();
    std::io::Read::read_to_string(first.stderr.as_mut().unwrap(), &mut said).unwrap();
    // It handed its partitions over when the second joined, and closed
    // them again at the end.
    assert!(
        said.matches("closed after").count() > PARTITIONS as usize,
        "the first process never handed a partition over: {said}"
    );

    for p in 0..PARTITIONS {
        let name = format!("partition-{p}.db");
        assert_eq!(
            dump_hash(&shared.join(&name)),
            dump_hash(&whole.join(&name)),
            "partition {p} differs from the single-process run"
        );
    }
}

#[test]
fn the_broker_restarts_mid_stream_and_the_run_waits_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let storage = dir.path().join("broker");
    std::fs::create_dir(&storage).unwrap();
    let mut broker = Broker::start_durable(&storage);
    let model = produce_orders(&broker, dir.path(), 10_000, 0x6272_6b72);

    let state_dir = dir.path().join("state");
    // Small batches: the first commit comes long before the stream's end
    // however fast the machine (a default batch commits after 500 ms, by
    // when a fast run has consumed the whole stream).
    let mut run = kafka_run(&broker, "outage", &state_dir)
        .args(["--batch-size", "512"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let progress = || stored_offsets(&state_dir);
    // Stop the broker once the run is under way, for longer than a batch.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while progress() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the run never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    broker.stop();
    let during = progress();
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert!(
        run.try_wait().unwrap().is_none(),
        "the run gave up during the outage"
    );
    broker.restart();

    let total: i64 = model.ends.iter().sum();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(180);
    while progress() < total {
        assert!(
            std::time::Instant::now() < deadline,
            "the run did not resume: {} of {total}",
            progress()
        );
        assert!(run.try_wait().unwrap().is_none(), "the run stopped");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert!(
        during < total,
        "the outage came after the end of the stream"
    );
    interrupt(&mut run);

    let (payments, totals) = state(&state_dir);
    let want: BTreeMap<_, _> = model
        .payments
        .iter()
        .map(|(k, (c, a, s))| (k.clone(), (c.clone(), *a, s.to_string())))
        .collect();
    assert!(payments == want, "payments differ from the model");
    assert!(
        totals == model.totals,
        "customer_totals differ from the model"
    );
    let outputs = read_back(&broker, "payments", dir.path());
    let ids: BTreeSet<String> = outputs
        .iter()
        .map(|r| header(r, "rewind-id").unwrap().to_owned())
        .collect();
    assert!(ids == model.outputs, "an output is missing or unexpected");
}

/// The parts of a replay report that do not depend on how events were
/// numbered: summary counts, every differing row with the positions of the
/// events that caused it, output and dead-letter differences.
fn comparable(report: &Json) -> Json {
    let mut tables: Vec<Json> = report["tables"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            let mut rows: Vec<Json> = t["rows"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| {
                    let mut positions = r["caused_by_positions"].as_array().unwrap().clone();
                    positions.sort_by_key(|p| (p["partition"].as_i64(), p["offset"].as_i64()));
                    json!([r["key"], r["change"], r["columns"], positions])
                })
                .collect();
            rows.sort_by_key(|r| r.to_string());
            json!([t["name"], t["added"], t["removed"], t["changed"], rows])
        })
        .collect();
    tables.sort_by_key(|t| t.to_string());
    let dead = |side: &str| {
        let mut d: Vec<Json> = report["dead_letters"][side]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| json!([d["partition"], d["offset"], d["class"]]))
            .collect();
        d.sort_by_key(|d| d.to_string());
        d
    };
    json!({
        "events": report["summary"]["events"],
        "diverged_events": report["summary"]["diverged_events"],
        "tables": tables,
        "outputs": report["outputs"]["diverged_events"],
        "dead_only_old": dead("only_old"),
        "dead_only_new": dead("only_new"),
    })
}

fn replay_report(tape: &Path, json_out: &Path) -> Json {
    let out = Command::new(rewind_bin())
        .args(["replay", "--quiet", "--tape"])
        .arg(tape)
        .arg("--old")
        .arg(processor("payments-v1"))
        .arg("--new")
        .arg(processor("payments-v2"))
        .arg("--json")
        .arg(json_out)
        .arg("--cache-dir")
        .arg(cache_dir())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "v1 and v2 differ on re-deliveries: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&std::fs::read_to_string(json_out).unwrap()).unwrap()
}

#[test]
fn tapes_recorded_from_kafka_replay_to_the_report_of_the_same_events_from_a_file() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    produce_orders(&broker, dir.path(), 20_000, 0x7461_7065);
    let tapes = dir.path().join("tapes");
    let limit = std::time::Duration::from_secs(180);
    run_within(
        kafka_run(&broker, "live", &dir.path().join("state"))
            .arg("--tape")
            .arg(&tapes)
            .arg("--exit-at-end"),
        limit,
    );

    // The same events as a kcat -J dump, partition after partition.
    let mut next = [0i64; PARTITIONS as usize];
    let mut dump: Vec<(i64, i64, String)> = Vec::new();
    for line in std::fs::read_to_string(dir.path().join("input.jsonl"))
        .unwrap()
        .lines()
    {
        let r: Json = serde_json::from_str(line).unwrap();
        let p = r["partition"].as_i64().unwrap();
        let offset = next[p as usize];
        next[p as usize] += 1;
        let envelope = json!({"topic": "orders", "partition": p, "offset": offset,
            "tstype": "create", "ts": r["timestamp"], "broker": 0,
            "key": r["key"], "payload": r["payload"]});
        dump.push((p, offset, envelope.to_string()));
    }
    dump.sort();
    let dump_file = dir.path().join("dump.jsonl");
    let text: String = dump.into_iter().map(|(_, _, l)| l + "\n").collect();
    std::fs::write(&dump_file, text).unwrap();
    let file_tape = dir.path().join("file.tape");
    let status = Command::new(rewind_bin())
        .args(["tape", "import"])
        .arg(&dump_file)
        .arg("--out")
        .arg(&file_tape)
        .status()
        .unwrap();
    assert!(status.success());

    let from_kafka = replay_report(&tapes, &dir.path().join("kafka.json"));
    let from_file = replay_report(&file_tape, &dir.path().join("file.json"));
    let (a, b) = (comparable(&from_kafka), comparable(&from_file));
    assert!(a["diverged_events"].as_u64() > Some(0));
    assert_eq!(a["events"], 20_000);
    let caused = from_kafka["tables"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|t| t["rows"].as_array().unwrap())
        .filter(|r| !r["caused_by_positions"].as_array().unwrap().is_empty())
        .count();
    assert!(caused > 0, "no row names the events that caused it");
    assert!(a == b, "the reports differ:\nkafka {a:#}\nfile {b:#}");
}
