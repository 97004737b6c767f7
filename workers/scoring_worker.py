"""The scoring worker: frames in, scores, alerts and inversion candidates out.

One consumer group on ``frames``; the delivery semantics are those of
:mod:`workers.delivery`. Bank updates from ``ood.negatives`` are applied between batches,
never during one, so a batch is scored against one bank version.
"""
from __future__ import annotations

import io
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from kafka.consumer.fetcher import ConsumerRecord
from PIL import Image

from pipeline.allow import AllowList
from pipeline.bundle import BundleError, load_bundle, load_bundle_with_model, manifest_digest
from pipeline.errors import InterNegError
from pipeline.images import ImageRejected, check_dimensions, decode_image
from pipeline.preprocess import BatchPreprocessor, UnsupportedTransform, decode_jpegs_on_device
from pipeline.methods import scorer_from_bundle
from pipeline.scorers import Scorer, Scores, judge
from schemas.messages import (
    CONTENT_TYPES,
    H_CAMERA_ID,
    H_CONTENT_TYPE,
    H_FRAME_ID,
    H_TS,
    MAX_ID_LENGTH,
    Candidate,
    FrameScore,
    OODAlert,
    SourceRef,
    Timings,
    Vector,
    WeighedNegative,
)
from schemas.settings import CameraSettings, Settings
from workers.delivery import Output, header
from workers.control import ControlFollower
from workers.worker import BundleWorker

MAX_KEY_BYTES = 1024
NO_CAMERA_SETTINGS = CameraSettings()


def crop_to(image: Image.Image, roi: tuple[float, float, float, float], max_aspect_ratio: float) -> Image.Image:
    """The camera's region of interest; refused like a frame if the region is a sliver."""
    w, h = image.size
    x0, y0, x1, y1 = roi
    box = (int(x0 * w), int(y0 * h), max(int(x0 * w) + 1, round(x1 * w)), max(int(y0 * h) + 1, round(y1 * h)))
    region = image.crop(box)
    check_dimensions(*region.size, max_pixels=w * h, max_aspect_ratio=max_aspect_ratio)
    return region
MAX_TS_MS = 2**63 - 1  # what a Kafka timestamp (int64) can hold


class FrameRejected(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass
class Prepared:
    """A batch after decoding: what the encoder needs, and what was refused."""

    frames: list = field(default_factory=list)
    images: list = field(default_factory=list)
    batch: torch.Tensor | None = None
    rejected: list = field(default_factory=list)  # (record, reason, detail)
    seconds: float = 0.0
    generation: int = 0  # the bundle generation whose transform decoded it


@dataclass
class Frame:
    record: ConsumerRecord
    frame_id: str
    camera_id: str
    ts_ms: int | None
    content_type: str | None = None


def _text_header(record: ConsumerRecord, name: str, required: bool) -> str | None:
    raw = header(record, name)
    if raw is None:
        if required:
            raise FrameRejected("missing-header", f"no '{name}' header")
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise FrameRejected("bad-header", f"'{name}' is not UTF-8") from None
    if not text or len(text) > MAX_ID_LENGTH or not text.isprintable():
        raise FrameRejected("bad-header", f"'{name}' must be 1-{MAX_ID_LENGTH} printable characters")
    return text


def _camera_from_key(key: bytes | None) -> str:
    """The camera id when there is no camera-id header: the key, if it is a valid id."""
    if not key:
        return "unknown"
    try:
        text = key.decode("utf-8")
    except UnicodeDecodeError:
        raise FrameRejected("bad-key", "the key (the camera id, with no camera-id header) is not UTF-8") from None
    if len(text) > MAX_ID_LENGTH or not text.isprintable():
        raise FrameRejected("bad-key", f"the key (the camera id, with no camera-id header) must be 1-{MAX_ID_LENGTH} printable characters")
    return text


def parse_frame(record: ConsumerRecord) -> Frame:
    """The frame's identity from its headers (METHOD-independent contract of ARCHITECTURE.md)."""
    frame_id = _text_header(record, H_FRAME_ID, required=True)
    if record.key is not None and len(record.key) > MAX_KEY_BYTES:
        raise FrameRejected("bad-key", f"key of {len(record.key)} bytes > {MAX_KEY_BYTES}")
    camera_id = _text_header(record, H_CAMERA_ID, required=False)
    if camera_id is None:
        camera_id = _camera_from_key(record.key)
    ts_text = _text_header(record, H_TS, required=False)
    ts_ms = None
    if ts_text is not None:
        # ASCII digits only: str.isdigit() also accepts '²' and other digits int() refuses
        if not (ts_text.isascii() and ts_text.isdigit()) or int(ts_text) > MAX_TS_MS:
            raise FrameRejected("bad-header", f"'{H_TS}' must be milliseconds since the epoch (0-{MAX_TS_MS}), got {ts_text[:40]!r}")
        ts_ms = int(ts_text)
    content_type = _text_header(record, H_CONTENT_TYPE, required=False)
    if content_type is not None and content_type not in CONTENT_TYPES:
        raise FrameRejected("unsupported-content-type", f"{content_type[:60]!r}; accepted: {', '.join(CONTENT_TYPES)}")
    if record.value is None:
        raise FrameRejected("empty", "null value")
    return Frame(record, frame_id, camera_id, ts_ms, content_type)


@dataclass(frozen=True)
class Routing:
    """What the output rules need beyond the batch itself (fixed for a worker's life)."""

    scores_topic: str
    alerts_topic: str
    candidates_topic: str
    threshold: float
    candidate_below: float | None  # publish inversion candidates below this score; None: the method wants none
    method: str
    model_id: str
    worker: str
    class_names: list[str]


def to_outputs(frames: list[Frame], emb, result: Scores, explanations: list, routing: Routing, *, bank_version: int,
               bank_size: int, now_ms: int, timings: Timings, allowed: list[str | None] | None = None,
               thresholds: list[float] | None = None) -> list[Output]:
    """A scored batch's records: a score per frame, an alert per OOD frame, a candidate per
    confidently-OOD frame when the method adapts remotely. A frame an operator's allow-list
    entry covers (``allowed``) is in-distribution: no alert, and no candidate, since it must
    not become a negative. ``thresholds``: per frame, its camera's own (default: the routing's).
    Pure: no Kafka, no clock, no state."""
    outputs = []
    allowed = allowed if allowed is not None else [None] * len(frames)
    thresholds = thresholds if thresholds is not None else [routing.threshold] * len(frames)
    for i, frame in enumerate(frames):
        r = frame.record
        score = float(result.score[i])
        common = dict(
            frame_id=frame.frame_id,
            camera_id=frame.camera_id,
            ts_ms=frame.ts_ms,
            source=SourceRef(topic=r.topic, partition=r.partition, offset=r.offset),
            method=routing.method,
            score=score,
            threshold=thresholds[i],
            id_class=routing.class_names[int(result.id_class[i])],
            id_prob=float(result.id_prob[i]),
            negatives=[WeighedNegative(label=label, cos=cos) for label, cos in explanations[i]],
            bank_version=bank_version,
            bank_size=bank_size,
            model_id=routing.model_id,
            worker=routing.worker,
            scored_at_ms=now_ms,
        )
        verdict = judge(score, thresholds[i])
        allowed_by = allowed[i] if verdict == "ood" else None
        if allowed_by is not None:
            verdict = "id"
        key = frame.frame_id.encode()
        outputs.append(Output(routing.scores_topic, key, FrameScore(**common, verdict=verdict, allowed_by=allowed_by, timings=timings).to_bytes(),
                              source=r))
        if verdict == "ood":
            # keyed by camera: a camera's alerts stay in order on one partition, which the events worker needs
            alert = OODAlert(**common, embedding=Vector.from_numpy(emb[i], routing.model_id, "float16"))
            outputs.append(Output(routing.alerts_topic, frame.camera_id.encode(), alert.to_bytes(), source=r))
        if routing.candidate_below is not None and score < routing.candidate_below and allowed_by is None:
            candidate = Candidate(frame_id=frame.frame_id, camera_id=frame.camera_id, source=common["source"], score=score,
                                  embedding=Vector.from_numpy(emb[i], routing.model_id), created_ms=now_ms)
            outputs.append(Output(routing.candidates_topic, key, candidate.to_bytes(), source=r))
    return outputs


class ScoringWorker(BundleWorker):
    role = "scoring"

    def __init__(self, settings: Settings):
        super().__init__(settings)
        self._adopt(self.bundle, self.loaded, scorer_from_bundle(self.bundle, settings, inverter=None))  # scoring workers never invert
        self.bundle_digest = manifest_digest(settings.worker.bundle)
        self.bundle_path = str(settings.worker.bundle)
        self.generation = 0  # bumped by each bundle adopted while running: a batch decoded before is decoded again
        self.rollout_error: str | None = None
        self._refused_rollout: str | None = None  # the digest last refused: not retried every batch
        self.pool = ThreadPoolExecutor(settings.worker.decode_threads, thread_name_prefix="decode")
        self.allow = AllowList(settings.method.allow_cos)
        self.control: ControlFollower | None = None
        self.frames_scored = 0
        self.adaptations = 0  # changes this replica made to its own state (AdaNeg's memory writes)

    def _adopt(self, bundle, loaded, scorer) -> None:
        """Run ``bundle`` with ``loaded`` and its ``scorer``: bank, output rules and image transform."""
        settings = self.settings
        t = settings.topics
        routing = Routing(
            scores_topic=t.scores, alerts_topic=t.alerts, candidates_topic=t.candidates, threshold=settings.method.threshold,
            candidate_below=settings.method.beta if scorer.adapts_remotely else None, method=scorer.name,
            model_id=loaded.model_id, worker=self.name, class_names=bundle.class_names,
        )
        try:
            preprocessor = BatchPreprocessor.for_model(loaded.model, loaded.crop_fraction)
        except UnsupportedTransform:
            preprocessor = None  # the model's own per-image transform
        self.bundle, self.loaded, self.scorer, self.routing, self.preprocessor = bundle, loaded, scorer, routing, preprocessor
        self.bank = scorer.bank if scorer.adapts_remotely else None  # followed from ood.negatives
        # cameras' own (bundle, method) scorers, built when first asked for, and their class names
        self.scorers: dict[tuple[str | None, str], Scorer] = {}
        self.class_names: dict[int, list[str]] = {}
        self.gpu_decode = settings.worker.gpu_decode and loaded.device.type == "cuda" and preprocessor is not None

    def input(self) -> tuple[str, str, int]:
        s = self.settings
        return s.topics.frames, s.kafka.scoring_group, s.worker.batch_size

    def counters(self) -> dict:
        return {"method": self.scorer.name, "frames_scored": self.frames_scored, "adaptations": self.adaptations,
                "allow_entries": len(self.allow.entries), "cameras_configured": len(self.control.cameras) if self.control is not None else 0,
                "bundle": self.bundle_path, "bundle_digest": self.bundle_digest, "rollout_error": self.rollout_error}

    def camera(self, camera_id: str) -> CameraSettings:
        """A camera's own settings from the control topic (empty when it has none)."""
        found = self.control.cameras.get(camera_id) if self.control is not None else None
        return found if found is not None else NO_CAMERA_SETTINGS

    def _by_method(self, frames: list[Frame]) -> list[tuple[Scorer, list[int]]]:
        """The batch's frames by the scorer of their camera's bundle and method (the worker's
        unless the cameras file names others), in batch order within each."""
        groups: dict[int, tuple[Scorer, list[int]]] = {}
        for i, frame in enumerate(frames):
            scorer = self._scorer_for(frame.camera_id)
            groups.setdefault(id(scorer), (scorer, []))[1].append(i)
        return list(groups.values())

    def _scorer_for(self, camera_id: str) -> Scorer:
        own = self.camera(camera_id)
        key = (own.bundle, own.method or self.scorer.name)
        if key == (None, self.scorer.name):
            return self.scorer
        if key not in self.scorers:
            try:
                bundle = self._camera_bundle(own.bundle) if own.bundle is not None else self.bundle
                self.scorers[key] = scorer_from_bundle(bundle, self.settings, key[1], inverter=None)
                self.class_names[id(self.scorers[key])] = bundle.class_names
                self.log.info("a camera's own bundle or method", camera=camera_id, bundle=own.bundle, method=key[1])
            except InterNegError as exc:  # not loadable here, or without that method: the worker's, said once
                self.scorers[key] = self.scorer
                self.log.warning("a camera's own bundle or method cannot be used: the worker's scores it", camera=camera_id,
                                 bundle=own.bundle, method=key[1], used=self.scorer.name, error=str(exc)[:300])
        return self.scorers[key]

    def _camera_bundle(self, path: str):
        """A camera's bundle, checked file by file and refused if made with another model."""
        return load_bundle(Path(path), model_id=self.loaded.model_id)

    def threshold(self, camera_id: str) -> float:
        own = self.camera(camera_id).threshold
        return own if own is not None else self.settings.method.threshold

    def catch_up(self) -> None:
        super().catch_up()
        self._follow_control()
        self._follow_rollout()  # a replica started after a rollout runs the rolled-out bundle too

    def _follow_control(self) -> None:
        if self.control is not None:
            self.control.close()
        self.allow = AllowList(self.settings.method.allow_cos)  # entries are vectors of one model
        self.control = ControlFollower(self.settings, self.log, allow=self.allow, model_id=self.loaded.model_id,
                                       dim=self.loaded.embed_dim, on_refused=self.metrics.control_refused.inc)
        applied = self.control.catch_up(beat=self.ops.beat)
        self.log.info("control caught up", records=applied, allow_entries=len(self.allow.entries))

    def _follow_rollout(self) -> None:
        """Between batches: adopt the bundle last rolled out on ood.control, if it is not the one
        running. It is loaded and checked first (every file against the manifest the record
        names); one that cannot be is refused, logged and shown in /status, and the worker goes
        on with the bundle it runs."""
        rollout = self.control.rollout if self.control is not None else None
        if rollout is None or rollout.manifest_sha256 in (self.bundle_digest, self._refused_rollout):
            return
        started = time.perf_counter()
        try:
            path = Path(rollout.path)
            if manifest_digest(path) != rollout.manifest_sha256:
                raise BundleError(f"{path}: its manifest is not the one rolled out (sha256 {rollout.manifest_sha256[:16]}…)")
            bundle, loaded = load_bundle_with_model(path, self.settings.model.device, self.settings.model.precision)
            self.ops.beat()
            scorer = scorer_from_bundle(bundle, self.settings, inverter=None)  # refuses a bundle without this method's state
            follower = self.follow_negatives(bundle, scorer.bank, loaded.model_id) if scorer.adapts_remotely else None
        except (InterNegError, OSError, TimeoutError) as exc:
            self._refused_rollout, self.rollout_error = rollout.manifest_sha256, f"{rollout.path}: {exc}"[:500]
            self.metrics.bundle_rollouts.labels(outcome="refused").inc()
            self.log.error("bundle rollout refused: this worker goes on with the bundle it runs", path=rollout.path,
                           error=str(exc)[:300], running=self.bundle_path)
            return
        old_model = self.loaded.model_id
        if self.follower is not None:
            self.follower.close()
        self._adopt(bundle, loaded, scorer)
        self.follower = follower
        self.bundle_path, self.bundle_digest, self.rollout_error = rollout.path, rollout.manifest_sha256, None
        self.generation += 1  # after the swap: a decode that saw this generation saw the new transform
        if loaded.model_id != old_model:
            self._follow_control()  # allow-list vectors are the old model's
        if self.bank is not None:
            self._bank_metrics()
        self.metrics.bundle_rollouts.labels(outcome="adopted").inc()
        self.log.info("bundle rolled out here", path=rollout.path, model_id=loaded.model_id, method=self.scorer.name,
                      classes=len(bundle.class_names), seconds=round(time.perf_counter() - started, 2))

    def between_batches(self) -> None:
        super().between_batches()
        if self.control is not None:
            self.control.poll()
            self._follow_rollout()

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        if self.control is not None:
            self.control.close()

    # --- one batch: prepare (decode threads, overlapped with the previous batch) then handle ---
    def _decode(self, frame: Frame):
        """Frame bytes -> uint8 array for the batched transform (or the model's own transform)."""
        images = self.settings.images
        short = self.preprocessor.short_side if self.preprocessor is not None else None
        roi = self.camera(frame.camera_id).roi
        image = decode_image(frame.record.value, max_bytes=images.max_bytes, max_pixels=images.max_pixels,
                             draft_short_side=None if roi is not None else short,  # the region, not the frame, is resized
                             max_aspect_ratio=images.max_aspect_ratio, content_type=frame.content_type)
        if roi is not None:
            image = crop_to(image, roi, images.max_aspect_ratio)
        return self.preprocessor.to_uint8(image) if self.preprocessor is not None else self.loaded.preprocess(image)

    def _decode_safely(self, frame: Frame):
        try:
            return self._decode(frame)
        except ImageRejected as exc:
            return exc

    def prepare_ahead(self, records: list[ConsumerRecord]) -> Prepared:
        """The decode step the batch loop runs ahead, overlapped with encoding (see BatchLoop)."""
        return self.decode_batch(records)

    def decode_batch(self, records: list[ConsumerRecord]) -> Prepared:
        start = time.perf_counter()
        prepared = Prepared(generation=self.generation)  # read before the transform: a swap after it is caught in handle
        frames: list[Frame] = []
        for record in records:
            try:
                frames.append(parse_frame(record))
            except FrameRejected as exc:
                prepared.rejected.append((record, exc.reason, exc.detail))
        if self.gpu_decode and frames and self._prepare_on_gpu(frames, prepared):
            prepared.seconds = time.perf_counter() - start
            return prepared
        for frame, result in zip(frames, self.pool.map(self._decode_safely, frames)):
            if isinstance(result, ImageRejected):
                prepared.rejected.append((frame.record, result.reason, result.detail))
            else:
                prepared.images.append(result)
                prepared.frames.append(frame)
        if prepared.images:
            prepared.batch = (
                self.preprocessor.batch(prepared.images, self.loaded.device)
                if self.preprocessor is not None
                else torch.stack(prepared.images)
            )
        prepared.seconds = time.perf_counter() - start
        return prepared

    def _prepare_on_gpu(self, frames: list[Frame], prepared: Prepared) -> bool:
        """nvJPEG for a batch of JPEGs within the limits; False sends the batch down the CPU path."""
        images = self.settings.images
        for frame in frames:
            data = frame.record.value
            if self.camera(frame.camera_id).roi is not None:  # the CPU path crops
                return False
            if not data.startswith(b"\xff\xd8") or len(data) > images.max_bytes or frame.content_type not in (None, "image/jpeg"):
                return False
            try:
                header = Image.open(io.BytesIO(data))  # the header only
                (width, height), orientation = header.size, header.getexif().get(0x0112, 1)
            except Exception:  # noqa: BLE001 - the CPU path names the problem
                return False
            try:
                check_dimensions(width, height, max_pixels=images.max_pixels, max_aspect_ratio=images.max_aspect_ratio)
            except ImageRejected:
                return False
            if orientation != 1:  # rotated by its EXIF orientation: the CPU path turns it upright
                return False
        try:
            prepared.batch = decode_jpegs_on_device([f.record.value for f in frames], self.preprocessor, self.loaded.device)
        except RuntimeError:  # a corrupt body: let the CPU path find which frame
            return False
        prepared.frames.extend(frames)
        return True

    def handle(self, records: list[ConsumerRecord], prepared: Prepared | None = None) -> list[Output]:
        if prepared is None or prepared.generation != self.generation:  # decoded for the bundle before a rollout
            prepared = self.decode_batch(records)
        outputs = [self._reject_frame(record, reason, detail) for record, reason, detail in prepared.rejected]
        kept = prepared.frames
        if not kept:
            return outputs
        decoded = time.perf_counter()
        emb_device = self.loaded.encode_images(prepared.batch)  # stays on the GPU for the score
        encoded = time.perf_counter()
        emb = emb_device.cpu().numpy()
        groups = self._by_method(kept)
        scored_groups = []
        for scorer, idx in groups:
            whole = len(groups) == 1  # the usual batch: no copies
            result = scorer.score(emb_device if whole else emb_device[torch.as_tensor(idx, device=emb_device.device)])
            part = emb if whole else emb[idx]
            scored_groups.append((scorer, idx, part, result, scorer.explain(part, self.settings.method.explain_top)))
        scored = time.perf_counter()
        n = len(kept)
        timings = Timings(
            decode_ms=1000 * prepared.seconds / n,
            encode_ms=1000 * (encoded - decoded) / n,
            score_ms=1000 * (scored - encoded) / n,
            batch_ms=1000 * (scored - decoded + prepared.seconds),
            batch_size=n,
        )
        self.stage_seconds = {"decode": prepared.seconds, "encode": encoded - decoded, "score": scored - encoded}
        now_ms = int(time.time() * 1000)
        bank = self.bank
        allowed = self.allow.match(emb, [f.camera_id for f in kept])
        produced = []
        for scorer, idx, part, result, explanations in scored_groups:
            frames = [kept[i] for i in idx]
            # a camera's own bundle or method: its scores and alerts, no inversion candidates (the bank is the worker's)
            routing = self.routing if scorer is self.scorer else replace(
                self.routing, method=scorer.name, candidate_below=None, class_names=self.class_names.get(id(scorer), self.routing.class_names))
            produced += to_outputs(frames, part, result, explanations, routing, bank_version=bank.version if bank is not None else 0,
                                   bank_size=len(bank.entries) if bank is not None else 0, now_ms=now_ms, timings=timings,
                                   allowed=[allowed[i] for i in idx], thresholds=[self.threshold(f.camera_id) for f in frames])
            if scorer.adapts and not scorer.adapts_remotely:  # AdaNeg: this replica's own memory, for the next batch
                self.adaptations += scorer.apply(scorer.propose(part, result, [f.frame_id for f in frames]))
        t = self.settings.topics
        m = self.metrics
        camera_of = {id(f.record): f.camera_id for f in kept}
        for output in produced:
            outcome = {t.scores: "scored", t.alerts: "alert", t.candidates: "candidate"}[output.topic]
            m.frames.labels(outcome=outcome).inc()
            m.camera_frames.labels(camera=m.cameras(camera_of[id(output.source)]), outcome=outcome).inc()
        for frame in kept:
            if frame.ts_ms is not None:
                seconds = max(0.0, now_ms - frame.ts_ms) / 1000
                m.end_to_end_seconds.observe(seconds)
                m.camera_end_to_end_seconds.labels(camera=m.cameras(frame.camera_id)).observe(seconds)
        self.frames_scored += n
        return outputs + produced

    def _reject_frame(self, record: ConsumerRecord, reason: str, detail: str) -> Output:
        self.metrics.frames.labels(outcome="deadletter").inc()
        return self.reject(record, reason, detail)



def run_scoring_worker(settings: Settings) -> int:
    return ScoringWorker.main(settings)
