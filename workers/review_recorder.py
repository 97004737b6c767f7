"""Events into the review store, each with a snapshot of its best frame (issue 14).

One consumer group on ``ood.events`` and ``ood.cameras`` (live sources going offline and
coming back). For each event record the store is updated (an
idempotent upsert) and, when the event's best frame changed, that frame is fetched from
the frames topic by its offset, decoded within the same limits the scoring workers use,
and stored as a thumbnail. Offsets are committed after the store has the records
(at-least-once; a redelivered record changes nothing). A record that is not an event, or a
frame that cannot be fetched or decoded, is logged and counted and the event is kept
without a snapshot.
"""
from __future__ import annotations

import io
import threading
import time

from kafka import TopicPartition
from pydantic import TypeAdapter, ValidationError

from pipeline.images import ImageRejected, decode_image
from schemas.messages import H_CAMERA_ID, H_FRAME_ID, CameraStatus, OODEvent
from schemas.settings import Settings
from workers.delivery import header, poll_readable
from workers.kafka_clients import make_consumer
from workers.review_store import ReviewStore

THUMBNAIL_SIDE = 320
FETCH_TIMEOUT_S = 10.0
# An event record is its best frame's embedding (at most 65,536 floats, 350 KB as base64)
# and a few negatives; the store keeps each one whole and the page reads up to 1,000 of them.
MAX_RECORD_BYTES = 1024 * 1024
EventRecord = TypeAdapter(OODEvent | CameraStatus)


def thumbnail(jpeg_or_png: bytes, settings: Settings) -> bytes:
    i = settings.images
    image = decode_image(jpeg_or_png, max_bytes=i.max_bytes, max_pixels=i.max_pixels, max_aspect_ratio=i.max_aspect_ratio,
                         draft_short_side=THUMBNAIL_SIDE)
    image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    out = io.BytesIO()
    image.convert("RGB").save(out, format="JPEG", quality=80)
    return out.getvalue()


class FrameFetcher:
    """A frame's bytes by its position in the frames topic (and nowhere else: a record names the topic it likes)."""

    def __init__(self, settings: Settings):
        self.topic = settings.topics.frames
        self.consumer = make_consumer(settings.kafka, group_id=None, enable_auto_commit=False, isolation_level="read_committed")

    def fetch(self, topic: str, partition: int, offset: int, frame_id: str, camera_id: str) -> bytes | None:
        """The bytes of that frame of that camera, or None: a record names any place it likes."""
        if topic != self.topic or partition not in (self.consumer.partitions_for_topic(topic) or ()):
            return None
        tp = TopicPartition(topic, partition)
        self.consumer.assign([tp])
        # past the end, the poll below would wait FETCH_TIMEOUT_S for a frame that may never come
        if not self.consumer.beginning_offsets([tp])[tp] <= offset < self.consumer.end_offsets([tp])[tp]:
            return None
        self.consumer.seek(tp, offset)
        deadline = time.monotonic() + FETCH_TIMEOUT_S
        while time.monotonic() < deadline:
            for records in poll_readable(self.consumer, 500, max_records=1).values():
                for r in records:
                    if r.offset != offset:  # gone (retention, compaction): the next one is not it
                        return None
                    # the frame the event names, as the scoring worker read it (camera: the header, else the key)
                    camera = header(r, H_CAMERA_ID) or r.key
                    return r.value if (header(r, H_FRAME_ID), camera) == (frame_id.encode(), camera_id.encode()) else None
        return None

    def close(self) -> None:
        self.consumer.close(autocommit=False)


class Recorder:
    def __init__(self, settings: Settings, store: ReviewStore, log):
        self.settings, self.store, self.log = settings, store, log
        self.consumer = make_consumer(settings.kafka, settings.topics.events, settings.topics.cameras, group_id=settings.kafka.review_group,
                                      enable_auto_commit=False, auto_offset_reset="earliest")
        self.fetcher = FrameFetcher(settings)
        self.counts = {"events": 0, "cameras": 0, "thumbnails": 0, "refused": 0, "no_snapshot": 0}
        self.stop_event = threading.Event()

    def poll_once(self, timeout_ms: int = 500) -> int:
        handled = 0
        for records in poll_readable(self.consumer, timeout_ms).values():
            for record in records:
                self._record(record)
                handled += 1
        if handled:
            self.consumer.commit()
        return handled

    def _record(self, record) -> None:
        try:
            if record.value is None:
                raise ValueError("null value")
            if len(record.value) > MAX_RECORD_BYTES:
                raise ValueError(f"{len(record.value)} bytes > {MAX_RECORD_BYTES}")
            item = EventRecord.validate_json(record.value)
            wanted = CameraStatus if record.topic == self.settings.topics.cameras else OODEvent
            if not isinstance(item, wanted):  # each topic has its one writer (deploy/kafka/acls): nothing crosses over
                raise ValueError(f"a {type(item).__name__} on {record.topic}")
            texts = (item.camera_id, item.detail) if isinstance(item, CameraStatus) else (
                item.event_id, item.camera_id, item.best_frame_id, item.id_class, item.method)
            if any("\x00" in text for text in texts):  # the store would raise, and stop the recorder
                raise ValueError("a NUL character in a text field: PostgreSQL's text cannot hold it")
        except (ValidationError, ValueError) as exc:
            self.counts["refused"] += 1
            self.log.warning("events record refused", offset=record.offset, error=str(exc)[:200])
            return
        if isinstance(item, CameraStatus):
            self.store.record_camera(item)
            self.counts["cameras"] += 1
            return
        self.store.record_event(item)
        self.counts["events"] += 1
        if self.store.needs_thumbnail(item.event_id, item.best_frame_id):
            src = item.best_source
            data = self.fetcher.fetch(src.topic, src.partition, src.offset, item.best_frame_id, item.camera_id)
            try:
                if data is None:
                    raise ImageRejected("not-found", f"no frame {item.best_frame_id[:60]!r} of this camera at {src.topic[:60]}/{src.partition}@{src.offset}")
                self.store.save_thumbnail(item.event_id, item.best_frame_id, thumbnail(data, self.settings))
                self.counts["thumbnails"] += 1
            except ImageRejected as exc:
                self.counts["no_snapshot"] += 1
                self.log.warning("event kept without a snapshot", event_id=item.event_id, reason=exc.reason, detail=exc.detail[:200])

    def run(self) -> None:
        try:
            while not self.stop_event.is_set():
                self.poll_once()
        finally:
            self.fetcher.close()
            self.consumer.close(autocommit=False)
