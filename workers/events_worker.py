"""The events worker: alerts in, per-camera events out (issue 14).

One consumer group on ``ood.alerts``, which the scoring workers key by camera id, so each
camera's alerts arrive in order on one partition and one member holds its state. The
state machine is :mod:`pipeline.events`; this module keeps its state in Kafka:

- Every batch writes the state of each camera it changed to the compacted
  ``ood.events.state`` topic (keyed by camera id) together with the events it caused; the
  batch loop commits the alerts' offsets only after both are acknowledged (at-least-once).
- When the member's partitions change (start, rebalance, a replaced consumer), it reads
  the state topic to its end and holds the cameras of the partitions it now owns, as last
  written. A batch redelivered after a crash finds its frames already counted (each
  camera's state remembers the offset of the last alert it handled) and tells nothing twice.
- A camera that goes quiet sends nothing, so events are closed by the wall clock between
  batches; those records are sent and flushed at once.

Always at-least-once, whatever ``worker.exactly_once`` says: the wall-clock records are
sent outside any batch, and an event record is idempotent for a reader (event id and
status).
"""
from __future__ import annotations

import time

from kafka import TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from pydantic import ValidationError

from pipeline.events import MAX_FIRED, CameraState, EventTracker, check_alert
from schemas.messages import OODAlert, OODEvent
from schemas.settings import MAX_OPEN_FRAMES, EventRules, Settings
from workers.control import ControlFollower
from workers.delivery import RECORD_OVERHEAD_BYTES, Output, poll_readable, read_to_end, send_and_confirm
from workers.kafka_clients import make_consumer
from workers.worker import Worker

STATE_READ_TIMEOUT_S = 60.0
# A scoring worker's alert is a few KB (a float16 embedding, a few negatives). A camera's
# state holds up to MAX_OPEN_FRAMES of them, its open event's best one and up to MAX_FIRED
# negatives' labels (each at most an alert long): an alert within this share of a record
# (less 1 KB for the fields a re-written alert may gain) keeps that state, and the events it
# tells, within one record, and the worker's memory within max_cameras such states.
MAX_ALERT_BYTES = 64 * 1024


def max_alert_bytes(max_message_bytes: int) -> int:
    return min(MAX_ALERT_BYTES, (max_message_bytes - RECORD_OVERHEAD_BYTES) // (MAX_OPEN_FRAMES + 1 + MAX_FIRED) - 1024)


def now_ms() -> int:
    return int(time.time() * 1000)


def read_states(settings: Settings, on_refused) -> list[CameraState]:
    """The compacted state topic read to its end: the last state of every camera (tombstones drop it)."""
    consumer = make_consumer(settings.kafka, group_id=None, enable_auto_commit=False)
    try:
        topic = settings.topics.event_state
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        if not partitions:
            return []
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        latest: dict[bytes, bytes | None] = {}

        def take(timeout_ms: int) -> int:
            polled = [r for records in poll_readable(consumer, timeout_ms).values() for r in records]
            latest.update((r.key, r.value) for r in polled)
            return len(polled)

        read_to_end(consumer, partitions, take, timeout_s=STATE_READ_TIMEOUT_S, what=f"{topic} topic")
    finally:
        consumer.close(autocommit=False)
    states = []
    now = now_ms()
    for key, value in latest.items():
        if value is None:
            continue
        try:
            state = CameraState.model_validate_json(value)
            if key != state.camera_id.encode():
                raise ValueError(f"key {(key or b'')[:60]!r} is not the camera id {state.camera_id[:60]!r}")
            state.check(now)
        except (ValidationError, ValueError) as exc:  # the topic is untrusted input too: that camera starts afresh
            on_refused(key or b"", exc)
            continue
        states.append(state)
    return states


class EventsWorker(Worker):
    role = "events"

    def __init__(self, settings: Settings):
        super().__init__(settings)
        self.tracker = EventTracker(self.rules_for, max_cameras=settings.worker.events_max_cameras)
        self.max_alert_bytes = max_alert_bytes(settings.kafka.max_message_bytes)
        self.owned: set[int] | None = None  # the alerts partitions whose cameras the tracker holds
        self.control: ControlFollower | None = None
        self.events_told = 0
        self.states_refused = 0
        self.cameras_evicted = 0

    def rules_for(self, camera_id: str) -> EventRules:
        """The camera's own event rules (the cameras file, through ood.control), else the worker's."""
        own = self.control.cameras.get(camera_id) if self.control is not None else None
        return own.events if own is not None and own.events is not None else self.settings.events

    def catch_up(self) -> None:
        self.control = ControlFollower(self.settings, self.log, on_refused=self.metrics.control_refused.inc)
        applied = self.control.catch_up(beat=self.ops.beat)
        self.log.info("control caught up", records=applied, cameras_configured=len(self.control.cameras))

    def close(self) -> None:
        if self.control is not None:
            self.control.close()

    def input(self) -> tuple[str, str, int]:
        s = self.settings
        return s.topics.alerts, s.kafka.events_group, s.worker.batch_size

    def exactly_once(self) -> bool:
        return False

    def counters(self) -> dict:
        open_events = sum(1 for s in self.tracker.cameras.values() if s.open is not None)
        return {"cameras": len(self.tracker.cameras), "events_open": open_events, "events_told": self.events_told,
                "states_refused": self.states_refused, "cameras_evicted": self.cameras_evicted,
                "cameras_configured": len(self.control.cameras) if self.control is not None else 0}

    # --- the state, held for the partitions owned ------------------------------------------
    def _follow_assignment(self) -> None:
        consumer = self.loop.consumer if self.loop is not None else None
        if consumer is None:
            return
        owned = {tp.partition for tp in consumer.assignment() if tp.topic == self.settings.topics.alerts}
        if owned == self.owned:
            return
        states = read_states(self.settings, self._state_refused) if owned else []  # owning nothing (not yet in the group), it holds nothing
        self.tracker.restore(states, owned)
        self.owned = owned
        self.log.info("event state restored", partitions=sorted(owned), cameras=len(self.tracker.cameras),
                      open=sum(1 for s in self.tracker.cameras.values() if s.open is not None))

    def _state_refused(self, key: bytes, exc: Exception) -> None:
        self.states_refused += 1
        self.log.warning("event state refused: the camera starts afresh", key=key[:80].decode("utf-8", "replace"), error=str(exc)[:200])

    def _outputs(self, told: list[OODEvent], changed: set[str]) -> list[Output]:
        t = self.settings.topics
        outputs = [Output(t.events, e.camera_id.encode(), e.to_bytes()) for e in told]
        for camera_id in sorted(changed):
            state = self.tracker.cameras.get(camera_id)
            outputs.append(Output(t.event_state, camera_id.encode(), state.model_dump_json().encode() if state is not None else None))
        m = self.metrics
        for e in told:
            m.events.labels(status=e.status).inc()
            m.camera_events.labels(camera=m.cameras(e.camera_id), status=e.status).inc()
        self.events_told += len(told)
        self.metrics.events_open.set(sum(1 for s in self.tracker.cameras.values() if s.open is not None))
        return outputs

    # --- a batch of alerts, and the wall clock between batches ------------------------------
    def handle(self, records: list[ConsumerRecord], prepared=None) -> list[Output]:
        self._follow_assignment()
        outputs: list[Output] = []
        told: list[OODEvent] = []
        changed: set[str] = set()
        now = now_ms()
        for r in records:
            if r.value is not None and len(r.value) > self.max_alert_bytes:
                outputs.append(self.reject(r, "alert-too-large", f"{len(r.value)} bytes > {self.max_alert_bytes}"))
                continue
            try:
                if r.value is None:
                    raise ValueError("null value")
                alert = OODAlert.from_bytes(r.value)
                if r.key != alert.camera_id.encode():  # the key placed it: a camera on two partitions would have two states
                    raise ValueError(f"key {(r.key or b'')[:60]!r} is not the alert's camera id {alert.camera_id[:60]!r}")
                check_alert(alert, now)
            except (ValidationError, ValueError) as exc:
                outputs.append(self.reject(r, "malformed-alert", str(exc)))
                continue
            suppressed = self.tracker.cameras.get(alert.camera_id)
            before = suppressed.suppressed if suppressed is not None else 0
            caused, did_change = self.tracker.observe(alert, r.partition, now, r.offset)
            told += caused
            if did_change:
                changed.add(alert.camera_id)
                self.metrics.frames_suppressed.inc(self.tracker.cameras[alert.camera_id].suppressed - before)
        closed, ticked = self.tracker.tick(now)
        evicted_told, evicted = self._evict(now)
        return outputs + self._outputs(told + closed + evicted_told, changed | ticked | evicted)

    def _evict(self, now: int) -> tuple[list[OODEvent], set[str]]:
        told, evicted = self.tracker.evict(now)
        if evicted:
            self.cameras_evicted += len(evicted)
            self.log.warning("cameras forgotten: more than events_max_cameras", cameras=len(evicted),
                             max_cameras=self.tracker.max_cameras, examples=[c[:60] for c in sorted(evicted)[:5]])
        return told, evicted

    def between_batches(self) -> None:
        super().between_batches()
        if self.control is not None:
            self.control.poll()
        if self.loop is None:
            return
        self._follow_assignment()
        told, changed = self.tracker.tick(now_ms())
        if not told and not changed:
            return
        send_and_confirm(self.loop.producer, self._outputs(told, changed))
        self.log.info("events closed by the clock", events=[f"{e.camera_id}:{e.status}" for e in told][:20], cameras=len(changed))


def run_events_worker(settings: Settings) -> int:
    return EventsWorker.main(settings)
