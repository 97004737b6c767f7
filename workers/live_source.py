"""Live sources for ``interneg produce``: RTSP cameras, HTTP streams (MJPEG or anything FFmpeg
reads from a URL) and video devices (``/dev/videoN``, FFmpeg's v4l2 input).

A live source has no end: it is read until the caller's stop event is set (SIGTERM, Ctrl-C)
or ``limit`` frames were sent. Frames are decoded with PyAV; at most ``rate`` of them per
second (by the clock, as they arrive) are encoded as JPEG and sent with the headers files
get, keyed by the camera id; ``ts`` is the moment the frame was decoded here, the closest
this side of the network comes to when the camera took it.

When the source cannot be opened or read, or its stream ends, it is reopened after an
exponential back-off with jitter (``settings.live``), for as long as it takes. The first
failure of an outage publishes ``CameraStatus(status="offline")`` to the cameras topic
(``settings.topics.cameras``), keyed by camera id, and the first frame after it ``status="online"``; both are logged.

With ``validate``, a frame that fails ``check_frame`` (over the size or pixel limits) ends
the run with an InputError: a camera's frames are all alike, so skipping one would mean
skipping every one.

Addresses are kept as given (a URL never goes through ``pathlib``); a password in one is
masked wherever it is shown (messages, logs, status details).
"""
from __future__ import annotations

import io
import random
import re
import stat
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal
from urllib.parse import urlsplit

from pipeline.errors import ConfigError, InputError
from schemas.messages import MAX_ID_LENGTH, CameraStatus
from schemas.settings import LiveSettings, Settings
from workers.kafka_clients import make_admin, make_producer
from workers.ops import get_logger
from workers.producer import ACK_TIMEOUT_S, ProduceReport, _Acks, check_frame, frame_headers

LIVE_SCHEMES = ("rtsp", "rtsps", "http", "https")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
ADMIN_TIMEOUT_MS = 10000


@dataclass(frozen=True)
class LiveSource:
    url: str  # as given: what FFmpeg opens
    kind: Literal["rtsp", "http", "device"]

    @property
    def shown(self) -> str:
        """The address with any password masked: what messages and logs carry."""
        return _masked(self.url)

    def open(self, live: LiveSettings):
        """The PyAV container, connected; raises av.FFmpegError or OSError when it cannot be."""
        import av

        options = {}
        read_timeout_s = live.read_timeout_s
        if self.kind != "device":
            options["timeout"] = str(int(live.read_timeout_s * 1_000_000))  # socket I/O, microseconds
        if self.kind == "rtsp":
            options["rtsp_transport"] = live.rtsp_transport
            # FFmpeg's RTSP demuxer answers the first read that times out with the frame it still
            # holds and fails only at the second: two waits of half make the setting's bound
            read_timeout_s /= 2
        return av.open(
            self.url, format="v4l2" if self.kind == "device" else None, options=options,
            # PyAV's own bound on every blocking call (its interrupt callback), whatever the protocol honours
            timeout=(live.open_timeout_s, read_timeout_s),
        )


def _masked(url: str) -> str:
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if parts.password is None:
        return url
    userinfo, _, host = parts.netloc.rpartition("@")
    return parts._replace(netloc=f"{userinfo.partition(':')[0]}:***@{host}").geturl()


def live_source(text: str) -> LiveSource | None:
    """The live source ``text`` names, or None when it is not one (a file or folder).

    A URL is live; so is a character device (``/dev/video0``, ``/dev/v4l/by-id/...``).
    Raises InputError for a URL with a scheme other than rtsp, rtsps, http, https, a
    malformed URL, or a ``/dev/video...`` that is not there; ConfigError when PyAV's
    FFmpeg has no v4l2 input. A well-formed URL is never contacted here: a camera that
    does not answer is retried (and reported offline), not refused.
    """
    scheme = _SCHEME.match(text)
    if "://" in text or (scheme and scheme.group(1).lower() in LIVE_SCHEMES):
        return _url_source(text)
    try:
        device = stat.S_ISCHR(Path(text).stat().st_mode)
    except OSError:
        device = False
    if device:
        return _device_source(text)
    if text.startswith("/dev/video"):
        raise InputError(f"{text}: no such video device")
    return None  # a path: files under /dev/shm are files


def _url_source(text: str) -> LiveSource:
    shown = _masked(text)
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in 0-65535
    except ValueError as exc:
        raise InputError(f"{shown}: malformed URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in LIVE_SCHEMES:
        raise InputError(
            f"{shown}: unsupported URL scheme '{parts.scheme}' (live sources: rtsp://, rtsps://, http://, https://, /dev/videoN)"
        )
    if not parts.hostname:
        raise InputError(f"{shown}: malformed URL: no host (expected {scheme}://HOST[:PORT]/PATH)")
    if any(c.isspace() or not c.isprintable() for c in text):
        raise InputError(f"{shown}: malformed URL: spaces or control characters (percent-encode them)")
    return LiveSource(text, "rtsp" if scheme.startswith("rtsp") else "http")


def _device_source(text: str) -> LiveSource:
    import av

    if not any("v4l2" in name.split(",") for name in av.formats_available):
        raise ConfigError(f"{text}: this PyAV's FFmpeg has no v4l2 input for video devices")
    return LiveSource(text, "device")


class Backoff:
    """Reconnection delays: doubling from ``reconnect_min_s`` up to ``reconnect_max_s``, each
    shortened by a random fraction up to ``reconnect_jitter``."""

    def __init__(self, live: LiveSettings, rng: random.Random | None = None) -> None:
        self.live = live
        self.failures = 0
        self.rng = rng or random.Random()

    def next(self) -> float:
        base = min(self.live.reconnect_max_s, self.live.reconnect_min_s * 2 ** min(self.failures, 60))
        self.failures += 1
        return base * (1 - self.live.reconnect_jitter * self.rng.random())

    def reset(self) -> None:
        self.failures = 0


def _decoded(stream) -> Iterator:
    """The frames of a live video stream until it ends; a damaged packet is skipped, as the
    next keyframe repairs the picture."""
    import av

    for packet in stream.container.demux(stream):
        try:
            frames = packet.decode()
        except av.InvalidDataError:
            continue
        yield from frames


def _now_ms() -> int:
    return int(time.time() * 1000)


class _LiveRun:
    """One ``produce`` of a live source: its producer, back-off, online state and report."""

    def __init__(self, settings: Settings, source: LiveSource, *, rate: float | None, camera_id: str,
                 limit: int | None, validate: bool, stop: threading.Event) -> None:
        self.settings = settings
        self.source = source
        self.camera_id = camera_id
        self.key = camera_id.encode()
        self.limit = limit
        self.validate = validate
        self.stop = stop
        self.interval = 1.0 / rate if rate else 0.0
        self.report = ProduceReport(topic=settings.topics.frames, camera_id=camera_id)
        self.backoff = Backoff(settings.live)
        self.log = get_logger("interneg.produce", camera=camera_id, source=source.shown)
        self.offline_since_ms: int | None = None  # when the source was lost, while it is
        self.decoded = 0
        self.next_due = 0.0
        self.status_topic = self._status_topic()
        self.producer = make_producer(settings.kafka)
        self.acks = _Acks()

    def _status_topic(self) -> str | None:
        """The cameras topic, or None where it does not exist: frames still flow, camera status
        is only logged. A missing frames topic is refused (every send would wait a minute)."""
        from kafka.errors import UnknownTopicOrPartitionError

        topics = self.settings.topics
        admin = make_admin(self.settings.kafka, ADMIN_TIMEOUT_MS)
        try:
            described = admin.describe_topics([topics.frames, topics.cameras])
        finally:
            admin.close()
        missing = {t["name"] for t in described if t.get("error_code") == UnknownTopicOrPartitionError.errno}
        if topics.frames in missing:
            raise ConfigError(f"topic {topics.frames} does not exist (run 'interneg topics' first)")
        if topics.cameras in missing:
            self.log.warning("camera status not published: its topic does not exist", topic=topics.cameras)
            return None
        return topics.cameras

    def done(self) -> bool:
        return self.stop.is_set() or (self.limit is not None and self.report.sent >= self.limit)

    def run(self) -> ProduceReport:
        start = time.monotonic()
        try:
            while not self.done():
                problem = self._stream()
                if self.done():
                    break
                self._lost(problem)
                delay = self.backoff.next()
                self.log.info("reconnecting", in_s=round(delay, 2), after=problem)
                self.stop.wait(delay)
        except KeyboardInterrupt:  # a second signal: stop now, still flushing what was sent
            pass
        finally:
            self.report.interrupted = self.stop.is_set()
            try:
                self.producer.flush(timeout=ACK_TIMEOUT_S)
                self.acks.wait_all()
            finally:
                self.producer.close(timeout=10)
        self.report.elapsed_s = time.monotonic() - start
        return self.report

    def _stream(self) -> str:
        """Reads the source until it fails, ends or the run is done; why it stopped."""
        import av

        try:
            with self.source.open(self.settings.live) as container:
                if not container.streams.video:
                    return "the source has no video stream"
                self.log.info("connected")
                for frame in _decoded(container.streams.video[0]):
                    if self.done():
                        return "stopped"
                    self.decoded += 1
                    self.backoff.reset()
                    if self.offline_since_ms is not None:
                        self._back()
                    if self._due():
                        self._send(frame)
            return "the stream ended"
        except av.ExitError:  # PyAV's interrupt callback: the open or the read timeout passed
            live = self.settings.live
            return f"timed out (open_timeout_s {live.open_timeout_s:g}, read_timeout_s {live.read_timeout_s:g})"
        except (av.FFmpegError, OSError) as exc:
            return f"{type(exc).__name__}: {exc}"

    def _due(self) -> bool:
        """Whether the frame arriving now is one of the ``rate`` per second sent."""
        if not self.interval:
            return True
        now = time.monotonic()
        if now < self.next_due:
            return False
        # on schedule, the next is one interval on; after a gap, one interval from now (no burst)
        self.next_due = self.next_due + self.interval if now < self.next_due + self.interval else now + self.interval
        return True

    def _send(self, frame) -> None:
        captured_ms = _now_ms()
        buffer = io.BytesIO()
        frame.to_image().save(buffer, "JPEG", quality=self.settings.live.jpeg_quality)
        data = buffer.getvalue()
        where = f"{self.source.shown}#frame={self.decoded}"
        problem = check_frame(data, self.settings) if self.validate else None
        if problem is not None:  # a camera's frames are all alike: refusing one would mean skipping every one, forever
            reason, detail = problem
            raise InputError(f"{where}: {reason}: {detail} (change the camera's resolution or the INTERNEG_IMAGES__ limits)")
        frame_id = uuid.uuid4().hex
        headers = frame_headers(frame_id, self.camera_id, captured_ms, "image/jpeg")
        self.acks.add(self.producer.send(self.report.topic, key=self.key, value=data, headers=headers), frame_id, where)
        self.report.sent += 1
        self.report.bytes += len(data)
        # report.frames stays empty: a source without an end would grow it without bound

    def _lost(self, problem: str) -> None:
        """The first failure of an outage says so; the reconnections that follow do not."""
        if self.offline_since_ms is not None:
            return
        self.offline_since_ms = _now_ms()
        self.log.warning("camera offline", detail=problem)
        self._publish("offline", self.offline_since_ms, problem)

    def _back(self) -> None:
        now_ms = _now_ms()
        # as loud as going offline: whoever watches warnings sees every outage end
        self.log.warning("camera online", offline_s=round((now_ms - self.offline_since_ms) / 1000, 1))
        self.offline_since_ms = None
        self._publish("online", now_ms)

    def _publish(self, status: Literal["offline", "online"], since_ms: int, detail: str = "") -> None:
        record = CameraStatus(camera_id=self.camera_id, status=status, since_ms=since_ms, detail=detail[:1024], emitted_ms=_now_ms())
        if self.status_topic is not None:
            future = self.producer.send(self.status_topic, key=self.key, value=record.to_bytes())
            self.acks.add(future, f"(camera {status})", self.source.shown)


def produce_live(
    settings: Settings,
    source: LiveSource,
    *,
    rate: float | None,
    camera_id: str,
    limit: int | None = None,
    validate: bool = True,
    stop: threading.Event | None = None,
) -> ProduceReport:
    """Send frames of a live source to ``settings.topics.frames`` until ``stop`` is set or
    ``limit`` frames were sent (see the module's doc); returns the report, every send
    acknowledged. ``rate``: frames per second at most, None = every frame decoded."""
    if len(camera_id) > MAX_ID_LENGTH:
        raise ConfigError(f"camera id: {len(camera_id)} characters, at most {MAX_ID_LENGTH}")
    run = _LiveRun(settings, source, rate=rate, camera_id=camera_id, limit=limit, validate=validate,
                   stop=stop or threading.Event())
    return run.run()


__all__ = ["LIVE_SCHEMES", "Backoff", "LiveSource", "live_source", "produce_live"]
