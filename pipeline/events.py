"""Per-camera events from a stream of OOD frames (issue 14), instead of one alert per frame.

An event opens when ``open_frames`` OOD frames fall within ``open_window_s``, stays open
while they go on, and closes after ``quiet_s`` without one. It is told once as *opened*,
then as *updated* (only when it changed, at most every ``update_every_s``), then once as
*closed*. For ``cooldown_s`` after a close the camera opens nothing; its OOD frames are
counted as suppressed.

Pure: no Kafka and no clock. Time comes in as arguments: a frame's own time (its ``ts``
header, else when it was scored) orders what happens within the stream, and the caller's
wall clock closes an event whose camera went quiet, since a quiet camera sends nothing
that could close it. The whole state of a camera is one pydantic model, so the worker
keeps it in a compacted topic and a restarted or rebalanced worker resumes where the last
one stopped; a record redelivered after a crash (at-least-once) is recognised by its
own offset, a frame alerted twice by its source among the camera's last ones, and neither
changes anything.
"""
from __future__ import annotations

import hashlib
import heapq
from typing import Callable

from pydantic import BaseModel, ConfigDict, Field

from schemas.messages import MAX_MS, Identifier, Millis, OODAlert, OODEvent, WeighedNegative
from schemas.settings import MAX_OPEN_FRAMES, MAX_RULE_S, EventRules

MAX_FIRED = 64  # negatives tallied per event: an event's explanation, not a histogram
NEGATIVES_TOLD = 5  # negatives an event record names
RECENT_FRAMES = 64  # sources remembered per camera: a scoring worker's redelivered batch is found among them
# A clock this far ahead of the one that should follow it is wrong, not skewed: a camera's
# frame taken after it was scored, an alert scored after the events worker's now. Believed,
# one such time would hold its camera's event open, or in its cooldown, for as long.
MAX_AHEAD_MS = 10 * 60 * 1000


# Typed as the event records made from them, so a state read back that would not make one is
# refused there, not when its event is told.
class Fired(BaseModel):
    model_config = ConfigDict(extra="forbid")
    count: int = Field(ge=0)
    best_cos: float = Field(allow_inf_nan=False)


class OpenEvent(BaseModel):
    model_config = ConfigDict(extra="forbid")
    event_id: Identifier
    start_ms: Millis
    end_ms: Millis
    frames: int = Field(ge=1, le=MAX_MS)
    best: OODAlert  # the most out-of-distribution frame so far (lowest score)
    fired: dict[str, Fired] = Field(default={}, max_length=MAX_FIRED)
    told_wall_ms: int  # when it was last told (opened or updated)
    changed: bool = False  # since it was last told


class CameraState(BaseModel):
    """Everything the events worker knows of one camera."""

    model_config = ConfigDict(extra="forbid")
    camera_id: str
    partition: int = Field(ge=0)  # the input partition the camera's records arrive on: whose owner holds this state
    pending: list[OODAlert] = Field(default=[], max_length=MAX_OPEN_FRAMES)  # OOD frames waiting to open an event
    open: OpenEvent | None = None
    cooldown_until_ms: int | None = None  # frame time before which nothing opens
    last_wall_ms: int = Field(0, ge=0)  # wall time of the last OOD frame handled
    last_offset: int = Field(-1, ge=-1)  # the offset, on that input partition, of the camera's last alert handled
    recent: list[tuple[int, int]] = Field(default=[], max_length=RECENT_FRAMES)  # sources (partition, offset) of the last frames handled
    suppressed: int = Field(0, ge=0)  # OOD frames that fell in a cooldown
    events: int = Field(0, ge=0)  # events opened so far

    def idle(self) -> bool:
        return self.open is None and not self.pending

    def check(self, now_wall_ms: int) -> None:
        """Raise ValueError unless this state is one the tracker could have made by ``now_wall_ms``:
        read back from a topic, it is untrusted input, and one time from the future would keep
        the camera's event open, or the camera in its cooldown, for as long."""
        alerts = self.pending + ([self.open.best] if self.open is not None else [])
        if any(a.camera_id != self.camera_id for a in alerts):
            raise ValueError("a frame of another camera in the state")
        for a in alerts:
            check_alert(a, now_wall_ms)
        ahead = now_wall_ms + MAX_AHEAD_MS
        walls = [self.last_wall_ms] + ([self.open.told_wall_ms] if self.open is not None else [])
        if max(walls) > ahead:
            raise ValueError(f"a wall time after now ({max(walls)} > {now_wall_ms})")
        if self.open is not None and not self.open.start_ms <= self.open.end_ms <= ahead + MAX_AHEAD_MS:
            raise ValueError(f"the open event's times are not a span before now ({self.open.start_ms}..{self.open.end_ms})")
        if self.cooldown_until_ms is not None and self.cooldown_until_ms > ahead + MAX_AHEAD_MS + MAX_RULE_S * 1000:
            raise ValueError(f"a cooldown until {self.cooldown_until_ms}, longer than any rule makes")


def check_alert(alert: OODAlert, now_wall_ms: int) -> None:
    """Raise ValueError for an alert scored after now: see MAX_AHEAD_MS."""
    if alert.scored_at_ms > now_wall_ms + MAX_AHEAD_MS:
        raise ValueError(f"scored at {alert.scored_at_ms}, after now ({now_wall_ms})")


def frame_time(alert: OODAlert) -> int:
    """The camera's time of the frame, unless the camera says it took it after it was scored (see MAX_AHEAD_MS)."""
    ts = alert.ts_ms
    return ts if ts is not None and ts <= alert.scored_at_ms + MAX_AHEAD_MS else alert.scored_at_ms


def event_id(alert: OODAlert) -> str:
    """Deterministic: the frame that opens an event names it, so a replay names it the same."""
    src = alert.source
    text = f"{alert.camera_id}\0{alert.frame_id}\0{src.topic}\0{src.partition}\0{src.offset}"
    return "ev-" + hashlib.sha256(text.encode()).hexdigest()[:20]


def _tally(fired: dict[str, Fired], alert: OODAlert) -> dict[str, Fired]:
    fired = dict(fired)
    for negative in alert.negatives:
        old = fired.get(negative.label)
        fired[negative.label] = Fired(count=1, best_cos=negative.cos) if old is None else Fired(
            count=old.count + 1, best_cos=max(old.best_cos, negative.cos))
    if len(fired) > MAX_FIRED:
        kept = sorted(fired.items(), key=lambda kv: (-kv[1].count, -kv[1].best_cos, kv[0]))[:MAX_FIRED]
        fired = dict(kept)
    return fired


def _told(event: OpenEvent, camera_id: str, status: str, now_wall_ms: int) -> OODEvent:
    best = event.best
    top = sorted(event.fired.items(), key=lambda kv: (-kv[1].count, -kv[1].best_cos, kv[0]))[:NEGATIVES_TOLD]
    return OODEvent(
        event_id=event.event_id, camera_id=camera_id, status=status, start_ms=event.start_ms, end_ms=event.end_ms,
        frames=event.frames, peak_score=best.score, best_frame_id=best.frame_id, best_source=best.source,
        id_class=best.id_class, negatives=[WeighedNegative(label=label, cos=f.best_cos) for label, f in top],
        threshold=best.threshold, method=best.method, embedding=best.embedding, emitted_ms=now_wall_ms,
    )


class EventTracker:
    """The per-camera events of one worker: the cameras of the partitions it owns, at most
    ``max_cameras`` of them (camera ids come from records: see :meth:`evict`)."""

    def __init__(self, rules_for: Callable[[str], EventRules], max_cameras: int = 10_000):
        self.rules_for = rules_for
        self.max_cameras = max_cameras
        self.cameras: dict[str, CameraState] = {}

    def observe(self, alert: OODAlert, partition: int, now_wall_ms: int, offset: int | None = None) -> tuple[list[OODEvent], bool]:
        """One OOD frame, the alert at ``offset`` of input ``partition``: the event records it
        causes, and whether the camera's state changed."""
        state = self.cameras.get(alert.camera_id) or CameraState(camera_id=alert.camera_id, partition=partition)
        src = alert.source
        # Redelivered, already in the state: an alert by its own offset (the broker's), a frame
        # alerted twice (a scoring worker's redelivered batch) by its source among the last
        # ones. Not "a source offset at most the last one": the source is what the record says,
        # and one naming a huge offset would silence its camera for good.
        if offset is not None and partition == state.partition and offset <= state.last_offset or (src.partition, src.offset) in state.recent:
            return [], False
        rules = self.rules_for(alert.camera_id)
        told: list[OODEvent] = []
        t = frame_time(alert)
        state = state.model_copy(update={"partition": partition, "last_offset": offset if offset is not None else state.last_offset,
                                         "recent": [*state.recent, (src.partition, src.offset)][-RECENT_FRAMES:]})
        if state.open is not None and t - state.open.end_ms >= rules.quiet_s * 1000:  # a gap the wall clock did not see (replay)
            state, closed = self._close(state, rules, now_wall_ms)
            told.append(closed)
        if state.open is not None:
            event = state.open
            best = alert if alert.score < event.best.score else event.best
            event = event.model_copy(update={"end_ms": max(event.end_ms, t), "frames": event.frames + 1, "best": best,
                                             "fired": _tally(event.fired, alert), "changed": True})
            if now_wall_ms - event.told_wall_ms >= rules.update_every_s * 1000:
                told.append(_told(event, state.camera_id, "updated", now_wall_ms))
                event = event.model_copy(update={"told_wall_ms": now_wall_ms, "changed": False})
            state = state.model_copy(update={"open": event, "last_wall_ms": now_wall_ms})
        elif state.cooldown_until_ms is not None and t < state.cooldown_until_ms:
            state = state.model_copy(update={"suppressed": state.suppressed + 1, "last_wall_ms": now_wall_ms})
        else:
            window = rules.open_window_s * 1000
            pending = [p for p in state.pending if t - frame_time(p) <= window][-(rules.open_frames - 1):] if rules.open_frames > 1 else []
            pending.append(alert)
            if len(pending) >= rules.open_frames:
                fired: dict[str, Fired] = {}
                for p in pending:
                    fired = _tally(fired, p)
                event = OpenEvent(event_id=event_id(pending[0]), start_ms=min(frame_time(p) for p in pending),
                                  end_ms=max(frame_time(p) for p in pending), frames=len(pending),
                                  best=min(pending, key=lambda p: p.score), fired=fired, told_wall_ms=now_wall_ms)
                told.append(_told(event, state.camera_id, "opened", now_wall_ms))
                state = state.model_copy(update={"open": event, "pending": [], "events": state.events + 1})
            else:
                state = state.model_copy(update={"pending": pending})
            state = state.model_copy(update={"last_wall_ms": now_wall_ms})
        self.cameras[state.camera_id] = state
        return told, True

    def tick(self, now_wall_ms: int) -> tuple[list[OODEvent], set[str]]:
        """The wall clock moved: close events whose camera went quiet, tell changes held back
        by update_every_s, and forget pending frames too old to open anything."""
        told: list[OODEvent] = []
        changed: set[str] = set()
        for camera_id, state in list(self.cameras.items()):
            rules = self.rules_for(camera_id)
            quiet = now_wall_ms - state.last_wall_ms
            if state.open is not None and quiet >= rules.quiet_s * 1000:
                state, closed = self._close(state, rules, now_wall_ms)
                told.append(closed)
            elif state.open is not None and state.open.changed and now_wall_ms - state.open.told_wall_ms >= rules.update_every_s * 1000:
                told.append(_told(state.open, camera_id, "updated", now_wall_ms))
                state = state.model_copy(update={"open": state.open.model_copy(update={"told_wall_ms": now_wall_ms, "changed": False})})
            elif state.pending and quiet >= rules.open_window_s * 1000:
                state = state.model_copy(update={"pending": []})
            else:
                continue
            self.cameras[camera_id] = state
            changed.add(camera_id)
        return told, changed

    @staticmethod
    def _close(state: CameraState, rules: EventRules, now_wall_ms: int) -> tuple[CameraState, OODEvent]:
        event = state.open
        closed = _told(event, state.camera_id, "closed", now_wall_ms)
        return state.model_copy(update={"open": None, "pending": [], "cooldown_until_ms": event.end_ms + int(rules.cooldown_s * 1000)}), closed

    def evict(self, now_wall_ms: int) -> tuple[list[OODEvent], set[str]]:
        """Over ``max_cameras``: forget cameras, the idle first (what they lose is a cooldown),
        then those with frames pending, then those with an open event (closed as it goes),
        each kind heard from least recently first. The events told, and the cameras forgotten
        (whose state the worker deletes).

        A flood of forged camera ids then costs a bounded memory and state topic, and pushes
        out no open event unless it opens more than max_cameras events itself.
        """
        excess = len(self.cameras) - self.max_cameras
        if excess <= 0:
            return [], set()
        told: list[OODEvent] = []
        kind = lambda s: 0 if s.idle() else 2 if s.open is not None else 1  # noqa: E731
        gone = heapq.nsmallest(excess, self.cameras.values(), key=lambda s: (kind(s), s.last_wall_ms, s.camera_id))
        for state in gone:
            if state.open is not None:
                told.append(self._close(state, self.rules_for(state.camera_id), now_wall_ms)[1])
            del self.cameras[state.camera_id]
        return told, {s.camera_id for s in gone}

    # --- the state as the worker keeps it -------------------------------------------------
    def restore(self, states: list[CameraState], partitions: set[int]) -> None:
        """Hold exactly the cameras of the owned partitions, as last written (the most recent
        ``max_cameras`` of them: a state topic written under a larger bound may hold more)."""
        owned = [s for s in states if s.partition in partitions]
        kept = heapq.nlargest(self.max_cameras, owned, key=lambda s: (s.last_wall_ms, s.camera_id))
        self.cameras = {s.camera_id: s for s in kept}
