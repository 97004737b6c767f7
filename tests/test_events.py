"""Per-camera events (issue 14): the state machine of pipeline/events.py, values by hand."""
from __future__ import annotations

import pytest

from pipeline.events import CameraState, EventTracker, event_id
from schemas.messages import OODAlert, SourceRef, WeighedNegative
from schemas.settings import EventRules

RULES = EventRules(open_frames=3, open_window_s=10, quiet_s=30, cooldown_s=60, update_every_s=10)
S = 1000  # ms


def alert(i: int, t_s: float, score: float = 0.3, camera: str = "cam", negatives=(("lava", 0.3),)) -> OODAlert:
    return OODAlert(
        frame_id=f"f{i}", camera_id=camera, ts_ms=int(t_s * S), source=SourceRef(topic="frames", partition=0, offset=i),
        method="interneg", score=score, threshold=0.5, id_class="cow", id_prob=0.9,
        negatives=[WeighedNegative(label=label, cos=cos) for label, cos in negatives],
        bank_version=0, bank_size=0, model_id="m", worker="w", scored_at_ms=int(t_s * S),
    )


def tracker(rules: EventRules = RULES) -> EventTracker:
    return EventTracker(lambda camera: rules)


def test_an_event_opens_on_the_third_ood_frame_within_the_window_and_not_before():
    tr = tracker()
    assert tr.observe(alert(0, 0), 0, 0)[0] == []
    assert tr.observe(alert(1, 11), 0, 11 * S)[0] == []  # 11 s after f0: f0 is out of the window
    assert tr.observe(alert(2, 12), 0, 12 * S)[0] == []  # f1, f2: two within 10 s
    told, changed = tr.observe(alert(3, 13, score=0.1), 0, 13 * S)
    assert changed and [e.status for e in told] == ["opened"]
    opened = told[0]
    assert (opened.start_ms, opened.end_ms, opened.frames) == (11 * S, 13 * S, 3)
    assert (opened.best_frame_id, opened.peak_score) == ("f3", 0.1)
    assert opened.event_id == event_id(alert(1, 11))  # named by the frame that opened it


def test_an_open_event_is_updated_at_most_every_update_period_and_closed_once_after_the_quiet_period():
    tr = tracker()
    for i, t in enumerate((0, 1, 2)):
        tr.observe(alert(i, t), 0, t * S)
    # frames every second until 25 s: one update at 12 s (10 s after the opening at 2 s), one at 22 s
    told = []
    for i in range(3, 26):
        told += tr.observe(alert(i, i, score=0.3 - i / 1000, negatives=(("lava", 0.2), ("moon", i / 100))), 0, i * S)[0]
    assert [(e.status, e.emitted_ms) for e in told] == [("updated", 12 * S), ("updated", 22 * S)]
    assert told[-1].frames == 23  # f0..f22
    assert told[-1].best_frame_id == "f22"
    # the wall clock: nothing at 54.9 s (29.9 s quiet), the held-back change told at the tick,
    # closed at 55 s, once
    held, _ = tr.tick(54_900)
    assert [e.status for e in held] == ["updated"] and held[0].frames == 26
    closed, changed = tr.tick(55 * S)
    assert [e.status for e in closed] == ["closed"] and changed == {"cam"}
    assert (closed[0].start_ms, closed[0].end_ms, closed[0].frames, closed[0].best_frame_id) == (0, 25 * S, 26, "f25")
    # the negatives that fired most: lava in every frame, moon in 23 with its best cos 0.25
    assert [(n.label, n.cos) for n in closed[0].negatives] == [("lava", 0.3), ("moon", 0.25)]
    assert tr.tick(200 * S) == ([], set())


def test_the_cooldown_suppresses_new_events_then_lets_them_open():
    tr = tracker()
    for i, t in enumerate((0, 1, 2)):
        tr.observe(alert(i, t), 0, t * S)
    tr.tick(40 * S)  # closed; end 2 s, so the cooldown lasts until 62 s of frame time
    for i, t in enumerate((50, 51, 52, 61), start=3):
        assert tr.observe(alert(i, t), 0, t * S)[0] == []
    assert tr.cameras["cam"].suppressed == 4
    assert [e.status for e in tr.observe(alert(7, 62), 0, 62 * S)[0]] == []
    assert [e.status for e in tr.observe(alert(8, 63), 0, 63 * S)[0]] == []
    assert [e.status for e in tr.observe(alert(9, 64), 0, 64 * S)[0]] == ["opened"]


def test_a_gap_in_frame_time_closes_the_event_even_when_replayed_faster_than_the_wall_clock():
    tr = tracker(RULES.model_copy(update={"cooldown_s": 0}))
    for i, t in enumerate((0, 1, 2)):
        tr.observe(alert(i, t), 0, 0)
    told = []
    for i, t in enumerate((40, 41, 42), start=3):  # 38 s later in frame time, at the same wall time
        told += tr.observe(alert(i, t), 0, 0)[0]
    assert [e.status for e in told] == ["closed", "opened"]
    assert told[0].end_ms == 2 * S and told[1].start_ms == 40 * S


def test_a_redelivered_frame_changes_nothing():
    tr = tracker()
    for i in range(3):
        tr.observe(alert(i, i), 0, i * S)
    before = tr.cameras["cam"]
    assert tr.observe(alert(1, 1), 0, 5 * S) == ([], False)
    assert tr.cameras["cam"] == before


def test_cameras_are_independent_and_the_state_round_trips_as_json():
    tr = tracker()
    for i in range(3):
        tr.observe(alert(i, i, camera="a"), 0, i * S)
        tr.observe(alert(10 + i, i, camera="b"), 1, i * S)
    assert {c: s.open.frames for c, s in tr.cameras.items()} == {"a": 3, "b": 3}
    saved = [CameraState.model_validate_json(s.model_dump_json()) for s in tr.cameras.values()]
    resumed = tracker()
    resumed.restore(saved, partitions={1})  # this worker owns partition 1 only
    assert set(resumed.cameras) == {"b"}
    told, _ = resumed.tick(40 * S)
    assert [(e.camera_id, e.status, e.frames) for e in told] == [("b", "closed", 3)]


@pytest.mark.parametrize("field,value", [("open_frames", 0), ("quiet_s", 0), ("cooldown_s", -1)])
def test_rules_are_validated(field, value):
    with pytest.raises(ValueError):
        EventRules(**{field: value})
