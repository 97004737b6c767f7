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
| rebalance while a batch is in flight           | its commit is refused (CommitFailedError or                |
|                                                | RebalanceInProgressError, logged); the new owner           |
|                                                | re-processes it: duplicates, no loss                       |
| a rebalance completed after the batch was      | the offsets of partitions it lost are not committed        |
| polled, moving some of its partitions          | (logged with the records concerned): the new owner redoes  |
|                                                | them from the committed offset, which a late commit here   |
|                                                | could move back behind the new owner's                     |
| a commit was refused, and the member is stable | that poll's records are dropped and every owned partition  |
| again                                          | is sought to its committed offset: the refused batch is    |
|                                                | redone here if this member kept its partition (else        |
|                                                | nothing would commit it until a later record arrived on    |
|                                                | that partition)                                            |
| bad input record (undecodable, wrong headers)  | a dead-letter output of the same batch, committed with it  |
| SIGTERM                                        | the batches in flight (at most three: prefetched, handled, |
|                                                | awaiting acks) finish and commit, then the worker leaves   |
|                                                | its group                                                  |
| broker or coordinator unreachable at commit    | the commit is retried for COMMIT_RETRY_S, then skipped     |
| (a broker restart)                             | (logged): the next commit covers the batch, or it is redone|
| sends while the broker is away                 | retried by the producer until delivery_timeout_ms (120 s)  |
| the member is (re)joining its group            | polls wait REJOIN_POLL_MS, so the join completes inside    |
|                                                | one poll (short polls can leave it rebalancing for good)   |
| kafka-python leaves the member half-joined     | after HALF_JOINED_S the member leaves the group and        |
| (REBALANCING with no join pending, fetching or | subscribes again; until then its commits are refused       |
| not; heartbeats off)                           |                                                            |
| a batch slower than max.poll.interval.ms       | the worker is evicted; batches are bounded (batch_size)    |
|                                                | so this needs a setting far below the real batch time      |
| records wait uncommitted on partitions the     | stalled (LivenessWatch): one warning line, on_stall (the   |
| member owns (any partition, while it is not    | worker's /readyz and interneg_worker_stalled say so); the  |
| stable) and it commits nothing for             | batch in flight is committed, a prefetched one dropped     |
| stall_after_s (the client stopped fetching,    | (redelivered), and the consumer is replaced by a new one   |
| commits refused, a refused batch behind the    | (new connections, fetch sessions, member id)               |
| position, a member that never becomes stable)  |                                                            |
| still stalled after MAX_RENEWALS renewals      | ConsumerStalledError: the worker exits non-zero for its    |
|                                                | supervisor to restart it; nothing committed is lost        |

kafka-python 3 heartbeats from a background thread, so a long batch does not miss
heartbeats; only max.poll.interval.ms bounds it (KafkaSettings.max_poll_interval_ms).
The kafka-python private names this module needs (the half-joined test, the skip of an
undecodable record, abort_transaction's forgetting) are read only in workers/kafka_adapter.py,
which BatchLoop has check them before its first batch (KafkaInternalsError if one is missing).

Exactly-once mode (``WorkerSettings.exactly_once``): each batch is one Kafka transaction
holding its outputs and its input offsets (``send_offsets_to_transaction`` with the
consumer's group metadata, so the broker fences a member that lost its partitions).
Readers with isolation_level=read_committed see a batch's outputs exactly once or not at
all. Batches are then handled and committed one at a time (decoding of the next batch
still overlaps); the failure table becomes:

| failure                                        | result                                                     |
|------------------------------------------------|------------------------------------------------------------|
| worker dies before its commit_transaction      | the transaction is aborted (by the restarted worker's      |
|                                                | init_transactions, or after transaction_timeout_ms): its   |
|                                                | outputs are never visible to read_committed readers; the   |
|                                                | batch is redone from the committed offsets                 |
| the batch was polled while the member was     | aborted without trying (its partitions may be moving and   |
| rebalancing                                    | its generation already the new one): rewound and redone    |
| the transaction cannot commit (rebalance:      | it is aborted, the prefetched batch is dropped, and every  |
| stale generation; broker errors)               | partition this member owns is sought to its committed      |
|                                                | offset: polled again here, or redone by the new owner      |
| a rebalance completes inside a poll (a new     | the records of that poll are dropped and every owned       |
| generation or member id)                       | partition is sought to its committed offset, read stable.  |
|                                                | kafka-python keeps a position across a rebalance when the  |
|                                                | member held the partition before and after, even if another|
|                                                | member committed past it in a generation between           |
| the offsets of an aborted transaction          | forgotten with it (abort_transaction): kafka-python would  |
| (TxnOffsetCommit refused)                      | send them again with the next transaction                  |
| the committed offsets cannot be read for       | KafkaTimeoutError: the worker exits non-zero; its          |
| COMMIT_RETRY_S                                 | successor starts from the committed offsets                |
| another producer took over the transactional   | ProducerFencedError: the worker exits non-zero (a zombie   |
| id (a second worker started with the same name)| must not keep writing)                                     |
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import (
    CommitFailedError,
    CorruptRecordError,
    IllegalGenerationError,
    KafkaError,
    KafkaTimeoutError,
    ProducerFencedError,
    RebalanceInProgressError,
    UnknownMemberIdError,
)
from kafka.structs import MemberState, OffsetAndMetadata

from schemas.messages import H_DL_DETAIL, H_DL_OFFSET, H_DL_PARTITION, H_DL_REASON, H_DL_TOPIC, H_DL_TRUNCATED, H_DL_WORKER
from workers import kafka_adapter

Headers = list[tuple[str, bytes]]

# A commit refused because the group is rebalancing or this member left it. Nothing is
# lost: the next owner of the partitions starts from the last committed offset (and
# redoes the batch: duplicates), or this member keeps them and its next commit covers it.
BUSY_POLL_MS = 100
# While the member is (re)joining its group, polls wait at least this long. kafka-python 3
# drives JoinGroup/SyncGroup inside poll; a join that completes after the poll has given up
# is not picked up by the next short poll (seen here: a member stuck REBALANCING for minutes,
# every commit refused, until the broker dropped it). A long poll lets the join finish.
REJOIN_POLL_MS = 3000
# A member that stays not STABLE for this long while its polls bring records, or while
# kafka-python has no join pending for it, is half-joined (see BatchLoop._rejoin_afresh):
# it leaves and joins again.
HALF_JOINED_S = 10.0

# The loop measures its group's uncommitted records this often (one ListOffsets and one
# OffsetFetch per partition), for the lag gauges and the liveness watch; the watch gives up on
# renewing its consumer after this many renewals in a row that brought no progress.
MEASURE_EVERY_S = 5.0
MAX_RENEWALS = 3

COMMIT_REFUSED = (CommitFailedError, RebalanceInProgressError, IllegalGenerationError, UnknownMemberIdError)
# How long a commit is retried while the broker or group coordinator is unreachable. After
# that the loop goes on uncommitted: the next batch's commit covers these offsets too, or
# whoever owns the partitions next redoes the batch (duplicates, no loss).
COMMIT_RETRY_S = 60.0


@dataclass(frozen=True)
class Output:
    topic: str
    key: bytes | None
    value: bytes | None  # None is a tombstone on a compacted topic
    headers: Headers = field(default_factory=list)
    source: ConsumerRecord | None = field(default=None, compare=False)  # the input it is made from, if one

    def size(self) -> int:
        return len(self.key or b"") + len(self.value or b"") + _headers_size(self.headers)


# Room kept below the record size limit for the record batch's and each field's framing.
RECORD_OVERHEAD_BYTES = 4096


def _headers_size(headers: Headers) -> int:
    return sum(len(k.encode("utf-8", "surrogateescape")) + len(v or b"") + 10 for k, v in headers)


DL_PREFIX = "x-dl-"


def fitting(outputs: list[Output], max_bytes: int, reject: Callable[[ConsumerRecord, str, str], Output]) -> list[Output]:
    """The outputs, except that an input with an output over the record size limit gets a dead
    letter instead of all its outputs (``reject(record, reason, detail)``).

    The producer refuses such a record at send time, which fails the whole batch: the worker
    would exit and meet the same input at every restart. An output made from no one input
    (a tombstone, say) that does not fit is a defect here, and raises.
    """
    limit = max_bytes - RECORD_OVERHEAD_BYTES
    oversized = [o for o in outputs if o.size() > limit]
    if not oversized:
        return outputs
    refused: dict[tuple, tuple[ConsumerRecord, Output]] = {}
    for o in oversized:
        if o.source is None:
            raise ValueError(f"an output to {o.topic} of {o.size()} bytes exceeds the record size limit {max_bytes}")
        refused.setdefault((o.source.topic, o.source.partition, o.source.offset), (o.source, o))
    kept = [o for o in outputs if o.source is None or (o.source.topic, o.source.partition, o.source.offset) not in refused]
    return kept + [reject(record, "output-too-large", f"its {o.topic} record would be {o.size()} bytes, over the limit of {limit}")
                   for record, o in refused.values()]


def dead_letter(topic: str, record: ConsumerRecord, reason: str, detail: str, worker: str,
                max_bytes: int | None = None) -> Output:
    """The original key, value and headers, plus why and where from.

    With ``max_bytes`` (the record size limit), a copy that would not fit (a frame just under
    the limit: the reason headers push it over, and the send would fail) drops the original
    headers, then cuts the key and the value to what fits, and says so in ``x-dl-truncated``.
    """
    extra = [
        (H_DL_REASON, reason.encode()),
        (H_DL_DETAIL, detail[:1000].encode("utf-8", "replace")),
        (H_DL_TOPIC, record.topic.encode()),
        (H_DL_PARTITION, str(record.partition).encode()),
        (H_DL_OFFSET, str(record.offset).encode()),
        (H_DL_WORKER, worker.encode()),
    ]
    # the original's own x-dl-* headers would stand before ours, and header() reads the first:
    # a frame could forge where its dead letter came from, or why
    key, value = record.key, record.value
    headers = [(k, v) for k, v in record.headers or [] if not k.startswith(DL_PREFIX)]
    if max_bytes is None:
        return Output(topic, key, value, headers + extra)
    budget = max_bytes - RECORD_OVERHEAD_BYTES - _headers_size(extra) - 200  # 200: the truncation header
    size = lambda: len(key or b"") + len(value or b"") + _headers_size(headers)  # noqa: E731
    if size() <= budget:
        return Output(topic, key, value, headers + extra)
    cut = []
    if headers:
        cut.append(f"{len(headers)} headers dropped")
        headers = []
    if key is not None and len(key) > budget // 2:
        cut.append(f"key {len(key)} -> {budget // 2} bytes")
        key = key[: budget // 2]
    if value is not None and size() > budget:
        keep = max(0, budget - len(key or b""))
        cut.append(f"value {len(value)} -> {keep} bytes")
        value = value[:keep]
    return Output(topic, key, value, extra + [(H_DL_TRUNCATED, "; ".join(cut).encode())])


def header(record: ConsumerRecord, name: str) -> bytes | None:
    for key, value in record.headers or []:
        if key == name:
            return value
    return None


def send(producer: KafkaProducer, outputs: Sequence[Output]) -> list:
    return [producer.send(o.topic, key=o.key, value=o.value, headers=o.headers) for o in outputs]


def confirm(producer: KafkaProducer, futures: list, timeout_s: float = 60.0) -> None:
    """Return only when every send is acknowledged; raise the KafkaError of a failed one."""
    if any(not f.is_done for f in futures):
        producer.flush(timeout=timeout_s)
    for future in futures:
        future.get(timeout=timeout_s)


def send_and_confirm(producer: KafkaProducer, outputs: Sequence[Output], timeout_s: float = 60.0) -> None:
    confirm(producer, send(producer, outputs), timeout_s)


def next_offsets(records: Sequence[ConsumerRecord]) -> dict[TopicPartition, OffsetAndMetadata]:
    """The offsets to commit after ``records``: one past the highest per partition."""
    highest: dict[TopicPartition, int] = {}
    for r in records:
        tp = TopicPartition(r.topic, r.partition)
        highest[tp] = max(highest.get(tp, -1), r.offset)
    return {tp: OffsetAndMetadata(offset + 1, "", -1) for tp, offset in highest.items()}


def abort_transaction(producer: KafkaProducer) -> None:
    """Abort the open transaction, and forget the input offsets it failed to add.

    kafka-python 3.0.12 keeps the offsets of a TxnOffsetCommit that failed (say with
    ILLEGAL_GENERATION after a rebalance) in its pending set after the abort, and sends them
    again with the producer's next transaction: that commits offsets of partitions this
    member may no longer own, moving another member's committed offset back (its frames
    are redone: the kill -9 test's duplicates, 64 and 132 frames in 20,000) or forward
    (frames skipped at the next rebalance). The Java client clears the set when a
    transaction completes.
    """
    producer.abort_transaction()
    kafka_adapter.forget_pending_offsets(producer)  # KafkaInternalsError if kafka-python renamed the set


@dataclass(frozen=True)
class Unreadable:
    """A record the Kafka client could not decode, skipped."""

    partition: TopicPartition
    offset: int
    error: str


def poll_readable(consumer: KafkaConsumer, timeout_ms: int, max_records: int | None = None,
                  on_unreadable: Callable[[Unreadable], None] | None = None) -> dict:
    """``consumer.poll``, skipping records the client cannot decode.

    kafka-python raises CorruptRecordError for a record it cannot read (a header key that is
    not UTF-8, which the broker accepts; a bad CRC), and raises again at every poll: without
    this, one such record stops its partition for good, and the worker that owns it exits.
    The record cannot be read, so it cannot be dead-lettered: it is skipped (the partition's
    position moves one past it) and reported to ``on_unreadable``. The client decodes a record
    batch from its start, so the records after a bad one in the same producer batch (records of
    the same writer) are unreadable too and are skipped one by one in the following polls.
    """
    try:
        return consumer.poll(timeout_ms=timeout_ms, **({} if max_records is None else {"max_records": max_records}))
    except CorruptRecordError as exc:
        # The client keeps the partition it was draining in a private attribute (read by the
        # adapter): if a client upgrade renames it, KafkaInternalsError says so (the worker
        # exits) instead of a blind skip; BatchLoop checks the name before its first batch.
        tp = kafka_adapter.draining_partition(consumer)
        if tp is None or tp not in consumer.assignment():
            raise
        offset = consumer.position(tp)
        consumer.seek(tp, offset + 1)
        if on_unreadable is not None:
            on_unreadable(Unreadable(tp, offset, str(exc)[:300]))
        return {}


def read_to_end(consumer: KafkaConsumer, partitions: Sequence[TopicPartition], poll_once: Callable[[int], int], *,
                timeout_s: float, what: str, beat: Callable[[], None] = lambda: None) -> int:
    """Call ``poll_once(timeout_ms)`` (which returns how many records it took) until every
    partition's position reaches the end offset taken now: how a follower of a compacted
    topic catches up. TimeoutError past ``timeout_s``; ``beat`` keeps liveness fresh."""
    ends = consumer.end_offsets(list(partitions))
    deadline = time.monotonic() + timeout_s
    count = 0
    while any(consumer.position(tp) < ends[tp] for tp in partitions):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not read to its end within {timeout_s} s")
        count += poll_once(200)
        beat()
    return count


def poll_batch(consumer: KafkaConsumer, size: int, timeout_ms: int,
               on_unreadable: Callable[[Unreadable], None] | None = None) -> list[ConsumerRecord]:
    """Up to ``size`` records, returning early when ``timeout_ms`` has passed since the first poll.

    It polls at least once, so ``timeout_ms=0`` takes what has already arrived.
    """
    deadline = time.monotonic() + timeout_ms / 1000
    batch: list[ConsumerRecord] = []
    while True:
        remaining = max(0, int((deadline - time.monotonic()) * 1000))
        polled = poll_readable(consumer, remaining, size - len(batch), on_unreadable)
        for records in polled.values():
            batch.extend(records)
        if len(batch) >= size or remaining == 0:
            return batch


class ConsumerStalledError(RuntimeError):
    """Renewing the consumer did not bring the member's partitions moving again."""


@dataclass(frozen=True)
class Stall:
    """Records wait for this member, and it has committed nothing for ``idle_s``."""

    waiting: dict[TopicPartition, int]  # per partition (see BatchLoop._waiting)
    idle_s: float

    def describe(self) -> str:
        parts = ", ".join(f"{tp.topic}[{tp.partition}]: {n}" for tp, n in sorted(self.waiting.items()))
        return f"{sum(self.waiting.values())} records waiting ({parts}), nothing committed for {self.idle_s:.0f} s"


# Lag measurements wait at most this long for the broker, all their requests together: the
# loop makes them between batches, and a broker that is away must not hold it up.
LAG_TIMEOUT_MS = 2000


class _Deadline:
    def __init__(self, timeout_ms: int):
        self.end = time.monotonic() + timeout_ms / 1000

    def ms(self) -> int:
        """What is left, in ms; a KafkaTimeoutError once nothing is."""
        left = int(1000 * (self.end - time.monotonic()))
        if left <= 0:
            raise KafkaTimeoutError("lag measurement took longer than its budget")
        return left


def committed_offsets(consumer: KafkaConsumer, partitions: Sequence[TopicPartition], timeout_ms: int) -> dict[TopicPartition, int | None]:
    """The group's committed offset per partition (None: never committed), read stable under
    read_committed (the broker makes the read wait for a transaction still open on it).
    A KafkaTimeoutError once ``timeout_ms`` has passed, all partitions together."""
    deadline = _Deadline(timeout_ms)
    return {tp: consumer.committed(tp, timeout_ms=deadline.ms()) for tp in partitions}


@dataclass(frozen=True)
class GroupOffsets:
    """The end and the group's committed offset of every partition of some topics."""

    ends: dict[TopicPartition, int]  # the last stable offset under read_committed
    committed: dict[TopicPartition, int]  # where the group resumes: its beginning if never committed

    def uncommitted(self) -> dict[TopicPartition, int]:
        """The group's lag per partition, as Kafka's tools count it: end minus committed.

        Under read_committed a partition written in transactions can show 1 (or more) while
        the group has handled everything: a batch's committed offset is one past its last
        record, and the commit marker (and any aborted records) after it count.
        """
        return {tp: max(0, end - self.committed[tp]) for tp, end in self.ends.items()}


def group_offsets(consumer: KafkaConsumer, topics: Sequence[str] | None = None, timeout_ms: int = LAG_TIMEOUT_MS) -> GroupOffsets:
    """Ends and committed offsets of every partition of ``topics`` (by default the subscribed
    ones), for the consumer's group, whoever owns the partitions. kafka-python lists offsets
    with the consumer's isolation level, so an open transaction of another producer does not
    move the end. Raises a KafkaError (a KafkaTimeoutError past ``timeout_ms``) if the broker
    does not answer.
    """
    partitions = [TopicPartition(topic, p) for topic in sorted(topics or consumer.subscription() or [])
                  for p in sorted(consumer.partitions_for_topic(topic) or [])]
    if not partitions:
        return GroupOffsets({}, {})
    deadline = _Deadline(timeout_ms)
    ends = consumer.end_offsets(partitions, timeout_ms=deadline.ms())
    committed = committed_offsets(consumer, partitions, deadline.ms())
    never = [tp for tp, offset in committed.items() if offset is None]
    starts = consumer.beginning_offsets(never, timeout_ms=deadline.ms()) if never else {}
    return GroupOffsets(ends, {tp: starts[tp] if offset is None else offset for tp, offset in committed.items()})


class LivenessWatch:
    """The liveness guarantee of a group member: progress is a committed batch, or a look that
    finds no record waiting for it (BatchLoop._waiting says which do). A member with records
    waiting and no progress for ``bound_s`` is stalled, whatever the cause (a client that
    stopped fetching, commits refused forever, a member that never becomes stable).

    A look whose measurement failed (broker away) counts as progress, since a missing broker is
    no fault of this member and renewing would not help.
    """

    def __init__(self, bound_s: float, clock: Callable[[], float] = time.monotonic):
        self.bound_s = bound_s
        self.clock = clock
        self.last_progress = clock()
        self.stall: Stall | None = None  # the current stall, until progress clears it
        self.renewals = 0  # consumer renewals since the last progress
        self.last_renewal = float("-inf")

    def progressed(self) -> Stall | None:
        """Record progress; return the stall it ends, if any."""
        ended, self.stall = self.stall, None
        self.last_progress, self.renewals = self.clock(), 0
        return ended

    def renewed(self) -> None:
        """The consumer was just renewed: it gets the whole bound from now."""
        self.renewals += 1
        self.last_renewal = self.clock()

    def look(self, waiting: dict[TopicPartition, int]) -> Stall | None:
        """The stall, if the member is stalled now with ``waiting`` records, else None."""
        waiting = {tp: n for tp, n in waiting.items() if n > 0}
        if not waiting:
            self.progressed()
            return None
        now = self.clock()
        idle = now - self.last_progress
        if now - max(self.last_progress, self.last_renewal) <= self.bound_s:  # a renewed consumer gets the bound afresh
            return None
        self.stall = Stall(waiting, idle)
        return self.stall


@dataclass
class BatchStats:
    records: int
    outputs: int
    seconds: float  # the loop's own time on it: wait for prepare, handle, send, confirm, commit
    committed: bool
    stages: dict[str, float] = field(default_factory=dict)  # seconds: poll, prepare, wait, handle, send, confirm, commit


@dataclass
class Prefetched:
    """A batch polled and being prepared in the background (the overlapped loop)."""

    batch: list[ConsumerRecord]
    prepared: Future  # of (what prepare returned, its seconds): BatchLoop._timed_prepare
    poll_s: float
    group: Any  # the group membership it was polled under (BatchLoop._poll)


@dataclass
class InFlight:
    """A batch handled and its outputs sent, not yet confirmed and committed."""

    batch: list[ConsumerRecord]
    outputs: list[Output]
    futures: list  # the producer's, one per output
    stages: dict[str, float]  # seconds so far (poll, prepare, wait, handle, send); confirm and commit are added
    group: Any  # the membership it was polled under: exactly-once commits with it (see BatchLoop._poll)


class OffsetCommit:
    """At-least-once (the module's first table): the outputs are sent outside any transaction
    and the consumer commits the batch's input offsets once every output is acknowledged.

    The strategies have the same methods; BatchLoop picks one when it is built and never asks
    which it has. A refused commit sets the loop's ``_refused``, which its next stable poll
    heals (BatchLoop._poll) and its liveness watch reads (BatchLoop._waiting).
    """

    def __init__(self, loop: BatchLoop):
        self.loop = loop

    def check(self) -> None:
        """The kafka-python private names it relies on besides the consumer's: none."""

    def start(self) -> None:
        """Before the first batch: nothing to set up."""

    def begin(self) -> None:
        """Before a batch's outputs are sent: nothing (no transaction)."""

    def reseek_after_poll(self, membership_changed: bool) -> bool:
        """Whether a poll must be dropped and the positions reset to the committed offsets
        because of a new membership: no, a position kept across a rebalance is this
        member's own progress (a refused commit is the loop's affair, for both strategies)."""
        return False

    def confirm_and_commit(self, in_flight: InFlight) -> tuple[float | None, bool]:
        """Wait for the acknowledgements, then commit: when the last one was in, and whether it committed."""
        confirm(self.loop.producer, in_flight.futures)
        acked = time.perf_counter()
        return acked, self._commit_offsets(in_flight.batch)

    def settle(self, sent: InFlight) -> tuple[InFlight | None, bool]:
        """Right after a batch is sent (the overlapped loop): what stays in flight, and whether
        the positions were rewound (the prefetched batch is then stale). Here the batch stays
        in flight: its acknowledgements arrive while the next batch is handled."""
        return sent, False

    def settled(self, stats: BatchStats) -> bool:
        """After a batch was committed or not: whether the positions were rewound. A refused
        commit here is redone after the loop's next stable poll, not at once."""
        return False

    def _commit_offsets(self, batch: list[ConsumerRecord]) -> bool:
        loop = self.loop
        offsets = next_offsets(batch)
        owned = loop.consumer.assignment()
        moved = [r for r in batch if TopicPartition(r.topic, r.partition) not in owned]
        if moved:
            # A rebalance completed since this batch was polled and gave some of its partitions
            # to another member, which resumed from their committed offsets: it redoes these
            # records whatever happens here. The broker would still take this member's commit
            # (the generation is current), and could move a committed offset back behind what
            # the new owner has committed since: more records redone at the next rebalance.
            # Mid-rebalance the assignment can also be empty for a moment and the partitions come
            # back to this member: as after a refused commit, the member then resumes from the
            # committed offsets once stable (_poll), so what it keeps is redone here.
            offsets = {tp: o for tp, o in offsets.items() if tp in owned}
            loop._refused = True
            if loop.log is not None:
                loop.log.warning("commit skipped: partitions moved to another member", records=len(moved))
            if not offsets:
                return False
        deadline = time.monotonic() + COMMIT_RETRY_S
        while True:
            try:
                loop.consumer.commit(offsets)
                return True
            except COMMIT_REFUSED as exc:  # a rebalance: the batch is redone by whoever owns it next
                loop._refused = True  # here too, if this member keeps the partition (see _poll)
                if loop.log is not None:
                    loop.log.warning("commit refused after rebalance", error=str(exc), records=len(batch))
                return False
            except KafkaError as exc:
                if not exc.retriable:  # connection refused, coordinator unknown, timeouts are retriable
                    raise
                if time.monotonic() > deadline:
                    if loop.log is not None:
                        loop.log.warning("commit skipped: broker unreachable", error=str(exc), records=len(batch))
                    return False
                time.sleep(0.5)


class TransactionCommit:
    """Exactly-once (the module's second table): each batch is one transaction holding its
    outputs and its input offsets, committed before the next batch is handled; an aborted
    one is rewound to the committed offsets and redone. The producer needs a transactional id.
    """

    def __init__(self, loop: BatchLoop):
        self.loop = loop

    def check(self) -> None:
        """The producer's private names abort_transaction relies on (kafka_adapter)."""
        kafka_adapter.check_transactional_producer(self.loop.producer)

    def start(self) -> None:
        self.loop.producer.init_transactions()  # aborts what a dead predecessor with this id left open

    def begin(self) -> None:
        self.loop.producer.begin_transaction()

    def reseek_after_poll(self, membership_changed: bool) -> bool:
        """After every rebalance: kafka-python keeps the position of a partition this member
        held before and holds after it, even when another member owned it in between (in a
        generation whose assignment never reached this one) and committed past that position:
        redoing from there commits those frames twice. Only the committed offsets can be trusted."""
        return membership_changed

    def confirm_and_commit(self, in_flight: InFlight) -> tuple[float | None, bool]:
        """The acknowledgements are awaited inside the commit (None: not timed apart from it)."""
        return None, self._commit_transaction(in_flight.batch, in_flight.futures, in_flight.group)

    def settle(self, sent: InFlight) -> tuple[InFlight | None, bool]:
        """One transaction at a time: the batch is committed (or aborted and rewound) now,
        before the next one is handled; nothing stays in flight."""
        return None, self.settled(self.loop._confirm_and_commit(sent))

    def settled(self, stats: BatchStats) -> bool:
        if stats.committed:
            return False
        self._rewind()
        return True

    def _commit_transaction(self, batch: list[ConsumerRecord], futures: list, group: Any) -> bool:
        """Outputs and input offsets in one transaction; False if it was aborted instead."""
        if group.state != MemberState.STABLE:
            # polled mid-rebalance: its partitions may be on their way to another member, and
            # the generation may already be the new one, which the broker would accept
            return self._abort(batch, "batch polled while the group was rebalancing")
        producer = self.loop.producer
        try:
            confirm(producer, futures)
            producer.send_offsets_to_transaction(next_offsets(batch), group)
            producer.commit_transaction()
            return True
        except ProducerFencedError:
            raise
        except KafkaError as exc:
            return self._abort(batch, f"{type(exc).__name__}: {exc}")

    def _abort(self, batch: list[ConsumerRecord], why: str) -> bool:
        if self.loop.log is not None:
            self.loop.log.warning("transaction aborted", error=why, records=len(batch))
        abort_transaction(self.loop.producer)  # raises if the producer is in a fatal state: the worker exits
        return False

    def _rewind(self) -> None:
        """After an aborted transaction: poll again from the committed offsets of what this member owns.

        Not from the aborted batch's own first offsets: if its partitions changed hands and
        came back meanwhile, another member may have committed past them.
        """
        self.loop._seek_to_committed()
        self.loop.on_abort()


class BatchLoop:
    """poll -> [prepare] -> handle -> send -> confirm -> commit, until ``should_stop()``.

    With a ``prepare`` step (decoding, for the scoring worker) the loop overlaps three
    batches: n+1 is polled and prepared in a background thread and n-1's outputs travel
    to the broker while n is handled. At most one batch is prefetched and one awaits its
    acknowledgements, so memory stays flat, and each batch is committed only after all of
    its own outputs are acknowledged.

    ``transactional=True`` is the exactly-once mode (see the module's second table): the
    producer must carry a transactional id, and each batch is committed in its own
    transaction before the next one is handled.

    The mode is chosen once, here: ``self.commit`` is an OffsetCommit or a TransactionCommit
    (same methods), and the loop never asks which. A batch in hand is a Prefetched (polled,
    being prepared) or an InFlight (handled and sent, awaiting confirmation and commit). The
    kafka-python private names the loop relies on are checked before its first batch
    (run, run_once) and on each renewed consumer: see workers/kafka_adapter.py.
    """

    def __init__(
        self,
        consumer: KafkaConsumer,
        producer: KafkaProducer,
        handle: Callable[[list[ConsumerRecord], Any], list[Output]],
        *,
        batch_size: int,
        batch_timeout_ms: int,
        should_stop: Callable[[], bool],
        prepare: Callable[[list[ConsumerRecord]], Any] | None = None,
        between_batches: Callable[[], None] = lambda: None,
        on_batch: Callable[[BatchStats], None] = lambda stats: None,
        log=None,
        transactional: bool = False,
        on_abort: Callable[[], None] = lambda: None,
        stall_after_s: float | None = None,
        renew_consumer: Callable[[], KafkaConsumer] | None = None,
        on_stall: Callable[[Stall | None], None] = lambda stall: None,
        on_lag: Callable[[dict[TopicPartition, int], set[TopicPartition]], None] | None = None,
        on_unreadable: Callable[[Unreadable], None] = lambda unreadable: None,
    ):
        self.consumer = consumer
        self.producer = producer
        self.handle = handle
        self.prepare = prepare
        self.batch_size = batch_size
        self.batch_timeout_ms = batch_timeout_ms
        self.should_stop = should_stop
        self.between_batches = between_batches
        self.on_batch = on_batch
        self.log = log
        # the commit strategy, chosen once: the loop never asks which it has
        self.commit: OffsetCommit | TransactionCommit = (TransactionCommit if transactional else OffsetCommit)(self)
        self._internals_checked = False  # kafka_adapter's checks, made before the first batch
        self.on_abort = on_abort  # after an aborted transaction: undo what handle changed in the worker
        self._membership: tuple | None = None  # (generation, member id) at the last poll; None before the first
        self._half_joined_since: float | None = None  # first poll that found the member half-joined (see _poll)
        self._refused = False  # at-least-once: a commit was refused since the last reseek
        # Liveness (see LivenessWatch): on a stall the consumer is replaced by renew_consumer()
        # (without one: the member leaves its group and joins again); on_stall(stall) is told
        # of a stall and on_stall(None) of its end.
        self.liveness = LivenessWatch(stall_after_s) if stall_after_s else None
        self.renew_consumer = renew_consumer
        self.on_stall = on_stall
        # on_lag(uncommitted per partition, partitions this member owns) after each measurement
        self.on_lag = on_lag
        self.on_unreadable = on_unreadable  # told of each record skipped because the client cannot decode it
        self.measure_every_s = min(MEASURE_EVERY_S, stall_after_s / 4) if stall_after_s else MEASURE_EVERY_S
        self._measured_at = float("-inf")
        self._reseeks = 0  # how often positions were reset to the committed offsets: a batch polled before is stale
        self._handed: dict[TopicPartition, int] = {}  # per partition, one past the last record a poll handed over

    @property
    def transactional(self) -> bool:
        """Whether this is the exactly-once loop (for readers; the loop itself asks self.commit)."""
        return isinstance(self.commit, TransactionCommit)

    def _check_kafka_internals(self) -> None:
        """Before the first batch: every kafka-python private name the loop relies on exists on
        the actual consumer (and, exactly-once, producer), else KafkaInternalsError naming it.
        Not in __init__: unit tests build loops around stand-in consumers that have only what
        the method under test reads (tests/test_liveness.py)."""
        if not self._internals_checked:
            kafka_adapter.check_consumer(self.consumer)
            self.commit.check()
            self._internals_checked = True

    def _poll(self, timeout_ms: int) -> tuple[list[ConsumerRecord], float, Any]:
        """A batch, the seconds it took, and the group membership it was polled under.

        Exactly-once commits a batch's offsets with that membership, not the one current at
        commit time: the overlapped loop polls batch n+1 (which may complete a rebalance)
        before it commits batch n, and the broker must fence n's offsets if its partitions
        have moved meanwhile (KIP-447) rather than accept them from the member that now
        holds a newer generation.
        """
        group = self.consumer.group_metadata()
        if group.group_id is not None and group.state != MemberState.STABLE:
            timeout_ms = max(timeout_ms, REJOIN_POLL_MS)
        start = time.perf_counter()
        batch = poll_batch(self.consumer, self.batch_size, timeout_ms, self._unreadable)
        for r in batch:
            tp = TopicPartition(r.topic, r.partition)
            self._handed[tp] = max(self._handed.get(tp, 0), r.offset + 1)
        group = self.consumer.group_metadata()
        if group.group_id is not None and group.state != MemberState.STABLE and (batch or not self._join_pending()):
            self._half_joined_since = self._half_joined_since or time.monotonic()
            if time.monotonic() - self._half_joined_since > HALF_JOINED_S:
                self._rejoin_afresh(group)
                group, batch = self.consumer.group_metadata(), []
        else:
            self._half_joined_since = None
        membership = (group.generation_id, group.member_id)
        # the first poll counts as a change too: the loop cannot know in which generation a
        # consumer handed to it fetched, and poll_batch may have spanned a rebalance
        changed = membership != self._membership
        self._membership = membership
        # Exactly-once, after every rebalance (TransactionCommit.reseek_after_poll says why).
        # At-least-once, once the group is stable after a refused commit: the refused batch
        # lies behind the position, and if this member kept its partition and no record
        # follows on it, nothing would ever commit it (issue 16: the group's lag stayed > 0
        # for good). Only the committed offsets can be trusted.
        if self.commit.reseek_after_poll(changed) or (self._refused and group.state == MemberState.STABLE):
            if self.log is not None and batch:
                self.log.info("batch dropped, positions reset to the committed offsets",
                              generation=group.generation_id, records=len(batch), after="rebalance" if changed else "refused commit")
            self._seek_to_committed()
            self._refused = False
            batch = []
        return batch, time.perf_counter() - start, group

    def _unreadable(self, unreadable: Unreadable) -> None:
        if self.log is not None:
            self.log.warning("record skipped: the Kafka client cannot decode it", topic=unreadable.partition.topic,
                             partition=unreadable.partition.partition, offset=unreadable.offset, error=unreadable.error)
        self.on_unreadable(unreadable)

    def _join_pending(self) -> bool:
        """Whether kafka-python still means to finish this member's join in a later poll.

        A member that is not STABLE and has no join pending is half-joined even when its polls
        bring nothing: it stays REBALANCING for good (seen in CI: a commit refused with
        RebalanceInProgressError, the join completed in the background, and no record followed
        on the member's partitions, so the refused batch was never redone). The adapter reads
        the coordinator strictly, not through a defaulting getattr, so that a kafka-python
        without it fails loudly
        instead of hiding the state (kafka-python is pinned in deploy/requirements.lock).
        """
        return kafka_adapter.join_pending(self.consumer)

    def _rejoin_afresh(self, group: Any) -> None:
        """Leave the group and subscribe again: the way out of kafka-python's half-joined state.

        kafka-python 3.0.12 can finish a JoinGroup/SyncGroup in the background after the poll
        that started it gave up, and a later poll may then find no reason to rejoin: the
        member fetches while its state stays REBALANCING, with heartbeats off, until the
        broker evicts it, and it never learns (reproduced by the test of a rebalance with a
        stale position: the broker showed the group Stable, the member stayed REBALANCING).
        Exactly-once aborts every such batch, so the worker would spin without progress.
        """
        if self.log is not None:
            self.log.warning("leaving and joining the group afresh", generation=group.generation_id,
                             half_joined_s=round(time.monotonic() - self._half_joined_since, 1) if self._half_joined_since else None)
        topics = sorted(self.consumer.subscription() or [])
        self.consumer.unsubscribe()  # leaves the group and resets the member's generation
        self.consumer.subscribe(topics)
        self._half_joined_since = None

    def _seek_to_committed(self) -> None:
        """Every owned partition back to its committed offset, read stable (the broker makes
        the read wait for a transaction still open on it): where exactly-once resumes."""
        self._reseeks += 1
        self._handed.clear()
        owned = list(self.consumer.assignment())
        # KafkaTimeoutError after COMMIT_RETRY_S: the worker exits, its successor starts from the commits
        for tp, offset in committed_offsets(self.consumer, owned, int(1000 * COMMIT_RETRY_S)).items():
            if offset is None:
                self.consumer.seek_to_beginning(tp)  # never committed: auto_offset_reset is earliest
            else:
                self.consumer.seek(tp, offset)

    def _progressed(self) -> None:
        if self.liveness is not None and self.liveness.progressed() is not None:
            self._stall_over()

    def _stall_over(self) -> None:
        if self.log is not None:
            self.log.info("consumer moving again after a stall")
        self.on_stall(None)

    def _measure(self) -> Stall | None:
        """Every measure_every_s: the group's lag (to on_lag) and, from the same offsets, a
        stall seen now (LivenessWatch.look), or None."""
        if self.liveness is None and self.on_lag is None:
            return None
        now = time.monotonic()
        if now - self._measured_at < self.measure_every_s:
            return None
        self._measured_at = now
        owned = set(self.consumer.assignment())
        try:
            offsets = group_offsets(self.consumer)
            uncommitted = offsets.uncommitted()
            if self.on_lag is not None:
                self.on_lag(self._lag(offsets, uncommitted, owned), owned)
            waiting = self._waiting(offsets, uncommitted, owned) if self.liveness is not None else {}
        except KafkaError as exc:  # the broker away: no gauge moves, and it is no stall of this member
            if self.log is not None:
                self.log.warning("lag not measured", error=str(exc))
            waiting = {}
        if self.liveness is None:
            return None
        was_stalled = self.liveness.stall is not None
        stall = self.liveness.look(waiting)
        if was_stalled and self.liveness.stall is None:  # the look found nothing waiting
            self._stall_over()
        return stall

    def _lag(self, offsets: GroupOffsets, uncommitted: dict[TopicPartition, int],
             owned: set[TopicPartition]) -> dict[TopicPartition, int]:
        """The records behind, per partition: for those this stable member owns, the records it
        was handed and has not committed plus those it has not fetched yet, so that the commit
        markers of a transactional input (which end minus committed counts) do not count: the
        gauge reads 0 once everything is handled (issue 14: it stayed at 1). Partitions of
        other members, or any while not stable or after a refused commit: end minus committed.
        """
        group = self.consumer.group_metadata()
        if (group.group_id is not None and group.state != MemberState.STABLE) or self._refused:
            return uncommitted
        lag = dict(uncommitted)
        deadline = _Deadline(LAG_TIMEOUT_MS)
        for tp in owned & offsets.ends.keys():
            position = self.consumer.position(tp, timeout_ms=deadline.ms())
            if position is None:
                continue
            committed = offsets.committed[tp]
            handed = max(self._handed.get(tp, committed), committed)
            lag[tp] = (handed - committed) + max(0, offsets.ends[tp] - max(position, handed))
        return lag

    def _waiting(self, offsets: GroupOffsets, uncommitted: dict[TopicPartition, int],
                 owned: set[TopicPartition]) -> dict[TopicPartition, int]:
        """The records waiting for this member, per partition.

        A stable member: those between its position and the end of each partition it owns,
        and, after a refused commit not yet healed by a reseek (see _poll), every record it
        has not committed: the refused batch lies behind its position. Not the committed lag
        always: a commit marker after a batch's last record would wait for ever. A member that
        is not stable cannot say what it owns: every uncommitted record of its topics waits.
        """
        group = self.consumer.group_metadata()
        if group.group_id is not None and group.state != MemberState.STABLE:
            return uncommitted
        if self._refused:
            return {tp: n for tp, n in uncommitted.items() if tp in owned}
        deadline = _Deadline(LAG_TIMEOUT_MS)
        positions = {tp: self.consumer.position(tp, timeout_ms=deadline.ms()) for tp in owned if tp in offsets.ends}
        return {tp: max(0, offsets.ends[tp] - (position or 0)) for tp, position in positions.items()}

    def _recover(self, stall: Stall) -> None:
        """Replace the consumer (or leave and rejoin the group) after a stall; give up after MAX_RENEWALS."""
        self.on_stall(stall)
        if self.liveness.renewals >= MAX_RENEWALS:
            raise ConsumerStalledError(f"consumer stalled after {MAX_RENEWALS} renewals: {stall.describe()}")
        self.liveness.renewed()
        if self.log is not None:
            self.log.warning(f"consumer stalled: {stall.describe()}; renewing it",
                             renewal=self.liveness.renewals, bound_s=self.liveness.bound_s)
        if self.renew_consumer is None:
            self._rejoin_afresh(self.consumer.group_metadata())
            return
        old = self.consumer
        try:
            old.close(autocommit=False)  # leaves the group: its partitions move at once
        except KafkaError as exc:
            if self.log is not None:
                self.log.warning("closing the stalled consumer failed", error=str(exc))
        # Exactly-once: the new member's first poll has another membership, so _poll seeks
        # every owned partition to its committed offset before anything is handled.
        self.consumer = self.renew_consumer()
        kafka_adapter.check_consumer(self.consumer)

    def _timed_prepare(self, batch: list[ConsumerRecord]) -> tuple[Any, float]:
        start = time.perf_counter()
        prepared = self.prepare(batch) if self.prepare is not None else None
        return prepared, time.perf_counter() - start

    def _handle_and_send(self, batch: list[ConsumerRecord], prepared: Any, stages: dict[str, float], group: Any) -> InFlight:
        start = time.perf_counter()
        outputs = self.handle(batch, prepared)
        handled = time.perf_counter()
        self.commit.begin()
        futures = send(self.producer, outputs)
        stages.update(handle=handled - start, send=time.perf_counter() - handled)
        return InFlight(batch, outputs, futures, stages, group)

    def _confirm_and_commit(self, in_flight: InFlight) -> BatchStats:
        """Wait for every acknowledgement of a batch's outputs, then commit it: the only commit there is."""
        waited = time.perf_counter()
        acked, committed = self.commit.confirm_and_commit(in_flight)
        if acked is None:  # awaited inside the commit: counted as commit time
            acked = waited
        done = time.perf_counter()
        stages = in_flight.stages
        stages.update(confirm=acked - waited, commit=done - acked)
        if committed:
            self._progressed()
        busy = sum(stages[k] for k in ("wait", "handle", "send", "confirm", "commit"))
        stats = BatchStats(len(in_flight.batch), len(in_flight.outputs), busy, committed, stages)
        self.on_batch(stats)
        return stats

    def _finish(self, batch: list[ConsumerRecord], prepared: Any, stages: dict[str, float], group: Any) -> BatchStats:
        return self._confirm_and_commit(self._handle_and_send(batch, prepared, stages, group))

    def run_once(self) -> BatchStats | None:
        """One batch without overlap (what the tests and the inversion worker use)."""
        self._check_kafka_internals()
        self.between_batches()
        stall = self._measure()
        if stall is not None:
            self._recover(stall)
        batch, poll_s, group = self._poll(self.batch_timeout_ms)
        if not batch:
            return None
        prepared, prepare_s = self._timed_prepare(batch)
        stats = self._finish(batch, prepared, {"poll": poll_s, "prepare": prepare_s, "wait": 0.0}, group)
        self.commit.settled(stats)  # exactly-once: rewound if aborted
        return stats

    def run(self) -> None:
        try:
            self._check_kafka_internals()
            self.commit.start()  # exactly-once: init_transactions
            if self.prepare is None:
                while not self.should_stop():
                    self.run_once()
            else:
                self._run_overlapped()
        finally:
            self.close()

    def _run_overlapped(self) -> None:
        """A three-stage pipeline: batch n+1 is prepared and batch n-1's acknowledgements
        arrive while batch n is handled; each batch still commits only after its own acks."""
        with ThreadPoolExecutor(1, thread_name_prefix="prepare") as executor:
            pending: Prefetched | None = None  # polled, being prepared
            in_flight: InFlight | None = None  # handled and sent, not yet confirmed and committed
            while True:
                stopping = self.should_stop()
                self.between_batches()
                stall = None if stopping else self._measure()
                if stall is not None:  # finish what is in hand, then renew
                    if in_flight is not None:
                        self._confirm_and_commit(in_flight)
                    if pending is not None:
                        pending.prepared.result()  # prepared for nothing: redelivered from the committed offsets
                    in_flight = pending = None
                    self._recover(stall)
                following, reseeks = None, self._reseeks
                if not stopping:
                    # With work in hand, wait only briefly for more (under load records are
                    # already buffered and return at once). Not zero or a few ms: kafka-python
                    # completes a group rejoin inside a poll that may wait; with 20 ms polls a
                    # busy member never rejoined and kept consuming with refused commits.
                    busy = pending is not None or in_flight is not None
                    batch, poll_s, group = self._poll(min(BUSY_POLL_MS, self.batch_timeout_ms) if busy else self.batch_timeout_ms)
                    if batch:
                        following = Prefetched(batch, executor.submit(self._timed_prepare, batch), poll_s, group)
                if pending is not None and self._reseeks != reseeks:
                    # that poll reset the positions to the committed offsets: the batch polled
                    # before it is polled again from there, and committing it now would commit
                    # its offsets behind the positions (handled twice)
                    pending.prepared.result()
                    pending = None
                sent = None
                if pending is not None:
                    waited = time.perf_counter()
                    prepared, prepare_s = pending.prepared.result()
                    stages = {"poll": pending.poll_s, "prepare": prepare_s, "wait": time.perf_counter() - waited}
                    # at-least-once: it stays in flight, its acks arriving while the next batch is
                    # handled; exactly-once: committed now, one transaction at a time
                    sent, rewound = self.commit.settle(self._handle_and_send(pending.batch, prepared, stages, pending.group))
                    if rewound:
                        following = None  # dropped: polled again from the committed offsets
                if in_flight is not None:
                    self._confirm_and_commit(in_flight)
                in_flight, pending = sent, following
                if stopping and pending is None and in_flight is None:
                    return

    def close(self) -> None:
        try:
            self.producer.flush(timeout=30)
        except KafkaError:
            pass
        self.producer.close(timeout=30)
        self.consumer.close(autocommit=False)  # leaves the group now, so its partitions move at once
