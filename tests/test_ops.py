"""The operations surface over real HTTP: metrics exposition, liveness, readiness, status, JSON logs."""
from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
import warnings

import pytest
import structlog
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from workers.ops import OpsServer, WorkerMetrics, configure_logging, get_logger


def fetch(server: OpsServer, path: str) -> tuple[int, str, bytes]:
    """(status, content type, body); error statuses are answers here, not exceptions."""
    try:
        with urllib.request.urlopen(server.url + path, timeout=5) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read()


def samples(body: bytes) -> dict[tuple[str, frozenset], float]:
    """Parse an exposition back into {(sample name, labels): value}."""
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def key(name: str, **labels: str) -> tuple[str, frozenset]:
    return name, frozenset(labels.items())


@pytest.fixture
def server():
    ops = OpsServer(WorkerMetrics("scoring", max_cameras=2), "127.0.0.1", 0, status=lambda: {"bank_size": 42, "digest": "abc"})
    ops.start()
    yield ops
    ops.stop()


def test_metrics_exposition_round_trips_values(server):
    m = server.metrics
    m.frames.labels(outcome="scored").inc(3)
    m.frames.labels(outcome="alert").inc()
    m.batch_seconds.observe(0.05)
    m.end_to_end_seconds.observe(1.2)
    m.consumer_lag.labels(topic="frames", partition="0").set(7)
    m.bank_size.set(128)
    m.bank_version.set(4)
    m.deadletters.labels(reason="decode").inc(2)
    m.negatives_published.labels(kind="tombstone").inc(5)  # the inversion worker's: not exported by a scoring worker
    m.inverted.labels(outcome="admitted").inc(2)
    for camera in ("gate", "yard", "x1", "x2"):
        m.camera_frames.labels(camera=m.cameras(camera), outcome="scored").inc()

    code, ctype, body = fetch(server, "/metrics")
    assert code == 200 and ctype == CONTENT_TYPE_LATEST
    got = samples(body)
    assert got[key("interneg_frames_total", outcome="scored")] == 3
    assert got[key("interneg_frames_total", outcome="alert")] == 1
    assert got[key("interneg_frames_total", outcome="deadletter")] == 0  # pre-initialised
    assert got[key("interneg_batch_seconds_count")] == 1
    assert got[key("interneg_batch_seconds_sum")] == pytest.approx(0.05)
    assert got[key("interneg_batch_seconds_bucket", le="0.05")] == 1
    assert got[key("interneg_batch_seconds_bucket", le="0.025")] == 0
    assert got[key("interneg_end_to_end_seconds_bucket", le="60.0")] == 1
    assert got[key("interneg_end_to_end_seconds_bucket", le="1.0")] == 0
    assert got[key("interneg_consumer_lag", topic="frames", partition="0")] == 7
    assert got[key("interneg_bank_size")] == 128
    assert got[key("interneg_bank_version")] == 4
    assert got[key("interneg_deadletters_total", reason="decode")] == 2
    assert not any(name.startswith(("interneg_negatives_published", "interneg_inverted", "interneg_events")) for name, _ in got)
    assert got[key("interneg_worker_info", role="scoring")] == 1
    # the camera label is bounded (max_cameras=2): cameras past the bound are 'other'
    assert {labels for name, labels in got if name == "interneg_camera_frames_total"} == {
        frozenset({"camera": c, "outcome": "scored"}.items()) for c in ("gate", "yard", "other")}
    assert got[key("interneg_camera_frames_total", camera="other", outcome="scored")] == 2


def test_healthz_goes_stale_without_beats_and_recovers():
    ops = OpsServer(WorkerMetrics("scoring"), "127.0.0.1", 0, status=dict, stale_after_s=0.2).start()
    try:
        code, ctype, body = fetch(ops, "/healthz")
        assert (code, json.loads(body)) == (200, {"status": "ok"})
        assert ctype == "application/json"

        time.sleep(0.4)
        code, _, body = fetch(ops, "/healthz")
        assert code == 503
        assert json.loads(body)["last_beat_age_s"] >= 0.2

        ops.beat()
        assert fetch(ops, "/healthz")[0] == 200
    finally:
        ops.stop()


def test_readyz_follows_set_ready(server):
    code, _, body = fetch(server, "/readyz")
    assert code == 503 and json.loads(body)["reason"] == "starting"

    server.set_ready(False, reason="catching up with negatives topic")
    code, _, body = fetch(server, "/readyz")
    assert code == 503 and json.loads(body)["reason"] == "catching up with negatives topic"

    server.set_ready(True)
    assert fetch(server, "/readyz")[0] == 200

    server.set_ready(False, reason="bank reload")
    assert fetch(server, "/readyz")[0] == 503


def test_status_returns_callable_dict(server):
    code, ctype, body = fetch(server, "/status")
    assert code == 200 and ctype == "application/json"
    assert json.loads(body) == {"bank_size": 42, "digest": "abc"}


def test_status_callback_failure_is_500_not_a_dead_server():
    def broken() -> dict:
        raise RuntimeError("bank not loaded")

    with OpsServer(WorkerMetrics("scoring"), "127.0.0.1", 0, status=broken) as ops:
        code, _, body = fetch(ops, "/status")
        assert code == 500 and "bank not loaded" in json.loads(body)["error"]
        assert fetch(ops, "/healthz")[0] == 200


def test_unknown_path_is_404(server):
    assert fetch(server, "/nope")[0] == 404
    assert fetch(server, "/metrics/extra")[0] == 404
    assert fetch(server, "/healthz?verbose=1")[0] == 200  # query strings do not change the route


def test_requests_are_not_logged_to_stderr(server, capfd):
    fetch(server, "/healthz")
    fetch(server, "/nope")
    assert capfd.readouterr().err == ""


def test_two_servers_in_one_process_do_not_clash():
    a = OpsServer(WorkerMetrics("scoring"), "127.0.0.1", 0, status=lambda: {"who": "a"}).start()
    b = OpsServer(WorkerMetrics("inversion"), "127.0.0.1", 0, status=lambda: {"who": "b"}).start()
    try:
        assert a.port != b.port and a.port > 0 and b.port > 0
        a.metrics.frames.labels(outcome="scored").inc(5)
        b.metrics.inverted.labels(outcome="duplicate").inc()

        got_a, got_b = samples(fetch(a, "/metrics")[2]), samples(fetch(b, "/metrics")[2])
        assert got_a[key("interneg_frames_total", outcome="scored")] == 5
        assert key("interneg_frames_total", outcome="scored") not in got_b  # each role its own counters only
        assert got_b[key("interneg_inverted_total", outcome="duplicate")] == 1
        assert got_a[key("interneg_worker_info", role="scoring")] == 1
        assert got_b[key("interneg_worker_info", role="inversion")] == 1
        assert json.loads(fetch(b, "/status")[2]) == {"who": "b"}
    finally:
        a.stop()
        b.stop()


def test_stop_releases_the_port(server):
    port = server.port
    server.stop()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)
    server.stop()  # second stop is a no-op


@pytest.fixture
def restore_logging():
    """configure_logging changes process-wide state; put it back for the rest of the suite."""
    root, kafka = logging.getLogger(), logging.getLogger("kafka")
    saved = (root.handlers[:], root.level, kafka.level)
    structlog_config = structlog.get_config()
    yield
    logging.captureWarnings(False)
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    kafka.setLevel(saved[2])
    structlog.configure(**structlog_config)


def json_lines(err: str) -> list[dict]:
    lines = [line for line in err.splitlines() if line.strip()]
    return [json.loads(line) for line in lines]  # every line must be a JSON object


def test_configure_logging_emits_json_lines_with_bound_keys(restore_logging, capsys):
    configure_logging("INFO")
    configure_logging("INFO")  # idempotent: still one handler, one line per event

    log = get_logger("interneg.scoring", worker="w1")
    log.bind(batch=7).info("batch scored", frames=32, alerts=1)
    log.debug("hidden at INFO")
    logging.getLogger("kafka.conn").warning("broker %s unreachable", "b1:9092")
    logging.getLogger("kafka.conn").info("connecting")  # kafka-python below WARNING is dropped
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("QuickGELU mismatch", UserWarning)  # how open_clip reports

    records = json_lines(capsys.readouterr().err)
    assert [r["event"] for r in records][:2] == ["batch scored", "broker b1:9092 unreachable"]
    assert len(records) == 3

    batch, kafka, warned = records
    assert batch["level"] == "info" and batch["logger"] == "interneg.scoring"
    assert (batch["worker"], batch["batch"], batch["frames"], batch["alerts"]) == ("w1", 7, 32, 1)
    assert batch["timestamp"].endswith("Z") and "T" in batch["timestamp"]

    assert kafka["level"] == "warning" and kafka["logger"] == "kafka.conn"
    assert kafka["timestamp"].endswith("Z")

    assert warned["level"] == "warning" and "QuickGELU mismatch" in warned["event"]


def test_configure_logging_level_and_exceptions(restore_logging, capsys):
    configure_logging("warning")
    log = get_logger("interneg.inversion")
    log.info("quiet")
    try:
        raise ValueError("bad record")
    except ValueError:
        log.exception("decode failed", offset=12)

    (record,) = json_lines(capsys.readouterr().err)
    assert record["event"] == "decode failed" and record["level"] == "error" and record["offset"] == 12
    assert "ValueError: bad record" in record["exception"]
