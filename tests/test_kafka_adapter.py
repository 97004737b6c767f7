"""The kafka-python adapter's checks and the loop's commit strategies, without a broker.

A kafka-python upgrade that renames a private name the workers rely on must stop the worker
at start with an error naming it, never make a workaround do nothing in silence (before the
adapter, abort_transaction went on without forgetting the aborted offsets).
"""
from __future__ import annotations

import re
from types import SimpleNamespace

import kafka
import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import CorruptRecordError, KafkaError
from kafka.structs import ConsumerGroupMetadata, MemberState

from workers import kafka_adapter
from workers.delivery import BatchLoop, OffsetCommit, Output, TransactionCommit, abort_transaction, poll_readable
from workers.kafka_adapter import KafkaInternalsError

NOWHERE = "127.0.0.1:1"  # the clients are built, never connected


def names(missing: str):
    """The error a check must raise: the missing name and the kafka-python version."""
    return pytest.raises(KafkaInternalsError, match=rf"kafka-python {re.escape(kafka.__version__)}: .*'{re.escape(missing)}'")


# --- the checks, on the real clients of the pinned kafka-python ----------------------------
def test_the_pinned_kafka_python_has_every_private_name_the_workers_use():
    consumer = KafkaConsumer(bootstrap_servers=NOWHERE, api_version=(3, 9), group_id="g")
    producer = KafkaProducer(bootstrap_servers=NOWHERE, api_version=(3, 9), transactional_id="t")
    try:
        kafka_adapter.check_consumer(consumer)
        kafka_adapter.check_transactional_producer(producer)
        assert kafka_adapter.draining_partition(consumer) is None  # nothing fetched yet
        assert kafka_adapter.join_pending(consumer) in (True, False)
        producer._transaction_manager._pending_txn_offset_commits[TopicPartition("t", 0)] = object()
        kafka_adapter.forget_pending_offsets(producer)
        assert producer._transaction_manager._pending_txn_offset_commits == {}
    finally:
        consumer.close(autocommit=False)
        producer.close(timeout=0)


# --- the checks, on clients of a kafka-python that renamed something -----------------------
class Coordinator:
    def need_rejoin(self):
        return False


class Fetcher:
    def __init__(self):
        self._next_partition_records = None


def consumer_like(**without) -> SimpleNamespace:
    parts = {"_coordinator": Coordinator(), "_fetcher": Fetcher()}
    return SimpleNamespace(**{k: v for k, v in parts.items() if k not in without})


@pytest.mark.parametrize("missing", ["_coordinator", "_fetcher"])
def test_a_consumer_without_a_private_name_fails_the_check_naming_it(missing):
    with names(missing):
        kafka_adapter.check_consumer(consumer_like(**{missing: True}))


def test_a_renamed_need_rejoin_or_next_partition_records_is_named():
    consumer = consumer_like()
    consumer._coordinator = SimpleNamespace(need_rejoin_now=lambda: False)
    with names("need_rejoin"):
        kafka_adapter.check_consumer(consumer)
    consumer = consumer_like()
    consumer._fetcher = SimpleNamespace(_next_records=None)
    with names("_next_partition_records"):
        kafka_adapter.check_consumer(consumer)


def test_partition_records_that_keep_their_partition_elsewhere_are_named():
    class RenamedFetcher:
        class PartitionRecords:
            def __init__(self, fetch_offset, tp):
                self.partition = tp

    with names("topic_partition"):
        kafka_adapter.check_partition_records_class(RenamedFetcher)
    with names("PartitionRecords"):
        kafka_adapter.check_partition_records_class(type("NoRecords", (), {}))


def test_a_transactional_producer_without_the_pending_offsets_fails_the_check_naming_them():
    with names("_transaction_manager"):
        kafka_adapter.check_transactional_producer(SimpleNamespace())
    with names("_pending_txn_offset_commits"):
        kafka_adapter.check_transactional_producer(SimpleNamespace(_transaction_manager=SimpleNamespace(_pending_offsets={})))
    kafka_adapter.check_transactional_producer(SimpleNamespace(_transaction_manager=None))  # no transactional id: not ours to say


def test_abort_transaction_no_longer_forgets_nothing_in_silence():
    aborted = []
    renamed = SimpleNamespace(abort_transaction=lambda: aborted.append(1), _transaction_manager=SimpleNamespace(_pending={1: 2}))
    with names("_pending_txn_offset_commits"):
        abort_transaction(renamed)
    pending = {TopicPartition("t", 0): 3}
    abort_transaction(SimpleNamespace(abort_transaction=lambda: aborted.append(1),
                                      _transaction_manager=SimpleNamespace(_pending_txn_offset_commits=pending)))
    assert pending == {}


class CorruptConsumer:
    """poll raises what kafka-python raises for a record it cannot decode."""

    def __init__(self, fetcher):
        self._fetcher, self.positions = fetcher, {TopicPartition("t", 0): 7}

    def poll(self, timeout_ms=None, max_records=None):
        raise CorruptRecordError("bad header key")

    def assignment(self):
        return set(self.positions)

    def position(self, tp):
        return self.positions[tp]

    def seek(self, tp, offset):
        self.positions[tp] = offset


def test_poll_readable_skips_an_undecodable_record_and_names_a_renamed_fetcher_attribute():
    tp, skipped = TopicPartition("t", 0), []
    consumer = CorruptConsumer(SimpleNamespace(_next_partition_records=SimpleNamespace(topic_partition=tp)))
    assert poll_readable(consumer, 0, on_unreadable=skipped.append) == {}
    assert consumer.positions[tp] == 8 and skipped[0].offset == 7
    with pytest.raises(CorruptRecordError):  # the error came before a partition was in hand: as before
        poll_readable(CorruptConsumer(SimpleNamespace(_next_partition_records=None)), 0)
    with names("_next_partition_records"):  # before the adapter: the CorruptRecordError, saying nothing of why
        poll_readable(CorruptConsumer(SimpleNamespace(_records=None)), 0)


# --- the loop checks before its first batch -------------------------------------------------
class Member:
    """A stable group member owning t[0], with records to poll; it records what is done to it."""

    def __init__(self, batches: list[list[int]], **without):
        self.batches, self.calls = list(batches), []
        self._coordinator, self._fetcher = Coordinator(), Fetcher()
        for name in without:
            delattr(self, name)
        self.positions = {TopicPartition("t", 0): 0}
        self.commits: dict[TopicPartition, int] = {}

    def group_metadata(self):
        return ConsumerGroupMetadata(group_id="g", generation_id=1, member_id="m", state=MemberState.STABLE)

    def poll(self, timeout_ms=None, max_records=None):
        self.calls.append("poll")
        if not self.batches:
            return {}
        offsets = self.batches.pop(0)
        tp = TopicPartition("t", 0)
        return {tp: [ConsumerRecord("t", 0, -1, o, 0, 0, b"k", f"in-{o}".encode(), [], None, 1, 4, -1) for o in offsets]}

    def assignment(self):
        return set(self.positions)

    def commit(self, offsets):
        self.calls.append("commit")
        self.commits.update({tp: o.offset for tp, o in offsets.items()})

    def committed(self, tp, timeout_ms=None):
        return self.commits.get(tp)

    def seek(self, tp, offset):
        self.calls.append(("seek", offset))

    def seek_to_beginning(self, tp):
        self.calls.append(("seek", "beginning"))

    def close(self, autocommit=True):
        self.calls.append("close")


class Done:
    is_done = True

    def get(self, timeout=None):
        return None


class Producer:
    """Sends succeed at once; the transactional calls are recorded, and fail where told."""

    def __init__(self, fail_offsets_at: int | None = None, **without):
        self.calls, self.fail_offsets_at, self.sent = [], fail_offsets_at, 0
        self._transaction_manager = SimpleNamespace(_pending_txn_offset_commits={})
        for name in without:
            delattr(self, name)

    def __getattr__(self, name):  # init_transactions, begin_transaction, commit_transaction, abort_transaction, flush, close
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda *args, **kwargs: self.calls.append(name)

    def send(self, topic, key=None, value=None, headers=None):
        self.sent += 1
        return Done()

    def send_offsets_to_transaction(self, offsets, group):
        self.calls.append("send_offsets_to_transaction")
        if self.calls.count("send_offsets_to_transaction") == self.fail_offsets_at:
            self._transaction_manager._pending_txn_offset_commits.update(offsets)
            raise KafkaError("injected")


def loop_of(member, producer, transactional=False, **kw) -> BatchLoop:
    return BatchLoop(member, producer, lambda batch, prepared: [Output("out", r.key, r.value) for r in batch],
                     batch_size=8, batch_timeout_ms=0, should_stop=lambda: not member.batches, transactional=transactional, **kw)


@pytest.mark.parametrize("missing", ["_coordinator", "_fetcher"])
def test_the_loop_refuses_to_start_on_a_consumer_without_a_private_name(missing):
    member = Member([[0, 1]], **{missing: True})
    with names(missing):
        loop_of(member, Producer()).run()
    assert "poll" not in member.calls and "close" in member.calls  # nothing polled; the clients closed
    with names(missing):
        loop_of(Member([[0, 1]], **{missing: True}), Producer()).run_once()


def test_the_exactly_once_loop_refuses_to_start_on_a_producer_without_the_pending_offsets():
    producer = Producer(_transaction_manager=True)
    with names("_transaction_manager"):
        loop_of(Member([[0, 1]]), producer, transactional=True).run()
    assert "init_transactions" not in producer.calls
    loop_of(Member([[0, 1]]), Producer(_transaction_manager=True)).run()  # at-least-once does not need them


# --- the strategy, chosen once --------------------------------------------------------------
TRANSACTIONAL = {"init_transactions", "begin_transaction", "commit_transaction", "abort_transaction"}


def test_the_strategy_is_chosen_at_construction():
    assert isinstance(loop_of(Member([]), Producer()).commit, OffsetCommit)
    loop = loop_of(Member([]), Producer(), transactional=True)
    assert isinstance(loop.commit, TransactionCommit) and loop.transactional


def test_at_least_once_commits_offsets_and_opens_no_transaction():
    member, producer = Member([[0, 1], [2]]), Producer()
    loop_of(member, producer).run()
    assert member.commits == {TopicPartition("t", 0): 3} and member.calls.count("commit") == 2
    assert producer.sent == 3 and not TRANSACTIONAL & set(producer.calls)


def test_exactly_once_commits_each_batch_in_a_transaction_and_rewinds_an_aborted_one():
    # the first poll is dropped (every owned partition sought to its committed offset): the
    # loop cannot know in which generation a consumer handed to it fetched
    member, producer, aborts = Member([[], [0, 1], [2], [2]]), Producer(fail_offsets_at=2), []
    stats = []
    loop_of(member, producer, transactional=True, on_abort=lambda: aborts.append(1), on_batch=stats.append).run()
    assert "commit" not in member.calls  # offsets go with the transaction, never through the consumer
    assert [c for c in producer.calls if c in TRANSACTIONAL] == [
        "init_transactions", "begin_transaction", "commit_transaction",
        "begin_transaction", "abort_transaction",  # the second batch: its offsets refused
        "begin_transaction", "commit_transaction",  # redone
    ]
    assert producer._transaction_manager._pending_txn_offset_commits == {}  # forgotten with the abort
    # sought after the first poll, and rewound after the abort (to the beginning: nothing committed here)
    assert aborts == [1] and member.calls.count(("seek", "beginning")) == 2
    assert [s.committed for s in stats] == [True, False, True]


def test_exactly_once_overlapped_drops_the_prefetched_batch_after_an_abort():
    member, producer, handled = Member([[], [0, 1], [2], [3], [2], [3]]), Producer(fail_offsets_at=2), []
    loop = BatchLoop(member, producer, lambda batch, prepared: handled.append([r.offset for r in batch]) or [],
                     prepare=lambda batch: None, batch_size=8, batch_timeout_ms=0,
                     should_stop=lambda: not member.batches and len(handled) >= 4, transactional=True)
    loop.run()
    # [3] was prefetched while [2] was aborted: dropped unhandled, and both polled again
    assert handled == [[0, 1], [2], [2], [3]]
    assert producer.calls.count("commit_transaction") == 3 and producer.calls.count("abort_transaction") == 1
