//! Payments v1 and v2 over a generated stream, checked row by row against an
//! independent model of DESIGN.md's payments rules.

use std::collections::BTreeMap;
use std::path::Path;

use rewind_tests::{XorShift, config, envelope, int, processor, rows, text};
use rusqlite::types::Value;

const BASE_TS: i64 = 1_700_000_000_000;

#[derive(Default)]
struct Model {
    /// order → (customer, amount, currency, status, updated_at)
    payments: BTreeMap<String, (String, i64, String, &'static str, i64)>,
    /// customer → (charged, refunded, charges)
    totals: BTreeMap<String, (i64, i64, i64)>,
    /// (stream, offset, class)
    dead: Vec<(String, i64, String)>,
    outputs: u64,
}

enum Line {
    Completed {
        order: String,
        customer: String,
        amount: i64,
        currency: String,
    },
    Cancelled {
        order: String,
    },
    Invalid,
    Malformed,
}

/// The stream: kcat envelopes for well-formed JSON, raw garbage otherwise.
fn generate(events: usize, seed: u64) -> (Vec<u8>, Vec<(i64, i64, Line)>) {
    let mut rng = XorShift(seed);
    let mut file = Vec::new();
    let mut lines = Vec::new();
    let mut completed: Vec<String> = Vec::new();
    let mut next_order = 0;
    for i in 0..events {
        let line_no = i as i64 + 1;
        let offset = i as i64;
        let ts = BASE_TS + offset * 1000;
        let roll = rng.below(100);
        let (payload, line) = if roll < 55 || completed.is_empty() {
            let order = format!("o-{next_order}");
            next_order += 1;
            let customer = format!("c-{}", rng.below(40));
            let amount = 100 + rng.below(5000) as i64;
            let currency = ["EUR", "USD"][rng.below(2) as usize].to_owned();
            let payload = format!(
                r#"{{"type":"order_completed","order_id":"{order}","customer_id":"{customer}","amount_cents":{amount},"currency":"{currency}"}}"#
            );
            completed.push(payload.clone());
            (
                Some(payload),
                Line::Completed {
                    order,
                    customer,
                    amount,
                    currency,
                },
            )
        } else if roll < 70 {
            // A re-delivered order: the same payload again, at a new offset.
            let payload = completed[rng.below(completed.len() as u64) as usize].clone();
            let v: serde_json::Value = serde_json::from_str(&payload).unwrap();
            let s = |k: &str| v[k].as_str().unwrap().to_owned();
            let line = Line::Completed {
                order: s("order_id"),
                customer: s("customer_id"),
                amount: v["amount_cents"].as_i64().unwrap(),
                currency: s("currency"),
            };
            (Some(payload), line)
        } else if roll < 85 {
            let order = format!("o-{}", rng.below(next_order + 2));
            (
                Some(format!(
                    r#"{{"type":"order_cancelled","order_id":"{order}"}}"#
                )),
                Line::Cancelled { order },
            )
        } else if roll < 89 {
            (
                Some(r#"{"type":"order_shipped","order_id":"o-1"}"#.to_owned()),
                Line::Invalid,
            )
        } else if roll < 93 {
            (
                Some(
                    r#"{"type":"order_completed","order_id":"o-x","customer_id":"c-1"}"#.to_owned(),
                ),
                Line::Invalid,
            )
        } else if roll < 95 {
            (Some("not even json".to_owned()), Line::Invalid)
        } else if roll < 98 {
            file.extend_from_slice(b"{\"topic\":\"orders\",\"partition\":0,\"offs\n");
            lines.push((line_no, offset, Line::Malformed));
            continue;
        } else {
            file.extend_from_slice(b"{\"type\":\"\xc3\x28\"}\n");
            lines.push((line_no, offset, Line::Malformed));
            continue;
        };
        let payload = payload.expect("every other case has a payload");
        file.extend_from_slice(envelope("orders", offset, ts, "k", &payload).as_bytes());
        file.push(b'\n');
        lines.push((line_no, offset, line));
    }
    (file, lines)
}

fn model(lines: &[(i64, i64, Line)], idempotent: bool) -> Model {
    let mut m = Model::default();
    for (line_no, offset, line) in lines {
        let ts = BASE_TS + offset * 1000;
        match line {
            Line::Completed {
                order,
                customer,
                amount,
                currency,
            } => {
                if idempotent && m.payments.contains_key(order) {
                    continue;
                }
                m.payments.insert(
                    order.clone(),
                    (customer.clone(), *amount, currency.clone(), "charged", ts),
                );
                let t = m.totals.entry(customer.clone()).or_default();
                t.0 += amount;
                t.2 += 1;
                m.outputs += 1;
            }
            Line::Cancelled { order } => match m.payments.get_mut(order) {
                Some(p) if p.3 == "charged" => {
                    p.3 = "refunded";
                    p.4 = ts;
                    m.totals.get_mut(&p.0).unwrap().1 += p.1;
                    m.outputs += 1;
                }
                _ => m
                    .dead
                    .push(("orders".into(), *offset, "invalid-input".into())),
            },
            Line::Invalid => m
                .dead
                .push(("orders".into(), *offset, "invalid-input".into())),
            Line::Malformed => m
                .dead
                .push(("orders.jsonl".into(), *line_no, "malformed".into())),
        }
    }
    m
}

fn check(db: &Path, expected: &Model) {
    let payments: BTreeMap<String, (String, i64, String, String, i64)> = rows(
        db,
        "SELECT order_id, customer_id, amount_cents, currency, status, updated_at_ms, gateway_ref FROM payments",
    )
    .into_iter()
    .map(|r| {
        let gateway = text(&r[6]);
        assert!(
            gateway.len() == 19 && gateway.starts_with("gw_") && gateway[3..].bytes().all(|b| b.is_ascii_hexdigit()),
            "gateway_ref {gateway:?} is not gw_ + 16 hex digits"
        );
        (text(&r[0]), (text(&r[1]), int(&r[2]), text(&r[3]), text(&r[4]), int(&r[5])))
    })
    .collect();
    let want: BTreeMap<_, _> = expected
        .payments
        .iter()
        .map(|(k, (c, a, cur, s, ts))| {
            (k.clone(), (c.clone(), *a, cur.clone(), s.to_string(), *ts))
        })
        .collect();
    assert_eq!(payments, want, "payments rows differ from the model");

    let totals: BTreeMap<String, (i64, i64, i64)> = rows(
        db,
        "SELECT customer_id, charged_cents, refunded_cents, charges FROM customer_totals",
    )
    .into_iter()
    .map(|r| (text(&r[0]), (int(&r[1]), int(&r[2]), int(&r[3]))))
    .collect();
    assert_eq!(
        totals, expected.totals,
        "customer_totals differ from the model"
    );

    let dead: Vec<(String, i64, String)> = rows(
        db,
        r#"SELECT stream, "offset", error_class FROM _rewind_dlq ORDER BY seq"#,
    )
    .into_iter()
    .map(|r| (text(&r[0]), int(&r[1]), text(&r[2])))
    .collect();
    assert_eq!(
        dead, expected.dead,
        "dead letters are not exactly the malformed and invalid events"
    );
}

#[test]
fn v1_and_v2_match_the_model_row_for_row() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("orders.jsonl");
    let (file, lines) = generate(4000, 0xfeed_beef);
    std::fs::write(&input, file).unwrap();

    for (name, idempotent) in [("payments-v1", false), ("payments-v2", true)] {
        let state = dir.path().join(format!("{name}.db"));
        let summary = rewind_host::run(&config(&processor(name), &input, &state), &()).unwrap();
        let expected = model(&lines, idempotent);
        check(&state, &expected);
        assert_eq!(summary.consumed, lines.len() as u64);
        assert_eq!(summary.dead_lettered, expected.dead.len() as u64);
        assert_eq!(
            summary.outputs, expected.outputs,
            "{name} emitted the wrong number of outputs"
        );
    }

    // The bug is visible: v1 charged re-delivered orders again.
    let v1 = model(&lines, false);
    let v2 = model(&lines, true);
    assert!(
        v1.totals.values().map(|t| t.2).sum::<i64>() > v2.totals.values().map(|t| t.2).sum::<i64>()
    );
}

#[test]
fn outputs_are_the_payment_rows_with_deterministic_ids() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("orders.jsonl");
    let (file, _) = generate(300, 7);
    std::fs::write(&input, file).unwrap();
    let state = dir.path().join("p.db");
    let output = dir.path().join("payments.jsonl");
    let mut cfg = config(&processor("payments-v2"), &input, &state);
    cfg.output = Some(output.clone());
    rewind_host::run(&cfg, &()).unwrap();

    let written = std::fs::read_to_string(&output).unwrap();
    let mut last_by_order: BTreeMap<String, serde_json::Value> = BTreeMap::new();
    for (n, line) in written.lines().enumerate() {
        let envelope: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(envelope["topic"], "payments");
        assert_eq!(envelope["offset"], n as i64);
        assert_eq!(envelope["headers"][0], "rewind-id");
        assert!(
            envelope["headers"][1]
                .as_str()
                .unwrap()
                .starts_with("orders/0@")
        );
        let payload: serde_json::Value =
            serde_json::from_str(envelope["payload"].as_str().unwrap()).unwrap();
        assert_eq!(envelope["key"], payload["order_id"]);
        last_by_order.insert(payload["order_id"].as_str().unwrap().to_owned(), payload);
    }
    // The last state event per order is the payment row.
    let db_rows = rows(
        &state,
        "SELECT order_id, status, gateway_ref, amount_cents FROM payments",
    );
    assert_eq!(db_rows.len(), last_by_order.len());
    for r in db_rows {
        let p = &last_by_order[&text(&r[0])];
        assert_eq!(p["status"], text(&r[1]));
        assert_eq!(p["gateway_ref"], text(&r[2]));
        assert_eq!(p["amount_cents"], int(&r[3]));
    }
    // Nothing is left in the outbox once delivered.
    assert_eq!(
        rows(&state, "SELECT count(*) FROM _rewind_outbox")[0][0],
        Value::Integer(0)
    );
}

/// Re-produced events carry their original event id (`rewind-id`, the id
/// rewind puts on its outputs): they are skipped and counted, so even v1
/// does not charge them twice. Without the header, a re-delivery is a new event.
#[test]
fn reproduced_events_with_a_known_event_id_are_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let order = r#"{"type":"order_completed","order_id":"o-1","customer_id":"c-1","amount_cents":100,"currency":"EUR"}"#;
    let with_id = |offset: i64, id: &str| {
        serde_json::json!({
            "topic": "orders", "partition": 0, "offset": offset, "ts": 5,
            "headers": ["rewind-id", id], "key": "o-1", "payload": order,
        })
        .to_string()
    };
    let lines = [
        with_id(0, "upstream/0@7/0"),
        with_id(1, "upstream/0@7/0"), // re-produced after an outage
        envelope("orders", 2, 5, "o-1", order), // re-delivered without an id
    ];
    let input = dir.path().join("orders.jsonl");
    std::fs::write(&input, lines.join("\n")).unwrap();

    let state = dir.path().join("v1.db");
    let summary =
        rewind_host::run(&config(&processor("payments-v1"), &input, &state), &()).unwrap();
    assert_eq!(
        (summary.consumed, summary.applied, summary.duplicates),
        (3, 2, 1)
    );
    assert_eq!(
        rows(&state, "SELECT charges FROM customer_totals")[0][0],
        Value::Integer(2)
    );

    // With deduplication off, v1 charges all three.
    let state = dir.path().join("v1-all.db");
    let mut cfg = config(&processor("payments-v1"), &input, &state);
    cfg.dedup_header = None;
    let summary = rewind_host::run(&cfg, &()).unwrap();
    assert_eq!((summary.applied, summary.duplicates), (3, 0));
    assert_eq!(
        rows(&state, "SELECT charges FROM customer_totals")[0][0],
        Value::Integer(3)
    );
}
