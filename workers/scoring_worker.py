"""The scoring worker: frames in, scores, alerts and inversion candidates out.

One consumer group on ``frames``; the delivery semantics are those of
:mod:`workers.delivery`. Bank updates from ``ood.negatives`` are applied between batches,
never during one, so a batch is scored against one bank version.
"""
from __future__ import annotations

import io
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from kafka.consumer.fetcher import ConsumerRecord
from PIL import Image

from pipeline.images import ImageRejected, check_dimensions, decode_image
from pipeline.preprocess import BatchPreprocessor, UnsupportedTransform, decode_jpegs_on_device
from pipeline.methods import scorer_from_bundle
from pipeline.scorers import Scores, judge
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
from schemas.settings import Settings
from workers.delivery import Output, header
from workers.worker import BundleWorker

MAX_KEY_BYTES = 1024
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
               bank_size: int, now_ms: int, timings: Timings) -> list[Output]:
    """A scored batch's records: a score per frame, an alert per OOD frame, a candidate per
    confidently-OOD frame when the method adapts remotely. Pure: no Kafka, no clock, no state."""
    outputs = []
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
            threshold=routing.threshold,
            id_class=routing.class_names[int(result.id_class[i])],
            id_prob=float(result.id_prob[i]),
            negatives=[WeighedNegative(label=label, cos=cos) for label, cos in explanations[i]],
            bank_version=bank_version,
            bank_size=bank_size,
            model_id=routing.model_id,
            worker=routing.worker,
            scored_at_ms=now_ms,
        )
        verdict = judge(score, routing.threshold)
        key = frame.frame_id.encode()
        outputs.append(Output(routing.scores_topic, key, FrameScore(**common, verdict=verdict, timings=timings).to_bytes(), source=r))
        if verdict == "ood":
            outputs.append(Output(routing.alerts_topic, key, OODAlert(**common).to_bytes(), source=r))
        if routing.candidate_below is not None and score < routing.candidate_below:
            candidate = Candidate(frame_id=frame.frame_id, camera_id=frame.camera_id, source=common["source"], score=score,
                                  embedding=Vector.from_numpy(emb[i], routing.model_id), created_ms=now_ms)
            outputs.append(Output(routing.candidates_topic, key, candidate.to_bytes(), source=r))
    return outputs


class ScoringWorker(BundleWorker):
    role = "scoring"

    def __init__(self, settings: Settings):
        super().__init__(settings)
        self.scorer = scorer_from_bundle(self.bundle, settings, inverter=None)  # scoring workers never invert
        if self.scorer.adapts_remotely:
            self.bank = self.scorer.bank  # followed from ood.negatives
        t = settings.topics
        self.routing = Routing(
            scores_topic=t.scores, alerts_topic=t.alerts, candidates_topic=t.candidates, threshold=settings.method.threshold,
            candidate_below=settings.method.beta if self.scorer.adapts_remotely else None, method=self.scorer.name,
            model_id=self.loaded.model_id, worker=self.name, class_names=self.bundle.class_names,
        )
        self.pool = ThreadPoolExecutor(settings.worker.decode_threads, thread_name_prefix="decode")
        try:
            self.preprocessor = BatchPreprocessor.for_model(self.loaded.model, self.loaded.crop_fraction)
        except UnsupportedTransform:
            self.preprocessor = None  # the model's own per-image transform
        self.gpu_decode = settings.worker.gpu_decode and self.loaded.device.type == "cuda" and self.preprocessor is not None
        self.frames_scored = 0
        self.adaptations = 0  # changes this replica made to its own state (AdaNeg's memory writes)

    def input(self) -> tuple[str, str, int]:
        s = self.settings
        return s.topics.frames, s.kafka.scoring_group, s.worker.batch_size

    def counters(self) -> dict:
        return {"method": self.scorer.name, "frames_scored": self.frames_scored, "adaptations": self.adaptations}

    def close(self) -> None:
        self.pool.shutdown(wait=True)

    # --- one batch: prepare (decode threads, overlapped with the previous batch) then handle ---
    def _decode(self, frame: Frame):
        """Frame bytes -> uint8 array for the batched transform (or the model's own transform)."""
        images = self.settings.images
        short = self.preprocessor.short_side if self.preprocessor is not None else None
        image = decode_image(frame.record.value, max_bytes=images.max_bytes, max_pixels=images.max_pixels, draft_short_side=short,
                             max_aspect_ratio=images.max_aspect_ratio, content_type=frame.content_type)
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
        prepared = Prepared()
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
        prepared = prepared if prepared is not None else self.decode_batch(records)
        outputs = [self._reject_frame(record, reason, detail) for record, reason, detail in prepared.rejected]
        kept = prepared.frames
        if not kept:
            return outputs
        decoded = time.perf_counter()
        emb_device = self.loaded.encode_images(prepared.batch)  # stays on the GPU for the score
        encoded = time.perf_counter()
        result = self.scorer.score(emb_device)
        emb = emb_device.cpu().numpy()
        explanations = self.scorer.explain(emb, self.settings.method.explain_top)
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
        produced = to_outputs(kept, emb, result, explanations, self.routing, bank_version=bank.version if bank is not None else 0,
                              bank_size=len(bank.entries) if bank is not None else 0, now_ms=now_ms, timings=timings)
        if self.scorer.adapts and not self.scorer.adapts_remotely:  # AdaNeg: this replica's own memory, for the next batch
            self.adaptations += self.scorer.apply(self.scorer.propose(emb, result, [f.frame_id for f in kept]))
        t = self.settings.topics
        for output in produced:
            outcome = {t.scores: "scored", t.alerts: "alert", t.candidates: "candidate"}[output.topic]
            self.metrics.frames.labels(outcome=outcome).inc()
        for frame in kept:
            if frame.ts_ms is not None:
                self.metrics.end_to_end_seconds.observe(max(0.0, now_ms - frame.ts_ms) / 1000)
        self.frames_scored += n
        return outputs + produced

    def _reject_frame(self, record: ConsumerRecord, reason: str, detail: str) -> Output:
        self.metrics.frames.labels(outcome="deadletter").inc()
        return self.reject(record, reason, detail)



def run_scoring_worker(settings: Settings) -> int:
    return ScoringWorker.main(settings)
