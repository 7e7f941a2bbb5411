//! The Kafka part of `cargo xtask bench`: `rewind run --brokers` end to end
//! (consume → process → commit → produce) against the raw consume rate of a
//! plain rdkafka consumer on the same topic, in the same run, on a local
//! tansu broker kept in memory.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{Offset, TopicPartitionList};

const PARTITIONS: i32 = 3;

/// A tansu broker for the bench, stopped on drop.
struct Broker(Child);

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn run(bin: &Path, processor: &Path, input: &Path, dir: &Path, events: usize) -> Result<()> {
    let tansu = crate::broker::tansu()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let url = format!("tcp://127.0.0.1:{port}");
    let _broker = Broker(crate::broker::spawn(
        &tansu,
        port,
        Stdio::null(),
        Stdio::null(),
    )?);
    crate::broker::wait_for_port(port, Duration::from_secs(30))?;
    for topic in ["orders", "payments"] {
        let status = Command::new(&tansu)
            .args([
                "topic",
                "create",
                topic,
                "--partitions",
                &PARTITIONS.to_string(),
            ])
            .args(["--broker", &url])
            .status()?;
        if !status.success() {
            bail!("creating topic {topic} failed");
        }
    }
    let brokers = format!("127.0.0.1:{port}");
    let started = Instant::now();
    let status = Command::new(bin)
        .args([
            "produce",
            "--brokers",
            &brokers,
            "--topic",
            "orders",
            "--from",
        ])
        .arg(input)
        .stderr(Stdio::null())
        .status()?;
    if !status.success() {
        bail!("rewind produce failed ({status})");
    }
    println!(
        "kafka: produced {events} events in {:.2}s",
        started.elapsed().as_secs_f64()
    );

    let raw = raw_consume(&brokers, events)?;
    let started = Instant::now();
    let status = Command::new(bin)
        .arg("run")
        .arg("--processor")
        .arg(processor)
        .args([
            "--brokers",
            &brokers,
            "--topic",
            "orders",
            "--group",
            "bench",
        ])
        .arg("--state-dir")
        .arg(dir.join("kafka-state"))
        .args(["--output-topic", "payments", "--exit-at-end", "--quiet"])
        .arg("--cache-dir")
        .arg(dir.join("cache"))
        .stderr(Stdio::null())
        .status()?;
    if !status.success() {
        bail!("rewind run --brokers failed ({status})");
    }
    let end_to_end = started.elapsed();
    let rate = |t: Duration| events as f64 / t.as_secs_f64();
    println!(
        "kafka raw consume (rdkafka):  {:>9.0} events/s  ({:.2}s)",
        rate(raw),
        raw.as_secs_f64()
    );
    println!(
        "kafka rewind end to end:      {:>9.0} events/s  ({:.2}s; consume, process, commit, produce)",
        rate(end_to_end),
        end_to_end.as_secs_f64()
    );
    println!(
        "kafka end to end / raw consume: {:.0}% (goal >= 50%)",
        100.0 * raw.as_secs_f64() / end_to_end.as_secs_f64()
    );
    Ok(())
}

/// Reads every record of `orders` with a plain consumer; the time it took.
fn raw_consume(brokers: &str, events: usize) -> Result<Duration> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "bench-raw")
        .set("enable.auto.commit", "false")
        .create()?;
    let mut assignment = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        assignment.add_partition_offset("orders", p, Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;
    let started = Instant::now();
    let mut seen = 0;
    while seen < events {
        if started.elapsed() > Duration::from_secs(600) {
            bail!("the raw consumer read only {seen} of {events} records");
        }
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(_)) => seen += 1,
            Some(Err(KafkaError::PartitionEOF(_))) | None => {}
            Some(Err(e)) => bail!("raw consume: {e}"),
        }
    }
    Ok(started.elapsed())
}
