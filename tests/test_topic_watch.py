"""Issue 11: a worker whose input or negatives topic is deleted says so on /readyz (503), in
one log line per topic and in interneg_topic_missing, and is ready again once it is back."""
from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request

from kafka.errors import KafkaConnectionError, UnknownTopicOrPartitionError
from prometheus_client.parser import text_string_to_metric_families

from test_faults import admissible_negative, wait_for as until  # this module has a wait_for of its own
from workers.kafka_clients import make_admin
from workers.producer import produce_records
from workers.signing import NegativeSigner
from workers.ops import OpsServer, WorkerMetrics
from workers.topic_watch import KAFKA_UNKNOWN_TOPIC, TopicWatch
from workers.topics import ensure_topics


class Log:
    """Records (level, event, keys) like the structlog logger it stands for."""

    def __init__(self):
        self.lines: list[tuple[str, str, dict]] = []

    def __getattr__(self, level):
        return lambda event, **kw: self.lines.append((level, event, kw))


class FakeAdmin:
    """describe_topics answers from ``self.exists``; ``self.down`` makes it fail like an unreachable broker."""

    def __init__(self):
        self.exists = {"frames", "negatives"}
        self.down = False

    def describe_topics(self, topics):
        if self.down:
            raise KafkaConnectionError("broker unreachable")
        unknown = UnknownTopicOrPartitionError.errno
        return [{"name": t, "error_code": 0 if t in self.exists else unknown, "partitions": []} for t in topics]

    def close(self):
        pass


def gauge(metrics: WorkerMetrics, topic: str) -> float:
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for s in family.samples:
            if s.name == "interneg_topic_missing" and s.labels == {"topic": topic}:
                return s.value
    raise AssertionError(f"no interneg_topic_missing for {topic}")


def test_watch_holds_readiness_logs_once_and_never_clobbers_a_stall():
    metrics, log, admin = WorkerMetrics("scoring"), Log(), FakeAdmin()
    ops = OpsServer(metrics)
    ops.set_ready(True)
    watch = TopicWatch(None, {"frames": "input", "negatives": "negatives"}, ops, log, metrics, admin=lambda: admin)

    for _ in range(3):
        watch.check()
    assert ops.readiness()[0] == 200 and log.lines == [] and gauge(metrics, "negatives") == 0

    admin.exists.discard("negatives")
    for _ in range(3):  # one line, however many checks see it
        watch.check()
    code, body = ops.readiness()
    assert code == 503 and "negatives topic negatives does not exist" in body["reason"]
    assert [(lvl, kw["topic"]) for lvl, ev, kw in log.lines if "does not exist" in ev] == [("error", "negatives")]
    assert gauge(metrics, "negatives") == 1 and gauge(metrics, "frames") == 0

    # a stall ending (set_ready(True)) does not make the worker ready while the topic is missing...
    ops.set_ready(False, reason="stalled: x")
    assert "stalled: x" in ops.readiness()[1]["reason"]
    ops.set_ready(True)
    assert ops.readiness()[0] == 503

    # ...and no answer from the broker changes nothing, logged once per streak
    admin.down = True
    for _ in range(3):
        watch.check()
    assert ops.readiness()[0] == 503 and gauge(metrics, "negatives") == 1
    assert len([ev for _, ev, _ in log.lines if "not available" in ev]) == 1
    admin.down = False

    admin.exists.add("negatives")
    ops.set_ready(False, reason="stalled: y")  # the topic coming back does not clear a stall
    for _ in range(3):
        watch.check()
    assert ops.readiness() == (503, {"status": "not ready", "reason": "stalled: y"})
    assert [kw["topic"] for _, ev, kw in log.lines if "exists again" in ev] == ["negatives"]
    assert gauge(metrics, "negatives") == 0
    ops.set_ready(True)
    assert ops.readiness()[0] == 200

    admin.down = True  # a broker unreachable from the start never flips readiness
    watch.apply(set())
    fresh = TopicWatch(None, {"frames": "input"}, ops, Log(), admin=lambda: admin)
    fresh.check()
    assert ops.readiness()[0] == 200


def test_kafka_python_lines_about_a_watched_topic_are_quiet_while_the_watch_runs(caplog):
    kafka = logging.getLogger("kafka.cluster")
    watch = TopicWatch(None, {"frames": "input"}, OpsServer(WorkerMetrics("scoring")), Log(), admin=FakeAdmin, period_s=60)
    with caplog.at_level(logging.INFO):
        watch.start()
        kafka.error(KAFKA_UNKNOWN_TOPIC, "frames")  # watched: the watch says it once instead
        kafka.error(KAFKA_UNKNOWN_TOPIC, "other")
        watch.stop()
        kafka.error(KAFKA_UNKNOWN_TOPIC, "frames")
    assert [r.getMessage() for r in caplog.records if r.name == "kafka.cluster"] == [
        "Topic other not found in cluster metadata", "Topic frames not found in cluster metadata"]


def readyz(worker) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{worker.port}/readyz", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def wait_for(worker, predicate, timeout_s: float, what: str) -> tuple[int, dict]:
    deadline = time.monotonic() + timeout_s
    while True:
        assert worker.process.poll() is None, f"worker exited; log: {worker.log_tail(30)}"
        answer = readyz(worker)
        if predicate(*answer):
            return answer
        assert time.monotonic() < deadline, f"{what} not within {timeout_s} s: last /readyz {answer}; log: {worker.log_tail(30)}"
        time.sleep(0.5)


def naming(worker, topic: str) -> list[str]:
    """The worker's log lines that name ``topic``."""
    return [line for line in worker.log_path.read_text(errors="replace").splitlines() if topic in line]


def watch_lines(worker, phrase: str) -> dict[str, int]:
    """topic -> number of the worker's log lines with ``phrase`` that name it."""
    counts: dict[str, int] = {}
    for line in worker.log_path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and phrase in str(record.get("event")) and "topic" in record:
            counts[record["topic"]] = counts.get(record["topic"], 0) + 1
    return counts


def missing_gauge(worker) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{worker.port}/metrics", timeout=5) as r:
        body = r.read().decode()
    return {s.labels["topic"]: s.value for f in text_string_to_metric_families(body) for s in f.samples
            if s.name == "interneg_topic_missing"}


def test_deleted_topics_fail_readiness_until_they_exist_again(stream_settings, tiny_bundle_dir, workers):
    s = stream_settings
    s.worker.bundle = tiny_bundle_dir
    negatives, frames = s.topics.negatives, s.topics.frames
    scorer = workers("score-worker", s, "scorer-topics")
    scorer.wait_ready()
    # one negative in the bank, so the topic made again (empty) must empty it
    negative = admissible_negative(tiny_bundle_dir, "before-deletion", seed=5)
    key, value = str(negative.id).encode(), negative.to_bytes()
    produce_records(s, [(key, value, NegativeSigner.from_file(s.bank.signing_key).sign(negatives, key, value))], topic=negatives)
    until(lambda: scorer.status()["bank_ids"] == [negative.id], 30, "the negative applied")

    admin = make_admin(s.kafka)
    try:
        admin.delete_topics([negatives])
        _, body = wait_for(scorer, lambda code, body: code == 503, 20, "503 after the negatives topic was deleted")
        assert negatives in body["reason"], body

        admin.delete_topics([frames])
        wait_for(scorer, lambda code, body: frames in body.get("reason", ""), 20, "the input topic named as missing")
        code, body = readyz(scorer)
        assert code == 503 and negatives in body["reason"], body  # both named
        assert missing_gauge(scorer) == {frames: 1, negatives: 1}
    finally:
        admin.close()
    # the negatives topic has been missing for several checks by now: still one line, and
    # the only one that names it (not kafka-python's ~10 a second)
    assert watch_lines(scorer, "does not exist") == {negatives: 1, frames: 1}, scorer.log_tail(30)
    (line,) = naming(scorer, negatives)
    assert "does not exist" in line

    ensure_topics(s)  # both created again
    wait_for(scorer, lambda code, body: code == 200, 20, "ready again after the topics were recreated")
    assert watch_lines(scorer, "exists again") == {negatives: 1, frames: 1}, scorer.log_tail(30)
    assert watch_lines(scorer, "does not exist") == {negatives: 1, frames: 1}
    assert missing_gauge(scorer) == {frames: 0, negatives: 0}
    # the bank is the new topic's (empty), as a worker started now would hold: not the old one's
    until(lambda: scorer.status()["bank_ids"] == [], 30, "the bank emptied after the negatives topic was made again")
    assert scorer.process.poll() is None
