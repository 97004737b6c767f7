"""Faults against the real broker: killed workers, a restarted broker, poisoned and hostile input.

Each test prints the counts it saw (run with ``-s`` to read them); the assertions are
what must hold whatever the timing: nothing lost, duplicates only where the delivery
table allows them, nothing inadmissible in any bank, no worker dead from bad input.
"""
from __future__ import annotations

import base64
import io
import json
import threading
import time
import zlib
from collections import Counter

import numpy as np
import pytest
from kafka import TopicPartition
from kafka.structs import MemberState, OffsetAndMetadata
from kafka.errors import CommitFailedError, KafkaError
from PIL import Image
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bench.stream_bench import CommitWatcher
from conftest import fresh_deployment
from pipeline.bank import NegativeBank
from pipeline.bundle import load_bundle_with_model
from schemas.messages import H_CONTENT_TYPE, H_DL_DETAIL, H_DL_REASON, H_DL_TRUNCATED, H_FRAME_ID, H_TS, Candidate, FrameScore, NegativeRecord, Vector
from test_streaming import crafted_candidates, frame_record, jpeg, read_topic, scores_by_frame
from workers.delivery import BatchLoop, Output, abort_transaction
from workers.kafka_clients import make_consumer, make_producer
from workers.negatives import NegativeCheck, NegativeFollower, negative_id
from workers.signing import NegativeSigner, NegativeVerifier
from workers.producer import produce_records

pytestmark = pytest.mark.fault


def committed(settings, group: str, topic: str) -> int:
    """Offsets the group has committed on ``topic``, summed over partitions."""
    watcher = CommitWatcher(settings, topic, group)
    try:
        return watcher.committed()
    finally:
        watcher.close()


def wait_for(condition, timeout_s: float, what: str, every_s: float = 0.3):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


class PrintLog:
    def __getattr__(self, level):
        return lambda event, **kw: print(f"[{time.strftime('%X')}] {level} {event} {kw}", flush=True)


class CountingLog(PrintLog):
    def __init__(self):
        self.events = Counter()

    def __getattr__(self, level):
        printed = super().__getattr__(level)

        def log(event, **kw):
            self.events[event] += 1
            printed(event, **kw)
        return log


def report(name: str, **counts) -> None:
    print(f"\n[fault] {name}: " + ", ".join(f"{k}={v}" for k, v in counts.items()))


# --- scoring workers killed with SIGKILL ----------------------------------------------------
FRAMES = 10_000
KILL_AT = (0.2, 0.45, 0.7)  # fractions of the stream committed when scorer-a is killed (once it is at work)
RATE = 200  # frames/s of the stream


def refused_records(log_path) -> int:
    """Records of the batches whose commit a worker's log (every process of that name) says was refused or skipped."""
    total = 0
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("event") in (
            "commit refused after rebalance", "commit skipped: broker unreachable", "commit skipped: partitions moved to another member"
        ):
            total += int(event.get("records", 0))
    return total


@pytest.mark.parametrize("exactly_once", [False, True], ids=["at-least-once", "exactly-once"])
def test_three_kill_9s_of_a_scoring_worker_lose_no_frame(stream_settings, tiny_bundle_dir, workers, exactly_once):
    s = stream_settings
    s.worker.bundle = tiny_bundle_dir
    s.worker.batch_size = 32
    s.worker.exactly_once = exactly_once
    a, b = workers("score-worker", s, "scorer-a"), workers("score-worker", s, "scorer-b")
    a.wait_ready()
    b.wait_ready()
    pool = [jpeg(i) for i in range(64)]
    sent, kills_done = [], threading.Event()

    def stream():
        """A live stream at RATE frames/s, below what the two workers manage, so both always
        have work; it runs until the last restart is over (FRAMES frames at least). A stream of
        a fixed length could end while scorer-a restarts (46 s on a loaded machine): the group
        then had nothing left, and the wait for scorer-a at work below timed out (issue 16)."""
        producer = make_producer(s.kafka)
        futures, i = [], 0
        while i < FRAMES or not kills_done.is_set():
            for _ in range(100):
                key, value, headers = frame_record(i, pool[i % 64], camera=f"cam-{i % 8}")
                futures.append(producer.send(s.topics.frames, key=key, value=value, headers=headers))
                i += 1
            time.sleep(100 / RATE)
        producer.flush()
        sent.extend(f.get(timeout=60) for f in futures)
        producer.close()

    streamer = threading.Thread(target=stream)
    streamer.start()
    try:
        for fraction in KILL_AT:
            wait_for(lambda: committed(s, s.kafka.scoring_group, s.topics.frames) >= fraction * FRAMES, 300, f"{fraction:.0%} committed")
            # killed while it works (batches in flight, maybe an open transaction), not while it starts
            wait_for(lambda: a.status().get("batches", 0) >= 2, 120, "scorer-a at work", every_s=0.1)
            a.kill()
            a = workers("score-worker", s, "scorer-a")  # same name: in exactly-once mode, same transactional id
            a.wait_ready()
    finally:
        kills_done.set()
        streamer.join()
    inputs = {(m.partition, m.offset) for m in sent}
    assert len(inputs) == len(sent) >= FRAMES
    wait_for(lambda: committed(s, s.kafka.scoring_group, s.topics.frames) >= len(sent), 300, "every frame committed")
    records = read_topic(s, s.topics.scores, expect=len(sent), timeout_s=120, idle_s=3)  # read_committed
    scores = [FrameScore.from_bytes(r.value) for r in records]
    per_input = Counter((x.source.partition, x.source.offset) for x in scores)
    duplicated = sum(c - 1 for c in per_input.values())
    report(
        f"kill -9 x{len(KILL_AT)} ({'exactly-once' if exactly_once else 'at-least-once'})",
        sent=len(sent), scored=len(per_input), score_records=len(scores), duplicated=duplicated,
        lost=len(inputs - set(per_input)), by_worker=dict(Counter(x.worker for x in scores)),
    )
    for source in sorted(k for k, c in per_input.items() if c > 1)[:40]:  # who wrote each twice, and where
        print("  duplicated input", source, [(r.partition, r.offset, x.worker, x.scored_at_ms) for r, x in zip(records, scores)
                                              if (x.source.partition, x.source.offset) == source])
    assert set(per_input) == inputs  # every input offset ends with a score record
    if exactly_once:
        assert duplicated == 0  # read_committed readers see each frame's score exactly once
    else:
        # redone batches only, each explained: the two a killed worker may have sent without
        # committing (one awaiting its acks, the next already sent: see BatchLoop), and every
        # batch whose commit a worker logged as refused or skipped (a fixed bound, such as the
        # 1,728 of 10,000 once here, could not fail: this one fails on any unexplained duplicate)
        explained = refused_records(a.log_path) + refused_records(b.log_path)
        print(f"  duplicates explained: {len(KILL_AT)} kills x 2 batches of {s.worker.batch_size}, "
              f"{explained} records of refused or skipped commits")
        assert duplicated <= len(KILL_AT) * 2 * s.worker.batch_size + explained
    assert b.process.poll() is None


def test_an_aborted_transaction_is_redone_and_its_outputs_are_never_read(stream_settings):
    """The exactly-once loop's abort path: a batch whose transaction fails (injected into a real
    transactional producer) is aborted, rewound with the prefetched batch, and redone once."""
    s = stream_settings
    n = 60
    produce_records(s, [(b"k", f"in-{i}".encode(), None) for i in range(n)])
    consumer = make_consumer(s.kafka, s.topics.frames, group_id=s.kafka.scoring_group, isolation_level="read_committed")
    producer = make_producer(s.kafka, transactional_id=f"abort-test-{s.kafka.scoring_group}")
    real_send_offsets, calls = producer.send_offsets_to_transaction, []

    def fails_the_second_time(offsets, group):
        calls.append(offsets)
        if len(calls) == 2:
            raise KafkaError("injected: the transaction cannot commit")
        return real_send_offsets(offsets, group)

    producer.send_offsets_to_transaction = fails_the_second_time
    done, aborts, deadline = [], [], time.monotonic() + 90
    loop = BatchLoop(
        consumer, producer, lambda batch, prepared: [Output(s.topics.scores, r.key, r.value + b"/out") for r in batch],
        prepare=lambda batch: None,  # the overlapped loop: a prefetched batch must be dropped and polled again
        batch_size=8, batch_timeout_ms=300, should_stop=lambda: sum(done) >= n or time.monotonic() > deadline,
        on_batch=lambda stats: done.append(stats.records if stats.committed else 0),
        transactional=True, on_abort=lambda: aborts.append(1),
    )
    loop.run()
    outputs = Counter(r.value for r in read_topic(s, s.topics.scores, expect=n, idle_s=2))  # read_committed
    report("aborted transaction", inputs=n, transactions=len(calls), aborted=len(aborts), outputs=sum(outputs.values()))
    assert len(aborts) == 1 and sum(done) == n
    assert outputs == Counter(f"in-{i}/out".encode() for i in range(n))  # each exactly once: the aborted copy is never read


def test_offsets_of_an_aborted_transaction_are_not_committed_by_the_next_one(stream_settings):
    """A transaction whose offsets the group refused (a stale generation) is aborted; the
    producer's next transaction, for another partition, must not carry the refused offsets
    along (kafka-python 3.0.12 does unless abort_transaction forgets them). Here they would
    move partition p's committed offset back from 5 to 3: another member's frames redone."""
    s = stream_settings
    consumer = make_consumer(s.kafka, s.topics.frames, group_id=s.kafka.scoring_group, isolation_level="read_committed")
    wait_for(lambda: consumer.poll(timeout_ms=200) is not None and consumer.group_metadata().state == MemberState.STABLE
             and consumer.assignment(), 60, "the member joined")
    group = consumer.group_metadata()
    stale = group._replace(generation_id=group.generation_id + 100)
    p, q = TopicPartition(s.topics.frames, 0), TopicPartition(s.topics.frames, 1)
    producer = make_producer(s.kafka, transactional_id=f"offsets-test-{s.kafka.scoring_group}")
    producer.init_transactions()

    def transaction(offsets, membership):
        producer.begin_transaction()
        producer.send(s.topics.scores, b"x")
        producer.send_offsets_to_transaction({tp: OffsetAndMetadata(o, "", -1) for tp, o in offsets.items()}, membership)
        producer.commit_transaction()

    transaction({p: 5}, group)
    with pytest.raises(KafkaError):
        transaction({p: 3}, stale)  # refused: ILLEGAL_GENERATION
    abort_transaction(producer)
    transaction({q: 7}, group)
    report("aborted offsets", committed_p=consumer.committed(p), committed_q=consumer.committed(q))
    assert consumer.committed(q) == 7
    assert consumer.committed(p) == 5
    producer.close()
    consumer.close()


def test_exactly_once_resumes_from_committed_offsets_after_a_rebalance_not_from_its_own_position(stream_settings):
    """kafka-python keeps a partition's position across a rebalance when the member holds it
    before and after. If that position is behind the committed offset (another member
    committed past it in a generation between, as seen under repeated kill -9s), redoing
    from it would commit frames twice. The loop must resume from the committed offsets.

    On the way, kafka-python 3.0.12 leaves the loop's member half-joined after the second
    rebalance here (fetching while REBALANCING, heartbeats off; the broker evicts it): the
    loop must also get out of that (BatchLoop._rejoin_afresh) or it never finishes."""
    s = stream_settings
    n = 20
    sent = produce_records(s, [(b"k", f"in-{i}".encode(), None) for i in range(n)])  # one key: one partition
    tp = TopicPartition(s.topics.frames, sent[0].partition)
    consumer = make_consumer(s.kafka, s.topics.frames, group_id=s.kafka.scoring_group, isolation_level="read_committed")
    producer = make_producer(s.kafka, transactional_id=f"rebalance-test-{s.kafka.scoring_group}")
    loop = BatchLoop(
        consumer, producer, lambda batch, prepared: [Output(s.topics.scores, r.key, r.value + b"/out") for r in batch],
        batch_size=10, batch_timeout_ms=300, should_stop=lambda: False, transactional=True,
    )
    producer.init_transactions()
    deadline = time.monotonic() + 60
    while consumer.committed(tp) != 10 and time.monotonic() < deadline:
        loop.run_once()
    assert consumer.committed(tp) == 10
    generation = consumer.group_metadata().generation_id

    # a second member joins the group for another topic: a rebalance in which the loop's
    # member keeps its partition (the range assignor assigns per topic)
    other = make_consumer(s.kafka, s.topics.alerts, group_id=s.kafka.scoring_group)
    leave = threading.Event()

    def member():  # joins and stays in the group (polling) until told to leave
        while not leave.is_set():
            other.poll(timeout_ms=200)
        other.close()

    joiner = threading.Thread(target=member)
    joiner.start()
    time.sleep(2 * s.kafka.session_timeout_ms / 3000)  # two heartbeats: the loop's member learns of the rebalance
    consumer.seek(tp, 4)  # the stale position a kafka-python member can carry through the rebalance

    while sum(1 for _ in read_topic(s, s.topics.scores, idle_s=1)) < n and time.monotonic() < deadline + 60:
        loop.run_once()
    leave.set()
    joiner.join()
    assert consumer.group_metadata().generation_id > generation  # the rebalance did happen
    loop.close()
    outputs = Counter(r.value for r in read_topic(s, s.topics.scores, expect=n, idle_s=2))  # read_committed
    report("rebalance with a stale position", inputs=n, outputs=sum(outputs.values()), repeated=sum(c - 1 for c in outputs.values()))
    assert outputs == Counter(f"in-{i}/out".encode() for i in range(n))


# --- the broker restarted under a running stream -------------------------------------------
def test_at_least_once_redoes_a_batch_whose_commit_a_rebalance_refused_when_no_record_follows(stream_settings):
    """A batch is handled, its commit is refused by a rebalance (injected as kafka-python
    raises it), and the member keeps its partition; no record follows. Its position is past
    the batch, so before issue 16 nothing ever committed it: the group's lag stayed 10 (the
    kill test waited 300 s for it to drain). Resuming from the committed offsets after the
    rebalance redoes and commits it."""
    s = stream_settings
    n = 10
    sent = produce_records(s, [(b"k", f"in-{i}".encode(), None) for i in range(n)])  # one key: one partition
    tp = TopicPartition(s.topics.frames, sent[0].partition)
    consumer = make_consumer(s.kafka, s.topics.frames, group_id=s.kafka.scoring_group)
    real_commit, refused = consumer.commit, []

    def commit(offsets=None):
        if not refused:
            refused.append(offsets)
            raise CommitFailedError("injected: the group rebalanced")
        return real_commit(offsets)

    consumer.commit = commit
    handled = []
    log = CountingLog()  # prints what it did (shown if it fails) and counts it
    loop = BatchLoop(
        consumer, make_producer(s.kafka), lambda batch, prepared: handled.extend(batch) or [],
        batch_size=n, batch_timeout_ms=300, should_stop=lambda: False, log=log,
    )
    deadline = time.monotonic() + 120
    while not refused and time.monotonic() < deadline:
        loop.run_once()
    other = make_consumer(s.kafka, s.topics.alerts, group_id=s.kafka.scoring_group)  # the rebalance: it joins
    leave = threading.Event()

    def member():
        while not leave.is_set():
            other.poll(timeout_ms=200)
        other.close()

    joiner = threading.Thread(target=member)
    joiner.start()
    try:
        while consumer.committed(tp) != n and time.monotonic() < deadline:
            loop.run_once()
    finally:
        leave.set()
        joiner.join()
    final = consumer.committed(tp)
    loop.close()
    report("refused commit, no record after it", inputs=n, handled=len(handled), committed=final)
    assert len(refused) == 1
    assert final == n
    # redone once per refused commit: the injected one, and, when the joining member's
    # rebalance catches the redone batch's commit (seen in CI), a real one that is logged
    assert len(handled) == n * (1 + log.events["commit refused after rebalance"])


def test_workers_ride_out_a_broker_restart_and_lose_nothing(own_broker, tiny_settings, tiny_bundle_dir, workers):
    start, stop = own_broker
    bootstrap = start()
    s = fresh_deployment(tiny_settings, bootstrap)
    s.worker.bundle = tiny_bundle_dir
    s.worker.batch_size = 32
    worker = workers("score-worker", s, "scorer-r")
    worker.wait_ready()
    n = 3000
    sent = produce_records(s, [frame_record(i, jpeg(i % 64), camera=f"cam-{i % 4}") for i in range(n)])
    wait_for(lambda: committed(s, s.kafka.scoring_group, s.topics.frames) >= n // 4, 300, "a quarter committed")
    stop()
    time.sleep(3)  # the worker sees the broker gone: failed fetches, sends waiting to be retried
    assert start() == bootstrap  # the same port and data
    wait_for(lambda: committed(s, s.kafka.scoring_group, s.topics.frames) >= n, 300, "every frame committed after the restart")
    records = read_topic(s, s.topics.scores, expect=n, timeout_s=120, idle_s=3)
    per_input = Counter((x.source.partition, x.source.offset) for x in (FrameScore.from_bytes(r.value) for r in records))
    inputs = {(m.partition, m.offset) for m in sent}
    report("broker restart", sent=n, scored=len(per_input), duplicated=sum(c - 1 for c in per_input.values()),
           lost=len(inputs - set(per_input)))
    assert set(per_input) == inputs
    assert worker.process.poll() is None  # reconnected, not restarted


# --- the inversion worker killed mid-batch; replay; poisoning -------------------------------
def poisoned_candidates(bundle_dir, n: int) -> list[Candidate]:
    """Embeddings sitting right next to the ID prototypes: whatever they invert to must never be admitted."""
    bundle, loaded = load_bundle_with_model(bundle_dir, "cpu")
    rng = np.random.default_rng(7)
    out = []
    for i in range(n):
        v = bundle.prototypes[i % len(bundle.prototypes)] + 0.02 * rng.normal(size=loaded.embed_dim) / np.sqrt(loaded.embed_dim)
        v = (v / np.linalg.norm(v)).astype(np.float32)
        out.append(Candidate(frame_id=f"poison-{i}", camera_id="cam-p", source={"topic": "frames", "partition": 0, "offset": i},
                             score=0.01, embedding=Vector.from_numpy(v, loaded.model_id), created_ms=0))
    return out


def forged_negative(bundle_dir) -> NegativeRecord:
    """A record written straight onto ood.negatives: an ID prototype posing as a high-ranking negative."""
    bundle, loaded = load_bundle_with_model(bundle_dir, "cpu")
    v = bundle.prototypes[0] / np.linalg.norm(bundle.prototypes[0])
    return NegativeRecord(id=negative_id("forged-0"), vector=Vector.from_numpy(v, loaded.model_id), deviation=9.0,
                          origin="forged-0", created=0.0, nearest_words=[])


def admissible_negative(bundle_dir, origin: str, seed: int, claimed: float = 9.0) -> NegativeRecord:
    """A plausible negative: a unit vector pointing away from the ID prototypes (admissible), claiming ``claimed``."""
    bundle, loaded = load_bundle_with_model(bundle_dir, "cpu")
    away = -bundle.prototypes.mean(axis=0)
    v = away / np.linalg.norm(away) + 0.05 * np.random.default_rng(seed).normal(size=away.shape)
    v = (v / np.linalg.norm(v)).astype(np.float32)
    NegativeCheck.of(bundle).degree(v)  # raises if it is not admissible after all
    return NegativeRecord(id=negative_id(origin), vector=Vector.from_numpy(v, loaded.model_id), deviation=claimed,
                          origin=origin, created=0.0)


def test_inversion_worker_killed_mid_batch_republishes_nothing_and_replicas_replay_the_identical_bank(
    stream_settings, tiny_bundle_dir, workers
):
    s = stream_settings
    s.worker.bundle = tiny_bundle_dir
    s.worker.inversion_batch_size = 8
    s.inversion.steps = 200  # slow batches (seconds each), so the kill lands inside the stream
    s.bank.capacity = 6
    legit, poison = crafted_candidates(tiny_bundle_dir, 40, seed=3), poisoned_candidates(tiny_bundle_dir, 16)
    mixed = [c for pair in zip(legit, poison + [None] * len(legit)) for c in pair if c is not None]
    inverter = workers("invert-worker", s, "inverter")
    inverter.wait_ready()
    produce_records(s, [(c.frame_id, c.to_bytes(), None) for c in mixed], topic=s.topics.candidates)
    wait_for(lambda: inverter.status().get("candidates", 0) >= 8, 120, "a first batch inverted")
    before = inverter.status()
    inverter.kill()
    inverter = workers("invert-worker", s, "inverter")
    inverter.wait_ready()
    wait_for(lambda: committed(s, s.kafka.inversion_group, s.topics.candidates) >= len(mixed), 300, "every candidate committed")
    truth = inverter.status()

    negatives = read_topic(s, s.topics.negatives, idle_s=2)
    published = Counter(r.key for r in negatives if r.value is not None)
    live: dict[bytes, bytes | None] = {}
    for r in negatives:
        live[r.key] = r.value
    live_keys = {k for k, v in live.items() if v is not None}
    poison_ids = {str(negative_id(c.frame_id)).encode() for c in poison}
    report("inversion worker kill -9", candidates=len(mixed), poisoned=len(poison), done_before_kill=before.get("candidates"),
           done_after_restart=truth["candidates"], published=sum(published.values()),
           tombstones=sum(1 for r in negatives if r.value is None), live=len(live_keys), bank_size=truth["bank_size"])
    assert before["candidates"] < len(mixed)  # the kill came mid-stream, batches still to do
    assert published and max(published.values()) == 1  # no negative published twice, across the kill
    assert not poison_ids & set(published)  # crafted next to the ID prototypes: never admitted
    assert len(live_keys) <= s.bank.capacity and truth["bank_size"] <= s.bank.capacity  # the bound holds

    # negatives forged straight onto the topic: next to an ID prototype (even signed with the
    # deployment's own key), admissible but unsigned, admissible but signed with another key,
    # and a tombstone of a live negative signed with another key: every replica refuses them
    forged = forged_negative(tiny_bundle_dir)
    own, stranger = NegativeSigner.from_file(s.bank.signing_key), NegativeSigner(Ed25519PrivateKey.generate())
    plausible = [admissible_negative(tiny_bundle_dir, f"forged-{k}", seed=k) for k in (1, 2)]
    victim = sorted(live_keys)[0]
    records = [(str(forged.id).encode(), forged.to_bytes()), (str(plausible[0].id).encode(), plausible[0].to_bytes())]
    produce_records(s, [(records[0][0], records[0][1], own.sign(s.topics.negatives, *records[0])),
                        (records[1][0], records[1][1], None),
                        (str(plausible[1].id).encode(), plausible[1].to_bytes(),
                         stranger.sign(s.topics.negatives, str(plausible[1].id).encode(), plausible[1].to_bytes())),
                        (victim, None, stranger.sign(s.topics.negatives, victim, None))], topic=s.topics.negatives)
    fresh = workers("score-worker", s, "scorer-fresh")  # replays ood.negatives from the beginning
    fresh.wait_ready()
    replica = fresh.status()
    assert replica["negatives_rejected"] == 4 and not {forged.id, *(p.id for p in plausible)} & set(replica["bank_ids"])
    assert int(victim) in replica["bank_ids"]
    assert replica["bank_ids"] == truth["bank_ids"]
    assert replica["bank_sha256"] == truth["bank_sha256"]  # byte-identical to the inversion worker's bank
    # and an in-process replay, saved to a file, hashes the same
    bundle, loaded = load_bundle_with_model(tiny_bundle_dir, "cpu")
    bank: NegativeBank = bundle.bank("interneg", s.bank.capacity, s.bank.dedup_cos)
    follower = NegativeFollower(s.kafka, s.topics.negatives, bank, loaded.model_id, check=NegativeCheck.of(bundle),
                                verifier=NegativeVerifier.from_file(s.bank.verify_key))
    follower.catch_up()
    follower.close()
    assert bank.sha256() == truth["bank_sha256"]


def test_an_inversion_backlog_sheds_candidates_older_than_the_age_limit(stream_settings, tiny_bundle_dir, workers):
    """Frames below beta arriving faster than inversion runs must not grow the candidates' lag without bound."""
    s = stream_settings
    s.worker.bundle = tiny_bundle_dir
    s.inversion.max_candidate_age_s = 60
    old, new = crafted_candidates(tiny_bundle_dir, 6, seed=21)[:3], crafted_candidates(tiny_bundle_dir, 6, seed=22)[3:]
    producer = make_producer(s.kafka)
    an_hour_ago = int(time.time() * 1000) - 3_600_000
    for c in old:  # queued an hour ago, as a backlog would be
        producer.send(s.topics.candidates, key=c.frame_id.encode(), value=c.to_bytes(), timestamp_ms=an_hour_ago)
    for c in new:
        producer.send(s.topics.candidates, key=c.frame_id.encode(), value=c.to_bytes())
    producer.flush()
    producer.close()
    inverter = workers("invert-worker", s, "inverter-s")
    inverter.wait_ready()
    wait_for(lambda: committed(s, s.kafka.inversion_group, s.topics.candidates) >= 6, 120, "every candidate committed")
    status = inverter.status()
    report("stale candidates", queued=6, stale=status["stale"], inverted=status["candidates"])
    assert (status["stale"], status["candidates"]) == (3, 3)
    origins = {NegativeRecord.from_bytes(r.value).origin for r in read_topic(s, s.topics.negatives, idle_s=1) if r.value}
    assert origins and origins <= {c.frame_id for c in new}


# --- hostile input --------------------------------------------------------------------------
class NotUtf8(str):
    """A header key that kafka-python writes as bytes that are not UTF-8 (the broker accepts them)."""

    def encode(self, *args, **kwargs):
        return b"\xff\xfe" + str(self).encode()


def broken_png() -> bytes:
    """A PNG whose image data is damaged (one byte flipped): Pillow reports a broken stream."""
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[data.index(b"IDAT") + 14] ^= 0xFF
    return bytes(data)


def png_bomb(side: int = 20_000, height: int | None = None) -> bytes:
    """A real PNG of side x height (default side) black pixels: a few hundred KB that would
    decode to side x height bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    height = side if height is None else height
    packer = zlib.compressobj(9)
    row = bytes(side + 1)  # filter byte + one grey byte per pixel
    body = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = side.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])  # 8-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small JPEG whose frame header claims width x height."""
    data = bytearray(jpeg(5))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def bad_vector_candidates(good: Candidate) -> list[tuple[str, bytes]]:
    """(case, value) candidates whose vectors are wrong in every way the contract names."""
    doc = json.loads(good.to_bytes())
    raw = np.frombuffer(base64.b64decode(doc["embedding"]["data"]), dtype=np.float32)

    def with_embedding(**changes) -> bytes:
        return json.dumps({**doc, "embedding": {**doc["embedding"], **changes}}).encode()

    nan = raw.copy()
    nan[0] = np.nan
    return [
        ("wrong-dtype", with_embedding(dtype="float64", data=base64.b64encode(raw.astype(np.float64).tobytes()).decode())),
        ("wrong-dim", with_embedding(dim=len(raw) // 2, data=base64.b64encode(raw[: len(raw) // 2].tobytes()).decode())),
        ("wrong-model", with_embedding(model_id="ViT-L-14/openai")),
        ("size-lies", with_embedding(data=base64.b64encode(raw[:-1].tobytes()).decode())),
        ("nan", with_embedding(data=base64.b64encode(nan.tobytes()).decode())),
        ("not-unit", with_embedding(data=base64.b64encode((2 * raw).tobytes()).decode())),  # no image embedding is that long
        ("not-json", b"\x80\x04\x95 a pickle, maybe"),
        ("empty", b""),
        ("extra-field", json.dumps({**doc, "exec": "rm -rf /"}).encode()),
    ]


def test_a_hostile_corpus_is_dead_lettered_with_reasons_and_no_worker_dies(stream_settings, tiny_bundle_dir, workers):
    s = stream_settings
    s.worker.bundle = tiny_bundle_dir
    s.images.max_bytes = 1_000_000
    good = jpeg(1)
    big = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (1200, 1200, 3), dtype=np.uint8)).save(big, format="PNG")
    # bombs between our pixel limit and Pillow's own (89M pixels warn, 179M refuse): only ours stops them
    bomb = png_bomb(8_000)
    assert s.images.max_pixels < 8_000 * 8_000 < Image.MAX_IMAGE_PIXELS and s.images.max_pixels < 7_000 * 7_000
    now = str(int(time.time() * 1000)).encode()
    frames = [  # (accepted reasons, key, value, headers); the frame-id header names the case
        (("corrupt",), b"cam", broken_png(), [(H_FRAME_ID, b"corrupt")]),
        (("corrupt",), b"cam", good[: len(good) // 2], [(H_FRAME_ID, b"truncated")]),
        (("empty",), b"cam", b"", [(H_FRAME_ID, b"zero-bytes")]),
        (("empty",), b"cam", None, [(H_FRAME_ID, b"null-value")]),
        (("too-many-pixels",), b"cam", bomb, [(H_FRAME_ID, b"png-bomb")]),
        (("too-many-pixels",), b"cam", jpeg_claiming(7_000, 7_000), [(H_FRAME_ID, b"jpeg-7k")]),
        (("not-an-image",), b"cam", b"#!/bin/sh\nplain text, not pixels", [(H_FRAME_ID, b"text")]),
        (("not-an-image",), b"cam", b"\x80\x04\x95" + bytes(200), [(H_FRAME_ID, b"pickle-ish")]),
        (("too-large",), b"cam", big.getvalue(), [(H_FRAME_ID, b"oversized")]),
        (("missing-header",), b"cam", good, [(H_TS, now)]),
        (("bad-header",), b"cam", good, [(H_FRAME_ID, b"\xff\xfe not utf-8")]),
        (("bad-header",), b"cam", good, [(H_FRAME_ID, b"x" * 300)]),
        (("bad-header",), b"cam", good, [(H_FRAME_ID, b"badts"), (H_TS, b"yesterday")]),
        (("unsupported-content-type",), b"cam", good, [(H_FRAME_ID, b"ctype"), (H_CONTENT_TYPE, b"text/html")]),
        (("content-type-mismatch",), b"cam", png_bomb(64, 48), [(H_FRAME_ID, b"ctype-lies"), (H_CONTENT_TYPE, b"image/jpeg")]),
        # issue 11's poison pills: each stopped the worker, at every restart
        (("bad-header",), b"cam", good, [(H_FRAME_ID, b"ts-superscript"), (H_TS, "\u00b2\u0663".encode())]),  # isdigit(), not int()
        (("bad-header",), b"cam", good, [(H_FRAME_ID, b"ts-huge"), (H_TS, b"9" * 30)]),
        (("bad-key",), b"k" * 3_000_000, good, [(H_FRAME_ID, b"key-3mb")]),
        (("extreme-aspect-ratio",), b"cam", png_bomb(60_000, 1), [(H_FRAME_ID, b"strip-60000x1")]),  # 224 x 13M pixels once resized
        # its copy would not fit; the copy keeps the key (which names the case here) but not the headers
        (("too-large",), b"near-limit", b"\0" * (s.kafka.max_message_bytes - 200), [(H_FRAME_ID, b"near-limit")]),
    ]
    assert len(bomb) < s.images.max_bytes < len(big.getvalue())
    records = []
    for i, (_, key, value, headers) in enumerate(frames):
        records.append(frame_record(i, jpeg(100 + i)))
        records.append((key, value, headers))
    records.append(frame_record(len(frames), jpeg(100 + len(frames))))
    legit = crafted_candidates(tiny_bundle_dir, 3, seed=9)
    bad = bad_vector_candidates(legit[0])
    candidates = [(legit[0].frame_id, legit[0].to_bytes(), None)]
    for (case, value), c in zip(bad, legit[1:] * len(bad)):
        candidates += [(case, value, None), (c.frame_id, c.to_bytes(), None)]
    # well formed and claiming a low score, but an ID prototype's twin: its score, recomputed, is high
    forged_candidate = poisoned_candidates(tiny_bundle_dir, 1)[0]
    candidates.append((forged_candidate.frame_id, forged_candidate.to_bytes(), None))

    scorer, inverter = workers("score-worker", s, "scorer-h"), workers("invert-worker", s, "inverter-h")
    scorer.wait_ready()
    inverter.wait_ready()
    produce_records(s, records[: len(records) // 2])
    # a record the Kafka client cannot decode (a header key that is not UTF-8: the broker takes
    # it), from its own writer, between the good frames; and negatives a hostile writer forged:
    # an id that does not fit in int64 (every worker follows the negatives topic), and a record
    # the client cannot decode
    hostile = make_producer(s.kafka)
    hostile.send(s.topics.frames, key=b"cam", value=good, headers=[(NotUtf8("x-key"), b"1"), (H_FRAME_ID, b"undecodable")]).get(30)
    forged = json.loads(forged_negative(tiny_bundle_dir).to_bytes())
    forged["id"] = 10**20
    hostile.send(s.topics.negatives, key=str(10**20).encode(), value=json.dumps(forged).encode()).get(30)
    hostile.send(s.topics.negatives, key=b"7", value=b"{}", headers=[(NotUtf8("x"), b"")]).get(30)
    hostile.close()
    produce_records(s, records[len(records) // 2 :])
    produce_records(s, candidates, topic=s.topics.candidates)
    wait_for(lambda: committed(s, s.kafka.scoring_group, s.topics.frames) >= len(records) + 1, 120, "every frame committed")
    skipped = wait_for(lambda: "record skipped: the Kafka client cannot decode it" in scorer.log_path.read_text(errors="replace"), 30,
                       "the undecodable record skipped")
    all_candidates = len(read_topic(s, s.topics.candidates, idle_s=1))  # ours, and the scoring worker's
    wait_for(lambda: committed(s, s.kafka.inversion_group, s.topics.candidates) >= all_candidates, 120, "every candidate committed")

    dead = read_topic(s, s.topics.deadletter, idle_s=2)
    scores = scores_by_frame(read_topic(s, s.topics.scores, expect=len(frames) + 1, idle_s=2))
    by_case = {}
    for r in dead:
        headers = dict(r.headers)
        name = headers.get(H_FRAME_ID, r.key).decode("utf-8", "replace")
        by_case[name] = (headers[H_DL_REASON].decode(), r.value, headers)
    dead_frames = [r for r in dead if r.topic == s.topics.deadletter and dict(r.headers).get("x-dl-source-topic") == s.topics.frames.encode()]
    dead_candidates = [r for r in dead if dict(r.headers).get("x-dl-source-topic") == s.topics.candidates.encode()]
    report("hostile corpus", frames=len(frames), frames_dead_lettered=len(dead_frames), candidates=len(bad),
           candidates_dead_lettered=len(dead_candidates), good_frames_scored=sum(1 for k in scores if k.startswith("f")),
           reasons=dict(Counter(v[0] for v in by_case.values())))
    assert len(dead_frames) == len(frames)
    for reasons, key, value, headers in frames:
        name = dict(headers).get(H_FRAME_ID, key).decode("utf-8", "replace")
        got = by_case[name]
        assert got[0] in reasons, (name, got[0])
        assert got[2]["x-dl-worker"] == b"scorer-h", name  # who refused it
        if name in ("png-bomb", "jpeg-7k"):  # refused by our limit, not Pillow's
            assert f"> limit {s.images.max_pixels} pixels".encode() in got[2][H_DL_DETAIL], got[2][H_DL_DETAIL]
        if name == "near-limit":  # the copy says what did not fit and carries what does
            assert got[2][H_DL_TRUNCATED].startswith(b"1 headers dropped; value ") and value.startswith(got[1]) and len(got[1]) > 16_000_000
            continue
        assert got[1] == value, name  # the original bytes
    assert {f"f{i}" for i in range(len(frames) + 1)} <= set(scores)  # the valid frames around them were scored
    assert skipped and "undecodable" not in scores and "undecodable" not in by_case  # skipped, counted, logged
    # candidates: each wrong vector dead-lettered with its reason, the valid ones between them inverted
    assert len(dead_candidates) == len(bad) + 1
    reasons = Counter(dict(r.headers)[H_DL_REASON].decode() for r in dead_candidates)
    assert set(reasons) <= {"malformed-candidate", "wrong-vector", "not-confidently-ood"} and by_case["not-unit"][0] == "wrong-vector"
    assert reasons["not-confidently-ood"] == 1 and by_case[forged_candidate.frame_id][0] == "not-confidently-ood"
    status = inverter.status()
    assert status["candidates"] == all_candidates - len(bad) and status["published"] >= 1  # the forged one parsed, never inverted
    assert scorer.process.poll() is None and inverter.process.poll() is None  # no worker died


def test_a_flood_of_candidates_in_one_cameras_name_cannot_fill_the_bank(stream_settings, tiny_bundle_dir, workers):
    """400 forged candidates, inverted by our own worker, took the bank over (issue 11): now
    one camera id gets its burst and then its sustained rate, and the other cameras theirs."""
    s = stream_settings
    s.worker.bundle = tiny_bundle_dir
    s.inversion.camera_burst, s.inversion.camera_rate = 4, 0.001  # nothing refills during the test
    flood = crafted_candidates(tiny_bundle_dir, 40, seed=31)
    others = crafted_candidates(tiny_bundle_dir, 3, seed=32)
    records = [(c.frame_id, c.model_copy(update={"camera_id": "cam-flood"}).to_bytes(), None) for c in flood]
    records += [(c.frame_id, c.model_copy(update={"camera_id": f"cam-{k}"}).to_bytes(), None) for k, c in enumerate(others)]
    inverter = workers("invert-worker", s, "inverter-r")
    inverter.wait_ready()
    produce_records(s, records, topic=s.topics.candidates)
    wait_for(lambda: committed(s, s.kafka.inversion_group, s.topics.candidates) >= len(records), 120, "every candidate committed")
    status = inverter.status()
    origins = {NegativeRecord.from_bytes(r.value).origin for r in read_topic(s, s.topics.negatives, idle_s=1) if r.value}
    report("candidate flood", flood=len(flood), others=len(others), rate_limited=status["rate_limited"], published=sorted(origins))
    assert status["candidates"] == len(records) and status["rate_limited"] == len(flood) - 4
    assert len(origins & {c.frame_id for c in flood}) <= 4 and origins & {c.frame_id for c in others}


def test_a_follower_keeps_the_bank_bound_whatever_the_topic_holds(stream_settings, tiny_bundle_dir):
    """A writer that publishes more negatives than the capacity (and no tombstones) grew every
    follower's bank past its bound (seen: 9,385 with a capacity of 2,000). The ranking is
    the deviation the follower computes from each vector, never the one a record claims."""
    s = stream_settings
    bundle, loaded = load_bundle_with_model(tiny_bundle_dir, "cpu")
    signer, check = NegativeSigner.from_file(s.bank.signing_key), NegativeCheck.of(bundle)
    flood = [admissible_negative(tiny_bundle_dir, f"flood-{i}", seed=i, claimed=float(i)) for i in range(10)]
    records = []
    for record in flood:
        key, value = str(record.id).encode(), record.to_bytes()
        records.append((key, value, signer.sign(s.topics.negatives, key, value)))
    # squatters first, on ids that real negatives get later (ids are predictable): a record that
    # is refused, and a tombstone of an id never put
    squat = [(str(flood[0].id).encode(), b"{}", None), (str(flood[1].id).encode(), None, None)]
    produce_records(s, squat + records, topic=s.topics.negatives)
    unverified = NegativeFollower(s.kafka, s.topics.negatives, bundle.bank("interneg", 10, None), loaded.model_id, None, check=check)
    try:
        assert unverified.catch_up(timeout_s=60) == 12 and unverified.rejected == 1
        assert {flood[0].id, flood[1].id} <= set(unverified.bank.entries)  # not kept out
    finally:
        unverified.close()
    bank = bundle.bank("interneg", 4, None)
    follower = NegativeFollower(s.kafka, s.topics.negatives, bank, loaded.model_id, None, check=check, verifier=signer.verifier())
    try:
        assert follower.catch_up(timeout_s=60) == 12 and follower.rejected == 2
        first = bank.ranked_ids()[0]
        # its removal, then a replay of its own signed record (a hostile writer can copy one):
        # it stays out, and is marked for the inversion worker to announce the removal again
        replayed = next(r for r in records if r[0] == str(first).encode())
        produce_records(s, [(replayed[0], None, signer.sign(s.topics.negatives, replayed[0], None)), replayed], topic=s.topics.negatives)
        assert follower.catch_up(timeout_s=60) == 2 and first not in bank.entries and first in follower.unannounced
        follower.unannounced.discard(first)
    finally:
        follower.close()
    truth = sorted(flood, key=lambda r: (-check.degree(r.vector.to_numpy(model_id=loaded.model_id, dim=bank.dim)), r.id))
    assert [bank.entries[i].origin for i in bank.ranked_ids()] == [r.origin for r in truth[1:4]]
    assert [r.origin for r in truth[:4]] != ["flood-9", "flood-8", "flood-7", "flood-6"]  # not what the records claim
    assert all(bank.entries[i].deviation == check.degree(bank.vector(i)) for i in bank.ranked_ids())
    # the six evicted without a tombstone on the topic: the inversion worker announces them
    assert follower.unannounced == {r.id for r in truth[4:]}
