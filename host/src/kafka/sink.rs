//! The Kafka sink: produces outbox rows with an idempotent producer; rows
//! leave the outbox only once the broker acknowledged them (and every row
//! before them), so they are safely in Kafka.

use std::collections::{HashSet, VecDeque};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header as KafkaHeader, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};

use crate::pipeline::DLQ_STREAM;
use crate::sink::{ID_HEADER, Sink, SinkError, Slot};
use crate::state::{OutboxRow, SinkMark};

/// Produces outputs (to `output_topic`, or the topic their stream names)
/// and dead letters (to `dlq_topic`). Sending does not wait: rows become
/// durable as the broker acknowledges them, in the order they were sent.
pub struct KafkaSink {
    brokers: String,
    producer: BaseProducer<Deliveries>,
    output_topic: Option<String>,
    dlq_topic: Option<String>,
    /// Packed slots sent and not yet reported durable, in send order.
    in_flight: VecDeque<u64>,
}

/// What the delivery callbacks reported.
#[derive(Default)]
struct Acks {
    delivered: HashSet<u64>,
    failed: u64,
    first_failure: Option<String>,
}

#[derive(Default)]
struct Deliveries(Mutex<Acks>);

impl Deliveries {
    fn acks(&self) -> std::sync::MutexGuard<'_, Acks> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl rdkafka::ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = usize;
    fn delivery(&self, result: &DeliveryResult<'_>, slot: usize) {
        let mut acks = self.acks();
        match result {
            Ok(_) => {
                acks.delivered.insert(slot as u64);
            }
            Err((error, _)) => {
                acks.failed += 1;
                acks.first_failure.get_or_insert_with(|| error.to_string());
            }
        }
    }
}

fn pack((seq, n): Slot) -> u64 {
    (seq << 16) | u64::from(n)
}

fn unpack(slot: u64) -> Slot {
    (slot >> 16, (slot & 0xffff) as u32)
}

impl KafkaSink {
    pub fn new(
        brokers: &str,
        settings: &[(String, String)],
        output_topic: Option<String>,
        dlq_topic: Option<String>,
    ) -> Result<KafkaSink, SinkError> {
        let mut client = ClientConfig::new();
        client
            .set("bootstrap.servers", brokers)
            .set("enable.idempotence", "true")
            .set("linger.ms", "5");
        // Consumer settings given with -X do not apply to the producer.
        for (key, value) in settings {
            if !matches!(
                key.as_str(),
                "group.id"
                    | "auto.offset.reset"
                    | "enable.auto.commit"
                    | "enable.auto.offset.store"
            ) && !key.starts_with("partition.assignment")
                && !key.starts_with("session.")
                && !key.starts_with("max.poll")
                && !key.starts_with("fetch.")
            {
                client.set(key, value);
            }
        }
        let producer = client
            .create_with_context(Deliveries::default())
            .map_err(|e| SinkError::Kafka {
                brokers: brokers.to_owned(),
                message: e.to_string(),
            })?;
        Ok(KafkaSink {
            brokers: brokers.to_owned(),
            producer,
            output_topic,
            dlq_topic,
            in_flight: VecDeque::new(),
        })
    }

    fn error(&self, message: String) -> SinkError {
        SinkError::Kafka {
            brokers: self.brokers.clone(),
            message,
        }
    }

    /// The topic of a row; `None` for a dead letter without a DLQ topic.
    fn topic<'r>(&'r self, row: &'r OutboxRow) -> Option<&'r str> {
        if row.output.stream == DLQ_STREAM {
            self.dlq_topic.as_deref()
        } else {
            Some(
                self.output_topic
                    .as_deref()
                    .unwrap_or(row.output.stream.as_str()),
            )
        }
    }
}

impl Sink for KafkaSink {
    fn send(&mut self, rows: Vec<OutboxRow>) -> Result<(), SinkError> {
        for row in &rows {
            let slot = pack((row.seq, row.n));
            self.in_flight.push_back(slot);
            // Dead letters queued by a run with --dlq-topic, now continued
            // without one: they stay in the state's dead-letter table.
            let Some(topic) = self.topic(row) else {
                self.producer.context().acks().delivered.insert(slot);
                continue;
            };
            let mut headers =
                OwnedHeaders::new_with_capacity(row.output.headers.len() + 1).insert(KafkaHeader {
                    key: ID_HEADER,
                    value: Some(row.id.as_bytes()),
                });
            for h in &row.output.headers {
                headers = headers.insert(KafkaHeader {
                    key: &h.name,
                    value: h.value.as_deref(),
                });
            }
            let mut record: BaseRecord<'_, [u8], [u8], usize> =
                BaseRecord::with_opaque_to(topic, slot as usize).headers(headers);
            if let Some(key) = row.output.key.as_deref() {
                record = record.key(key);
            }
            if let Some(payload) = row.output.payload.as_deref() {
                record = record.payload(payload);
            }
            if let Some(ts) = row.timestamp_ms {
                record = record.timestamp(ts);
            }
            loop {
                match self.producer.send(record) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        self.producer.poll(Duration::from_millis(50));
                        record = back;
                    }
                    Err((error, _)) => {
                        return Err(self.error(format!("producing to {topic}: {error}")));
                    }
                }
            }
        }
        self.producer.poll(Duration::ZERO);
        Ok(())
    }

    fn durable(&mut self, wait: bool) -> Result<Option<(Slot, Option<SinkMark>)>, SinkError> {
        if wait {
            // While the broker is away the producer keeps retrying (up to
            // its message.timeout.ms).
            let mut waited = 0u32;
            while self.producer.flush(Duration::from_secs(5)).is_err() {
                waited += 5;
                if waited % 30 == 5 {
                    eprintln!(
                        "kafka ({}): waiting for the broker to acknowledge outputs ({waited}s)",
                        self.brokers
                    );
                }
            }
        } else {
            self.producer.poll(Duration::ZERO);
        }
        let mut acks = self.producer.context().acks();
        if acks.failed > 0 {
            let message = format!(
                "{} outputs were not delivered (first: {}); they stay in the outbox \
                 and are produced again when the run restarts",
                acks.failed,
                acks.first_failure.clone().unwrap_or_default()
            );
            drop(acks);
            return Err(self.error(message));
        }
        let mut through = None;
        while let Some(&slot) = self.in_flight.front() {
            if !acks.delivered.remove(&slot) {
                break;
            }
            through = Some(slot);
            self.in_flight.pop_front();
        }
        Ok(through.map(|slot| (unpack(slot), None)))
    }
}
