"""Delivery semantics: every poll, produce, commit and dead letter of the workers is here.

A worker is a :class:`BatchLoop` around a handler that turns a batch of input records
into output records. The loop polls a batch (size or time, whichever comes first),
hands it to the handler, sends every output, waits until the broker has acknowledged
all of them (acks=all), and only then commits the batch's input offsets. Between
batches it runs the worker's housekeeping (applying negative-bank updates).

What happens when things fail (at-least-once; outputs are keyed by frame id so readers
can de-duplicate):

| failure                                        | result                                                     |
|------------------------------------------------|------------------------------------------------------------|
| worker dies while handling a batch             | nothing produced or committed; the batch is redelivered    |
| worker dies after some outputs, before commit  | the batch is redelivered: those outputs appear twice       |
| an output is not acknowledged                  | no commit; the loop raises and the worker exits non-zero;  |
|                                                | the batch is redelivered to the group                      |
| rebalance while a batch is in flight           | its commit is refused (CommitFailedError, logged); the new |
|                                                | owner re-processes it: duplicates, no loss                 |
| bad input record (undecodable, wrong headers)  | a dead-letter output of the same batch, committed with it  |
| SIGTERM                                        | the batch in flight finishes and commits, then the worker  |
|                                                | leaves its group                                           |
| a batch slower than max.poll.interval.ms       | the worker is evicted; batches are bounded (batch_size)    |
|                                                | so this needs a setting far below the real batch time      |

kafka-python 3 heartbeats from a background thread, so a long batch does not miss
heartbeats; only max.poll.interval.ms bounds it (KafkaSettings.max_poll_interval_ms).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import CommitFailedError, KafkaError
from kafka.structs import OffsetAndMetadata

from schemas.messages import H_DL_DETAIL, H_DL_OFFSET, H_DL_PARTITION, H_DL_REASON, H_DL_TOPIC, H_DL_WORKER

Headers = list[tuple[str, bytes]]


@dataclass(frozen=True)
class Output:
    topic: str
    key: bytes | None
    value: bytes | None  # None is a tombstone on a compacted topic
    headers: Headers = field(default_factory=list)


def dead_letter(topic: str, record: ConsumerRecord, reason: str, detail: str, worker: str) -> Output:
    """The original key, value and headers, plus why and where from."""
    extra = [
        (H_DL_REASON, reason.encode()),
        (H_DL_DETAIL, detail[:1000].encode("utf-8", "replace")),
        (H_DL_TOPIC, record.topic.encode()),
        (H_DL_PARTITION, str(record.partition).encode()),
        (H_DL_OFFSET, str(record.offset).encode()),
        (H_DL_WORKER, worker.encode()),
    ]
    return Output(topic, record.key, record.value, list(record.headers or []) + extra)


def header(record: ConsumerRecord, name: str) -> bytes | None:
    for key, value in record.headers or []:
        if key == name:
            return value
    return None


def send_and_confirm(producer: KafkaProducer, outputs: Sequence[Output], timeout_s: float = 60.0) -> None:
    """Send all outputs and return only when every one is acknowledged; raise otherwise."""
    futures = [producer.send(o.topic, key=o.key, value=o.value, headers=o.headers) for o in outputs]
    producer.flush(timeout=timeout_s)
    for future in futures:
        future.get(timeout=timeout_s)  # raises the KafkaError of a failed send


def next_offsets(records: Sequence[ConsumerRecord]) -> dict[TopicPartition, OffsetAndMetadata]:
    """The offsets to commit after ``records``: one past the highest per partition."""
    highest: dict[TopicPartition, int] = {}
    for r in records:
        tp = TopicPartition(r.topic, r.partition)
        highest[tp] = max(highest.get(tp, -1), r.offset)
    return {tp: OffsetAndMetadata(offset + 1, "", -1) for tp, offset in highest.items()}


def poll_batch(consumer: KafkaConsumer, size: int, timeout_ms: int) -> list[ConsumerRecord]:
    """Up to ``size`` records, returning early when ``timeout_ms`` has passed since the first poll."""
    deadline = time.monotonic() + timeout_ms / 1000
    batch: list[ConsumerRecord] = []
    while len(batch) < size:
        remaining = int((deadline - time.monotonic()) * 1000)
        if remaining <= 0:
            break
        polled = consumer.poll(timeout_ms=remaining, max_records=size - len(batch))
        for records in polled.values():
            batch.extend(records)
    return batch


@dataclass
class BatchStats:
    records: int
    outputs: int
    seconds: float
    committed: bool


class BatchLoop:
    """consume -> handle -> send -> confirm -> commit, until ``should_stop()``."""

    def __init__(
        self,
        consumer: KafkaConsumer,
        producer: KafkaProducer,
        handle: Callable[[list[ConsumerRecord]], list[Output]],
        *,
        batch_size: int,
        batch_timeout_ms: int,
        should_stop: Callable[[], bool],
        between_batches: Callable[[], None] = lambda: None,
        on_batch: Callable[[BatchStats], None] = lambda stats: None,
        log=None,
    ):
        self.consumer = consumer
        self.producer = producer
        self.handle = handle
        self.batch_size = batch_size
        self.batch_timeout_ms = batch_timeout_ms
        self.should_stop = should_stop
        self.between_batches = between_batches
        self.on_batch = on_batch
        self.log = log

    def run_once(self) -> BatchStats | None:
        self.between_batches()
        batch = poll_batch(self.consumer, self.batch_size, self.batch_timeout_ms)
        if not batch:
            return None
        start = time.perf_counter()
        outputs = self.handle(batch)
        send_and_confirm(self.producer, outputs)
        committed = True
        try:
            self.consumer.commit(next_offsets(batch))
        except CommitFailedError as exc:  # partitions moved to another member: it redoes the batch
            committed = False
            if self.log is not None:
                self.log.warning("commit refused after rebalance", error=str(exc), records=len(batch))
        stats = BatchStats(len(batch), len(outputs), time.perf_counter() - start, committed)
        self.on_batch(stats)
        return stats

    def run(self) -> None:
        try:
            while not self.should_stop():
                self.run_once()
        finally:
            self.close()

    def close(self) -> None:
        try:
            self.producer.flush(timeout=30)
        except KafkaError:
            pass
        self.producer.close(timeout=30)
        self.consumer.close(autocommit=False)  # leaves the group now, so its partitions move at once
