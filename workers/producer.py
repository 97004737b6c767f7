"""The frame producer: image files, folders of images, or a video file -> the ``frames`` topic.

Each record is keyed by the camera id and its value is the encoded image: files are sent
byte for byte as they are on disk (never re-encoded); video frames are decoded with PyAV
and encoded as JPEG. Headers (UTF-8): ``frame-id``, ``camera-id``, ``ts``, ``content-type``.

Frame ids are ``uuid4().hex``: downstream topics are keyed and de-duplicated by frame id,
so an id must never repeat, not even when the same files are produced again by another
run (a ``<camera>-<n>`` counter would restart at 0 and collide). ``ts`` is the wall-clock
time of the send in milliseconds since the epoch, i.e. the moment this "camera" took it.

The content type comes from the bytes (magic numbers), not the file name.
"""
from __future__ import annotations

import io
import signal
import threading
import time
import uuid
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

from kafka.producer.future import FutureRecordMetadata, RecordMetadata

from pipeline.errors import ConfigError, InputError, InterNegError
from pipeline.images import IMAGE_SUFFIXES, list_images
from schemas.messages import CONTENT_TYPES, H_CAMERA_ID, H_CONTENT_TYPE, H_FRAME_ID, H_TS
from schemas.settings import Settings
from workers.kafka_clients import make_producer

VIDEO_SUFFIXES = {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".wmv", ".flv"}
VIDEO_JPEG_QUALITY = 90
ACK_TIMEOUT_S = 60.0
MAX_IN_FLIGHT = 1000  # sends not yet checked; beyond this the oldest is waited on

OCTET_STREAM = "application/octet-stream"


class ProduceError(InterNegError):
    """A record was not acknowledged by the broker; names the frame and the source."""


@dataclass(frozen=True)
class Skipped:
    """A source item that was not sent: ``reason`` is a short tag, ``detail`` says more."""

    source: str
    reason: str
    detail: str


@dataclass
class ProduceReport:
    topic: str
    camera_id: str
    sent: int = 0
    bytes: int = 0
    skipped: list[Skipped] = field(default_factory=list)
    elapsed_s: float = 0.0
    interrupted: bool = False  # stopped by a signal (SIGTERM, Ctrl-C); what was sent before is flushed and acknowledged
    frames: list[tuple[str, str]] = field(default_factory=list)  # (source, frame id) of each frame sent; none kept for a live source

    @property
    def frame_ids(self) -> list[str]:
        return [frame_id for _, frame_id in self.frames]

    @property
    def frames_per_s(self) -> float:
        return self.sent / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def summary(self) -> str:
        text = (
            f"sent {self.sent} frames ({self.bytes} bytes) to {self.topic} as camera {self.camera_id} "
            f"in {self.elapsed_s:.2f}s ({self.frames_per_s:.1f} frames/s)"
        )
        if self.skipped:
            text += f", skipped {len(self.skipped)}"
        if self.interrupted:
            text += " (interrupted)"
        return text


def sniff_content_type(data: bytes) -> str | None:
    """The MIME type of encoded image bytes from their magic numbers; None when unknown.

    Knows the frame formats (JPEG, PNG, WebP) and, so that they can be named in a skip
    reason, GIF, BMP and TIFF.
    """
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if data[:2] == b"BM" and len(data) >= 26:
        return "image/bmp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "image/tiff"
    return None


def check_frame(data: bytes, settings: Settings) -> tuple[str, str] | None:
    """Why these bytes would not be a usable frame, as (reason, detail); None when fine.

    Cheap checks only (magic bytes, size, the image header via Pillow without decoding
    the pixels); a frame whose body is damaged past its header is left to the scoring
    worker's dead-letter path.
    """
    if not data:
        return "empty", "zero bytes"
    limit = min(settings.images.max_bytes, settings.kafka.max_message_bytes)
    if len(data) > limit:
        return "too-large", f"{len(data)} bytes > limit {limit}"
    kind = sniff_content_type(data)
    if kind is None:
        return "not-an-image", "not a JPEG, PNG or WebP file (magic bytes)"
    if kind not in CONTENT_TYPES:
        return "unsupported-format", f"{kind}; frames must be one of {', '.join(CONTENT_TYPES)}"
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except Exception as exc:  # noqa: BLE001 - any failure to read the header means unusable
        return "corrupt", f"{type(exc).__name__}: {exc}"
    if width * height > settings.images.max_pixels:
        return "too-many-pixels", f"{width}x{height} > limit {settings.images.max_pixels} pixels"
    return None


# --- sources ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Frame:
    source: str
    data: bytes | None  # None: could not be read (see error)
    error: tuple[str, str] | None = None


def _expand_sources(sources: Sequence[Path]) -> list[tuple[str, Path]]:
    """(kind, path) for each item: 'file' or 'video'; folders expand to their images."""
    items: list[tuple[str, Path]] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            images = list_images(path)
            if not images:  # refused before any connection: an empty folder is a typo, not a stream of nothing
                raise InputError(f"{path}: a folder with no image files in it (not recursive)")
            items.extend(("file", p) for p in images)
        elif path.is_file():
            suffix = path.suffix.lower()
            items.append(("video" if suffix in VIDEO_SUFFIXES else "file", path))
        elif not path.exists():
            raise FileNotFoundError(f"{path}: no such file or folder")
        else:
            raise InputError(f"{path}: neither a file nor a folder")
    return items


def _video_frames(path: Path, rate: float | None) -> Iterator[_Frame]:
    """Decoded frames of a video as JPEG; with a rate below the video's, every Nth frame.

    A file PyAV cannot open or decode ends with one item carrying the error.
    """
    try:
        import av
    except ImportError as exc:  # pragma: no cover - av is a dependency
        raise ConfigError("reading video needs PyAV: pip install av") from exc

    n = -1
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                yield _Frame(str(path), None, ("no-video-stream", "the file has no video stream"))
                return
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            fps = float(stream.average_rate) if stream.average_rate else None
            step = max(1, round(fps / rate)) if rate is not None and fps else 1
            for n, frame in enumerate(container.decode(stream)):
                if n % step:
                    continue
                buffer = io.BytesIO()
                frame.to_image().save(buffer, "JPEG", quality=VIDEO_JPEG_QUALITY)
                yield _Frame(f"{path}#frame={n}", buffer.getvalue())
    except (av.FFmpegError, OSError, ValueError) as exc:
        where = str(path) if n < 0 else f"{path}#after-frame={n}"
        yield _Frame(where, None, ("unreadable-video", f"{type(exc).__name__}: {exc}"))


def _read_file(path: Path) -> _Frame:
    try:
        return _Frame(str(path), path.read_bytes())
    except OSError as exc:
        return _Frame(str(path), None, ("unreadable", exc.strerror or str(exc)))


# --- sending ------------------------------------------------------------------------------


class _Acks:
    """Sent records not yet known to be acknowledged; raises on the first failure."""

    def __init__(self) -> None:
        self.pending: deque[tuple[FutureRecordMetadata, str, str]] = deque()

    def add(self, future: FutureRecordMetadata, frame_id: str, source: str) -> None:
        self.pending.append((future, frame_id, source))
        while self.pending and (self.pending[0][0].is_done or len(self.pending) > MAX_IN_FLIGHT):
            self._wait_oldest()

    def _wait_oldest(self) -> RecordMetadata:
        future, frame_id, source = self.pending.popleft()
        try:
            return future.get(timeout=ACK_TIMEOUT_S)
        except Exception as exc:
            raise ProduceError(f"frame {frame_id} from {source} was not acknowledged: {exc!r}") from exc

    def wait_all(self) -> None:
        while self.pending:
            self._wait_oldest()


def frame_headers(frame_id: str, camera_id: str, ts_ms: int, content_type: str) -> list[tuple[str, bytes]]:
    """The four frame headers, as the ``frames`` topic carries them."""
    return [
        (H_FRAME_ID, frame_id.encode()),
        (H_CAMERA_ID, camera_id.encode()),
        (H_TS, str(ts_ms).encode()),
        (H_CONTENT_TYPE, content_type.encode()),
    ]


@contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """An event that SIGTERM and SIGINT set, for ``produce(stop=...)``: it stops between frames,
    flushes what it sent and returns its report. A second signal interrupts at once.
    Call from the main thread (Python delivers signals there)."""
    stop = threading.Event()

    def handle(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def produce(
    settings: Settings,
    sources: Sequence[str | Path],
    *,
    rate: float | None,
    camera_id: str,
    loop: int = 1,
    limit: int | None = None,
    validate: bool = True,
    stop: threading.Event | None = None,
) -> ProduceReport:
    """Send frames from image files, folders, video files or a live source to ``settings.topics.frames``.

    Options (CLI flags):
      sources   image files, folders (their image files by suffix, sorted, not recursive)
                or video files (by suffix: .mp4 .mkv .mov .webm .avi ...), in order.
                A file named explicitly is read whatever its suffix. Or one live source,
                alone: an rtsp://, rtsps://, http:// or https:// stream URL, or a video
                device /dev/videoN, read until stopped (workers/live_source.py; loop does
                not apply).
      rate      frames per second at most (sends are paced on a fixed schedule); None =
                as fast as possible. For a video whose frame rate is higher, every Nth
                frame is taken (N = round(video fps / rate)); from a live source, at
                most ``rate`` of the frames arriving each second.
      camera_id the record key and the ``camera-id`` header; must not be empty.
      loop      passes over all the sources (1 = once); 0 = repeat until ``limit`` or Ctrl-C.
      limit     stop after this many frames sent (skipped items do not count); None = no limit.
      validate  True: items that are not a usable JPEG/PNG/WebP frame (magic bytes, empty,
                over settings.images.max_bytes, bad header, too many pixels) are skipped and
                listed in the report with a reason. False: every file is sent as it is, with
                content-type from its magic bytes or application/octet-stream.

      stop      once set, sending stops and the report is returned (interrupted); see
                stop_on_signals.

    Files are sent byte for byte; video frames are encoded as JPEG. Every send is
    acknowledged before this returns (producer flushed, each future checked); a failed
    send raises ProduceError. Ctrl-C stops sending and returns the report (interrupted).
    Missing sources raise FileNotFoundError, and a malformed or unsupported URL or a
    missing device InputError, before anything is sent.
    """
    if not camera_id:
        raise ConfigError("camera_id must not be empty")
    if rate is not None and rate <= 0:
        raise ConfigError(f"rate must be positive, got {rate}")
    if loop < 0:
        raise ConfigError(f"loop must be >= 0, got {loop}")
    if limit is not None and limit < 0:
        raise ConfigError(f"limit must be >= 0, got {limit}")
    from workers.live_source import live_source, produce_live  # it builds on this module

    stop = stop or threading.Event()
    live = [found for found in (live_source(str(source)) for source in sources) if found is not None]
    if live:
        if len(sources) > 1:
            raise InputError(f"{live[0].shown}: a live source has no end, so it is produced alone (one produce per camera)")
        return produce_live(settings, live[0], rate=rate, camera_id=camera_id, limit=limit, validate=validate, stop=stop)
    items = _expand_sources(sources)
    topic = settings.topics.frames
    report = ProduceReport(topic=topic, camera_id=camera_id)
    key = camera_id.encode()
    rejected: set[str] = set()  # files skipped on the first pass are skipped silently after
    interval = 1.0 / rate if rate else 0.0

    producer = make_producer(settings.kafka)
    acks = _Acks()
    start = time.monotonic()
    next_at = start

    def done() -> bool:
        return stop.is_set() or (limit is not None and report.sent >= limit)

    try:
        passes = 0
        while (loop == 0 or passes < loop) and not done():
            passes += 1
            sent_this_pass = 0
            for kind, path in items:
                if done():
                    break
                frames = _video_frames(path, rate) if kind == "video" else iter([_read_file(path)])
                for frame in frames:
                    if done():
                        break
                    if frame.source in rejected:
                        continue
                    problem = frame.error
                    if problem is None and validate:
                        problem = check_frame(frame.data, settings)
                    if problem is not None:
                        rejected.add(frame.source)
                        report.skipped.append(Skipped(frame.source, *problem))
                        continue
                    data = frame.data
                    content_type = sniff_content_type(data) or OCTET_STREAM
                    if interval:  # a fixed schedule; after a stall it restarts from now (no burst)
                        now = time.monotonic()
                        if now < next_at and stop.wait(next_at - now):
                            break
                        next_at = max(next_at, now) + interval
                    frame_id = uuid.uuid4().hex
                    headers = frame_headers(frame_id, camera_id, int(time.time() * 1000), content_type)
                    future = producer.send(topic, key=key, value=data, headers=headers)
                    acks.add(future, frame_id, frame.source)
                    report.sent += 1
                    report.bytes += len(data)
                    report.frames.append((frame.source, frame_id))
                    sent_this_pass += 1
            if sent_this_pass == 0:
                break  # nothing sendable: looping again would spin forever
    except KeyboardInterrupt:
        report.interrupted = True
    finally:
        try:
            producer.flush(timeout=ACK_TIMEOUT_S)
            acks.wait_all()
        finally:
            producer.close(timeout=10)
    report.interrupted = report.interrupted or stop.is_set()
    report.elapsed_s = time.monotonic() - start
    return report


Header = tuple[str, bytes | str]


def produce_records(
    settings: Settings,
    records: Iterable[tuple[bytes | str | None, bytes | str | None, Sequence[Header] | Mapping[str, bytes | str] | None]],
    *,
    topic: str | None = None,
) -> list[RecordMetadata]:
    """Send arbitrary (key, value, headers) records, as given, and wait for each ack.

    Low-level helper for tests and tools: nothing is checked, so malformed frames (missing
    or bad headers, non-image values, null values) can be made on purpose. str keys,
    values and header values are UTF-8 encoded; headers may be a list of pairs or a dict.
    ``topic`` defaults to ``settings.topics.frames``. Returns the records' metadata
    (partition, offset) in order; raises ProduceError if one is not acknowledged.
    """
    topic = topic or settings.topics.frames

    def as_bytes(x):
        return x.encode() if isinstance(x, str) else x

    producer = make_producer(settings.kafka)
    futures = []
    try:
        for key, value, headers in records:
            pairs = list(headers.items()) if isinstance(headers, Mapping) else list(headers or [])
            futures.append(
                producer.send(
                    topic,
                    key=as_bytes(key),
                    value=as_bytes(value),
                    headers=[(str(name), as_bytes(v)) for name, v in pairs],
                )
            )
        producer.flush(timeout=ACK_TIMEOUT_S)
        results = []
        for n, future in enumerate(futures):
            try:
                results.append(future.get(timeout=ACK_TIMEOUT_S))
            except Exception as exc:
                raise ProduceError(f"record {n} to {topic} was not acknowledged: {exc!r}") from exc
        return results
    finally:
        producer.close(timeout=10)


__all__ = [
    "IMAGE_SUFFIXES",
    "VIDEO_SUFFIXES",
    "ProduceError",
    "ProduceReport",
    "Skipped",
    "check_frame",
    "frame_headers",
    "produce",
    "produce_records",
    "sniff_content_type",
    "stop_on_signals",
]
