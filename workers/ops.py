"""Operations surface shared by every worker process: JSON logs, Prometheus metrics, health endpoints.

A worker builds one `WorkerMetrics` and one `OpsServer`, calls `ops.beat()` every loop
iteration and `ops.set_ready(True)` once it can serve; orchestrators probe `/healthz`
(liveness) and `/readyz` (readiness), Prometheus scrapes `/metrics`.
"""
from __future__ import annotations

import json as jsonlib
import logging
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import urlsplit

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

__all__ = ["configure_logging", "get_logger", "WorkerMetrics", "OpsServer"]


# ---------------------------------------------------------------- logging


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at emit time, so redirection (pytest capture, daemons) is honoured."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def configure_logging(level: str = "INFO", json: bool = True) -> None:
    """Route structlog and stdlib `logging` through one renderer: one JSON object per line on stderr.

    Safe to call repeatedly: the previous handler installed here is replaced, never duplicated.
    """
    # Applied to stdlib records only (structlog events already went through `shared` before
    # reaching the handler), so both kinds carry the same keys.
    shared: list = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Not cached: a later configure_logging() must reach loggers created before it.
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = _StderrHandler()
    handler.setFormatter(formatter)

    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # kafka-python is chatty at INFO (every connect/rebalance step); its warnings still matter.
    logging.getLogger("kafka").setLevel(max(logging.WARNING, root.level))
    # open_clip and torch report through warnings.warn; send those through the same JSON path.
    logging.captureWarnings(True)


def get_logger(name: str, **bound: Any) -> structlog.stdlib.BoundLogger:
    """A structlog logger named `name`, with `bound` keys on every line."""
    return structlog.stdlib.get_logger(name).bind(**bound)


# ---------------------------------------------------------------- metrics

# 1 ms .. 30 s: a CPU batch of 32 frames is ~seconds, a GPU batch ~milliseconds.
BATCH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# 5 ms .. 60 s: includes queueing in Kafka, so the tail is consumer lag, not compute.
END_TO_END_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


# What each role exports beside what every worker does (ROLE_METRICS[""]): a scoring worker
# with the inversion worker's counters, all zero, misleads (issue 14). A metric a role does not
# own still exists, unregistered, so shared code may touch it; it is never exported.
ROLE_METRICS = {
    "": {"batch_seconds", "consumer_lag", "group_lag", "deadletters", "unreadable", "transactions_aborted", "stalled",
         "consumer_renewals"},
    "scoring": {"frames", "end_to_end_seconds", "bank_size", "bank_version", "negatives_rejected", "control_refused", "bundle_rollouts",
                "camera_frames", "camera_end_to_end_seconds"},
    "inversion": {"bank_size", "bank_version", "negatives_rejected", "negatives_published", "inverted"},
    "events": {"events", "events_open", "frames_suppressed", "control_refused", "camera_events"},
}


class CameraLabels:
    """A camera id as a metric label, bounded: camera ids come from records anyone may write,
    and each label value is a series Prometheus keeps. The first ``limit`` cameras seen keep
    their id; the rest are 'other'."""

    def __init__(self, limit: int):
        self.limit = limit
        self.known: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, camera_id: str) -> str:
        if camera_id in self.known:
            return camera_id
        with self._lock:
            if len(self.known) < self.limit:
                self.known.add(camera_id)
                return camera_id
        return "other"


class WorkerMetrics:
    """The metrics of one worker's role, in its own registry so several workers can live in one process (tests)."""

    def __init__(self, role: str, max_cameras: int = 50, **info: str) -> None:
        self.role = role
        self.registry = CollectorRegistry(auto_describe=True)
        owned = ROLE_METRICS[""] | ROLE_METRICS.get(role, set())


        def r(name: str):  # the registry of a metric this role owns, else none
            return self.registry if name in owned else None

        self.cameras = CameraLabels(max_cameras)
        self.info = Info("interneg_worker", "worker identity", registry=self.registry)
        self.info.info({"role": role, **{k: str(v) for k, v in info.items()}})

        self.frames = Counter("interneg_frames", "frames handled, by outcome", ["outcome"], registry=r("frames"))
        self.batch_seconds = Histogram(
            "interneg_batch_seconds", "wall time to score one batch", buckets=BATCH_BUCKETS, registry=r("batch_seconds")
        )
        self.end_to_end_seconds = Histogram(
            "interneg_end_to_end_seconds",
            "frame timestamp header to score produced",
            buckets=END_TO_END_BUCKETS,
            registry=r("end_to_end_seconds"),
        )
        self.consumer_lag = Gauge(
            "interneg_consumer_lag", "records of an owned partition its group has not committed (end minus committed offset)", ["topic", "partition"], registry=r("consumer_lag")
        )
        self.bank_size = Gauge("interneg_bank_size", "negatives in the bank in use", registry=r("bank_size"))
        self.bank_version = Gauge("interneg_bank_version", "version of the bank in use", registry=r("bank_version"))
        self.deadletters = Counter("interneg_deadletters", "records sent to the dead-letter topic", ["reason"], registry=r("deadletters"))
        self.unreadable = Counter(
            "interneg_records_unreadable", "records skipped because the Kafka client cannot decode them", ["topic"], registry=r("unreadable")
        )
        self.negatives_published = Counter(
            "interneg_negatives_published", "records written to the negatives topic", ["kind"], registry=r("negatives_published")
        )
        self.inverted = Counter("interneg_inverted", "inversion candidates, by outcome", ["outcome"], registry=r("inverted"))
        self.transactions_aborted = Counter(
            "interneg_transactions_aborted", "exactly-once mode: batches whose transaction was aborted and redone", registry=r("transactions_aborted")
        )
        self.group_lag = Gauge(
            "interneg_group_lag",
            "records of the input topic the worker's consumer group has not committed, all partitions (every member "
            "reports the same: take the max)",
            ["topic"],
            registry=r("group_lag"),
        )
        self.stalled = Gauge(
            "interneg_worker_stalled",
            "1 while the worker owns partitions with records waiting and has committed nothing for worker.stall_after_s",
            registry=r("stalled"),
        )
        self.consumer_renewals = Counter(
            "interneg_consumer_renewals", "Kafka consumers replaced after a stall (liveness watch)", registry=r("consumer_renewals")
        )
        self.negatives_rejected = Counter(
            "interneg_negatives_rejected", "records of the negatives topic refused (unsigned or badly signed, malformed, foreign, inadmissible)", registry=r("negatives_rejected")
        )
        self.bundle_rollouts = Counter("interneg_bundle_rollouts", "bundles rolled out through ood.control, by outcome",
                                       ["outcome"], registry=r("bundle_rollouts"))
        self.control_refused = Counter("interneg_control_refused", "records of the control topic refused (malformed, foreign model)", registry=r("control_refused"))
        self.events = Counter("interneg_events", "OOD events told, by status", ["status"], registry=r("events"))
        self.events_open = Gauge("interneg_events_open", "OOD events open on the cameras this worker holds", registry=r("events_open"))
        self.frames_suppressed = Counter(
            "interneg_ood_frames_suppressed", "OOD frames that opened nothing because their camera was in its cooldown", registry=r("frames_suppressed")
        )

        self.camera_frames = Counter(
            "interneg_camera_frames", "frames scored per camera, by outcome (cameras past the label bound count as 'other')",
            ["camera", "outcome"], registry=r("camera_frames"),
        )
        self.camera_end_to_end_seconds = Histogram(
            "interneg_camera_end_to_end_seconds", "frame timestamp header to score produced, per camera", ["camera"],
            buckets=END_TO_END_BUCKETS, registry=r("camera_end_to_end_seconds"),
        )
        self.camera_events = Counter("interneg_camera_events", "OOD events told per camera, by status", ["camera", "status"],
                                     registry=r("camera_events"))

        # Known label values start at 0 so rate() and absent-series alerts work before the first event.
        for outcome in ("scored", "alert", "deadletter", "candidate"):
            self.frames.labels(outcome=outcome)
        for status in ("opened", "updated", "closed"):
            self.events.labels(status=status)
        for outcome in ("adopted", "refused"):
            self.bundle_rollouts.labels(outcome=outcome)
        for kind in ("negative", "tombstone"):
            self.negatives_published.labels(kind=kind)
        for outcome in ("admitted", "inadmissible", "duplicate", "already_in_bank", "below_bound", "not_finite", "stale"):
            self.inverted.labels(outcome=outcome)

    def exposition(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)


# ---------------------------------------------------------------- HTTP


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        ops = self.server.ops
        path = urlsplit(self.path).path
        if path == "/metrics":
            self._send(200, ops.metrics.exposition(), CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            self._json(*ops.health())
        elif path == "/readyz":
            self._json(*ops.readiness())
        elif path == "/status":
            try:
                self._json(200, ops.status())
            except Exception as exc:  # a broken status callback must not look like a dead server
                get_logger(__name__).exception("status callback failed")
                self._json(500, {"error": repr(exc)})
        else:
            self._json(404, {"error": "not found", "path": path})

    def _json(self, code: int, body: dict) -> None:
        self._send(code, jsonlib.dumps(body, default=str).encode(), "application/json")

    def _send(self, code: int, payload: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass  # probes every few seconds would drown the JSON log


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    ops: "OpsServer"


class OpsServer:
    """`/metrics`, `/healthz`, `/readyz`, `/status` on a daemon thread.

    Liveness is a heartbeat: the worker's main loop calls `beat()`; no beat for `stale_after_s`
    means the loop is stuck (e.g. a hung poll or a deadlocked batch) and `/healthz` answers 503.
    `start()` counts as a beat, so model loading has `stale_after_s` before it must beat.
    """

    def __init__(
        self,
        metrics: WorkerMetrics,
        host: str = "127.0.0.1",
        port: int = 0,
        status: Callable[[], dict] | None = None,
        stale_after_s: float = 60.0,
    ) -> None:
        self.metrics = metrics
        self.host = host
        self._status = status or dict
        self.stale_after_s = stale_after_s
        self._last_beat = time.monotonic()
        self._readiness: tuple[bool, str] = (False, "starting")  # one tuple: read and written atomically
        self._holds: dict[str, str] = {}  # name -> reason: each keeps /readyz at 503 whatever set_ready says; replaced whole
        self._holds_lock = threading.Lock()
        self._bound_port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- worker side

    def beat(self) -> None:
        self._last_beat = time.monotonic()

    def set_ready(self, ready: bool, reason: str = "") -> None:
        self._readiness = (ready, reason or ("ready" if ready else "not ready"))

    def hold(self, name: str, reason: str | None) -> None:
        """Not ready because of ``reason`` (None: no longer), under ``name``, independently of
        ``set_ready`` and of other names: e.g. a missing topic, next to a stall."""
        with self._holds_lock:
            holds = dict(self._holds)
            if reason is None:
                holds.pop(name, None)
            else:
                holds[name] = reason
            self._holds = holds

    # -- probe side

    def health(self) -> tuple[int, dict]:
        age = time.monotonic() - self._last_beat
        if age > self.stale_after_s:
            return 503, {"status": "stale", "last_beat_age_s": round(age, 3), "stale_after_s": self.stale_after_s}
        return 200, {"status": "ok"}

    def readiness(self) -> tuple[int, dict]:
        ready, reason = self._readiness
        holds = list(self._holds.values())
        if holds:
            return 503, {"status": "not ready", "reason": "; ".join(([] if ready else [reason]) + holds)}
        return (200, {"status": "ready"}) if ready else (503, {"status": "not ready", "reason": reason})

    def status(self) -> dict:
        return self._status()

    # -- lifecycle

    @property
    def port(self) -> int:
        """The bound port (the real one when constructed with port 0); valid after `start()`."""
        return self._bound_port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "OpsServer":
        if self._server is not None:
            return self
        self._server = _Server((self.host, self._bound_port), _Handler)
        self._server.ops = self
        self._bound_port = self._server.server_address[1]
        self.beat()
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.2}, name=f"ops-http-{self.port}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None:
            return
        self._server = self._thread = None
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> "OpsServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
