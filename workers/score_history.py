"""A camera's recorded scores over a time range, read back from ``ood.scores`` (issue 14:
``interneg calibrate --camera``): the frames the workers already scored, with the method
they ran, need no model here."""
from __future__ import annotations

import time

from kafka import TopicPartition
from pydantic import ValidationError

from pipeline.errors import ConfigError
from schemas.messages import FrameScore
from schemas.settings import Settings
from workers.delivery import poll_readable
from workers.kafka_clients import make_consumer


def camera_scores(settings: Settings, camera_id: str, since_ms: int, until_ms: int, timeout_s: float = 120.0) -> list[FrameScore]:
    """Every score of ``camera_id`` written between the two times (broker timestamps), once per frame id."""
    topic = settings.topics.scores
    consumer = make_consumer(settings.kafka, group_id=None, enable_auto_commit=False, isolation_level="read_committed")
    found: dict[str, FrameScore] = {}
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        if not partitions:
            raise ConfigError(f"the scores topic {topic!r} does not exist")
        starts = consumer.offsets_for_times({tp: since_ms for tp in partitions})
        ends = consumer.end_offsets(partitions)
        wanted = {tp: found_at.offset for tp, found_at in starts.items() if found_at is not None}
        if not wanted:
            return []
        consumer.assign(list(wanted))
        for tp, offset in wanted.items():
            consumer.seek(tp, offset)
        open_partitions = set(wanted)
        deadline = time.monotonic() + timeout_s
        while open_partitions and time.monotonic() < deadline:
            for tp, records in poll_readable(consumer, 300).items():
                for r in records:
                    if r.timestamp > until_ms:
                        open_partitions.discard(tp)
                        break
                    try:
                        score = FrameScore.from_bytes(r.value) if r.value is not None else None
                    except ValidationError:
                        continue  # not a score: nothing to learn from it
                    if score is not None and score.camera_id == camera_id:
                        found.setdefault(score.frame_id, score)
            open_partitions = {tp for tp in open_partitions if consumer.position(tp) < ends[tp]}
    finally:
        consumer.close(autocommit=False)
    return list(found.values())
