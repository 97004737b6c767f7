"""``interneg local-run``: the whole loop on one machine, then a summary, then everything stopped.

Starts a single-node Kafka broker from the Maven jars (unless given one), creates the
topics, prepares a bundle, starts one scoring and one inversion worker as processes,
streams a folder of frames, waits until every frame is scored and the bank has settled
in the scoring worker, prints a summary, and stops what it started.
"""
from __future__ import annotations

import csv
import math
import os
import shutil
import subprocess
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from kafka import TopicPartition
from kafka.errors import KafkaError

from pipeline.errors import ConfigError, InputError
from schemas.messages import FrameScore, OODEvent
from schemas.settings import Settings
from workers.kafka_clients import make_admin, make_consumer
from workers.processes import WorkerProcess

REPO = Path(__file__).resolve().parent.parent
BROKER = REPO / "deploy" / "kafka" / "broker.sh"
SAMPLES = REPO / "deploy" / "samples"
RENDERED_SAMPLES = SAMPLES / "rendered"  # the shipped small model's demo (train/make_demo.py)
LABELS_FILE = "labels.csv"


class Broker:
    def __init__(self, home: Path):
        self.home = home

    def start(self) -> str:
        """Start on empty storage: a run is compared with the runs before it, so it must not
        inherit their topics, offsets or negatives (they also made a second run wait for
        candidates it never produced)."""
        subprocess.run(["bash", str(BROKER), "fetch"], check=True, capture_output=True, timeout=900)
        self.stop()  # one a killed run left behind
        if (self.home / "data" / "meta.properties").is_file():  # only a broker's storage is ever removed
            shutil.rmtree(self.home / "data")
        done = subprocess.run(["bash", str(BROKER), "start", str(self.home)], capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise ConfigError(f"the local Kafka broker did not start: {(done.stdout + done.stderr)[-800:]}")
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


def demo_model(settings: Settings) -> tuple[str | None, Path]:
    """The model and samples of ``local-run``: the settings' model unless none was named and
    its weights are not on this machine; then the shipped small model on its rendered demo.
    Returns (why the model changed, or None; the samples folder), changing ``settings``."""
    from pipeline.model import SHIPPED_TAG, SMALL_MODEL, weights_at_hand

    note = None
    if not {"name", "pretrained"} & settings.model.model_fields_set and not weights_at_hand(settings.model):
        note = (f"{settings.model.name} weights '{settings.model.pretrained}' are not on this machine, so the small model "
                f"trained for this project runs; for real cameras set INTERNEG_MODEL__PRETRAINED to CLIP weights")
        settings.model = settings.model.model_copy(update={"name": SMALL_MODEL, "pretrained": SHIPPED_TAG})
    return note, RENDERED_SAMPLES if settings.model.name == SMALL_MODEL else SAMPLES


def read_labels(frames: Path) -> dict[str, str] | None:
    """file name -> kind ("id" for a known class, anything else for an unknown) from the frames
    folder's labels.csv (columns file, kind), or None when it has none."""
    path = frames / LABELS_FILE if frames.is_dir() else None
    if path is None or not path.is_file():
        return None
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or not {"file", "kind"} <= set(rows[0]):
        raise InputError(f"{path}: needs the columns 'file' and 'kind' (id, or anything else for an unknown)")
    return {row["file"]: row["kind"] for row in rows}


def check_inputs(settings: Settings, *, classes: Path | None, frames: Path | None, out: Path | None, bootstrap: str | None = None) -> None:
    """Refuse, in seconds, what would otherwise fail only after the broker, the bundle and the
    workers were started: the same checks as the run's own, without torch or the model. None: not given."""
    from pipeline.classes import load_classes
    from pipeline.images import list_images

    if classes is not None:
        if not classes.exists():
            raise InputError(f"--classes {classes}: no such folder or file")
        try:
            load_classes(classes, settings.classes)
        except InputError as exc:
            raise InputError(f"--classes {exc}") from None
    if frames is not None:
        if not frames.exists():
            raise InputError(f"--frames {frames}: no such folder or file")
        if frames.is_dir() and not list_images(frames):
            raise InputError(f"--frames {frames}: a folder with no image files in it (not recursive)")
        read_labels(frames)
    if out is not None:
        existing = next(p for p in [out, *out.parents] if p.exists())  # what the run's mkdir would start from
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise InputError(f"--out {out}: cannot write there ({existing} is {'not writable' if existing.is_dir() else 'not a folder'})")
    if bootstrap is not None:
        kafka = settings.kafka.model_copy(update={"bootstrap_servers": bootstrap})
        make_admin(kafka).close()  # the first contact fails within connect_timeout_ms


def own_namespace(settings: Settings) -> str:
    """Give this run topics and consumer groups of its own (changing ``settings``); returns their prefix.

    On a cluster that is not the run's own, the default names would be another deployment's:
    its scoring workers' group, its bank of negatives, the records of earlier runs."""
    run = f"local-run-{uuid.uuid4().hex[:8]}"
    for name in type(settings.topics).model_fields:
        if isinstance(getattr(settings.topics, name), str):
            setattr(settings.topics, name, f"{run}.{getattr(settings.topics, name)}")
    for name in type(settings.kafka).model_fields:
        if name.endswith("_group"):
            setattr(settings.kafka, name, f"{run}.{getattr(settings.kafka, name)}")
    return run


def _delete_topics(settings: Settings, topics: list[str], echo: Callable[[str], None]) -> None:
    try:
        admin = make_admin(settings.kafka)
        try:
            admin.delete_topics(topics)
        finally:
            admin.close()
    except KafkaError as exc:
        echo(f"note: the run's topics were left on the cluster ({exc})")


@dataclass
class Verdicts:
    """One pass's verdicts against the frames' true labels (OOD is the positive class)."""

    unknowns: int = 0
    alerted: int = 0  # unknown frames judged OOD: alerts that were right
    known: int = 0
    false_alarms: int = 0  # known frames judged OOD
    auroc: float = float("nan")  # of the score separating known from unknown frames

    @classmethod
    def of(cls, scores: list[FrameScore], kinds: dict[str, str]) -> "Verdicts":
        v = cls()
        id_scores, ood_scores = [], []
        for score in scores:
            kind = kinds.get(score.frame_id)
            if kind is None:
                continue
            unknown = kind != "id"
            (ood_scores if unknown else id_scores).append(score.score)
            v.unknowns += unknown
            v.known += not unknown
            v.alerted += unknown and score.verdict == "ood"
            v.false_alarms += (not unknown) and score.verdict == "ood"
        if id_scores and ood_scores:
            from pipeline.metrics import ood_metrics

            v.auroc = ood_metrics(id_scores, ood_scores)["auroc"]
        return v


@dataclass
class RunPass:
    report: Any  # workers.producer.ProduceReport
    scores: list[FrameScore]
    seconds: float  # produce to the last score
    bank_at_start: int  # negatives in the scoring worker's bank when the pass began
    verdicts: Verdicts | None = None  # against labels.csv, when the frames have one


@dataclass
class RunResult:
    passes: list[RunPass]
    published: int = 0  # negatives the inversion worker published
    admitted: int = 0  # negatives in the scoring worker's bank at the end

    @property
    def exit_code(self) -> int:
        """0 when frames were sent and every frame of every pass was scored."""
        sent = any(p.report.sent for p in self.passes)
        return 0 if sent and all(len(p.scores) == len(set(p.report.frame_ids)) for p in self.passes) else 1


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
    model_note: str | None = None,
) -> RunResult:
    """Everything it saw; ``RunResult.exit_code`` is 0 when every frame of every pass was scored.

    With a labels.csv beside the frames (see read_labels), the frames are streamed twice: the
    first pass starts with an empty bank of inverted negatives, the second after the inversion
    worker's negatives from the first have reached the scoring worker; the summary scores both
    passes' verdicts against the labels, so it shows what the grown bank changed.
    """
    from pipeline.bundle import prepare_bundle, save_bundle
    from pipeline.images import list_images
    from pipeline.model import load_model
    from workers.producer import produce
    from workers.topics import ensure_topics

    out = Path(out)
    check_inputs(settings, classes=classes, frames=frames, out=out)
    kinds_by_file = read_labels(frames)
    loaded = load_model(settings.model)  # first: a missing model stops the run before anything starts
    echo(f"model {loaded.model_id}" + (f" ({model_note})" if model_note else ""))
    broker = None
    run_topics: list[str] = []  # created on a cluster that is not the run's own: deleted at the end
    workers: list[WorkerProcess] = []
    try:
        if bootstrap is None:
            broker = Broker(out / "kafka")
            bootstrap = broker.start()
            echo(f"kafka broker started at {bootstrap} ({out / 'kafka'}, empty)")
        settings.kafka.bootstrap_servers = bootstrap
        if broker is None:
            namespace = own_namespace(settings)
            echo(f"topics and consumer groups of this run on {bootstrap}: {namespace}.* (topics deleted at the end)")
            run_topics = list(ensure_topics(settings))
        else:
            ensure_topics(settings)
        settings.method.bundled = list(dict.fromkeys([settings.method.method, "interneg"]))  # what these workers run: no more
        bundle = prepare_bundle(loaded, classes, settings)
        bundle_dir = save_bundle(bundle, out / "bundle")
        settings.worker.bundle = bundle_dir
        if settings.bank.signing_key is None and settings.bank.verify_key is None:
            settings.bank.signing_key, settings.bank.verify_key = run_keypair(out / "keys")
        echo(f"bundle {bundle_dir}: {len(bundle.class_names)} classes ({', '.join(bundle.class_names)}), {len(bundle.negatives('interneg')[1])} negatives")
        if bundle.prototypes is not None:
            workers.append(WorkerProcess("invert-worker", settings, out / "logs" / "invert-worker.log"))
        scorer = WorkerProcess("score-worker", settings, out / "logs" / "score-worker.log")
        events = WorkerProcess("events-worker", settings, out / "logs" / "events-worker.log")
        workers += [scorer, events]
        for worker in workers:
            worker.wait_ready()
        echo("workers ready: " + ", ".join(f"{w.command} (http://127.0.0.1:{w.port}/metrics)" for w in workers))
        inverter = workers[0] if workers[0] is not scorer else None

        def settle() -> None:
            """Wait until the candidates are inverted and the scoring worker holds the result."""
            if inverter is None:
                return
            candidates = _count_topic(settings, settings.topics.candidates)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and inverter.status().get("candidates", 0) < candidates:
                time.sleep(0.5)
            target = inverter.status().get("bank_digest")
            while time.monotonic() < deadline and scorer.status().get("bank_digest") != target:
                # updates are applied between batches: one more frame lets an idle worker apply them
                produce(settings, [list_images(frames)[0] if frames.is_dir() else frames], rate=None, camera_id="settle", limit=1)
                time.sleep(1.0)

        result = RunResult([])
        for n in range(2 if kinds_by_file is not None else 1):
            bank_before = scorer.status().get("bank_size", 0)
            start = time.monotonic()
            report = produce(settings, [frames], rate=rate, camera_id="local-camera")
            echo(f"pass {n + 1}: {report.summary()}")
            scores = _collect_scores(settings, set(report.frame_ids), timeout_s)
            run_pass = RunPass(report, scores, time.monotonic() - start, bank_before)
            if kinds_by_file is not None:
                kinds = {frame_id: kinds_by_file[Path(name).name] for name, frame_id in report.frames if Path(name).name in kinds_by_file}
                run_pass.verdicts = Verdicts.of(scores, kinds)
            result.passes.append(run_pass)
            settle()
        result.published = inverter.status().get("published", 0) if inverter is not None else 0
        result.admitted = scorer.status().get("bank_size", 0)
        _summary(settings, result, kinds_by_file, inverter, scorer, echo, events=events)
        return result
    finally:
        for worker in workers:
            worker.terminate()
        if run_topics:
            _delete_topics(settings, run_topics, echo)
        if broker is not None:
            broker.stop()
            echo("stopped the workers and the broker")


def _summary(settings: Settings, result: RunResult, kinds_by_file: dict[str, str] | None,
             inverter: WorkerProcess | None, scorer: WorkerProcess, echo: Callable[[str], None],
             events: WorkerProcess | None = None) -> None:
    passes = result.passes
    first = passes[0]
    all_scores = [s for p in passes for s in p.scores]
    verdicts = Counter(s.verdict for s in all_scores)
    batch_seconds = {(s.worker, s.scored_at_ms, s.timings.batch_size): s.timings.batch_ms / 1000 for s in all_scores}
    busy = sum(batch_seconds.values())
    status = scorer.status()
    echo("")
    echo("summary")
    echo(f"  frames sent               {sum(p.report.sent for p in passes)} in {len(passes)} pass{'es' if len(passes) > 1 else ''} "
         f"({len(first.report.skipped)} skipped)")
    echo(f"  frames scored             {len(all_scores)} of {sum(len(set(p.report.frame_ids)) for p in passes)}")
    echo(f"  alerts (judged OOD)       {verdicts.get('ood', 0)}")
    if events is not None:
        _events_summary(settings, events, echo)
    echo(f"  judged in-distribution    {verdicts.get('id', 0)}")
    echo(f"  dead letters              {_count_topic(settings, settings.topics.deadletter)}")
    echo(f"  inversion candidates      {_count_topic(settings, settings.topics.candidates)}")
    if inverter is not None:
        inv = inverter.status()
        echo(f"  negatives published       {result.published} by the inversion worker (its bank {inv.get('bank_size', 0)} of {settings.bank.capacity})")
    echo(f"  negatives admitted        {result.admitted} in the scoring worker's bank, version {status.get('bank_version')}, "
         f"digest {str(status.get('bank_digest'))[:12]}")
    echo(f"  throughput                {per_second(len(all_scores), busy)} frames/s in the scoring worker's batches; "
         f"{per_second(len(first.scores), first.seconds)} frames/s produce-to-score wall clock (pass 1)")
    if kinds_by_file is not None:
        echo("")
        echo("verdicts against the frames' true labels (labels.csv; an unknown should alert, a known class should not)")
        names = [f"pass {n + 1} (bank {p.bank_at_start})" for n, p in enumerate(passes)]
        rows = [p.verdicts for p in passes]
        echo(f"  {'':28s}" + "".join(f"{name:>22s}" for name in names))
        echo(f"  {'unknowns alerted (right)':28s}" + "".join(f"{f'{v.alerted} of {v.unknowns}':>22s}" for v in rows))
        echo(f"  {'unknowns missed':28s}" + "".join(f"{v.unknowns - v.alerted:>22d}" for v in rows))
        echo(f"  {'false alarms (known class)':28s}" + "".join(f"{f'{v.false_alarms} of {v.known}':>22s}" for v in rows))
        echo(f"  {'AUROC of the score':28s}" + "".join(f"{'-':>22s}" if math.isnan(v.auroc) else f"{v.auroc:>22.3f}" for v in rows))
    echo("")
    echo("per frame (file order" + (", last pass" if len(passes) > 1 else "") + "):")
    last = passes[-1]
    by_id = {s.frame_id: s for s in last.scores}
    for name, frame_id in last.report.frames:
        s = by_id.get(frame_id)
        label = f"[{kinds_by_file.get(Path(name).name, '?')}] " if kinds_by_file is not None else ""
        if s is None:
            echo(f"  {Path(name).name:32s} {label}not scored")
            continue
        negs = ", ".join(n.label for n in s.negatives[:3])
        echo(f"  {Path(name).name:32s} {label}{s.verdict.upper():3s} score {s.score:.3f}  top {s.id_class} ({s.id_prob:.2f})  negatives: {negs}")


def _events_summary(settings: Settings, events: WorkerProcess, echo: Callable[[str], None]) -> None:
    """What the events worker made of the alerts: events per camera, not one line per frame."""
    told, deadline = -1, time.monotonic() + 10
    while time.monotonic() < deadline:  # until it has told what the last alerts caused
        now = events.status().get("events_told", 0)
        if now == told:
            break
        told = now
        time.sleep(1)
    status = events.status()
    consumer = make_consumer(settings.kafka, group_id=None)
    opened: Counter = Counter()
    try:
        partitions = [TopicPartition(settings.topics.events, p) for p in consumer.partitions_for_topic(settings.topics.events) or []]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        ends = consumer.end_offsets(partitions)
        while any(consumer.position(tp) < ends[tp] for tp in partitions):
            for records in consumer.poll(timeout_ms=300).values():
                for r in records:
                    event = OODEvent.from_bytes(r.value)
                    opened[event.camera_id] += event.status == "opened"
    finally:
        consumer.close()
    echo(f"  events                    {sum(opened.values())} opened on {len(opened)} camera(s), {status.get('events_open', 0)} still open "
         f"({status.get('events_told', 0)} event records for the alerts above; one alert per frame would be one record each)")


def per_second(count: int, seconds: float) -> str:
    """A rate for a summary line; "-" when nothing was timed (no frame scored), never nan or inf."""
    return f"{count / seconds:.1f}" if seconds > 0 else "-"
