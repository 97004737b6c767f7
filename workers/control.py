"""What operators tell running workers: the compacted ``ood.control`` topic (issue 14).

Keys say what a record is: ``allow:<entry id>`` an allow-list entry (:class:`AllowEntry`),
``camera:<camera id>`` a camera's own settings (:class:`CameraConfig`, from the operator's
cameras file), ``bundle`` the bundle scoring workers should run (:class:`BundleRollout`,
``interneg rollout``); a null value withdraws an entry or a camera's settings. Every worker that uses the topic reads it whole from the
beginning at start (no consumer group), then follows it between batches, as the negatives
are followed, so a "normal" clicked on the review page changes every replica's next batch
without a restart. Only the operator principal may write the topic (deploy/kafka/acls);
records are still validated here, and a bad one is counted and skipped, never fatal.
"""
from __future__ import annotations

from typing import Callable

from kafka import TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from pydantic import ValidationError

from pipeline.allow import AllowList
from schemas.messages import AllowEntry, BundleRollout, CameraConfig
from schemas.settings import CameraSettings, Settings
from workers.delivery import Output, poll_readable, read_to_end
from workers.kafka_clients import make_consumer

ALLOW_PREFIX = b"allow:"
CAMERA_PREFIX = b"camera:"
BUNDLE_KEY = b"bundle"


def allow_output(topic: str, entry: AllowEntry) -> Output:
    return Output(topic, ALLOW_PREFIX + entry.entry_id.encode(), entry.to_bytes())


def rollout_output(topic: str, rollout: BundleRollout) -> Output:
    return Output(topic, BUNDLE_KEY, rollout.to_bytes())


def camera_output(topic: str, camera_id: str, config: CameraConfig | None) -> Output:
    return Output(topic, CAMERA_PREFIX + camera_id.encode(), config.to_bytes() if config is not None else None)


class ControlFollower:
    """``allow``: the allow-list to keep (None: this worker ignores allow-list entries, and
    then needs no model id or dimension); ``cameras``: each camera's settings, kept current."""

    def __init__(self, settings: Settings, log, *, allow: AllowList | None = None, model_id: str = "", dim: int = 0,
                 on_refused: Callable[[], None] = lambda: None, on_camera: Callable[[str], None] = lambda camera: None):
        self.topic = settings.topics.control
        self.allow, self.model_id, self.dim, self.log, self.on_refused = allow, model_id, dim, log, on_refused
        self.on_camera = on_camera
        self.cameras: dict[str, CameraSettings] = {}
        self.rollout: BundleRollout | None = None  # the latest bundle rolled out, if any
        self.refused = 0
        self.applied = 0
        self.consumer = make_consumer(settings.kafka, group_id=None, enable_auto_commit=False)
        self.partitions = [TopicPartition(self.topic, p) for p in sorted(self.consumer.partitions_for_topic(self.topic) or ())]
        if self.partitions:
            self.consumer.assign(self.partitions)
            self.consumer.seek_to_beginning(*self.partitions)

    def catch_up(self, timeout_s: float = 120.0, beat=lambda: None) -> int:
        if not self.partitions:
            return 0
        return read_to_end(self.consumer, self.partitions, self.poll, timeout_s=timeout_s, what=f"{self.topic} topic", beat=beat)

    def poll(self, timeout_ms: int = 0) -> int:
        if not self.partitions:
            return 0
        count = 0
        for records in poll_readable(self.consumer, timeout_ms).values():
            for record in records:
                count += self.apply(record)
        return count

    def apply(self, record: ConsumerRecord) -> int:
        key = record.key or b""
        try:
            if key == BUNDLE_KEY:
                if record.value is not None:  # a tombstone leaves each worker on the bundle it runs
                    self.rollout = BundleRollout.from_bytes(record.value)
                    self.log.info("bundle rolled out", path=self.rollout.path, manifest_sha256=self.rollout.manifest_sha256[:16],
                                  by=self.rollout.by)
                self.applied += 1
                return 1
            if key.startswith(CAMERA_PREFIX):
                self._camera(key[len(CAMERA_PREFIX):].decode("utf-8"), record.value)
                self.applied += 1
                return 1
            if not key.startswith(ALLOW_PREFIX) or self.allow is None:
                return 0  # another kind of control record: not this worker's
            entry_id = key[len(ALLOW_PREFIX):].decode("utf-8")
            if record.value is None:
                self.allow.remove(entry_id)
            else:
                entry = AllowEntry.from_bytes(record.value)
                if entry.entry_id != entry_id:
                    raise ValueError(f"key names entry {entry_id[:60]!r}, the record {entry.entry_id[:60]!r}")
                self.allow.put(entry.entry_id, entry.camera_id, entry.embedding.to_numpy(model_id=self.model_id, dim=self.dim))
                self.log.info("allow-list entry applied", entry=entry.entry_id, camera=entry.camera_id, event_id=entry.event_id,
                              entries=len(self.allow.entries))
        except (ValidationError, ValueError, UnicodeDecodeError) as exc:
            self.refused += 1
            self.on_refused()
            self.log.warning("control record refused", offset=record.offset, key=key[:80].decode("utf-8", "replace"), error=str(exc)[:200])
            return 0
        self.applied += 1
        return 1

    def _camera(self, camera_id: str, value: bytes | None) -> None:
        if value is None:
            if self.cameras.pop(camera_id, None) is not None:
                self.log.info("camera settings withdrawn: the workers' settings apply", camera=camera_id)
        else:
            config = CameraConfig.from_bytes(value)
            if config.camera_id != camera_id:
                raise ValueError(f"key names camera {camera_id[:60]!r}, the record {config.camera_id[:60]!r}")
            self.cameras[camera_id] = config.settings
            self.log.info("camera settings applied", camera=camera_id, settings=config.settings.model_dump(exclude_none=True))
        self.on_camera(camera_id)

    def close(self) -> None:
        self.consumer.close(autocommit=False)
