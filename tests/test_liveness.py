"""The liveness guarantee (issue 16): a group member that owns partitions with records waiting
and commits nothing for ``stall_after_s`` notices, says so, and renews its consumer.

The stall is made real, not mocked: the member's consumer pauses its partitions, so it stays
in the group, heartbeats and holds its assignment while fetching nothing, which is what a
client that stopped fetching looks like from outside.
"""
from __future__ import annotations

import re
import threading
import time
import urllib.error
import urllib.request
from collections import Counter

import pytest
from kafka import ConsumerRebalanceListener, TopicPartition
from kafka.structs import ConsumerGroupMetadata, MemberState

from test_faults import report, wait_for
from test_streaming import frame_record, jpeg, read_topic
from workers.delivery import MAX_RENEWALS, BatchLoop, ConsumerStalledError, LivenessWatch, Output, Stall, group_offsets
from workers.kafka_clients import make_consumer, make_producer
from workers.producer import produce_records

BOUND_S = 5.0


# --- the watch's arithmetic, on a clock the test moves ---------------------------------------
class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_the_watch_reports_a_stall_only_past_the_bound_and_gives_a_renewed_consumer_the_bound_again():
    clock = Clock()
    watch = LivenessWatch(bound_s=60, clock=clock)
    waiting = {TopicPartition("t", 0): 6, TopicPartition("t", 1): 0}  # 6 records uncommitted on partition 0
    seen = []
    for t in range(0, 200, 5):  # the loop measures every 5 s
        clock.now = float(t)
        stall = watch.look(waiting)
        if stall is not None:
            seen.append((t, stall))
            watch.renewed()  # what BatchLoop._recover does
    # first stall at the first look past 60 s, the next ones at the first look a bound after each renewal
    assert [t for t, _ in seen] == [65, 130, 195]
    assert seen[0][1] == Stall({TopicPartition("t", 0): 6}, 65.0)
    assert "6 records waiting (t[0]: 6), nothing committed for 65 s" in seen[0][1].describe()

    clock.now = 200.0
    assert watch.progressed() is seen[-1][1]  # a commit ends the stall and the renewal count
    assert watch.renewals == 0 and watch.stall is None
    clock.now = 255.0
    assert watch.look(waiting) is None  # 55 s since the progress: within the bound


def test_an_idle_member_with_nothing_waiting_is_never_stalled():
    clock = Clock()
    watch = LivenessWatch(bound_s=10, clock=clock)
    for t in range(0, 100):
        clock.now = float(t)
        assert watch.look({TopicPartition("t", 0): 0} if t % 2 else {}) is None
    assert watch.last_progress == 99.0


class Member:
    """What BatchLoop._measure reads of a consumer: subscription, ends, commits, positions, state."""

    def __init__(self, ends: dict[int, int], committed: dict[int, int], positions: dict[int, int], state: MemberState):
        self.ends, self.commits, self.positions, self.state = ends, committed, positions, state

    def subscription(self):
        return {"t"}

    def partitions_for_topic(self, topic):
        return set(self.ends)

    def end_offsets(self, partitions, timeout_ms=None):
        return {tp: self.ends[tp.partition] for tp in partitions}

    def committed(self, tp, timeout_ms=None):
        return self.commits[tp.partition]

    def beginning_offsets(self, partitions, timeout_ms=None):
        return {tp: 0 for tp in partitions}

    def assignment(self):
        return {TopicPartition("t", p) for p in self.positions}

    def position(self, tp, timeout_ms=None):
        return self.positions[tp.partition]

    def group_metadata(self):
        return ConsumerGroupMetadata(group_id="g", generation_id=3, member_id="m", state=self.state)


def stalls_seen(member: Member, refused: bool = False, seconds: int = 40, bound_s: float = 10) -> list[dict]:
    """What the loop's watch reports of ``member``, measuring every second for ``seconds``."""
    clock, lags = Clock(), []
    loop = BatchLoop(member, None, lambda batch, prepared: [], batch_size=8, batch_timeout_ms=100,
                     should_stop=lambda: True, stall_after_s=bound_s, on_lag=lambda lag, owned: lags.append((lag, owned)))
    loop.liveness, loop._refused = LivenessWatch(bound_s, clock=clock), refused
    seen = []
    for t in range(seconds):
        clock.now, loop._measured_at = float(t), float("-inf")
        stall = loop._measure()
        if stall is not None:
            seen.append(stall.waiting)
            loop.liveness.renewed()
    # the gauges: the group's committed lag, except where a stable member without a refused
    # commit owns the partition: there what it has not fetched (nothing was handed to it here),
    # so that commit markers past its last record do not count
    owned, stable = member.assignment(), member.state == MemberState.STABLE and not refused
    expected = {TopicPartition("t", p): max(0, member.ends[p] - max(member.positions[p], member.commits[p]))
                if stable and TopicPartition("t", p) in owned else member.ends[p] - member.commits[p] for p in member.ends}
    assert lags[0] == (expected, owned)
    return seen


def test_which_records_wait_for_a_member():
    ends, committed = {0: 10, 1: 20}, {0: 9, 1: 5}  # 1 and 15 records uncommitted
    p0, p1 = TopicPartition("t", 0), TopicPartition("t", 1)
    # stable and caught up: a commit marker (or aborted records) between the committed offset
    # and the end is not waiting, nor is another member's partition
    assert stalls_seen(Member(ends, committed, {0: 10}, MemberState.STABLE)) == []
    # stable: what lies between its position and the end of what it owns
    assert stalls_seen(Member(ends, committed, {0: 10, 1: 12}, MemberState.STABLE)) == [{p1: 8}] * 3
    # after a refused commit: everything it owns and has not committed (the batch lies behind the position)
    assert stalls_seen(Member(ends, committed, {0: 10, 1: 20}, MemberState.STABLE), refused=True) == [{p0: 1, p1: 15}] * 3
    # not stable (joining, or half-joined): it cannot say what it owns, all of it waits
    assert stalls_seen(Member(ends, committed, {}, MemberState.REBALANCING)) == [{p0: 1, p1: 15}] * 3


# --- against the real broker -----------------------------------------------------------------
class PauseOnAssign(ConsumerRebalanceListener):
    def __init__(self, consumer):
        self.consumer = consumer

    def on_partitions_revoked(self, revoked):
        pass

    def on_partitions_assigned(self, assigned):
        self.consumer.pause(*assigned)  # before the first fetch


def paused_member(s, topic: str):
    """A consumer that has joined the group, owns every partition of ``topic`` and fetches nothing."""
    consumer = make_consumer(s.kafka, topic, group_id=s.kafka.scoring_group)
    consumer.subscribe([topic], listener=PauseOnAssign(consumer))
    wait_for(lambda: consumer.poll(timeout_ms=200) == {} and len(consumer.assignment()) == s.topics.partitions, 60, "the member joined")
    return consumer


@pytest.mark.parametrize("renew", [True, False], ids=["new-consumer", "rejoin"])
def test_a_member_that_stops_fetching_is_renewed_and_its_records_are_handled(stream_settings, renew):
    """Without the watch this member would hold its partitions forever and handle nothing
    (seen: the test times out with 0 of 40 outputs when stall_after_s is None)."""
    s = stream_settings
    n = 40
    consumer = paused_member(s, s.topics.frames)
    produce_records(s, [(f"k{i % 8}".encode(), f"in-{i}".encode(), None) for i in range(n)])  # all partitions
    assert sum(group_offsets(consumer).uncommitted().values()) == n
    renewed, events, done = [], [], []

    def new_consumer():
        renewed.append(time.monotonic())
        return make_consumer(s.kafka, s.topics.frames, group_id=s.kafka.scoring_group)

    start, deadline = time.monotonic(), time.monotonic() + 90
    loop = BatchLoop(
        consumer, make_producer(s.kafka), lambda batch, prepared: [Output(s.topics.scores, r.key, r.value + b"/out") for r in batch],
        batch_size=8, batch_timeout_ms=200, should_stop=lambda: sum(done) >= n or time.monotonic() > deadline,
        on_batch=lambda stats: done.append(stats.records if stats.committed else 0),
        stall_after_s=BOUND_S, renew_consumer=new_consumer if renew else None, on_stall=events.append,
    )
    loop.run()
    took = time.monotonic() - start
    outputs = Counter(r.value for r in read_topic(s, s.topics.scores, expect=n, idle_s=1))
    report("stalled member", renew="new consumer" if renew else "rejoin", stall=events[0].describe() if events else None,
           renewals=len(renewed), events=len(events), handled=sum(done), seconds=round(took, 1))
    assert outputs == Counter(f"in-{i}/out".encode() for i in range(n))  # each once, none lost
    assert isinstance(events[0], Stall) and sum(events[0].waiting.values()) == n and events[0].idle_s > BOUND_S
    assert events[-1] is None  # told of the end of the stall
    assert len(renewed) == (1 if renew else 0)
    reader = make_consumer(s.kafka, group_id=s.kafka.scoring_group)  # not a member: reads the group's commits
    assert sum(group_offsets(reader, [s.topics.frames]).uncommitted().values()) == 0
    reader.close()
    assert took < BOUND_S + 30  # the bound, one look, a join, 40 records


def test_a_member_at_the_end_of_a_transactional_topic_is_not_stalled(stream_settings):
    """Under read_committed the end is the last stable offset, and the last record of a
    committed transaction is followed by its commit marker: a member that has read
    everything must not count that marker as a record waiting."""
    s = stream_settings
    producer = make_producer(s.kafka, transactional_id=f"marker-test-{s.kafka.scoring_group}")
    producer.init_transactions()
    producer.begin_transaction()
    for i in range(12):
        producer.send(s.topics.frames, key=f"k{i % 8}".encode(), value=b"x")
    producer.commit_transaction()
    producer.close()
    consumer = make_consumer(s.kafka, s.topics.frames, group_id=s.kafka.scoring_group, isolation_level="read_committed")
    events, done, lags, stop_at = [], [], [], time.monotonic() + 4 * BOUND_S
    loop = BatchLoop(
        consumer, make_producer(s.kafka), lambda batch, prepared: [],
        batch_size=8, batch_timeout_ms=200, should_stop=lambda: time.monotonic() > stop_at,
        on_batch=lambda stats: done.append(stats.records), stall_after_s=BOUND_S, on_stall=events.append,
        on_lag=lambda lag, owned: lags.append({tp: n for tp, n in lag.items() if tp in owned}),
    )
    loop.run()
    report("idle at a commit marker", handled=sum(done), stalls=len(events), last_lag=lags[-1])
    assert sum(done) == 12
    assert events == []
    # the lag gauge too: 0 once everything is handled, though end minus committed is 1 per
    # partition the transaction wrote (its commit marker; issue 14)
    assert len(lags[-1]) == s.topics.partitions and set(lags[-1].values()) == {0}


def test_a_member_still_stalled_after_its_renewals_exits(stream_settings):
    """A renewal that does not help (here each new consumer stops fetching too) is tried
    MAX_RENEWALS times, then the worker exits for its supervisor: ConsumerStalledError."""
    s = stream_settings
    consumer = paused_member(s, s.topics.frames)
    produce_records(s, [(f"k{i % 8}".encode(), b"x", None) for i in range(16)])
    renewed = []

    def new_stalled_consumer():
        renewed.append(1)
        return paused_member(s, s.topics.frames)

    loop = BatchLoop(
        consumer, make_producer(s.kafka), lambda batch, prepared: [], batch_size=8, batch_timeout_ms=200,
        should_stop=lambda: False, stall_after_s=BOUND_S, renew_consumer=new_stalled_consumer,
    )
    with pytest.raises(ConsumerStalledError, match="16 records waiting"):
        loop.run()
    assert len(renewed) == MAX_RENEWALS


def test_a_stalled_scoring_worker_says_so_and_recovers(stream_settings, tiny_bundle_dir):
    """The whole worker: /readyz answers 503 with the stall, interneg_worker_stalled is 1 and a
    renewal is counted; after the renewal every frame is scored and it is ready again."""
    from workers.scoring_worker import ScoringWorker

    s = stream_settings
    s.worker.bundle = tiny_bundle_dir
    s.worker.stall_after_s = BOUND_S
    s.worker.http_port = 0
    worker = ScoringWorker(s)
    server = threading.Thread(target=worker.serve)
    server.start()
    try:
        wait_for(lambda: worker.loop is not None and len(worker.loop.consumer.assignment()) == s.topics.partitions, 60, "the worker joined")
        first = worker.loop.consumer
        first.pause(*first.assignment())  # from here its client fetches nothing
        n = 12
        producer = make_producer(s.kafka)
        for i in range(n):
            key, value, headers = frame_record(i, jpeg(i), camera=f"cam-{i % 8}")
            producer.send(s.topics.frames, key=key, value=value, headers=headers)
        producer.flush()
        producer.close()

        def probe(path):
            try:
                with urllib.request.urlopen(worker.ops.url + path, timeout=5) as answer:
                    return answer.status, answer.read().decode()
            except urllib.error.HTTPError as exc:
                return exc.code, exc.read().decode()

        stalled = wait_for(lambda: (lambda r: r if r[0] == 503 else None)(probe("/readyz")), 4 * BOUND_S, "/readyz to report the stall", every_s=0.05)
        metrics = probe("/metrics")[1]
        wait_for(lambda: worker.frames_scored >= n, 60, "every frame scored after the renewal")
        ready = wait_for(lambda: (lambda r: r if r[0] == 200 else None)(probe("/readyz")), 30, "ready again")
        idle_lag = f'interneg_group_lag{{topic="{s.topics.frames}"}} 0.0'
        after = wait_for(lambda: (lambda m: m if idle_lag in m else None)(probe("/metrics")[1]), 30, "the group lag measured while idle")
        report("stalled scoring worker", readyz=stalled, scored=worker.frames_scored)
        assert "stalled" in stalled[1] and f"{n} records waiting" in stalled[1]
        assert worker.loop.consumer is not first
        assert "interneg_consumer_renewals_total 1.0" in metrics
        assert "interneg_worker_stalled 0.0" in after and ready[0] == 200
        # one renewal for the stall made here; another if a rebalance after it refused a commit
        # (the refused batch waits behind the position until a renewal or a reseek redoes it)
        renewals = float(re.search(r"^interneg_consumer_renewals_total (\S+)$", after, re.M).group(1))
        assert renewals >= 1.0 and worker.metrics.consumer_renewals._value.get() == renewals
    finally:
        worker.stop_event.set()
        server.join(timeout=60)


# --- half-joined with nothing to fetch (CI, issue 11's stop) -----------------------------------
class HalfJoined:
    """A member that kafka-python left REBALANCING with no join pending: what a CI run showed
    after a commit refused with RebalanceInProgressError, when no record followed."""

    def __init__(self, join_pending: bool):
        self._coordinator = type("Coordinator", (), {"need_rejoin": lambda _: join_pending})()
        self.state, self.calls = MemberState.REBALANCING, []

    def group_metadata(self):
        return ConsumerGroupMetadata(group_id="g", generation_id=3, member_id="m", state=self.state)

    def poll(self, timeout_ms=None, max_records=None):
        return {}  # nothing follows on its partitions

    def subscription(self):
        return {"t"}

    def unsubscribe(self):
        self.calls.append("unsubscribe")

    def subscribe(self, topics):
        self.calls.append(("subscribe", topics))


@pytest.mark.parametrize("join_pending", [False, True])
def test_a_member_half_joined_with_no_records_rejoins_and_one_still_joining_waits(monkeypatch, join_pending):
    import workers.delivery as delivery

    monkeypatch.setattr(delivery, "HALF_JOINED_S", 0.05)
    member = HalfJoined(join_pending)
    loop = BatchLoop(member, None, lambda batch, prepared: [], batch_size=8, batch_timeout_ms=0, should_stop=lambda: True)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not member.calls:
        loop._poll(0)
        if join_pending and time.monotonic() > deadline - 4.5:
            break  # well past HALF_JOINED_S: a member whose join is pending is left to finish it
    assert member.calls == ([] if join_pending else ["unsubscribe", ("subscribe", ["t"])])
