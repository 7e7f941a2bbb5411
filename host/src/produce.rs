//! `rewind produce`: re-produce a kcat `-J` dump, bare JSONL or a tape to a
//! Kafka topic, validated: a record that cannot be decoded is reported with
//! its line (or seq) and never produced.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header as KafkaHeader, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};

use crate::source::InputError;

/// What to produce, and where.
#[derive(Debug, Clone)]
pub struct ProduceConfig {
    pub brokers: String,
    pub topic: String,
    pub from: PathBuf,
    /// Send each record to the partition it came from (else the key decides).
    pub keep_partitions: bool,
    /// librdkafka settings, as kcat's `-X key=value`.
    pub settings: Vec<(String, String)>,
}

/// A record that was not produced, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// Which record (1-based, in the input's order).
    pub at: String,
    pub reason: String,
}

/// What a produce did.
#[derive(Debug, Clone, Default)]
pub struct Produced {
    pub records: u64,
    pub skipped: Vec<Skipped>,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProduceError {
    #[error(transparent)]
    Input(#[from] InputError),
    #[error("kafka ({brokers}): {source}")]
    Kafka {
        brokers: String,
        #[source]
        source: KafkaError,
    },
    #[error("kafka ({brokers}): {failed} records were not delivered; first: {first}")]
    Undelivered {
        brokers: String,
        failed: u64,
        first: String,
    },
}

/// Counts delivery failures.
#[derive(Default)]
struct Deliveries {
    failed: Mutex<(u64, Option<String>)>,
}

impl rdkafka::ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((error, _)) = result {
            let mut failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
            failed.0 += 1;
            failed.1.get_or_insert_with(|| error.to_string());
        }
    }
}

/// Produces every valid record of `config.from` to the topic, in order,
/// with an idempotent producer.
pub fn produce(config: &ProduceConfig) -> Result<Produced, ProduceError> {
    let kafka = |source| ProduceError::Kafka {
        brokers: config.brokers.clone(),
        source,
    };
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &config.brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5");
    for (key, value) in &config.settings {
        client.set(key, value);
    }
    let producer: BaseProducer<Deliveries> = client
        .create_with_context(Deliveries::default())
        .map_err(kafka)?;
    let mut source = crate::source::open(&config.from, None)?;
    let mut out = Produced::default();
    let mut n = 0u64;
    while let Some(record) = source.next_record()? {
        n += 1;
        let event = match record.decoded {
            Ok(event) => event,
            Err(reason) => {
                // A JSONL reason names the file and line already.
                out.skipped.push(Skipped {
                    at: format!("record {n}"),
                    reason,
                });
                continue;
            }
        };
        let mut headers = OwnedHeaders::new_with_capacity(event.headers.len());
        for h in &event.headers {
            headers = headers.insert(KafkaHeader {
                key: &h.name,
                value: h.value.as_deref(),
            });
        }
        let mut message: BaseRecord<'_, [u8], [u8]> =
            BaseRecord::to(&config.topic).headers(headers);
        if let Some(key) = event.key.as_deref() {
            message = message.key(key);
        }
        if let Some(payload) = event.payload.as_deref() {
            message = message.payload(payload);
        }
        if let Some(ts) = event.timestamp_ms {
            message = message.timestamp(ts);
        }
        if config.keep_partitions {
            message = message.partition(event.position.partition);
        }
        loop {
            match producer.send(message) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    producer.poll(Duration::from_millis(50));
                    message = back;
                }
                Err((error, _)) => return Err(kafka(error)),
            }
        }
        producer.poll(Duration::ZERO);
        out.records += 1;
    }
    producer.flush(Duration::from_secs(60)).map_err(kafka)?;
    let failed = producer
        .context()
        .failed
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    if failed.0 > 0 {
        return Err(ProduceError::Undelivered {
            brokers: config.brokers.clone(),
            failed: failed.0,
            first: failed.1.unwrap_or_default(),
        });
    }
    Ok(out)
}
