"""Kafka authorisation against a real broker: SASL_SSL + SCRAM-SHA-512, one principal per role,
KRaft's StandardAuthorizer with the ACLs of deploy/kafka/acls.

One broker for the module (``KAFKA_ACLS=1 broker.sh start``); its ACLs are then synced
(``broker.sh acls``) with the environment of one fresh deployment, so the file's
``${INTERNEG_*}`` names are this deployment's topics, groups and transactional ids. To see a
test fail, run the module with another file: ``KAFKA_ACL_FILE=/tmp/less pytest tests/test_acl.py``.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest
from kafka import KafkaProducer, TopicPartition
from kafka.errors import GroupAuthorizationFailedError, TopicAuthorizationFailedError, TransactionalIdAuthorizationFailedError

from conftest import BROKER, fresh_deployment
from schemas.messages import FrameScore
from schemas.settings import Settings
from test_security import error_lines, frame_record
from test_streaming import crafted_candidates
from workers.kafka_clients import connection_options, make_admin, make_consumer, make_producer
from workers.kafka_security import KafkaAuthError
from workers.processes import WorkerProcess, settings_env
from workers.producer import ProduceError, produce_records

ROLES = ("admin", "camera", "scoring", "inversion", "events", "operator")
TOPICS = ("frames", "scores", "alerts", "candidates", "negatives", "deadletter", "events", "event_state", "control", "cameras")


@dataclass
class AclBroker:
    home: Path
    deployment: Settings  # topics and groups of this module's deployment, as the admin
    credentials: dict[str, dict[str, str]]  # role -> INTERNEG_KAFKA__* of DIR/acl/ROLE.env

    def as_role(self, role: str, **kafka) -> Settings:
        """The deployment's settings with ``role``'s login (and any other Kafka settings)."""
        s = self.deployment.model_copy(deep=True)
        for name, value in {**self.credentials[role], **kafka}.items():
            setattr(s.kafka, name, value)
        return s

    def topic(self, name: str) -> str:
        return getattr(self.deployment.topics, name)

    def failed_login_times(self) -> list[float]:
        times = []
        for log in (self.home / "logs").glob("server.log*"):
            for line in log.read_text(errors="replace").splitlines():
                if "Failed authentication with" in line:
                    times.append(datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f").timestamp())
        return sorted(times)


def _broker(*args: str, env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(BROKER), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "KAFKA_PYTHON": sys.executable, **(env or {})})


@pytest.fixture(scope="module")
def acl_broker(tiny_settings, tmp_path_factory):
    assert _broker("fetch", timeout=600).returncode == 0
    home = tmp_path_factory.mktemp("acl-kafka")  # not kafka*: conftest finds the session broker's DIR by that name
    started = _broker("start", str(home), env={"KAFKA_ACLS": "1"})
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        bootstrap = started.stdout.strip().splitlines()[-1]
        credentials = {}
        for role in ROLES:
            env = dict(line.split("=", 1) for line in (home / "acl" / f"{role}.env").read_text().splitlines())
            assert env["INTERNEG_KAFKA__BOOTSTRAP_SERVERS"] == bootstrap
            credentials[role] = {k.removeprefix("INTERNEG_KAFKA__").lower(): v for k, v in env.items()}
        admin = tiny_settings.model_copy(deep=True)
        for name, value in credentials["admin"].items():
            setattr(admin.kafka, name, value)
        deployment = fresh_deployment(admin)  # its topics, created by the admin (a super user)
        synced = _broker("acls", str(home), env=settings_env(deployment), timeout=60)
        assert synced.returncode == 0, synced.stdout + synced.stderr
        yield AclBroker(home, deployment, credentials)
    finally:
        _broker("stop", str(home), timeout=120)


# --- helpers ---------------------------------------------------------------------------------
PROBE_KEY = b"acl-probe"
PROBE = (PROBE_KEY, b"probe", None)


def write_error(broker: AclBroker, role: str, topic: str, record=PROBE) -> str | None:
    """None if ``role`` may write ``record`` to the deployment's ``topic``, else the error."""
    started = time.monotonic()
    try:
        produce_records(broker.as_role(role), [record], topic=broker.topic(topic))
        return None
    except (ProduceError, TopicAuthorizationFailedError) as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        assert time.monotonic() - started < 10, "a refused write must fail at once, not after Kafka's timeouts"


def readable(broker: AclBroker, role: str, timeout_s: float = 15.0) -> set[str]:
    """The deployment's topics ``role`` may fetch from (without a group, as the tail does).
    Every topic must hold a record: a fetch then either returns one or is refused."""
    consumer = make_consumer(broker.as_role(role).kafka, group_id=None)
    out = set()
    try:
        for name in TOPICS:
            partitions = consumer.partitions_for_topic(broker.topic(name))
            if not partitions:  # not even DESCRIBE: the broker hides the topic
                continue
            consumer.assign([TopicPartition(broker.topic(name), p) for p in partitions])
            consumer.seek_to_beginning()
            deadline = time.monotonic() + timeout_s
            try:
                while not consumer.poll(timeout_ms=200):
                    assert time.monotonic() < deadline, f"{role} neither read {name} nor was refused within {timeout_s} s"
                out.add(name)
            except TopicAuthorizationFailedError:
                pass
    finally:
        consumer.close()
    return out


def scores_of(settings: Settings, topic: str, frame_ids: set[str], timeout_s: float = 60.0) -> dict[str, FrameScore]:
    """The scores of ``frame_ids`` on ``topic`` (read_committed, no group), waiting up to ``timeout_s`` for all."""
    consumer = make_consumer(settings.kafka, group_id=None, isolation_level="read_committed")
    found: dict[str, FrameScore] = {}
    try:
        consumer.assign([TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)])
        consumer.seek_to_beginning()
        deadline = time.monotonic() + timeout_s
        while not frame_ids <= found.keys() and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=300).values():
                for record in records:
                    if record.key != PROBE_KEY:  # what test_each_role_writes_only_its_own_topics sent
                        score = FrameScore.from_bytes(record.value)
                        found[score.frame_id] = score
    finally:
        consumer.close()
    return {frame_id: found[frame_id] for frame_id in frame_ids & found.keys()}


# --- who may write what --------------------------------------------------------------------
WRITES = {  # role -> topics it may write; every other topic of the deployment is refused
    "camera": {"frames", "cameras"},
    "scoring": {"scores", "alerts", "candidates", "deadletter"},
    "inversion": {"negatives", "deadletter"},
    "events": {"events", "event_state", "deadletter"},
    "operator": {"control"},
}
# What an allowed write sends: records the other tests shrug off. A frame is scored like any
# other, a tombstone of a negative that never existed changes no bank, and the end-to-end test
# skips PROBE_KEY on the scores topic (a junk candidate is dead-lettered by the inversion worker).
PROBES = {"frames": frame_record(9999), "negatives": (b"1", None, None)}


@pytest.mark.parametrize("role", list(WRITES))
def test_each_role_writes_only_its_own_topics(acl_broker, role):
    written = {topic: write_error(acl_broker, role, topic, PROBES.get(topic, PROBE)) for topic in TOPICS}
    assert {topic for topic, error in written.items() if error is None} == WRITES[role], written
    assert all("AuthorizationFailed" in error for error in written.values() if error is not None), written


def test_only_the_inversion_principal_writes_negatives_and_only_scoring_principals_candidates(acl_broker):
    """The two writes that steer every replica's detector (README, trust model), spelled out."""
    assert "TopicAuthorizationFailedError" in write_error(acl_broker, "scoring", "negatives")
    assert "TopicAuthorizationFailedError" in write_error(acl_broker, "camera", "negatives")
    assert "TopicAuthorizationFailedError" in write_error(acl_broker, "camera", "candidates")
    assert "TopicAuthorizationFailedError" in write_error(acl_broker, "inversion", "candidates")
    assert write_error(acl_broker, "inversion", "negatives", PROBES["negatives"]) is None


def test_each_role_reads_only_what_it_needs(acl_broker):
    producer = make_producer(acl_broker.as_role("admin").kafka)
    try:
        for name in TOPICS:
            key, value, headers = PROBES.get(name, PROBE)
            producer.send(acl_broker.topic(name), key=key, value=value, headers=headers).get(timeout=30)
    finally:
        producer.close(timeout=10)
    assert readable(acl_broker, "camera") == set()
    assert readable(acl_broker, "scoring") == {"frames", "negatives", "control"}
    assert readable(acl_broker, "inversion") == {"candidates", "negatives"}
    assert readable(acl_broker, "events") == {"alerts", "event_state", "control"}
    assert readable(acl_broker, "operator") == {"alerts", "scores", "deadletter", "events", "cameras", "frames", "control"}


def test_groups_and_transactional_ids_belong_to_their_role(acl_broker):
    d = acl_broker.deployment
    # another role's consumer group: refused even where the topic itself may be read
    for role, topic, group in [("inversion", "negatives", d.kafka.scoring_group), ("scoring", "negatives", d.kafka.inversion_group),
                               ("operator", "scores", d.kafka.scoring_group), ("events", "alerts", d.kafka.scoring_group),
                               ("operator", "events", d.kafka.events_group)]:
        consumer = make_consumer(acl_broker.as_role(role).kafka, acl_broker.topic(topic), group_id=group)
        try:
            with pytest.raises(GroupAuthorizationFailedError):
                for _ in range(20):
                    consumer.poll(timeout_ms=300)
        finally:
            consumer.close()
    # exactly-once mode: a worker's transactional id is CLIENT_ID-ROLE-NAME (BundleWorker.transactional_id)
    for role, owner, allowed in [("scoring", "scoring", True), ("inversion", "inversion", True), ("scoring", "inversion", False),
                                 ("camera", "scoring", False), ("operator", "scoring", False)]:
        producer = KafkaProducer(**connection_options(acl_broker.as_role(role).kafka), transactional_id=f"{d.kafka.client_id}-{owner}-probe")
        try:
            if allowed:
                producer.init_transactions()
            else:
                with pytest.raises(TransactionalIdAuthorizationFailedError):
                    producer.init_transactions()
        finally:
            producer.close(timeout=5)


# --- the whole loop, each process as its own principal ------------------------------------------
def test_frames_are_scored_and_negatives_published_with_a_principal_per_role(acl_broker, tiny_bundle_dir, tmp_path):
    """Camera -> scoring worker -> operator; scoring -> candidates -> inversion worker -> negatives,
    followed by the scoring worker. Both workers in exactly-once mode, so their transactional
    ids and transactional offset commits are authorised too (at-least-once needs a subset)."""
    failed_before = len(acl_broker.failed_login_times())
    workers = {}
    for role, command in (("scoring", "score-worker"), ("inversion", "invert-worker"), ("events", "events-worker")):
        settings = acl_broker.as_role(role)
        settings.worker.bundle = tiny_bundle_dir
        settings.worker.exactly_once = True
        workers[role] = WorkerProcess(command, settings, tmp_path / f"{role}.log", {"INTERNEG_WORKER__NAME": f"acl-{role}", "HF_HUB_OFFLINE": "1"})
    scorer, inverter, events = workers["scoring"], workers["inversion"], workers["events"]
    try:
        for worker in workers.values():
            worker.wait_ready()
        n = 8
        produce_records(acl_broker.as_role("camera"), [frame_record(i) for i in range(n)])
        wanted = {f"f{i}" for i in range(n)}
        scores = scores_of(acl_broker.as_role("operator"), acl_broker.topic("scores"), wanted)
        assert scores.keys() == wanted, scorer.log_tail()
        assert {s.worker for s in scores.values()} == {"acl-scoring"}
        # the events worker, as its own principal, reads the alerts and keeps its state
        alerted = sum(s.verdict == "ood" for s in scores.values())
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and events.status().get("cameras", 0) == 0 and alerted:
            time.sleep(0.3)
        assert not alerted or events.status()["cameras"] == 1, events.log_tail()
        # candidates (the scoring worker's own, and these, as only a scoring principal may
        # write them: embeddings whose inversions are admissible) become negatives
        candidates = crafted_candidates(tiny_bundle_dir, 6)
        produce_records(acl_broker.as_role("scoring"), [(c.frame_id, c.to_bytes(), None) for c in candidates], topic=acl_broker.topic("candidates"))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and inverter.status().get("published", 0) == 0:
            time.sleep(0.3)
        assert inverter.status()["published"] > 0, inverter.log_tail()
        # the scoring worker applies negatives between batches: keep frames coming until it holds
        # the inversion worker's bank (read from the negatives it alone may write)
        deadline, k = time.monotonic() + 30, n
        while time.monotonic() < deadline and scorer.status()["bank_digest"] != inverter.status()["bank_digest"]:
            produce_records(acl_broker.as_role("camera"), [frame_record(k)])
            k += 1
            time.sleep(0.5)
        truth = inverter.status()
        assert truth["bank_ids"] and scorer.status()["bank_ids"] == truth["bank_ids"]
        for worker in workers.values():
            assert worker.terminate() == 0, worker.log_tail()
        assert "AuthorizationFailed" not in scorer.log_path.read_text() + inverter.log_path.read_text() + events.log_path.read_text()
    finally:
        for worker in workers.values():
            worker.terminate(timeout_s=30)
    assert len(acl_broker.failed_login_times()) == failed_before  # every client logged in


def test_the_credentials_are_readable_by_their_owner_only(acl_broker):
    folder = acl_broker.home / "acl"
    assert folder.stat().st_mode & 0o777 == 0o700
    files = sorted(folder.iterdir())
    assert [f.name for f in files] == sorted(f"{role}.{kind}" for role in ROLES for kind in ("env", "password"))
    assert all(f.stat().st_mode & 0o777 == 0o600 for f in files)
    assert len({acl_broker.credentials[role]["sasl_plain_password"] for role in ROLES}) == len(ROLES)


# --- refused logins --------------------------------------------------------------------------------
def test_a_wrong_scram_password_fails_at_once_with_one_clear_error(acl_broker, monkeypatch, capsys):
    before = len(acl_broker.failed_login_times())
    wrong = acl_broker.as_role("operator", sasl_plain_password="not-" + acl_broker.credentials["operator"]["sasl_plain_password"])
    started = time.monotonic()
    with pytest.raises(KafkaAuthError, match="invalid credentials with SASL mechanism SCRAM-SHA-512") as caught:
        make_admin(wrong.kafka)
    assert time.monotonic() - started < 5
    assert "for user 'interneg-operator'" in str(caught.value)
    assert len(acl_broker.failed_login_times()) - before == 1
    # the operator's own command (in this process: the CLI's imports take longer than the
    # test): one error line, exit 2, one login attempt, no Kafka retries after it
    from workers.cli import main

    wrong.kafka.request_timeout_ms = 120000  # nothing may wait for a timeout either
    for name, value in settings_env(wrong).items():
        monkeypatch.setenv(name, value)
    before = acl_broker.failed_login_times()
    capsys.readouterr()
    started = time.monotonic()
    code = main(["tail", "--from-beginning", "--idle-timeout", "1"])
    seconds = time.monotonic() - started
    out = capsys.readouterr()
    logins = acl_broker.failed_login_times()[len(before):]
    assert code == 2, out.err[-2000:]
    errors = error_lines(out.err)
    assert len(errors) == 1 and errors[0].startswith("error: Kafka authentication failed for user 'interneg-operator'"), out.err[-2000:]
    assert "SCRAM-SHA-512" in errors[0] and "Traceback" not in out.err
    assert acl_broker.credentials["operator"]["sasl_plain_password"] not in out.err + out.out
    assert len(logins) == 1 and seconds < 5
