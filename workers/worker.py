"""What every worker process shares: bundle and model, ops endpoints, the negatives
follower, signals, and the batch loop of :mod:`workers.delivery` around its ``handle``."""
from __future__ import annotations

import faulthandler
import os
import signal
import socket
import threading
from abc import ABC, abstractmethod

from kafka import TopicPartition
from kafka.consumer.fetcher import ConsumerRecord

from pipeline.bank import NegativeBank
from pipeline.bundle import load_bundle_with_model
from pipeline.errors import ConfigError
from schemas.settings import Settings
from workers.delivery import BatchLoop, BatchStats, Output, Stall, dead_letter, fitting
from workers.kafka_clients import make_consumer, make_producer
from workers.negatives import NegativeCheck, NegativeFollower
from workers.signing import keys_from_settings
from workers.ops import OpsServer, WorkerMetrics, configure_logging, get_logger
from workers.topic_watch import TopicWatch



class Worker(ABC):
    """A process around one batch loop: settings, name, logs, ops endpoints, signals."""

    role: str

    def __init__(self, settings: Settings):
        self.settings = settings
        self.name = settings.worker.name or f"{self.role}-{socket.gethostname()}-{os.getpid()}"
        self.log = get_logger(self.role).bind(worker=self.name)
        self.stop_event = threading.Event()
        self.metrics = WorkerMetrics(self.role, max_cameras=settings.worker.metrics_cameras)
        self.ops = OpsServer(self.metrics, settings.worker.http_host, settings.worker.http_port, self.status)
        self.bank: NegativeBank | None = None  # a subclass that follows ood.negatives sets it
        self.follower: NegativeFollower | None = None
        self.loop: BatchLoop | None = None
        self.batches = 0
        self.stage_seconds: dict[str, float] = {}  # stages inside handle, set by the subclass
        self._lag_labels: set[tuple[str, str]] = set()

    # --- what a worker defines -------------------------------------------------------------
    prepare_ahead = None  # optional: a step run ahead, overlapped with the previous batch (see BatchLoop)

    @abstractmethod
    def handle(self, records: list[ConsumerRecord], prepared=None) -> list[Output]: ...

    @abstractmethod
    def input(self) -> tuple[str, str, int]:
        """(topic, consumer group, batch size)."""

    def counters(self) -> dict:
        """Extra fields of /status and of the per-batch log line."""
        return {}

    def close(self) -> None:
        """Release what the subclass holds."""

    def on_abort(self) -> None:
        """Exactly-once mode: a batch's transaction was aborted; undo what ``handle`` changed."""

    # --- shared --------------------------------------------------------------------------
    def status(self) -> dict:
        return {
            "worker": self.name,
            "role": self.role,
            "exactly_once": self.exactly_once(),
            "batches": self.batches,
            **self.counters(),
        }

    def exactly_once(self) -> bool:
        return self.settings.worker.exactly_once

    def starting(self) -> dict:
        """Fields of the 'starting' log line."""
        return {}

    def transactional_id(self) -> str:
        """Stable across restarts of a worker with the same name, so a restart aborts the dead one's transaction."""
        return f"{self.settings.kafka.client_id}-{self.role}-{self.name}"

    def _handle_fitting(self, records: list[ConsumerRecord], prepared=None) -> list[Output]:
        return fitting(self.handle(records, prepared), self.settings.kafka.max_message_bytes, self.reject)

    def reject(self, record: ConsumerRecord, reason: str, detail: str) -> Output:
        self.metrics.deadletters.labels(reason=reason).inc()
        self.log.info("dead-lettered", reason=reason, detail=detail[:200], topic=record.topic, partition=record.partition, offset=record.offset)
        return dead_letter(self.settings.topics.deadletter, record, reason, detail, self.name, self.settings.kafka.max_message_bytes)

    def _bank_metrics(self) -> None:
        self.metrics.bank_size.set(len(self.bank.entries))
        self.metrics.bank_version.set(self.bank.version)

    def between_batches(self) -> None:
        self.ops.beat()
        if self.follower is not None:
            self.follower.poll()
            self._bank_metrics()

    def on_stall(self, stall: Stall | None) -> None:
        """The batch loop's liveness watch saw a stall (and renews the consumer), or its end."""
        self.metrics.stalled.set(0 if stall is None else 1)
        if stall is None:
            self.ops.set_ready(True)
        else:
            self.metrics.consumer_renewals.inc()
            self.ops.set_ready(False, reason=f"stalled: {stall.describe()}")

    def on_batch(self, stats: BatchStats) -> None:
        self.batches += 1
        self.metrics.batch_seconds.observe(stats.seconds)
        bank = {"bank_size": len(self.bank.entries), "bank_version": self.bank.version} if self.bank is not None else {}
        rate = round(stats.records / stats.seconds, 1) if stats.seconds else None
        stages = {k: round(v, 5) for k, v in {**stats.stages, **self.stage_seconds}.items()}
        self.log.info("batch", records=stats.records, outputs=stats.outputs, seconds=round(stats.seconds, 4),
                      records_per_s=rate, committed=stats.committed, stages=stages, **bank, **self.counters())

    def _aborted(self) -> None:
        self.metrics.transactions_aborted.inc()
        self.on_abort()

    def on_lag(self, lag: dict[TopicPartition, int], owned: set[TopicPartition]) -> None:
        """The loop measured its group's uncommitted records (every few seconds, idle or not: a
        stale gauge misleads alerts): per partition this member owns, and the group's total.

        The group's lag counts partitions that no member owns or whose owner stopped
        reporting: it is what the stall alert reads.
        """
        labels = {(tp.topic, str(tp.partition)) for tp in owned}
        for gone in self._lag_labels - labels:  # moved to another worker: its lag is theirs to report now
            self.metrics.consumer_lag.remove(*gone)
        self._lag_labels = labels
        for tp in owned:
            self.metrics.consumer_lag.labels(topic=tp.topic, partition=str(tp.partition)).set(lag.get(tp, 0))
        for topic in {tp.topic for tp in lag}:
            self.metrics.group_lag.labels(topic=topic).set(sum(n for tp, n in lag.items() if tp.topic == topic))

    def watch_topics(self, topic: str) -> TopicWatch:
        """Not ready while the input topic, or the negatives topic a follower reads, does not exist (issue 11)."""
        negatives = {self.settings.topics.negatives: "negatives"} if self.follower is not None else {}
        return TopicWatch(self.settings.kafka, {topic: "input", **negatives}, self.ops, self.log, self.metrics).start()

    def serve(self) -> None:
        """Catch up with what the worker follows, report ready, run batches until SIGTERM, drain, stop."""
        s = self.settings
        topic, group, batch_size = self.input()
        self.ops.start()
        self.log.info("starting", http_port=self.ops.port, input=topic, **self.starting())
        watch: TopicWatch | None = None
        try:
            self.catch_up()

            # read_committed: the outputs of an aborted exactly-once batch (candidates, alerts) never reach the next reader
            def new_consumer():
                return make_consumer(s.kafka, topic, group_id=group, isolation_level="read_committed")

            transactional = {"transactional_id": self.transactional_id(), "transaction_timeout_ms": s.kafka.transaction_timeout_ms}
            self.loop = loop = BatchLoop(
                new_consumer(),
                make_producer(s.kafka, **(transactional if self.exactly_once() else {})),
                self._handle_fitting,
                prepare=self.prepare_ahead,
                batch_size=batch_size,
                batch_timeout_ms=s.worker.batch_timeout_ms,
                should_stop=self.stop_event.is_set,
                between_batches=self.between_batches,
                on_batch=self.on_batch,
                log=self.log,
                transactional=self.exactly_once(),
                on_abort=self._aborted,
                stall_after_s=s.worker.stall_after_s,
                renew_consumer=new_consumer,
                on_stall=self.on_stall,
                on_lag=self.on_lag,
                on_unreadable=lambda unreadable: self.metrics.unreadable.labels(topic=unreadable.partition.topic).inc(),
            )
            self.ops.set_ready(True)
            watch = self.watch_topics(topic)
            loop.run()
        finally:
            if watch is not None:
                watch.stop()
            self.ops.set_ready(False, reason="stopping")
            if self.follower is not None:
                self.follower.close()
            self.close()
            self.ops.stop()
            self.log.info("stopped", batches=self.batches, **self.counters())

    def catch_up(self) -> None:
        """What the worker must have read before its first batch (a subclass's)."""

    @classmethod
    def main(cls, settings: Settings) -> int:
        configure_logging()
        faulthandler.register(signal.SIGUSR1, all_threads=True)  # kill -USR1 <pid>: every thread's stack to stderr
        worker = cls(settings)

        def stop(signum, _frame):  # finish and commit the batch in flight, then leave the group
            worker.stop_event.set()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        worker.serve()
        return 0


class BundleWorker(Worker):
    """A worker with a detector bundle and its model, that may follow ``ood.negatives``."""

    def __init__(self, settings: Settings):
        if settings.worker.bundle is None:
            raise ConfigError(f"the {self.role} worker needs a bundle: set INTERNEG_WORKER__BUNDLE or --bundle")
        super().__init__(settings)
        self.bundle, self.loaded = load_bundle_with_model(settings.worker.bundle, settings.model.device, settings.model.precision,
                                                          model=settings.model)
        self.signer, self.verifier = keys_from_settings(settings.bank)

    def starting(self) -> dict:
        return {"model_id": self.loaded.model_id, "bundle": str(self.settings.worker.bundle)}

    def status(self) -> dict:
        bank = self.bank
        return {
            **super().status(),
            "model_id": self.loaded.model_id,
            "bank_size": len(bank.entries) if bank is not None else 0,
            "bank_version": bank.version if bank is not None else 0,
            "bank_digest": bank.digest() if bank is not None else "",
            "bank_sha256": bank.sha256() if bank is not None else "",
            "negatives_rejected": self.follower.rejected if self.follower is not None else 0,
            "negatives_verify_key": self.verifier.fingerprint() if self.verifier is not None else None,
            "bank_ids": bank.ranked_ids() if bank is not None else [],
        }

    def catch_up(self) -> None:
        if self.bank is None:
            return
        if self.verifier is None:
            self.log.warning("negatives are not authenticated: anyone who can write to the topic can change this "
                             "worker's bank; set INTERNEG_BANK__VERIFY_KEY (see 'interneg keygen')", topic=self.settings.topics.negatives)
        self.follower = self.follow_negatives(self.bundle, self.bank, self.loaded.model_id)
        self._bank_metrics()

    def follow_negatives(self, bundle, bank: NegativeBank, model_id: str) -> NegativeFollower:
        """A follower of ood.negatives for ``bank``, caught up (read to the end)."""
        s = self.settings
        follower = NegativeFollower(
            s.kafka, s.topics.negatives, bank, model_id, self.log, check=NegativeCheck.of(bundle),
            verifier=self.verifier, on_rejected=self.metrics.negatives_rejected.inc,
        )
        applied = follower.catch_up(beat=self.ops.beat)
        self.log.info("negatives caught up", records=applied, bank_size=len(bank.entries), digest=bank.digest()[:16])
        return follower
