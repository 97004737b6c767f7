"""The negative bank across many workers: the compacted ``ood.negatives`` topic.

The inversion worker publishes each admitted negative keyed by its id and a tombstone
for each eviction, each signed (:mod:`workers.signing`); every worker follows the topic from the beginning (no consumer
group) and applies records to its own bank between batches. Ranking by (deviation, id)
makes every replica that has applied the same records hold the identical bank.
"""
from __future__ import annotations

import hashlib
import time
from typing import Callable

import numpy as np

from kafka import TopicPartition
from pydantic import ValidationError

from pipeline.bank import FIRST_INVERTED_ID, InvertedNegative, NegativeBank
from pipeline.errors import ConfigError
from pipeline.selection import deviation
from schemas.messages import NegativeRecord, Vector
from schemas.settings import KafkaSettings
from workers.delivery import Output, poll_readable, read_to_end
from workers.kafka_clients import make_consumer
from workers.signing import NegativeSigner, NegativeVerifier, SignatureRefused


class NotAdmissible(ValueError):
    """A vector METHOD §2 does not admit as a negative. A ValueError, as the inversion worker
    and the tests catch it."""


class RecordRefused(Exception):
    """A negatives record that must not reach the bank: malformed, foreign or inadmissible."""


def negative_id(origin: str) -> int:
    """A stable id per origin frame: a redelivered candidate maps to the same negative."""
    return FIRST_INVERTED_ID + int.from_bytes(hashlib.sha256(origin.encode()).digest()[:6], "big")


class NegativeCheck:
    """What every holder of a bank computes from a negative's vector rather than trusts:
    METHOD §2's admissibility against the bundle's ID prototypes, and the deviation degree
    that ranks the bank. The inversion worker ranks by this same value of the same float32
    vector it publishes, so every replica ranks (and evicts) exactly as it does."""

    def __init__(self, prototypes: np.ndarray | None, base: np.ndarray | None):
        self.prototypes, self.base = prototypes, base

    @classmethod
    def of(cls, bundle) -> "NegativeCheck":
        return cls(bundle.prototypes, bundle.base_similarity)

    def degree(self, vector: np.ndarray) -> float:
        """The deviation degree of one stored vector; NotAdmissible if it is not admissible."""
        if self.prototypes is None:  # the inversion worker refuses to run on such a bundle
            raise NotAdmissible("the bundle was made from a class list: it has no image prototypes, so no inverted negative is admissible")
        found = deviation(np.asarray(vector, dtype=np.float32).reshape(1, -1), self.prototypes, self.base)
        if not found.admissible[0]:
            raise NotAdmissible("as close to an ID prototype as that class's own text is (METHOD §2)")
        return float(found.degree[0])


def negative_output(topic: str, entry: InvertedNegative, vector, model_id: str, signer: NegativeSigner | None) -> Output:
    record = NegativeRecord(
        id=entry.id,
        vector=Vector.from_numpy(vector, model_id),
        deviation=entry.deviation,
        origin=entry.origin,
        created=entry.created,
        nearest_words=list(entry.nearest_words),
    )
    return _signed(topic, str(entry.id).encode(), record.to_bytes(), signer)


def tombstone_output(topic: str, negative: int, signer: NegativeSigner | None) -> Output:
    return _signed(topic, str(negative).encode(), None, signer)


def _signed(topic: str, key: bytes, value: bytes | None, signer: NegativeSigner | None) -> Output:
    return Output(topic, key, value, signer.sign(topic, key, value) if signer is not None else [])


class NegativeFollower:
    """Applies the negatives topic to a bank; ``catch_up`` reads to the end before a worker is ready.

    Nothing a record says is taken on trust. With a ``verifier``, a record (tombstones
    included) without the inversion worker's valid signature is refused. The id must be in
    range and match the key; the vector must be this model's finite unit vector; ``check``
    recomputes admissibility and the deviation degree from the vector, and the record's own
    deviation is ignored; the bank keeps its capacity itself. So a record forged onto the
    topic changes no bank, and every replica that applied the same records holds the same one.
    """

    def __init__(
        self,
        kafka: KafkaSettings,
        topic: str,
        bank: NegativeBank,
        model_id: str,
        log=None,
        check: NegativeCheck | None = None,
        verifier: NegativeVerifier | None = None,
        on_rejected: Callable[[], None] = lambda: None,
    ):
        self.bank = bank
        self.topic = topic
        self.check = check if check is not None else NegativeCheck(None, None)
        self.verifier = verifier
        self.on_rejected = on_rejected
        self.model_id = model_id
        self.log = log
        self.rejected = 0
        self.applied = 0
        self.seen_ids: set[int] = set()  # every id put or tombstoned, still known after eviction
        # ids this bank does not hold whose last record on the topic is not a tombstone (evicted
        # here by the bound, or put again after their removal): the inversion worker publishes
        # those tombstones (see InversionWorker.restore_bound)
        self.unannounced: set[int] = set()
        self.last_applied_at: float | None = None
        self._positions: dict[TopicPartition, int] = {}  # after the last poll: a later one lower means the topic was made again
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
        raise ConfigError(f"topic {topic} does not exist (run 'interneg topics' first)")

    def apply(self, key: bytes | None, value: bytes | None, headers=()) -> None:
        try:
            if self.verifier is not None:
                self.verifier.check(self.topic, key, value, headers)
            if key is None or not (key.isascii() and key.isdigit()) or len(key) > 19 or int(key) >= 2**63:
                raise RecordRefused("the key must be a negative id: 0 to 2^63-1 in ASCII digits")
            negative = int(key)
            if value is not None and negative in self.seen_ids and negative not in self.bank.entries:
                # an id once removed stays removed (ids are never reused): the inversion worker
                # reading back its own negative after it already evicted it must not revive it
                # until the tombstone that follows arrives (seen: bank 5 with capacity 4). Until one
                # does, the compacted topic's last word on this id is a put that a replica replaying
                # it later would apply (a signed record replayed by a hostile writer is one): the
                # inversion worker announces the removal again
                self.unannounced.add(negative)
                return
            # an id counts as seen once a valid record of it changed the bank, not before: a record
            # that is refused, or a tombstone of an id never put, must not keep a later genuine
            # negative of that id out (ids are predictable: negative_id of a frame id)
            if value is None:
                if self.bank.remove(negative):
                    self.seen_ids.add(negative)
                self.unannounced.discard(negative)
            else:
                record = NegativeRecord.from_bytes(value)
                if record.id != negative:
                    raise RecordRefused(f"key {negative} carries record {record.id}")
                try:
                    vector = record.vector.to_numpy(model_id=self.model_id, dim=self.bank.dim)
                except ValueError as exc:  # another model's vector, or another width
                    raise RecordRefused(str(exc)) from None
                try:
                    degree = self.check.degree(vector)
                except NotAdmissible as exc:
                    raise RecordRefused(f"negative {negative} refused: {exc}") from None
                entry = InvertedNegative(record.id, degree, record.origin, record.created, tuple(record.nearest_words))
                try:
                    evicted = self.bank.put(entry, vector)
                except ValueError as exc:  # the bank checks the vector's norm and the id before it changes
                    raise RecordRefused(str(exc)) from None
                self.unannounced.update(evicted)
                self.seen_ids.add(negative)
            self.applied += 1
            self.last_applied_at = time.time()
        # A malformed, foreign or unsigned record never reaches the bank, and never stops the
        # worker. Anything else (a ValueError of numpy in the deviation, say) is a bug: it raises.
        except (RecordRefused, SignatureRefused, ValidationError) as exc:
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
                self.apply(r.key, r.value, r.headers)
                count += 1
        if self._rewound():
            self.bank.reset()
            self.restart()
        return count

    def _rewound(self) -> bool:
        """A position moved back: the topic was deleted and made again (the client resets a
        position past the new end to the beginning). The bank must then be the new topic's,
        as a worker started now would hold, not the old one's."""
        rewound = False
        for tp in self.partitions:
            position = self.consumer.position(tp, timeout_ms=200)
            if position is None:  # being reset right now: looked at again next poll
                continue
            if position < self._positions.get(tp, 0):
                rewound = True
                if self.log is not None:
                    self.log.warning("negatives topic starts again from an earlier offset (deleted and made again?): "
                                     "re-reading it into an empty bank", topic=tp.topic, partition=tp.partition,
                                     offset=position, was=self._positions[tp])
            self._positions[tp] = position
        return rewound

    def _unreadable(self, unreadable) -> None:
        self._reject("negative record skipped: the Kafka client cannot decode it", offset=unreadable.offset, error=unreadable.error)

    def lag(self) -> int:
        ends = self.consumer.end_offsets(self.partitions)
        return sum(max(0, ends[tp] - self.consumer.position(tp)) for tp in self.partitions)

    def catch_up(self, timeout_s: float = 300.0, beat=lambda: None) -> int:
        """Read until the positions reach the end offsets taken now (``beat`` keeps liveness fresh)."""
        return read_to_end(self.consumer, self.partitions, self.poll, timeout_s=timeout_s, what="negatives topic", beat=beat)

    def restart(self) -> None:
        """Forget what was applied and read the topic from the beginning again."""
        self.seen_ids.clear()
        self.unannounced.clear()
        self._positions.clear()
        self.consumer.seek_to_beginning(*self.partitions)

    def close(self) -> None:
        self.consumer.close(autocommit=False)
