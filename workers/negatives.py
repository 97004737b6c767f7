"""The negative bank across many workers: the compacted ``ood.negatives`` topic.

The inversion worker publishes each admitted negative keyed by its id and a tombstone
for each eviction; every worker follows the topic from the beginning (no consumer
group) and applies records to its own bank between batches. Ranking by (deviation, id)
makes every replica that has applied the same records hold the identical bank.
"""
from __future__ import annotations

import hashlib
import time
from typing import Callable

import numpy as np

from kafka import TopicPartition

from pipeline.bank import FIRST_INVERTED_ID, InvertedNegative, NegativeBank
from pipeline.selection import deviation
from schemas.messages import NegativeRecord, Vector
from schemas.settings import KafkaSettings
from workers.delivery import Output, poll_readable
from workers.kafka_clients import make_consumer


def negative_id(origin: str) -> int:
    """A stable id per origin frame: a redelivered candidate maps to the same negative."""
    return FIRST_INVERTED_ID + int.from_bytes(hashlib.sha256(origin.encode()).digest()[:6], "big")


def inadmissible_to(bundle) -> Callable[[np.ndarray], str | None] | None:
    """METHOD §2's admissibility test against a bundle's ID prototypes, as a follower's ``refuse``.

    None for a bundle made from a class list: it has no prototypes to test against.
    """
    if bundle.prototypes is None:
        return None
    prototypes, base = bundle.prototypes, bundle.base_similarity

    def refuse(vector: np.ndarray) -> str | None:
        if deviation(vector.reshape(1, -1), prototypes, base).admissible[0]:
            return None
        return "as close to an ID prototype as that class's own text is (METHOD §2)"

    return refuse


def negative_output(topic: str, entry: InvertedNegative, vector, model_id: str) -> Output:
    record = NegativeRecord(
        id=entry.id,
        vector=Vector.from_numpy(vector, model_id),
        deviation=entry.deviation,
        origin=entry.origin,
        created=entry.created,
        nearest_words=list(entry.nearest_words),
    )
    return Output(topic, str(entry.id).encode(), record.to_bytes())


def tombstone_output(topic: str, negative: int) -> Output:
    return Output(topic, str(negative).encode(), None)


class NegativeFollower:
    """Applies the negatives topic to a bank; ``catch_up`` reads to the end before a worker is ready.

    ``refuse(vector)`` returns why a negative must not enter the bank (or None): the
    workers re-check METHOD §2's admissibility on every record, so a negative forged onto
    the topic next to an ID prototype is refused by every replica, not only by the
    inversion worker that would never have published it.
    """

    def __init__(
        self,
        kafka: KafkaSettings,
        topic: str,
        bank: NegativeBank,
        model_id: str,
        log=None,
        refuse: Callable[[np.ndarray], str | None] | None = None,
        on_rejected: Callable[[], None] = lambda: None,
    ):
        self.bank = bank
        self.refuse = refuse
        self.on_rejected = on_rejected
        self.model_id = model_id
        self.log = log
        self.rejected = 0
        self.applied = 0
        self.seen_ids: set[int] = set()  # every id put or tombstoned, still known after eviction
        # ids the bank's bound evicted here that no tombstone on the topic has announced yet:
        # the inversion worker publishes those tombstones (see InversionWorker.restore_bound)
        self.unannounced: set[int] = set()
        self.last_applied_at: float | None = None
        self.consumer = make_consumer(kafka, group_id=None, isolation_level="read_committed")
        self.partitions = [TopicPartition(topic, p) for p in sorted(self._partitions(topic))]
        self.consumer.assign(self.partitions)
        self.consumer.seek_to_beginning(*self.partitions)

    def _partitions(self, topic: str, timeout_s: float = 30.0) -> set[int]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            partitions = self.consumer.partitions_for_topic(topic)
            if partitions:
                return partitions
            time.sleep(0.2)
        raise RuntimeError(f"topic {topic} does not exist (run 'interneg topics' first)")

    def apply(self, key: bytes | None, value: bytes | None) -> None:
        try:
            if key is None or not (key.isascii() and key.isdigit()) or len(key) > 19 or int(key) >= 2**63:
                raise ValueError("the key must be a negative id: 0 to 2^63-1 in ASCII digits")
            negative = int(key)
            if value is not None and negative in self.seen_ids and negative not in self.bank.entries:
                # an id once removed stays removed (ids are never reused): the inversion worker
                # reading back its own negative after it already evicted it must not revive it
                # until the tombstone that follows arrives (seen: bank 5 with capacity 4)
                return
            self.seen_ids.add(negative)
            if value is None:
                self.bank.remove(negative)
                self.unannounced.discard(negative)
            else:
                record = NegativeRecord.from_bytes(value)
                if record.id != negative:
                    raise ValueError(f"key {negative} carries record {record.id}")
                vector = record.vector.to_numpy(model_id=self.model_id, dim=self.bank.dim)
                why = self.refuse(vector) if self.refuse is not None else None
                if why is not None:
                    raise ValueError(f"negative {negative} refused: {why}")
                entry = InvertedNegative(record.id, record.deviation, record.origin, record.created, tuple(record.nearest_words))
                self.unannounced.update(self.bank.put(entry, vector))
            self.applied += 1
            self.last_applied_at = time.time()
        except ValueError as exc:  # a malformed or foreign record never reaches the bank (ValidationError is one)
            self._reject("negative record rejected", key=repr(key)[:80], error=str(exc)[:300])

    def _reject(self, event: str, **fields) -> None:
        self.rejected += 1
        self.on_rejected()
        if self.log is not None:
            self.log.warning(event, **fields)

    def poll(self, timeout_ms: int = 0) -> int:
        """Apply whatever has arrived; returns the number of records applied or rejected."""
        count = 0
        for records in poll_readable(self.consumer, timeout_ms, on_unreadable=self._unreadable).values():
            for r in records:
                self.apply(r.key, r.value)
                count += 1
        return count

    def _unreadable(self, unreadable) -> None:
        self._reject("negative record skipped: the Kafka client cannot decode it", offset=unreadable.offset, error=unreadable.error)

    def lag(self) -> int:
        ends = self.consumer.end_offsets(self.partitions)
        return sum(max(0, ends[tp] - self.consumer.position(tp)) for tp in self.partitions)

    def catch_up(self, timeout_s: float = 300.0, beat=lambda: None) -> int:
        """Read until the positions reach the end offsets taken now (``beat`` keeps liveness fresh)."""
        ends = self.consumer.end_offsets(self.partitions)
        deadline = time.monotonic() + timeout_s
        count = 0
        while any(self.consumer.position(tp) < ends[tp] for tp in self.partitions):
            if time.monotonic() > deadline:
                raise TimeoutError(f"negatives topic not read to its end within {timeout_s} s")
            count += self.poll(timeout_ms=200)
            beat()
        return count

    def restart(self) -> None:
        """Forget what was applied and read the topic from the beginning again."""
        self.seen_ids.clear()
        self.unannounced.clear()
        self.consumer.seek_to_beginning(*self.partitions)

    def close(self) -> None:
        self.consumer.close(autocommit=False)
