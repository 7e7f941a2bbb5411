"""An independent Kafka client for rewind's tests (confluent-kafka, librdkafka 2.16).

    kafka_client.py produce BROKERS TOPIC FILE   # FILE: JSON lines {"key", "payload", "partition"?, "timestamp"?, "headers"?}
    kafka_client.py consume BROKERS TOPIC FILE   # writes every record of TOPIC as JSON lines, then exits

Strings travel as UTF-8; "payload_hex"/"key_hex" carry bytes that are not.
"""

import json
import sys
import uuid

from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition


def produce(brokers, topic, path):
    # One record per batch: tansu 0.6 answers a fetch from an offset inside a
    # record batch with the batches after it, so a consumer resuming
    # mid-batch (after a crash, a rebalance) would silently skip records.
    producer = Producer({
        "bootstrap.servers": brokers,
        "enable.idempotence": True,
        "linger.ms": 0,
        "batch.num.messages": 1,
    })
    failures = []

    def delivered(err, _msg):
        if err is not None:
            failures.append(str(err))

    count = 0
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            record = json.loads(line)
            kwargs = {"on_delivery": delivered}
            if record.get("key") is not None:
                kwargs["key"] = record["key"].encode()
            if record.get("payload") is not None:
                kwargs["value"] = record["payload"].encode()
            if record.get("partition") is not None:
                kwargs["partition"] = record["partition"]
            if record.get("timestamp") is not None:
                kwargs["timestamp"] = record["timestamp"]
            if record.get("headers"):
                kwargs["headers"] = [(k, v.encode() if v is not None else None) for k, v in record["headers"]]
            while True:
                try:
                    producer.produce(topic, **kwargs)
                    break
                except BufferError:
                    producer.poll(0.05)
            producer.poll(0)
            count += 1
    if producer.flush(120) != 0 or failures:
        sys.exit(f"produce failed: {len(failures)} failures, first {failures[:1]}")
    print(count)


def text(value):
    if value is None:
        return None
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return {"hex": value.hex()}


def consume(brokers, topic, path):
    consumer = Consumer({
        "bootstrap.servers": brokers,
        "group.id": "test-reader-" + uuid.uuid4().hex,
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
        "enable.partition.eof": True,
    })
    metadata = consumer.list_topics(topic, timeout=30)
    partitions = sorted(metadata.topics[topic].partitions)
    # Read to the end of every partition, as the fetcher reports it (some
    # brokers' ListOffsets answers are not reliable; partition EOF is).
    pending = set(partitions)
    consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
    count = 0
    with open(path, "w", encoding="utf-8") as out:
        while pending:
            msg = consumer.poll(1.0)
            if msg is None:
                continue
            if msg.error():
                if msg.error().code() == KafkaError._PARTITION_EOF:
                    pending.discard(msg.partition())
                    continue
                sys.exit(f"consume failed: {msg.error()}")
            headers = [[k, text(v)] for k, v in (msg.headers() or [])]
            out.write(json.dumps({
                "partition": msg.partition(),
                "offset": msg.offset(),
                "key": text(msg.key()),
                "payload": text(msg.value()),
                "headers": headers,
            }) + "\n")
            count += 1
    consumer.close()
    print(count)


if __name__ == "__main__":
    command, brokers, topic, path = sys.argv[1:5]
    {"produce": produce, "consume": consume}[command](brokers, topic, path)
