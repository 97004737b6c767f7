"""The operator's cameras file, applied to running workers through ``ood.control`` (issue 14).

One TOML file names each camera's own settings; what a camera leaves out is the workers'
setting::

    [cameras.yard]
    threshold = 0.42                 # frames scoring below it are OOD
    method = "neglabel"              # one the bundle carries
    bundle = "/bundles/yard"         # its own known classes (the workers' model), at a path the workers see
    roi = [0.0, 0.25, 1.0, 1.0]      # x0, y0, x1, y1: only this part of the frame is scored

    [cameras.yard.events]            # how its OOD frames become events
    open_frames = 5
    quiet_s = 20

``interneg cameras apply FILE`` checks the whole file first (one line per problem, naming
the camera and the field, and nothing is sent if any is wrong), then publishes one record
per camera that changed and withdraws the cameras the file no longer names. Scoring and
events workers follow the topic and use the new settings from their next batch.
"""
from __future__ import annotations

import time
import tomllib
from pathlib import Path

from kafka import TopicPartition
from pydantic import ValidationError

from pipeline.errors import ConfigError
from schemas.messages import MAX_ID_LENGTH, CameraConfig
from schemas.settings import CameraSettings, Settings
from workers.control import CAMERA_PREFIX, camera_output
from workers.delivery import poll_readable, read_to_end, send_and_confirm
from workers.kafka_clients import make_consumer, make_producer


def _where(loc) -> str:
    return ".".join(str(part) for part in loc)


def load_cameras_file(path: Path) -> dict[str, CameraSettings]:
    """Every camera's settings, or a ConfigError listing every problem found."""
    if not path.is_file():
        raise ConfigError(f"cameras file {path}: no such file")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cameras file {path}: not valid TOML: {exc}") from None
    problems = [f"{key}: unknown section (only [cameras.<id>] sections)" for key in data if key != "cameras"]
    cameras = data.get("cameras", {})
    if not isinstance(cameras, dict):
        raise ConfigError(f"cameras file {path}: 'cameras' must be a table of [cameras.<id>] sections")
    found: dict[str, CameraSettings] = {}
    for camera_id, table in cameras.items():
        if not camera_id or len(camera_id) > MAX_ID_LENGTH or not camera_id.isprintable():
            problems.append(f"cameras.{camera_id!r}: a camera id is 1-{MAX_ID_LENGTH} printable characters")
            continue
        if not isinstance(table, dict):
            problems.append(f"cameras.{camera_id}: must be a table of settings")
            continue
        try:
            found[camera_id] = CameraSettings.model_validate(table)
        except ValidationError as exc:
            for error in exc.errors():
                given = f" (got {error['input']!r})" if error["type"] != "missing" and not isinstance(error["input"], dict) else ""
                problems.append(f"cameras.{camera_id}.{_where(error['loc'])}: {error['msg']}{given}".replace(f"cameras.{camera_id}.:", f"cameras.{camera_id}:"))
    if problems:
        raise ConfigError(f"cameras file {path}: " + "; ".join(problems))
    return found


def current_cameras(settings: Settings, timeout_s: float = 30.0) -> dict[str, CameraConfig]:
    """What the control topic says now, read to its end."""
    consumer = make_consumer(settings.kafka, group_id=None, enable_auto_commit=False)
    try:
        topic = settings.topics.control
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        if not partitions:
            raise ConfigError(f"the control topic {topic!r} does not exist: run 'interneg topics'")
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        latest: dict[str, CameraConfig | None] = {}

        def take(timeout_ms: int) -> int:
            count = 0
            for records in poll_readable(consumer, timeout_ms).values():
                for r in records:
                    count += 1
                    if not (r.key or b"").startswith(CAMERA_PREFIX):
                        continue
                    camera_id = r.key[len(CAMERA_PREFIX):].decode("utf-8", "replace")
                    try:
                        latest[camera_id] = CameraConfig.from_bytes(r.value) if r.value is not None else None
                    except ValidationError:
                        latest[camera_id] = None  # unreadable: the workers refuse it too
            return count

        read_to_end(consumer, partitions, take, timeout_s=timeout_s, what=f"{topic} topic")
    finally:
        consumer.close(autocommit=False)
    return {camera: config for camera, config in latest.items() if config is not None}


def apply_cameras(settings: Settings, path: Path, by: str) -> list[str]:
    """Publish the file's settings; one line per camera saying what happened."""
    wanted = load_cameras_file(path)  # nothing is sent unless all of it is right
    now = current_cameras(settings)
    outputs, lines = [], []
    applied_ms = int(time.time() * 1000)
    for camera_id, camera_settings in sorted(wanted.items()):
        old = now.get(camera_id)
        if old is not None and old.settings == camera_settings:
            lines.append(f"{camera_id}: unchanged")
            continue
        config = CameraConfig(camera_id=camera_id, settings=camera_settings, source=str(path)[:1024], by=by, applied_ms=applied_ms)
        outputs.append(camera_output(settings.topics.control, camera_id, config))
        lines.append(f"{camera_id}: {'updated' if old is not None else 'added'} {camera_settings.model_dump(exclude_none=True)}")
    for camera_id in sorted(set(now) - set(wanted)):
        outputs.append(camera_output(settings.topics.control, camera_id, None))
        lines.append(f"{camera_id}: withdrawn (not in the file): the workers' settings apply")
    if outputs:
        producer = make_producer(settings.kafka)
        try:
            send_and_confirm(producer, outputs)
        finally:
            producer.close(timeout=10)
    return lines
