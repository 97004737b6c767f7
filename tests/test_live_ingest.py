"""Live sources for ``interneg produce`` (issue 14): an RTSP camera and an HTTP MJPEG stream on
loopback, served from real processes, frames on the real broker of conftest.py.

The RTSP camera is tests/rtsp_server.py (RTSP written there, H.264 encoded by imageio-ffmpeg's
ffmpeg at 25 fps); the MJPEG stream is ffmpeg itself (``-f mpjpeg -listen 1``). Every
process a test starts is killed by the fixture that started it, whatever the outcome.
"""
from __future__ import annotations

import io
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import imageio_ffmpeg
import pytest
from kafka import TopicPartition
from kafka.admin import NewTopic
from PIL import Image

from pipeline.errors import InputError
from schemas.messages import H_CAMERA_ID, H_CONTENT_TYPE, H_FRAME_ID, H_TS, CameraStatus
from schemas.settings import LiveSettings, Settings
from workers.cli import main
from workers.kafka_clients import make_admin, make_consumer
from workers.live_source import Backoff
from workers.processes import free_port, settings_env
from workers.producer import produce

ROOT = Path(__file__).resolve().parents[1]
RTSP_SERVER = ROOT / "tests" / "rtsp_server.py"
SAMPLE_FRAMES = ROOT / "deploy" / "samples" / "frames"
SOURCE_SIZE = (320, 240)  # what tests/rtsp_server.py and the MJPEG server send, at 25 fps
SUMMARY = re.compile(r"^sent (\d+) frames \(\d+ bytes\) to \S+ as camera \S+ in [\d.]+s \([\d.]+ frames/s\)")

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def settings(kafka_bootstrap) -> Settings:
    """Fresh frames and cameras topics on the session broker; live timeouts and back-off short enough for a test."""
    s = Settings(_env_file=None)
    s.kafka.bootstrap_servers = kafka_bootstrap
    tag = uuid.uuid4().hex[:8]
    s.topics.frames = f"live-frames-{tag}"
    s.topics.cameras = f"live-cameras-{tag}"
    s.live = LiveSettings(open_timeout_s=3, read_timeout_s=2, reconnect_min_s=0.2, reconnect_max_s=1.0)
    admin = make_admin(s.kafka)
    try:
        admin.create_topics([NewTopic(s.topics.frames, 3, 1), NewTopic(s.topics.cameras, 1, 1)])
    finally:
        admin.close()
    return s


class TopicReader:
    """Every record of a topic from the beginning, gathered as the test waits for them."""

    def __init__(self, settings: Settings, topic: str) -> None:
        self.consumer = make_consumer(settings.kafka, group_id=None)
        partitions = [TopicPartition(topic, p) for p in sorted(self.consumer.partitions_for_topic(topic))]
        self.consumer.assign(partitions)
        self.consumer.seek_to_beginning(*partitions)
        self.records: list = []

    def poll(self) -> list:
        for batch in self.consumer.poll(timeout_ms=200).values():
            self.records.extend(batch)
        return self.records

    def wait(self, enough, timeout_s: float, what: str) -> list:
        deadline = time.monotonic() + timeout_s
        while not enough(self.poll()):
            assert time.monotonic() < deadline, f"waited {timeout_s}s for {what}; have {len(self.records)} records"
        return self.records

    def close(self) -> None:
        self.consumer.close()


@pytest.fixture
def readers():
    opened: list[TopicReader] = []

    def open_reader(settings: Settings, topic: str) -> TopicReader:
        opened.append(TopicReader(settings, topic))
        return opened[-1]

    yield open_reader
    for reader in opened:
        reader.close()


@pytest.fixture
def processes():
    """start(argv, **popen) -> Popen in a session of its own; every one is killed, with its children, at the end."""
    started: list[subprocess.Popen] = []

    def start(argv: list[str], **popen) -> subprocess.Popen:
        started.append(subprocess.Popen(argv, start_new_session=True, **popen))
        return started[-1]

    yield start
    for process in started:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def start_rtsp_server(start, port: int) -> subprocess.Popen:
    server = start([sys.executable, str(RTSP_SERVER), str(port)], stdout=subprocess.PIPE, text=True)
    assert server.stdout.readline().strip() == "ready", "the RTSP server did not start"
    return server


def kill(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGKILL)  # the server and its ffmpeg: the camera is gone at once
    process.wait(timeout=30)


def statuses(records) -> list[CameraStatus]:
    return [CameraStatus.from_bytes(r.value) for r in records]


def check_frames(records, camera: str, t0_ms: int, t1_ms: int) -> None:
    for record in records:
        headers = dict(record.headers)
        assert set(headers) == {H_FRAME_ID, H_CAMERA_ID, H_TS, H_CONTENT_TYPE}
        assert uuid.UUID(hex=headers[H_FRAME_ID].decode()).version == 4
        assert headers[H_CAMERA_ID] == camera.encode() and record.key == camera.encode()
        assert headers[H_CONTENT_TYPE] == b"image/jpeg"
        assert t0_ms <= int(headers[H_TS]) <= t1_ms
        with Image.open(io.BytesIO(record.value)) as image:
            assert image.format == "JPEG" and image.size == SOURCE_SIZE
            image.load()  # the whole picture decodes, not only its header
    assert len({dict(r.headers)[H_FRAME_ID] for r in records}) == len(records)


@contextmanager
def producing(settings: Settings, source: str, **options):
    """produce() of ``source`` on a thread of its own until the block ends (its stop event set);
    yields a dict that then holds its report."""
    stop, result = threading.Event(), {}
    run = threading.Thread(target=lambda: result.update(report=produce(settings, [source], stop=stop, **options)))
    run.start()
    try:
        yield result
    finally:
        stop.set()
        run.join(timeout=30)
    assert not run.is_alive() and "report" in result, "produce did not stop, or failed (its traceback is above)"


def produce_cli(start, settings: Settings, *args: str) -> subprocess.Popen:
    """``interneg produce ARGS`` as a process of its own, with ``settings`` in its environment."""
    env = {**os.environ, **settings_env(settings), "PYTHONUNBUFFERED": "1"}
    return start([sys.executable, "-m", "workers.cli", "produce", *args], cwd=ROOT, env=env,
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# --- RTSP --------------------------------------------------------------------------------


def test_rtsp_frames_are_sampled_to_the_rate_with_frame_headers(settings, processes, readers):
    port = free_port()
    start_rtsp_server(processes, port)
    t0 = int(time.time() * 1000)
    report = produce(settings, [f"rtsp://127.0.0.1:{port}/live"], rate=5.0, camera_id="gate-1", limit=12)
    t1 = int(time.time() * 1000)
    assert report.sent == 12 and report.skipped == [] and not report.interrupted

    records = readers(settings, settings.topics.frames).wait(lambda r: len(r) >= 12, 30, "12 frames")
    assert len(records) == 12 and len({r.partition for r in records}) == 1
    check_frames(records, "gate-1", t0, t1)
    stamps = sorted(int(dict(r.headers)[H_TS]) for r in records)
    # 25 fps sampled at 5: 11 gaps of 200 ms (arrival jitter aside); unsampled, 12 frames take 0.44 s
    assert stamps[-1] - stamps[0] >= 11 * 200 - 100
    assert stamps[-1] - stamps[0] <= 11 * 200 * 2, "far slower than the rate: frames lost"
    assert readers(settings, settings.topics.cameras).wait(lambda r: True, 1, "") == []  # never offline


def test_a_frame_over_the_limits_ends_a_live_run_with_one_error(settings, processes, readers):
    """A camera's frames are all alike: one over the pixel limit means every one is."""
    port = free_port()
    start_rtsp_server(processes, port)
    settings.images.max_pixels = SOURCE_SIZE[0] * SOURCE_SIZE[1] - 1
    with pytest.raises(InputError, match=rf"^rtsp://127.0.0.1:{port}/live#frame=\d+: too-many-pixels: 320x240 > limit 76799 pixels"):
        produce(settings, [f"rtsp://127.0.0.1:{port}/live"], rate=5.0, camera_id="gate-5", limit=3)
    assert readers(settings, settings.topics.frames).wait(lambda r: True, 1, "") == []


def test_rtsp_camera_lost_and_back_offline_once_online_once_then_sigterm_summary(settings, processes, readers):
    port = free_port()
    server = start_rtsp_server(processes, port)
    t0 = int(time.time() * 1000)
    producer = produce_cli(processes, settings, f"rtsp://127.0.0.1:{port}/live", "--fps", "5", "--camera", "gate-2")
    frames = readers(settings, settings.topics.frames)
    cameras = readers(settings, settings.topics.cameras)

    frames.wait(lambda r: len(r) >= 5, 120, "frames before the camera is lost")
    kill(server)
    lost_at = int(time.time() * 1000)
    cameras.wait(lambda r: len(r) >= 1, 30, "the offline status")
    time.sleep(3)  # several reconnections fail meanwhile (0.2 s back-off, doubling to 1 s)
    before = len(frames.poll())
    start_rtsp_server(processes, port)
    cameras.wait(lambda r: len(r) >= 2, 60, "the online status")
    frames.wait(lambda r: len(r) >= before + 5, 60, "frames after the camera is back")

    producer.send_signal(signal.SIGTERM)
    out, err = producer.communicate(timeout=60)
    t1 = int(time.time() * 1000)
    assert producer.returncode == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 1 and SUMMARY.match(lines[0]) and lines[0].endswith("(interrupted)"), out
    sent = int(SUMMARY.match(lines[0]).group(1))
    records = frames.wait(lambda r: len(r) >= sent, 30, "every frame the summary counts")
    assert len(records) == sent  # everything sent was flushed, nothing more
    check_frames(records, "gate-2", t0, t1)

    offline, online = statuses(cameras.wait(lambda r: True, 1, ""))  # exactly one of each for one outage
    assert [r.key for r in cameras.records] == [b"gate-2", b"gate-2"]
    assert (offline.status, online.status) == ("offline", "online")
    assert offline.camera_id == online.camera_id == "gate-2"
    assert lost_at - 1000 <= offline.since_ms <= lost_at + 10_000 and offline.detail
    assert offline.since_ms < online.since_ms <= t1
    assert f"rtsp://127.0.0.1:{port}/live" in err and '"camera offline"' in err and '"camera online"' in err


def test_unreachable_camera_is_retried_and_reported_offline_not_refused(settings, readers):
    cameras = readers(settings, settings.topics.cameras)
    with producing(settings, f"rtsp://127.0.0.1:{free_port()}/cam", rate=5.0, camera_id="gate-3") as result:  # nothing listens
        cameras.wait(lambda r: len(r) >= 1, 60, "the offline status")
        time.sleep(2)  # more attempts fail: still one offline status
    assert result["report"].sent == 0 and result["report"].interrupted
    (offline,) = statuses(cameras.wait(lambda r: True, 1, ""))
    assert offline.status == "offline" and offline.camera_id == "gate-3" and cameras.records[0].key == b"gate-3"
    assert "refused" in offline.detail.lower() or "timed out" in offline.detail, offline.detail


def test_a_silent_camera_is_noticed_within_the_read_timeout(settings, processes, readers):
    """A camera that stops sending without closing the connection (its process frozen)."""
    port = free_port()
    server = start_rtsp_server(processes, port)
    frames, cameras = readers(settings, settings.topics.frames), readers(settings, settings.topics.cameras)
    with producing(settings, f"rtsp://127.0.0.1:{port}/live", rate=5.0, camera_id="gate-4") as result:
        frames.wait(lambda r: len(r) >= 3, 60, "the first frames")
        os.killpg(server.pid, signal.SIGSTOP)
        frozen_at = int(time.time() * 1000)
        cameras.wait(lambda r: len(r) >= 1, 30, "the offline status")
        os.killpg(server.pid, signal.SIGCONT)
        cameras.wait(lambda r: len(r) >= 2, 60, "the online status")
    assert result["report"].interrupted
    offline, online = statuses(cameras.records)
    assert (offline.status, online.status) == ("offline", "online")
    assert "timed out" in offline.detail
    # read_timeout_s is 2: noticed after 2 s of silence, give or take the frame in flight and a slow machine
    assert frozen_at + 1500 <= offline.since_ms <= frozen_at + 2000 + 1500


# --- HTTP MJPEG --------------------------------------------------------------------------


def test_http_mjpeg_stream(settings, processes, readers):
    port = free_port()
    processes([
        imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-re",
        "-f", "lavfi", "-i", f"testsrc=size={SOURCE_SIZE[0]}x{SOURCE_SIZE[1]}:rate=25",
        "-c:v", "mjpeg", "-q:v", "5", "-f", "mpjpeg", "-listen", "1", f"http://127.0.0.1:{port}/stream",
    ], stdin=subprocess.DEVNULL)
    t0 = int(time.time() * 1000)
    # it may not listen yet: the producer retries until it does, as for any camera
    report = produce(settings, [f"http://127.0.0.1:{port}/stream"], rate=10.0, camera_id="door-1", limit=8)
    t1 = int(time.time() * 1000)
    assert report.sent == 8
    records = readers(settings, settings.topics.frames).wait(lambda r: len(r) >= 8, 30, "8 frames")
    assert len(records) == 8
    check_frames(records, "door-1", t0, t1)
    stamps = sorted(int(dict(r.headers)[H_TS]) for r in records)
    assert stamps[-1] - stamps[0] >= 7 * 100 - 50  # 10 of 25 fps


# --- video devices -----------------------------------------------------------------------


def test_a_video_device_goes_to_ffmpegs_v4l2_input_and_is_retried_when_it_fails(settings, readers):
    """No camera here: /dev/null is a character device, so it is taken for one, and v4l2's
    first ioctl fails on it. A real /dev/videoN is not tested."""
    cameras = readers(settings, settings.topics.cameras)
    with producing(settings, "/dev/null", rate=5.0, camera_id="desk-1") as result:
        cameras.wait(lambda r: len(r) >= 1, 30, "the offline status")
        time.sleep(1)
    assert result["report"].sent == 0
    (offline,) = statuses(cameras.records)
    assert offline.status == "offline" and "Inappropriate ioctl for device" in offline.detail, offline.detail


# --- stopping ----------------------------------------------------------------------------


def test_sigterm_on_a_file_produce_prints_the_summary(settings, processes, readers):
    producer = produce_cli(processes, settings, str(SAMPLE_FRAMES), "--loop", "0", "--rate", "5", "--camera", "files-1")
    frames = readers(settings, settings.topics.frames)
    frames.wait(lambda r: len(r) >= 3, 120, "the first frames")
    producer.send_signal(signal.SIGTERM)
    out, err = producer.communicate(timeout=60)
    assert producer.returncode == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 1 and SUMMARY.match(lines[0]) and lines[0].endswith("(interrupted)"), out
    sent = int(SUMMARY.match(lines[0]).group(1))
    assert len(frames.wait(lambda r: len(r) >= sent, 30, "every frame the summary counts")) == sent


# --- bad input: one line, exit 2, no connection ------------------------------------------


@pytest.mark.parametrize(
    "source, line",
    [
        ("ftp://cam.example/x", "error: ftp://cam.example/x: unsupported URL scheme 'ftp' (live sources: rtsp://, rtsps://, http://, https://, /dev/videoN)"),
        ("rtsp://", "error: rtsp://: malformed URL: no host (expected rtsp://HOST[:PORT]/PATH)"),
        ("rtsp:/192.168.1.5/x", "error: rtsp:/192.168.1.5/x: malformed URL: no host (expected rtsp://HOST[:PORT]/PATH)"),
        ("rtsp://cam:99999/x", "error: rtsp://cam:99999/x: malformed URL: Port out of range 0-65535"),
        ("http://cam/a b", "error: http://cam/a b: malformed URL: spaces or control characters (percent-encode them)"),
        ("rtmp://admin:hunter2@cam/live", "error: rtmp://admin:***@cam/live: unsupported URL scheme 'rtmp' (live sources: rtsp://, rtsps://, http://, https://, /dev/videoN)"),
        ("/dev/video-none-here", "error: /dev/video-none-here: no such video device"),
    ],
    ids=["scheme", "no-host", "one-slash", "port", "space", "password-masked", "no-device"],
)
def test_a_bad_live_source_is_one_line_and_exit_2_before_any_connection(source, line, capsys, monkeypatch):
    monkeypatch.setenv("INTERNEG_KAFKA__BOOTSTRAP_SERVERS", f"127.0.0.1:{free_port()}")  # nothing listens: connecting would hang
    started = time.monotonic()
    status = main(["produce", source])
    assert capsys.readouterr().err.strip().splitlines() == [line]
    assert status == 2 and time.monotonic() - started < 10


def test_a_live_source_is_produced_alone(capsys, monkeypatch):
    monkeypatch.setenv("INTERNEG_KAFKA__BOOTSTRAP_SERVERS", f"127.0.0.1:{free_port()}")
    status = main(["produce", str(SAMPLE_FRAMES), "rtsp://127.0.0.1:8554/live"])
    assert status == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: rtsp://127.0.0.1:8554/live: a live source has no end, so it is produced alone (one produce per camera)"
    ]


def test_reconnection_delays_double_with_jitter_up_to_the_bound():
    live = LiveSettings(reconnect_min_s=0.5, reconnect_max_s=4.0, reconnect_jitter=0.5)
    backoff = Backoff(live, random.Random(0))
    delays = [backoff.next() for _ in range(8)]
    for delay, base in zip(delays, [0.5, 1, 2, 4, 4, 4, 4, 4]):
        assert base * 0.5 <= delay <= base
    assert len(set(delays)) == len(delays)  # jittered: cameras lost together come back apart
    backoff.reset()
    assert 0.25 <= backoff.next() <= 0.5
    steady = Backoff(LiveSettings(reconnect_min_s=1, reconnect_max_s=1, reconnect_jitter=0))
    assert [steady.next() for _ in range(3)] == [1, 1, 1]
    with pytest.raises(ValueError, match="reconnect_max_s"):
        LiveSettings(reconnect_min_s=5, reconnect_max_s=1)
