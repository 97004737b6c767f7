"""Every read or write of a kafka-python private name the workers make is here, checked.

kafka-python (pinned in deploy/requirements.lock, 3.0.12 when this was written) lacks three
things the delivery loop needs (workers/delivery.py says why for each):

- whether the consumer still means to finish its group join (``_coordinator.need_rejoin()``):
  a member left half-joined is only seen this way;
- which partition the consumer was draining when it raised CorruptRecordError
  (``_fetcher._next_partition_records.topic_partition``): to skip the record it cannot read;
- forgetting the input offsets of an aborted transaction
  (``_transaction_manager._pending_txn_offset_commits``): else the next transaction sends
  them again.

An upgrade that renames one of these must fail loudly, at start, not skip or forget nothing in
silence. What is checked where:

- :func:`check_consumer` (BatchLoop, before its first batch and on each renewed consumer):
  on the consumer *instance* (these are set in ``KafkaConsumer.__init__``, not on the class):
  ``_coordinator`` with a callable ``need_rejoin``, and ``_fetcher`` with an attribute
  ``_next_partition_records`` (None until a fetch is being drained, so only its presence is
  checked). The records object held there does not exist until records arrive, so for it the
  *class* is checked: ``Fetcher.PartitionRecords`` exists and its ``__init__`` assigns
  ``topic_partition``.
- :func:`check_transactional_producer` (BatchLoop in exactly-once mode, before its first
  batch; and :func:`forget_pending_offsets` at each call): the producer *instance* has
  ``_transaction_manager`` and the manager (built in ``KafkaProducer.__init__`` when
  idempotence is on, which a transactional id implies) has ``_pending_txn_offset_commits``
  with a ``clear``. A producer whose manager is None has no transactional id: that is not a
  kafka-python change, and its own ``init_transactions``/``abort_transaction`` say so.
- The functions that use the names (:func:`join_pending`, :func:`draining_partition`,
  :func:`forget_pending_offsets`) read them strictly too, never through a defaulting getattr,
  so a caller that skipped the checks (``poll_readable`` of the tail and negatives followers,
  which are no BatchLoop) still gets :class:`KafkaInternalsError`, not a silent no-op.
"""
from __future__ import annotations

from typing import Any

import kafka
from kafka.consumer.fetcher import Fetcher
from kafka.structs import TopicPartition


class KafkaInternalsError(RuntimeError):
    """A kafka-python private name the workers rely on is missing: the client was upgraded
    (or replaced) without updating workers/kafka_adapter.py."""


def _missing(owner: str, name: str, why: str) -> KafkaInternalsError:
    return KafkaInternalsError(
        f"kafka-python {getattr(kafka, '__version__', '?')}: {owner} has no attribute {name!r}, which "
        f"workers/kafka_adapter.py relies on ({why}); this kafka-python is not the pinned one "
        f"(deploy/requirements.lock): update the adapter for it or install the pinned version"
    )


def _get(obj: Any, name: str, owner: str, why: str) -> Any:
    try:
        return getattr(obj, name)
    except AttributeError:
        raise _missing(owner, name, why) from None


_JOIN = "to see a member left half-joined"
_DRAIN = "to skip a record the client cannot decode"
_FORGET = "to forget the offsets of an aborted transaction"


# --- the checks --------------------------------------------------------------------------
def check_consumer(consumer: Any) -> None:
    """Raise KafkaInternalsError naming the first private name of a KafkaConsumer the workers
    use that ``consumer`` (or kafka-python's Fetcher.PartitionRecords class) lacks."""
    coordinator = _get(consumer, "_coordinator", type(consumer).__name__, _JOIN)
    if not callable(_get(coordinator, "need_rejoin", type(coordinator).__name__, _JOIN)):
        raise _missing(type(coordinator).__name__, "need_rejoin (callable)", _JOIN)
    fetcher = _get(consumer, "_fetcher", type(consumer).__name__, _DRAIN)
    _get(fetcher, "_next_partition_records", type(fetcher).__name__, _DRAIN)
    check_partition_records_class()


def check_partition_records_class(fetcher_class: type = Fetcher) -> None:
    """The class of ``_next_partition_records`` keeps its partition in ``topic_partition``
    (checked on the class: no instance exists before records arrive)."""
    records_class = _get(fetcher_class, "PartitionRecords", fetcher_class.__name__, _DRAIN)
    init = getattr(records_class, "__init__", None)
    if "topic_partition" not in getattr(getattr(init, "__code__", None), "co_names", ()):
        raise _missing(f"{fetcher_class.__name__}.PartitionRecords", "topic_partition", _DRAIN)


def check_transactional_producer(producer: Any) -> None:
    """Raise KafkaInternalsError naming the private name of a transactional KafkaProducer the
    workers use that ``producer`` lacks (see the module's docstring for a manager of None)."""
    manager = _get(producer, "_transaction_manager", type(producer).__name__, _FORGET)
    if manager is None:
        return
    pending = _get(manager, "_pending_txn_offset_commits", type(manager).__name__, _FORGET)
    if not callable(getattr(pending, "clear", None)):
        raise _missing(f"{type(manager).__name__}._pending_txn_offset_commits", "clear", _FORGET)


# --- the uses ----------------------------------------------------------------------------
def join_pending(consumer: Any) -> bool:
    """Whether kafka-python still means to finish this member's join in a later poll."""
    coordinator = _get(consumer, "_coordinator", type(consumer).__name__, _JOIN)
    return _get(coordinator, "need_rejoin", type(coordinator).__name__, _JOIN)()


def draining_partition(consumer: Any) -> TopicPartition | None:
    """The partition whose fetched records the consumer was reading when it raised (None
    when it holds none: the error came before a partition's records were taken in hand)."""
    fetcher = _get(consumer, "_fetcher", type(consumer).__name__, _DRAIN)
    records = _get(fetcher, "_next_partition_records", type(fetcher).__name__, _DRAIN)
    if records is None:
        return None
    return _get(records, "topic_partition", type(records).__name__, _DRAIN)


def forget_pending_offsets(producer: Any) -> None:
    """Clear the input offsets the producer's transaction manager still means to send (those
    of a TxnOffsetCommit that failed). Nothing to do for a producer without a manager."""
    check_transactional_producer(producer)
    manager = producer._transaction_manager
    if manager is not None:
        manager._pending_txn_offset_commits.clear()
