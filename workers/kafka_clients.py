"""Kafka client construction: one place for connection, security and size settings, and the first contact's time limit."""
from __future__ import annotations

import time

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer

from pipeline.errors import ConfigError
from schemas.settings import KafkaSettings
from workers.kafka_security import check_security

# Bootstrap servers a client of this process has reached. Before that, an unreachable broker is
# a typo or a cluster that is down, and a user should hear so within connect_timeout_ms; after
# it, a broker lost while running (a restart, a failover) is waited for with the client's own
# patience, as a worker must ride it out.
_reached: set[str] = set()


def _first_contact_ms(kafka: KafkaSettings) -> int | None:
    """How long a new client may take to bootstrap: connect_timeout_ms on the process's first
    contact with these servers, else None (the client's default)."""
    return None if kafka.bootstrap_servers in _reached else kafka.connect_timeout_ms


def _bootstrap_limit(kafka: KafkaSettings, options: dict) -> dict:
    first = _first_contact_ms(kafka)
    if first is None:
        return options
    return {**options, "bootstrap_timeout_ms": min(first, options.get("bootstrap_timeout_ms", first))}


def connection_options(kafka: KafkaSettings) -> dict:
    """Options every client shares: brokers, client id, SSL/SASL pass-through."""
    options = {
        "bootstrap_servers": kafka.bootstrap_servers.split(","),
        "client_id": kafka.client_id,
        "security_protocol": kafka.security_protocol,
        "request_timeout_ms": kafka.request_timeout_ms,
    }
    optional = {
        "sasl_mechanism": kafka.sasl_mechanism,
        "sasl_plain_username": kafka.sasl_plain_username,
        "sasl_plain_password": kafka.sasl_plain_password.get_secret_value() if kafka.sasl_plain_password else None,
        "ssl_cafile": kafka.ssl_cafile,
        "ssl_certfile": kafka.ssl_certfile,
        "ssl_keyfile": kafka.ssl_keyfile,
    }
    options.update({k: v for k, v in optional.items() if v is not None})
    return options


def make_producer(kafka: KafkaSettings, **extra) -> KafkaProducer:
    """acks=all with idempotence: an acknowledged record is durable and never written twice by one producer session."""
    options = {
        "acks": "all",
        "enable_idempotence": True,
        "max_request_size": kafka.max_message_bytes,
        "linger_ms": 5,
        # retries are left unbounded (kafka-python's default): delivery_timeout_ms (120 s)
        # bounds a send, so a broker restart is waited out instead of failing the batch
        **extra,
    }
    check_security(kafka, connection_options(kafka))
    producer = KafkaProducer(**_bootstrap_limit(kafka, {**connection_options(kafka), **options}))
    _reached.add(kafka.bootstrap_servers)
    return producer


def make_consumer(kafka: KafkaSettings, *topics: str, group_id: str | None, **extra) -> KafkaConsumer:
    options = {
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "fetch_max_bytes": max(kafka.max_message_bytes, 52428800),
        "max_partition_fetch_bytes": kafka.max_message_bytes,
        "session_timeout_ms": kafka.session_timeout_ms,
        "heartbeat_interval_ms": max(1000, kafka.session_timeout_ms // 3),
        "max_poll_interval_ms": kafka.max_poll_interval_ms,
        **extra,
    }
    check_security(kafka, connection_options(kafka))
    consumer = KafkaConsumer(**_bootstrap_limit(kafka, {**connection_options(kafka), **options}))
    _reached.add(kafka.bootstrap_servers)
    if topics:
        # Subscribe only once the topics' metadata is known: a group leader that assigns
        # before it has seen the partitions hands out nothing (kafka-python logs
        # "No partition metadata") and the group sits idle until the next rebalance.
        deadline = time.monotonic() + kafka.request_timeout_ms / 1000
        missing = [t for t in topics if not consumer.partitions_for_topic(t)]
        while missing and time.monotonic() < deadline:
            time.sleep(0.2)
            missing = [t for t in missing if not consumer.partitions_for_topic(t)]
        if missing:
            consumer.close()
            raise ConfigError(f"topics {', '.join(missing)} do not exist (run 'interneg topics' first)")
        consumer.subscribe(list(topics))
    return consumer


def make_admin(kafka: KafkaSettings, timeout_ms: int | None = None) -> KafkaAdminClient:
    """An admin client; with ``timeout_ms``, each request and the first contact with the
    brokers give up after that long at most (never longer than request_timeout_ms)."""
    options = connection_options(kafka)
    check_security(kafka, options)
    if timeout_ms is not None:
        timeout_ms = min(timeout_ms, kafka.request_timeout_ms)
        options = {**options, "request_timeout_ms": timeout_ms, "bootstrap_timeout_ms": timeout_ms}
    admin = KafkaAdminClient(**_bootstrap_limit(kafka, options))
    _reached.add(kafka.bootstrap_servers)
    return admin
