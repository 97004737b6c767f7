"""End-to-end check of a broker from broker.sh, using kafka-python.

usage: python deploy/kafka/smoke.py HOST:PORT

Creates a topic sized for image payloads, round-trips a 5 MB message and
commits a transaction (which needs the single-replica transaction state log).
"""
import os
import sys
import time
import uuid

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic

MAX = 16 * 1024 * 1024
bootstrap = sys.argv[1]
topic = f"smoke-{uuid.uuid4().hex[:8]}"
payload = os.urandom(5 * 1024 * 1024)

t = time.monotonic()
admin = KafkaAdminClient(bootstrap_servers=bootstrap)
admin.create_topics([NewTopic(topic, 1, 1, topic_configs={"max.message.bytes": str(MAX)})])
admin.close()
print(f"created {topic} with max.message.bytes={MAX}")

producer = KafkaProducer(bootstrap_servers=bootstrap, max_request_size=MAX)
producer.send(topic, key=b"big", value=payload).get(timeout=30)
producer.close()

consumer = KafkaConsumer(
    topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
    fetch_max_bytes=MAX, max_partition_fetch_bytes=MAX, consumer_timeout_ms=20000,
)
got = next(iter(consumer))
consumer.close()
assert got.key == b"big" and got.value == payload, "payload mismatch"
print(f"round-tripped {len(got.value)} bytes")

txp = KafkaProducer(bootstrap_servers=bootstrap, transactional_id=f"smoke-tx-{topic}")
txp.init_transactions()
txp.begin_transaction()
txp.send(topic, key=b"tx", value=b"committed")
txp.commit_transaction()
txp.close()

consumer = KafkaConsumer(
    topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
    isolation_level="read_committed", fetch_max_bytes=MAX,
    max_partition_fetch_bytes=MAX, consumer_timeout_ms=20000,
)
keys = [m.key for _, m in zip(range(2), consumer)]
consumer.close()
assert keys == [b"big", b"tx"], keys
print(f"transaction committed and visible to read_committed: {keys}")
print(f"ok in {time.monotonic() - t:.1f}s")
