//! Kafka, against a real broker (tansu) started by the test: `rewind
//! produce` re-produces dumps byte-exact and never produces garbage.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use rewind_host::Header;
use rewind_tests::{Broker, rewind_bin};

/// One record as a consumer sees it.
type Seen = (Option<Vec<u8>>, Option<Vec<u8>>, Vec<Header>, Option<i64>);

/// Reads `expected` records from every partition of `topic`, from the start,
/// with a plain rdkafka consumer (not rewind's code).
fn consume(
    broker: &Broker,
    topic: &str,
    partitions: i32,
    expected: usize,
) -> BTreeMap<i32, Vec<Seen>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", broker.address())
        .set("group.id", "rewind-tests-reader")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut assignment = TopicPartitionList::new();
    for p in 0..partitions {
        assignment
            .add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&assignment).unwrap();
    let mut seen: BTreeMap<i32, Vec<Seen>> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.values().map(Vec::len).sum::<usize>() < expected {
        assert!(Instant::now() < deadline, "only {seen:?} arrived");
        let Some(message) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let m = message.unwrap();
        let headers = m
            .headers()
            .map(|hs| {
                hs.iter()
                    .map(|h| Header {
                        name: h.key.to_owned(),
                        value: h.value.map(<[u8]>::to_vec),
                    })
                    .collect()
            })
            .unwrap_or_default();
        seen.entry(m.partition()).or_default().push((
            m.key().map(<[u8]>::to_vec),
            m.payload().map(<[u8]>::to_vec),
            headers,
            m.timestamp().to_millis(),
        ));
    }
    seen
}

/// A kcat -J line, with raw bytes written as kcat does.
fn line(
    partition: i32,
    offset: i64,
    ts: i64,
    headers: &[Header],
    key: Option<&[u8]>,
    payload: Option<&[u8]>,
) -> Vec<u8> {
    let position = rewind_host::Position {
        stream: "orders".into(),
        partition,
        offset,
    };
    rewind_host::tapes::export_line(&rewind_host::TapeEvent {
        seq: 0,
        position,
        timestamp_ms: Some(ts),
        key: key.map(<[u8]>::to_vec),
        payload: payload.map(<[u8]>::to_vec),
        headers: headers.to_vec(),
        malformed: None,
        result: None,
    })
}

/// `produce` from a kcat-style dump with a truncated line and an invalid
/// line: the valid records arrive byte-identical (keys, null keys, headers
/// with null values, tombstones, bytes that are not UTF-8, timestamps, the
/// partitions they came from); the invalid ones are reported and skipped,
/// and the exit code says so unless --skip-invalid.
#[test]
fn produce_sends_valid_records_byte_exact_and_reports_the_rest() {
    let broker = Broker::start();
    broker.create_topic("orders", 3);
    let dir = tempfile::tempdir().unwrap();
    let mut dump = Vec::new();
    let mut expected: BTreeMap<i32, Vec<Seen>> = BTreeMap::new();
    for i in 0..60i64 {
        let partition = (i % 3) as i32;
        let headers = match i % 4 {
            0 => vec![],
            1 => vec![Header {
                name: "rewind-id".into(),
                value: Some(format!("x/{i}").into_bytes()),
            }],
            2 => vec![Header {
                name: "trace".into(),
                value: None,
            }],
            _ => vec![Header {
                name: "bin".into(),
                value: Some(vec![0xff, 0, b'\n']),
            }],
        };
        let key = (i % 5 != 0).then(|| format!("k-{i}").into_bytes());
        let payload: Option<Vec<u8>> = match i % 7 {
            0 => None,
            1 => Some(vec![0xfe, b'"', 0x80]),
            _ => Some(format!(r#"{{"type":"order_completed","order_id":"o-{i}"}}"#).into_bytes()),
        };
        let ts = 1_700_000_000_000 + i;
        dump.extend(line(
            partition,
            i,
            ts,
            &headers,
            key.as_deref(),
            payload.as_deref(),
        ));
        expected
            .entry(partition)
            .or_default()
            .push((key, payload, headers, Some(ts)));
        if i == 20 {
            dump.extend_from_slice(
                b"{\"topic\":\"orders\",\"partition\":1,\"offset\":99,\"key\":\"tr\n",
            );
        }
        if i == 40 {
            dump.extend_from_slice(b"definitely not json\n");
        }
    }
    let path = dir.path().join("dump.jsonl");
    std::fs::write(&path, &dump).unwrap();

    let produce = |extra: &[&str]| {
        Command::new(rewind_bin())
            .args([
                "produce",
                "--brokers",
                &broker.address(),
                "--topic",
                "orders",
            ])
            .args(["--keep-partitions", "--from"])
            .arg(&path)
            .args(extra)
            .output()
            .unwrap()
    };
    let out = produce(&[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("line 22") && stderr.contains("line 43"),
        "{stderr}"
    );
    assert!(
        stderr.contains("produced 60 records") && stderr.contains("skipped 2"),
        "{stderr}"
    );

    let seen = consume(&broker, "orders", 3, 60);
    assert_eq!(seen, expected);

    // --skip-invalid: the same records again, exit 0.
    let out = produce(&["--skip-invalid"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
