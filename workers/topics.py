"""The topics of ARCHITECTURE.md, created idempotently with their settings."""
from __future__ import annotations

from kafka.admin import ConfigResource, ConfigResourceType, NewPartitions, NewTopic
from kafka.errors import TopicAlreadyExistsError

from schemas.settings import Settings
from workers.kafka_clients import make_admin


def topic_configs(settings: Settings) -> dict[str, tuple[int, dict[str, str]]]:
    """name -> (partitions, topic configs)."""
    t, k = settings.topics, settings.kafka
    streamed = {
        "max.message.bytes": str(k.max_message_bytes),
        "retention.ms": str(t.retention_ms),
        "cleanup.policy": "delete",
    }
    # One partition keeps the negatives in a single total order, so every replica reads
    # them in the same sequence; compaction keeps the latest record (or tombstone) per id.
    negatives = {"max.message.bytes": str(k.max_message_bytes), "cleanup.policy": "compact", "min.cleanable.dirty.ratio": "0.1"}
    # Per-camera state and operator control: the latest record per key is all that matters.
    compacted = {"max.message.bytes": str(k.max_message_bytes), "cleanup.policy": "compact", "min.cleanable.dirty.ratio": "0.1"}
    return {
        t.frames: (t.partitions, streamed),
        t.scores: (t.partitions, streamed),
        t.alerts: (t.partitions, streamed),
        t.candidates: (t.partitions, streamed),
        t.deadletter: (t.partitions, streamed),
        t.negatives: (1, negatives),
        t.events: (t.partitions, streamed),
        t.cameras: (1, streamed),
        t.event_state: (t.partitions, compacted),
        t.control: (1, compacted),  # one total order, read whole by every worker, as the negatives are
    }


def ensure_topics(settings: Settings) -> dict[str, str]:
    """Create missing topics; bring existing ones to the configured settings. Returns name -> action."""
    wanted = topic_configs(settings)
    admin = make_admin(settings.kafka)
    try:
        existing = set(admin.list_topics())
        actions = {}
        new = [
            NewTopic(name, partitions, settings.topics.replication_factor, topic_configs=configs)
            for name, (partitions, configs) in wanted.items()
            if name not in existing
        ]
        if new:
            try:
                admin.create_topics(new)
            except TopicAlreadyExistsError:  # created by a concurrent worker: fine
                pass
            actions.update({t.name: "created" for t in new})
        for name in sorted(existing & set(wanted)):
            partitions, configs = wanted[name]
            admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, name, configs=configs)])
            current = len(admin.describe_topics([name])[0]["partitions"])
            if current < partitions:
                admin.create_partitions({name: NewPartitions(partitions)})
                actions[name] = f"updated, partitions {current} -> {partitions}"
            else:
                actions[name] = "exists, configs updated"
        return actions
    finally:
        admin.close()
