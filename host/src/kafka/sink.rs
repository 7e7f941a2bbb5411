//! The Kafka sink: produces outbox rows with an idempotent producer and
//! returns only once the broker acknowledged every one of them, so the rows
//! leave the outbox only when they are safely in Kafka.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header as KafkaHeader, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};

use crate::pipeline::DLQ_STREAM;
use crate::sink::{ID_HEADER, Sink, SinkError};
use crate::state::{OutboxRow, SinkMark};

/// Produces outputs (to `output_topic`, or the topic their stream names)
/// and dead letters (to `dlq_topic`).
pub struct KafkaSink {
    brokers: String,
    producer: BaseProducer<Deliveries>,
    output_topic: Option<String>,
    dlq_topic: Option<String>,
}

/// Delivery failures since the last write.
#[derive(Default)]
struct Deliveries {
    failed: Mutex<(u64, Option<String>)>,
}

impl rdkafka::ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((error, _)) = result {
            let mut failed = self.failed.lock().unwrap_or_else(PoisonError::into_inner);
            failed.0 += 1;
            failed.1.get_or_insert_with(|| error.to_string());
        }
    }
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
    fn write(&mut self, rows: &[OutboxRow]) -> Result<Option<SinkMark>, SinkError> {
        *self
            .producer
            .context()
            .failed
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = (0, None);
        for row in rows {
            // Dead letters queued by a run with --dlq-topic, now continued
            // without one: they stay in the state's dead-letter table.
            let Some(topic) = self.topic(row) else {
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
            let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic).headers(headers);
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
            self.producer.poll(Duration::ZERO);
        }
        // Wait for every acknowledgement. While the broker is away the
        // producer keeps retrying (up to its message.timeout.ms).
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
        let failed = self
            .producer
            .context()
            .failed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if failed.0 > 0 {
            return Err(self.error(format!(
                "{} outputs were not delivered (first: {}); they stay in the outbox \
                 and are produced again when the run restarts",
                failed.0,
                failed.1.unwrap_or_default()
            )));
        }
        Ok(None)
    }
}
