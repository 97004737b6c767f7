"""Events through the real broker (issue 14): an alert storm becomes one event, and the
event survives its worker being killed (state kept in the compacted state topic)."""
from __future__ import annotations

import time
from collections import Counter

from schemas.messages import H_CAMERA_ID, H_CONTENT_TYPE, H_FRAME_ID, H_TS, OODAlert, OODEvent
from test_streaming import jpeg, read_topic
from workers.producer import produce_records

LOOP = [jpeg(i) for i in range(12)]  # twelve images, looped: the operator's alert storm


def looped(start: int, count: int, t0_ms: int, camera: str = "yard"):
    """Frames at 20 per second of camera time, each a JPEG of the loop."""
    for i in range(start, start + count):
        headers = [(H_FRAME_ID, f"{camera}-{i}".encode()), (H_CAMERA_ID, camera.encode()),
                   (H_TS, str(t0_ms + 50 * i).encode()), (H_CONTENT_TYPE, b"image/jpeg")]
        yield camera.encode(), LOOP[i % len(LOOP)], headers


def events_of(settings) -> list[OODEvent]:
    return [OODEvent.from_bytes(r.value) for r in read_topic(settings, settings.topics.events, idle_s=1)]


def wait_for_events(settings, done, timeout_s: float = 120.0) -> list[OODEvent]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        events = events_of(settings)
        if done(events):
            return events
        time.sleep(1)
    raise AssertionError(f"events not as expected within {timeout_s} s: {[(e.camera_id, e.status, e.frames) for e in events_of(settings)]}")


def storm_settings(stream_settings, tiny_bundle_dir):
    s = stream_settings
    s.worker.bundle = tiny_bundle_dir
    s.method.threshold = 0.9999  # every frame OOD: one alert per frame
    s.events = s.events.model_copy(update={"open_frames": 3, "open_window_s": 10, "quiet_s": 6, "cooldown_s": 0, "update_every_s": 2})
    return s


def test_an_alert_storm_becomes_one_event_with_its_best_frame(stream_settings, tiny_bundle_dir, workers):
    s = storm_settings(stream_settings, tiny_bundle_dir)
    scorer, events = workers("score-worker", s, "scorer"), workers("events-worker", s, "events")
    scorer.wait_ready()
    events.wait_ready()
    produce_records(s, list(looped(0, 240, int(time.time() * 1000))))
    told = wait_for_events(s, lambda evs: any(e.status == "closed" for e in evs))
    alerts = [OODAlert.from_bytes(r.value) for r in read_topic(s, s.topics.alerts, expect=240)]
    print(f"\n[events] alerts={len(alerts)} event records={len(told)} by status={dict(Counter(e.status for e in told))}")
    assert len(alerts) == 240  # the storm
    assert {e.event_id for e in told} == {told[0].event_id}  # one event
    by_status = Counter(e.status for e in told)
    assert by_status["opened"] == 1 and by_status["closed"] == 1 and len(told) <= 12
    closed = next(e for e in told if e.status == "closed")
    assert closed.frames == 240 and closed.camera_id == "yard"
    best = min(alerts, key=lambda a: a.score)
    assert (closed.best_frame_id, closed.peak_score) == (best.frame_id, best.score)
    assert closed.embedding is not None and closed.negatives
    assert closed.start_ms == min(a.ts_ms for a in alerts) and closed.end_ms == max(a.ts_ms for a in alerts)
    assert events.status()["events_told"] == len(told)


def test_an_event_survives_its_worker_killed_mid_storm(stream_settings, tiny_bundle_dir, workers):
    s = storm_settings(stream_settings, tiny_bundle_dir)
    s.events = s.events.model_copy(update={"quiet_s": 20})  # longer than a restart takes
    scorer, first = workers("score-worker", s, "scorer"), workers("events-worker", s, "events-a")
    scorer.wait_ready()
    first.wait_ready()
    t0 = int(time.time() * 1000)
    produce_records(s, list(looped(0, 120, t0)))
    wait_for_events(s, lambda evs: any(e.status == "opened" for e in evs))
    deadline = time.monotonic() + 60
    while first.status().get("cameras") != 1 and time.monotonic() < deadline:
        time.sleep(0.5)
    first.kill()  # no drain, no commit of what it had in hand
    produce_records(s, list(looped(120, 120, t0)))
    second = workers("events-worker", s, "events-b")
    second.wait_ready()
    told = wait_for_events(s, lambda evs: any(e.status == "closed" for e in evs), timeout_s=150)
    print(f"\n[events] after a kill: {[(e.status, e.frames) for e in told]}")
    assert {e.event_id for e in told} == {told[0].event_id}  # the same event, not a second one
    assert Counter(e.status for e in told)["opened"] == 1
    closed = [e for e in told if e.status == "closed"]
    assert len(closed) == 1 and closed[0].frames == 240  # every frame counted once, whoever held the camera
