"""Readiness follows the topics a worker reads: a deleted input or negatives topic makes
``/readyz`` answer 503 until the topic exists again (issue 11).

Without this a scorer whose ``ood.negatives`` was deleted sits silently frozen while
``/readyz`` says ready: kafka-python's consumer keeps its metadata cache for a minute
and more after a deletion, and ``consumer.topics()`` can block without a timeout. So the
watch asks the broker itself, on a daemon thread of its own, with a dedicated admin
client whose requests are bounded: the batch loop never waits on it.

Only a definite answer counts: the broker saying UNKNOWN_TOPIC_OR_PARTITION for a topic.
A request that fails (broker unreachable, timeout) changes nothing; a briefly missing
broker is the liveness watch's business, not a missing topic.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable

from kafka import KafkaAdminClient
from kafka.errors import UnknownTopicOrPartitionError
from prometheus_client import Gauge

from schemas.settings import KafkaSettings
from workers.kafka_clients import make_admin

__all__ = ["TopicWatch"]

# One metadata request, and the admin client's first contact with the brokers, at most this long.
ADMIN_TIMEOUT_MS = 10000
# What kafka-python logs (at ERROR) on every metadata refresh, ~10 a second, while a topic
# one of its clients reads does not exist: the watch says it once instead (see _Quiet).
KAFKA_UNKNOWN_TOPIC = "Topic %s not found in cluster metadata"


class _Quiet(logging.Filter):
    """Drops kafka-python's per-refresh "Topic X not found in cluster metadata" for the watched topics."""

    def __init__(self, topics):
        super().__init__()
        self.topics = set(topics)

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.msg == KAFKA_UNKNOWN_TOPIC and record.args and record.args[0] in self.topics)


class TopicWatch:
    """Every ``period_s``, asks the broker whether ``topics`` exist; while one does not,
    holds the worker not ready (``ops.hold(hold_name, reason)``), sets the gauge
    ``interneg_topic_missing{topic}`` to 1, and logs one line when it goes and one when it
    is back, never one per check (kafka-python's own line per metadata refresh about a
    watched topic is filtered out while the watch runs).

    ``topics`` maps a topic name to what it is to the worker ("input", "negatives"): the
    log line and the readiness reason say both.
    """

    def __init__(
        self,
        kafka: KafkaSettings,
        topics: dict[str, str],
        ops,
        log,
        metrics=None,
        period_s: float = 5.0,
        hold_name: str = "topics",
        admin: Callable[[], KafkaAdminClient] | None = None,
    ):
        self.topics = dict(topics)
        self.ops = ops
        self.log = log
        self.period_s = period_s
        self.hold_name = hold_name
        self._new_admin = admin or (lambda: make_admin(kafka, ADMIN_TIMEOUT_MS))
        self._admin: KafkaAdminClient | None = None
        self._admin_lock = threading.Lock()
        self.missing: set[str] = set()
        self.failing = False  # the last check got no answer (logged once per streak)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._quiet = _Quiet(self.topics)
        self.gauge = None
        if metrics is not None:
            self.gauge = Gauge(
                "interneg_topic_missing",
                "1 while the broker says a topic this worker reads (its input, the negatives) does not exist; "
                "the worker is not ready meanwhile",
                ["topic"],
                registry=metrics.registry,
            )
            for topic in self.topics:
                self.gauge.labels(topic=topic).set(0)

    # -- one check

    def look(self) -> set[str] | None:
        """The watched topics the broker says do not exist; None when it gave no answer."""
        try:
            admin = self._admin
            if admin is None:  # made here, outside the lock: stop() never waits for a bootstrap
                admin = self._new_admin()
                with self._admin_lock:
                    self._admin = admin
            described = admin.describe_topics(list(self.topics))
        except Exception as exc:  # noqa: BLE001 - any failure is "no answer", never "missing"
            self._drop_admin()
            if not self.failing and not self._stop.is_set():
                self.log.warning("topic watch: broker metadata not available; readiness unchanged", error=str(exc)[:300])
            self.failing = True
            return None
        if self.failing:
            self.log.info("topic watch: broker metadata available again")
        self.failing = False
        unknown = UnknownTopicOrPartitionError.errno
        return {t["name"] for t in described if t.get("name") in self.topics and t.get("error_code") == unknown}

    def apply(self, missing: set[str]) -> None:
        """Move readiness, gauge and log to ``missing``; log only what changed."""
        gone, back = missing - self.missing, self.missing - missing
        self.missing = set(missing)
        for topic in sorted(gone):
            self.log.error(
                f"{self.topics[topic]} topic {topic} does not exist: not ready until it is created again",
                topic=topic, kind=self.topics[topic],
            )
        for topic in sorted(back):
            self.log.info(f"{self.topics[topic]} topic {topic} exists again", topic=topic, kind=self.topics[topic])
        if self.gauge is not None:
            for topic in self.topics:
                self.gauge.labels(topic=topic).set(1 if topic in missing else 0)
        if gone or back:
            reason = "; ".join(f"{self.topics[t]} topic {t} does not exist" for t in sorted(missing)) or None
            self.ops.hold(self.hold_name, reason)

    def check(self) -> None:
        missing = self.look()
        if missing is not None and not self._stop.is_set():
            self.apply(missing)

    # -- lifecycle

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.check()
            except Exception as exc:  # noqa: BLE001 - the watch must outlive any surprise
                self.log.warning("topic watch: check failed", error=str(exc)[:300])
            self._stop.wait(self.period_s)
        self._drop_admin()

    def start(self) -> "TopicWatch":
        if self._thread is None:
            logging.getLogger("kafka.cluster").addFilter(self._quiet)
            self._thread = threading.Thread(target=self._run, name="topic-watch", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout_s: float = 2.0) -> None:
        """Stop checking (a request in flight is failed by closing the client); never blocks for long."""
        self._stop.set()
        logging.getLogger("kafka.cluster").removeFilter(self._quiet)
        self._drop_admin()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)

    def _drop_admin(self) -> None:
        with self._admin_lock:
            admin, self._admin = self._admin, None
        if admin is not None:
            try:
                admin.close()
            except Exception:  # noqa: BLE001
                pass
