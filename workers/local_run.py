"""``interneg local-run``: the whole loop on one machine, then a summary, then everything stopped.

Starts a single-node Kafka broker from the Maven jars (unless given one), creates the
topics, prepares a bundle, starts one scoring and one inversion worker as processes,
streams a folder of frames, waits until every frame is scored and the bank has settled
in the scoring worker, prints a summary, and stops what it started.
"""
from __future__ import annotations

import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Callable

from kafka import TopicPartition

from schemas.messages import FrameScore
from schemas.settings import Settings
from workers.kafka_clients import make_consumer
from workers.processes import WorkerProcess

REPO = Path(__file__).resolve().parent.parent
BROKER = REPO / "deploy" / "kafka" / "broker.sh"
SAMPLES = REPO / "deploy" / "samples"


class Broker:
    def __init__(self, home: Path):
        self.home = home

    def start(self) -> str:
        subprocess.run(["bash", str(BROKER), "fetch"], check=True, capture_output=True, timeout=900)
        done = subprocess.run(["bash", str(BROKER), "start", str(self.home)], capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"the local Kafka broker did not start: {(done.stdout + done.stderr)[-800:]}")
        return done.stdout.strip().splitlines()[-1]

    def stop(self) -> None:
        subprocess.run(["bash", str(BROKER), "stop", str(self.home)], capture_output=True, timeout=120)


def _count_topic(settings: Settings, topic: str) -> int:
    consumer = make_consumer(settings.kafka, group_id=None)
    try:
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or []]
        ends, starts = consumer.end_offsets(partitions), consumer.beginning_offsets(partitions)
        return sum(ends[tp] - starts[tp] for tp in partitions)
    finally:
        consumer.close()


def _collect_scores(settings: Settings, frame_ids: set[str], timeout_s: float) -> list[FrameScore]:
    consumer = make_consumer(settings.kafka, group_id=None, isolation_level="read_committed")
    topic = settings.topics.scores
    partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
    consumer.assign(partitions)
    consumer.seek_to_beginning(*partitions)
    scores: dict[str, FrameScore] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while not frame_ids <= set(scores) and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                for r in records:
                    score = FrameScore.from_bytes(r.value)
                    scores.setdefault(score.frame_id, score)
    finally:
        consumer.close()
    return [scores[f] for f in frame_ids if f in scores]


def run_keypair(folder: Path) -> tuple[Path, Path]:
    """The run's negatives key pair: made on the first run, kept with the run's topics after."""
    from workers.signing import SIGNING_KEY_FILE, VERIFY_KEY_FILE, generate_keypair

    if (folder / SIGNING_KEY_FILE).is_file() and (folder / VERIFY_KEY_FILE).is_file():
        return folder / SIGNING_KEY_FILE, folder / VERIFY_KEY_FILE
    return generate_keypair(folder)


def local_run(
    settings: Settings,
    *,
    classes: Path,
    frames: Path,
    out: Path,
    bootstrap: str | None,
    rate: float | None,
    echo: Callable[[str], None],
    timeout_s: float = 600.0,
) -> int:
    from pipeline.bundle import prepare_bundle, save_bundle
    from pipeline.model import load_model
    from workers.producer import produce
    from workers.topics import ensure_topics

    out = Path(out)
    loaded = load_model(settings.model)  # first: a missing model stops the run before anything starts
    echo(f"model {loaded.model_id}")
    broker = None
    workers: list[WorkerProcess] = []
    try:
        if bootstrap is None:
            broker = Broker(out / "kafka")
            bootstrap = broker.start()
            echo(f"kafka broker started at {bootstrap} ({out / 'kafka'})")
        settings.kafka.bootstrap_servers = bootstrap
        ensure_topics(settings)
        bundle = prepare_bundle(loaded, classes, settings)
        bundle_dir = save_bundle(bundle, out / "bundle")
        settings.worker.bundle = bundle_dir
        if settings.bank.signing_key is None and settings.bank.verify_key is None:
            settings.bank.signing_key, settings.bank.verify_key = run_keypair(out / "keys")
        echo(f"bundle {bundle_dir}: {len(bundle.class_names)} classes ({', '.join(bundle.class_names)}), {len(bundle.interneg_words)} negatives")
        if bundle.prototypes is not None:
            workers.append(WorkerProcess("invert-worker", settings, out / "logs" / "invert-worker.log"))
        scorer = WorkerProcess("score-worker", settings, out / "logs" / "score-worker.log")
        workers.append(scorer)
        for worker in workers:
            worker.wait_ready()
        echo("workers ready: " + ", ".join(f"{w.command} (http://127.0.0.1:{w.port}/metrics)" for w in workers))
        start = time.monotonic()
        report = produce(settings, [frames], rate=rate, camera_id="local-camera")
        echo(report.summary())
        sent_ids = set(report.frame_ids)
        scores = _collect_scores(settings, sent_ids, timeout_s)
        scored_at = time.monotonic()
        inverter = workers[0] if workers[0] is not scorer else None
        if inverter is not None:  # wait until the candidates are inverted and the scoring worker holds the result
            candidates = _count_topic(settings, settings.topics.candidates)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and inverter.status().get("candidates", 0) < candidates:
                time.sleep(0.5)
            target = inverter.status().get("bank_digest")
            while time.monotonic() < deadline and scorer.status().get("bank_digest") != target:
                # updates are applied between batches: one more frame lets an idle worker apply them
                produce(settings, [sorted(frames.iterdir())[0] if frames.is_dir() else frames], rate=None, camera_id="settle", limit=1)
                time.sleep(1.0)
        verdicts = Counter(s.verdict for s in scores)
        batch_seconds = {(s.worker, s.scored_at_ms, s.timings.batch_size): s.timings.batch_ms / 1000 for s in scores}
        busy = sum(batch_seconds.values())
        worker_rate = len(scores) / busy if busy else float("nan")
        status = scorer.status()
        echo("")
        echo("summary")
        echo(f"  frames sent               {report.sent} ({len(report.skipped)} skipped)")
        echo(f"  frames scored             {len(scores)} of {len(sent_ids)}")
        echo(f"  alerts (judged OOD)       {verdicts.get('ood', 0)}")
        echo(f"  judged in-distribution    {verdicts.get('id', 0)}")
        echo(f"  dead letters              {_count_topic(settings, settings.topics.deadletter)}")
        echo(f"  inversion candidates      {_count_topic(settings, settings.topics.candidates)}")
        if inverter is not None:
            inv = inverter.status()
            echo(f"  negatives published       {inv.get('published', 0)} (bank {inv.get('bank_size', 0)} of {settings.bank.capacity})")
        echo(f"  scoring-worker bank       {status.get('bank_size', 0)} inverted negatives, version {status.get('bank_version')}, digest {str(status.get('bank_digest'))[:12]}")
        echo(f"  throughput                {worker_rate:.1f} frames/s in the scoring worker's batches; "
             f"{len(scores) / max(scored_at - start, 1e-9):.1f} frames/s produce-to-score wall clock")
        echo("")
        echo("per frame (file order):")
        by_id = {s.frame_id: s for s in scores}
        for name, frame_id in report.frames:
            s = by_id.get(frame_id)
            if s is None:
                echo(f"  {Path(name).name:32s} not scored")
                continue
            negs = ", ".join(n.label for n in s.negatives[:3])
            echo(f"  {Path(name).name:32s} {s.verdict.upper():3s} score {s.score:.3f}  top {s.id_class} ({s.id_prob:.2f})  negatives: {negs}")
        return 0 if len(scores) == len(sent_ids) else 1
    finally:
        for worker in workers:
            worker.terminate()
        if broker is not None:
            broker.stop()
            echo("stopped the workers and the broker")
