"""Benchmarks through the real broker: the scoring worker against the encoder's limit.

Each function starts what it measures (a local broker from deploy/kafka, worker
processes) and stops it. Numbers are medians with their spread; every ratio compares two
figures measured in the same run on the same machine.
"""
from __future__ import annotations

import io
import json
import statistics
import time
import uuid
from pathlib import Path
from typing import Callable

import numpy as np
from kafka import TopicPartition
from PIL import Image

from schemas.messages import H_CAMERA_ID, H_CONTENT_TYPE, H_FRAME_ID, H_TS, FrameScore
from schemas.settings import Settings
from workers.kafka_clients import make_consumer, make_producer
from workers.local_run import SAMPLES, Broker
from workers.processes import WorkerProcess
from workers.topics import ensure_topics

# per batch, seconds: decode (in handle, or ahead in a thread as "prepare" when it can
# overlap; "wait" is the loop blocked on it), encode and score (inside handle), send,
# confirm (waiting for acknowledgements), commit
STAGES = ("poll", "decode", "prepare", "wait", "handle", "encode", "score", "send", "confirm", "commit")


def sample_frames(count: int, size=(640, 480), quality: int = 85) -> list[bytes]:
    """Real photographs (deploy/samples/frames) as 640x480 JPEGs, cycled to ``count``."""
    sources = sorted((SAMPLES / "frames").glob("*.jpg"))
    encoded = []
    for path in sources:
        image = Image.open(path).convert("RGB").resize(size, Image.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        encoded.append(buffer.getvalue())
    return [encoded[i % len(encoded)] for i in range(count)]


def spread(values: list[float]) -> dict:
    v = sorted(values)
    if not v:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {"median": statistics.median(v), "min": v[0], "max": v[-1], "n": len(v)}


def percentiles(values: list[float]) -> dict:
    a = np.asarray(values, dtype=float)
    return {"p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)), "n": int(a.size)} if a.size else {"n": 0}


class Deployment:
    """A broker (started here unless given), fresh topics, and helpers to drive workers."""

    def __init__(self, settings: Settings, workdir: Path, bootstrap: str | None = None):
        self.workdir = Path(workdir)
        self.broker = None if bootstrap else Broker(self.workdir / f"kafka-{uuid.uuid4().hex[:6]}")
        self.settings = settings.model_copy(deep=True)
        if self.settings.bank.signing_key is None and self.settings.bank.verify_key is None:  # signed, as deployed
            from workers.local_run import run_keypair

            self.settings.bank.signing_key, self.settings.bank.verify_key = run_keypair(self.workdir / "keys")
        self.bootstrap = bootstrap
        self.workers: list[WorkerProcess] = []

    def __enter__(self) -> "Deployment":
        try:
            self.settings.kafka.bootstrap_servers = self.bootstrap or self.broker.start()
        except BaseException:  # a half-started broker (or Ctrl-C during its start) is stopped too
            self.__exit__()
            raise
        return self

    def fresh_topics(self) -> Settings:
        run = uuid.uuid4().hex[:6]
        s = self.settings.model_copy(deep=True)
        for name in ("frames", "scores", "alerts", "candidates", "negatives", "deadletter"):
            setattr(s.topics, name, f"bench-{run}.{getattr(self.settings.topics, name)}")
        s.kafka.scoring_group = f"bench-scoring-{run}"
        s.kafka.inversion_group = f"bench-inversion-{run}"
        ensure_topics(s)
        return s

    def start(self, command: str, settings: Settings, name: str, wait: bool = True) -> WorkerProcess:
        name = f"{settings.model.name}-{name}-{uuid.uuid4().hex[:4]}"  # a fresh log per worker, never appended to
        worker = WorkerProcess(command, settings, self.workdir / "logs" / f"{name}.log", {"INTERNEG_WORKER__NAME": name})
        self.workers.append(worker)
        if wait:
            worker.wait_ready(timeout_s=600)
        return worker

    def __exit__(self, *exc) -> None:
        for worker in self.workers:
            worker.terminate()
        if self.broker is not None:
            self.broker.stop()


def frame_headers(frame_id: str, camera: str) -> list[tuple[str, bytes]]:
    """The headers of a JPEG frame stamped now."""
    return [(H_FRAME_ID, frame_id.encode()), (H_CAMERA_ID, camera.encode()),
            (H_TS, str(int(time.time() * 1000)).encode()), (H_CONTENT_TYPE, b"image/jpeg")]


def fill_frames(settings: Settings, frames: list[bytes], camera: str = "bench") -> None:
    producer = make_producer(settings.kafka)
    for i, data in enumerate(frames):
        producer.send(settings.topics.frames, key=camera.encode(), value=data, headers=frame_headers(f"{camera}-{i}", camera))
    producer.flush()
    producer.close()


class CommitWatcher:
    """Reads a group's committed offsets on its input topic (without joining the group); by default
    the scoring group on the frames topic."""

    def __init__(self, settings: Settings, topic: str | None = None, group: str | None = None):
        self.consumer = make_consumer(settings.kafka, group_id=group or settings.kafka.scoring_group)
        topic = topic or settings.topics.frames
        self.partitions = [TopicPartition(topic, p) for p in self.consumer.partitions_for_topic(topic)]

    def committed(self) -> int:
        return sum(self.consumer.committed(tp) or 0 for tp in self.partitions)

    def lag(self) -> tuple[int, int]:
        """(end offsets minus committed offsets, end offsets), summed over the topic's partitions."""
        ends = self.consumer.end_offsets(self.partitions)
        end = sum(ends.values())
        return end - self.committed(), end

    def close(self) -> None:
        self.consumer.close(autocommit=False)


def batch_lines(worker: WorkerProcess) -> list[dict]:
    lines = []
    for line in worker.log_path.read_text(errors="replace").splitlines():
        if '"event": "batch"' in line:
            lines.append(json.loads(line))
    return lines


def worker_throughput(
    deployment: Deployment, *, frames: int, batch_size: int, repeats: int = 3, limit: Callable[[], float] | None = None
) -> dict:
    """Frames/s of one scoring worker, frames topic -> committed scores, on a pre-filled topic.

    With ``limit`` (a measurement of the raw encoder's frames/s) the limit is measured
    before each repeat and after the last, and each repeat's ratio is its frames/s over the
    mean of the two limits around it: a shared machine drifts by more than the 10 % asked
    of this ratio between measurements minutes apart.
    """
    runs, stage_ms, limits = [], {k: [] for k in STAGES}, []
    data = sample_frames(frames)
    for repeat in range(repeats):
        if limit is not None:
            limits.append(limit())
        s = deployment.fresh_topics()
        s.worker.batch_size = batch_size
        fill_frames(s, data)
        watcher = CommitWatcher(s)
        worker = deployment.start("score-worker", s, f"throughput-{batch_size}-{repeat}")
        start = time.monotonic()
        while watcher.committed() < frames:
            time.sleep(0.25)  # each check is a request the broker serves on these same cores
        elapsed = time.monotonic() - start
        watcher.close()
        worker.terminate()
        lines = batch_lines(worker)
        steady = lines[1:] or lines  # the first batch pays for warm-up
        n = sum(line["records"] for line in steady)
        for k in STAGES:
            stage_ms[k].append(1000 * sum(line["stages"].get(k, 0.0) for line in steady) / max(n, 1))
        busy = sum(line["seconds"] + line["stages"].get("poll", 0.0) for line in steady)
        runs.append({"wall_fps": frames / elapsed, "steady_fps": n / busy if busy else float("nan")})
    out = {
        "frames": frames,
        "batch_size": batch_size,
        "wall_fps": spread([r["wall_fps"] for r in runs]),
        "steady_fps": spread([r["steady_fps"] for r in runs]),
        "stage_ms_per_frame": {k: spread(v) for k, v in stage_ms.items()},
    }
    if limit is not None:
        limits.append(limit())
        around = [(limits[i] + limits[i + 1]) / 2 for i in range(repeats)]
        out["limit_fps"] = limits
        out["ratio_steady"] = spread([r["steady_fps"] / a for r, a in zip(runs, around)])
        out["ratio_wall"] = spread([r["wall_fps"] / a for r, a in zip(runs, around)])
    return out


def alert_latency(deployment: Deployment, *, rate: float, seconds: float, batch_size: int, rss_every_s: float = 10.0) -> dict:
    """Frame produced -> alert readable, at a fixed rate; with the worker's RSS over the run."""
    s = deployment.fresh_topics()
    s.worker.batch_size = batch_size
    worker = deployment.start("score-worker", s, f"latency-{int(rate)}")
    producer = make_producer(s.kafka, linger_ms=0)
    consumer = make_consumer(s.kafka, group_id=None, isolation_level="read_committed")
    partitions = [TopicPartition(s.topics.alerts, p) for p in consumer.partitions_for_topic(s.topics.alerts)]
    consumer.assign(partitions)
    consumer.seek_to_end(*partitions)
    data = sample_frames(16)
    sent_at: dict[str, float] = {}
    latencies: list[float] = []
    rss: list[tuple[float, int]] = []
    start = time.monotonic()
    next_at, next_rss, i = start, start, 0
    while time.monotonic() - start < seconds:
        now = time.monotonic()
        if now >= next_at:
            frame_id = f"lat-{i}"
            producer.send(s.topics.frames, key=b"bench", value=data[i % len(data)], headers=frame_headers(frame_id, "bench"))
            sent_at[frame_id] = time.monotonic()
            i += 1
            next_at += 1.0 / rate
        if now >= next_rss:
            rss.append((now - start, rss_kib(worker.process.pid)))
            next_rss += rss_every_s
        for records in consumer.poll(timeout_ms=5).values():
            arrived = time.monotonic()
            for r in records:
                alert = FrameScore.from_bytes(r.value)
                if alert.frame_id in sent_at:
                    latencies.append(arrived - sent_at[alert.frame_id])
    producer.close()
    consumer.close()
    worker.terminate()
    warm = [kib for t, kib in rss if t >= min(60.0, seconds / 4)] or [kib for _, kib in rss]
    return {
        "rate_fps": rate,
        "seconds": seconds,
        "sent": i,
        "alerts_received": len(latencies),
        "latency_s": percentiles(latencies),
        "rss_kib": {"after_warmup": warm[0] if warm else None, "end": warm[-1] if warm else None,
                    "growth_pct": 100 * (warm[-1] - warm[0]) / warm[0] if len(warm) > 1 else None,
                    "samples": rss},
    }


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def propagation(deployment: Deployment, *, negatives: int, workers: int, rate: float, batch_size: int) -> dict:
    """Time from publishing an inverted negative to it being applied in every scoring worker."""
    from pipeline.bank import FIRST_INVERTED_ID
    from pipeline.bundle import load_bundle
    from schemas.messages import NegativeRecord, Vector
    from workers.negatives import NegativeCheck
    from workers.signing import NegativeSigner

    s = deployment.fresh_topics()
    s.worker.batch_size = batch_size
    scorers = [deployment.start("score-worker", s, f"propagation-{k}") for k in range(workers)]
    model_id = scorers[0].status()["model_id"]
    bundle = load_bundle(Path(s.worker.bundle))
    dim = bundle.id_text.shape[1]
    # scoring workers refuse negatives that fail METHOD §2's test: publish only admissible ones
    check, signer = NegativeCheck.of(bundle), NegativeSigner.from_file(s.bank.signing_key)
    producer = make_producer(s.kafka, linger_ms=0)
    data = sample_frames(8)
    # warm-up: every worker has joined the group and handled two batches (the second worker's
    # join rebalances the first, whose polls then wait up to REJOIN_POLL_MS: not the steady state)
    warm_until = time.monotonic() + 120
    while time.monotonic() < warm_until and min(w.status().get("batches", 0) for w in scorers) < 2:
        producer.send(s.topics.frames, key=b"bench", value=data[0],
                      headers=[(H_FRAME_ID, f"warm-{time.monotonic_ns()}".encode()), (H_CONTENT_TYPE, b"image/jpeg")])
        time.sleep(1.0 / rate)
    rng = np.random.default_rng(0)
    delays = []
    for n in range(negatives):
        while True:
            v = rng.normal(size=dim).astype(np.float32)
            v /= np.linalg.norm(v)
            try:
                check.degree(v)
                break
            except ValueError:
                continue
        negative = FIRST_INVERTED_ID + 10_000 + n
        record = NegativeRecord(id=negative, vector=Vector.from_numpy(v, model_id), deviation=float(rng.random()), origin=f"bench-{n}", created=time.time())
        published = time.monotonic()
        key, value = str(negative).encode(), record.to_bytes()
        producer.send(s.topics.negatives, key=key, value=value, headers=signer.sign(s.topics.negatives, key, value)).get(timeout=30)
        pending = set(range(workers))
        next_frame = time.monotonic()
        while pending and time.monotonic() - published < 30:
            if time.monotonic() >= next_frame:  # a steady stream: updates are applied between batches
                producer.send(s.topics.frames, key=b"bench", value=data[n % len(data)],
                              headers=[(H_FRAME_ID, f"p{n}-{time.monotonic_ns()}".encode()), (H_CONTENT_TYPE, b"image/jpeg")])
                next_frame += 1.0 / rate
            for k in list(pending):
                if negative in scorers[k].status().get("bank_ids", []):
                    pending.discard(k)
            time.sleep(0.01)
        delays.append(time.monotonic() - published if not pending else float("inf"))
    producer.close()
    applied = [d for d in delays if d != float("inf")]
    return {"negatives": negatives, "workers": workers, "stream_rate_fps": rate, "batch_size": batch_size,
            "batch_timeout_ms": s.worker.batch_timeout_ms, "delay_s": percentiles(applied),
            "not_applied_in_30s": len(delays) - len(applied)}
