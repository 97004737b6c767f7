"""The scoring worker: frames in, scores, alerts and inversion candidates out.

One consumer group on ``frames``; the delivery semantics are those of
:mod:`workers.delivery`. Bank updates from ``ood.negatives`` are applied between batches,
never during one, so a batch is scored against one bank version.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from kafka.consumer.fetcher import ConsumerRecord

from pipeline.images import ImageRejected, decode_image
from pipeline.scorers import InterNegScorer, scorer_from_bundle
from schemas.messages import (
    CONTENT_TYPES,
    H_CAMERA_ID,
    H_CONTENT_TYPE,
    H_FRAME_ID,
    H_TS,
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

MAX_ID_LENGTH = 256


class FrameRejected(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass
class Frame:
    record: ConsumerRecord
    frame_id: str
    camera_id: str
    ts_ms: int | None


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


def parse_frame(record: ConsumerRecord) -> Frame:
    """The frame's identity from its headers (METHOD-independent contract of ARCHITECTURE.md)."""
    frame_id = _text_header(record, H_FRAME_ID, required=True)
    camera_id = _text_header(record, H_CAMERA_ID, required=False)
    if camera_id is None:
        camera_id = record.key.decode("utf-8", "replace") if record.key else "unknown"
    ts_text = _text_header(record, H_TS, required=False)
    ts_ms = None
    if ts_text is not None:
        if not ts_text.isdigit():
            raise FrameRejected("bad-header", f"'{H_TS}' must be milliseconds since the epoch, got {ts_text[:40]!r}")
        ts_ms = int(ts_text)
    content_type = _text_header(record, H_CONTENT_TYPE, required=False)
    if content_type is not None and content_type not in CONTENT_TYPES:
        raise FrameRejected("unsupported-content-type", f"{content_type[:60]!r}; accepted: {', '.join(CONTENT_TYPES)}")
    if record.value is None:
        raise FrameRejected("empty", "null value")
    return Frame(record, frame_id, camera_id, ts_ms)


class ScoringWorker(BundleWorker):
    role = "scoring"

    def __init__(self, settings: Settings):
        super().__init__(settings)
        self.scorer = scorer_from_bundle(self.bundle, settings, inverter=None)  # scoring workers never invert
        if isinstance(self.scorer, InterNegScorer):
            self.bank = self.scorer.bank  # followed from ood.negatives
        self.wants_candidates = isinstance(self.scorer, InterNegScorer) and self.bundle.prototypes is not None
        self.pool = ThreadPoolExecutor(settings.worker.decode_threads, thread_name_prefix="decode")
        self.frames_scored = 0

    def input(self) -> tuple[str, str, int]:
        s = self.settings
        return s.topics.frames, s.kafka.scoring_group, s.worker.batch_size

    def counters(self) -> dict:
        return {"method": self.scorer.name, "frames_scored": self.frames_scored}

    def close(self) -> None:
        self.pool.shutdown(wait=True)

    # --- one batch ---------------------------------------------------------------------
    def _prepare(self, frame: Frame) -> torch.Tensor:
        images = self.settings.images
        image = decode_image(frame.record.value, max_bytes=images.max_bytes, max_pixels=images.max_pixels)
        return self.loaded.preprocess(image)

    def handle(self, records: list[ConsumerRecord]) -> list[Output]:
        t = self.settings.topics
        start = time.perf_counter()
        outputs: list[Output] = []
        frames: list[Frame] = []
        for record in records:
            try:
                frames.append(parse_frame(record))
            except FrameRejected as exc:
                outputs.append(self._reject_frame(record, exc.reason, exc.detail))
        tensors, kept = [], []
        for frame, result in zip(frames, self.pool.map(self._decode_safely, frames)):
            if isinstance(result, ImageRejected):
                outputs.append(self._reject_frame(frame.record, result.reason, result.detail))
            else:
                tensors.append(result)
                kept.append(frame)
        decoded = time.perf_counter()
        if not kept:
            return outputs
        emb = self.loaded.encode_images(torch.stack(tensors)).cpu().numpy()
        encoded = time.perf_counter()
        result = self.scorer.score(emb)
        explanations = self.scorer.explain(emb, self.settings.method.explain_top)
        scored = time.perf_counter()
        n = len(kept)
        timings = Timings(
            decode_ms=1000 * (decoded - start) / n,
            encode_ms=1000 * (encoded - decoded) / n,
            score_ms=1000 * (scored - encoded) / n,
            batch_ms=1000 * (scored - start),
            batch_size=n,
        )
        threshold = self.settings.method.threshold
        now_ms = int(time.time() * 1000)
        bank_size = len(self.bank.entries) if self.bank is not None else 0
        bank_version = self.bank.version if self.bank is not None else 0
        for i, frame in enumerate(kept):
            r = frame.record
            score = float(result.score[i])
            message = dict(
                frame_id=frame.frame_id,
                camera_id=frame.camera_id,
                ts_ms=frame.ts_ms,
                source=SourceRef(topic=r.topic, partition=r.partition, offset=r.offset),
                method=self.scorer.name,
                score=score,
                threshold=threshold,
                verdict="ood" if score < threshold else "id",
                id_class=self.bundle.class_names[int(result.id_class[i])],
                id_prob=float(result.id_prob[i]),
                negatives=[WeighedNegative(label=label, cos=cos) for label, cos in explanations[i]],
                bank_version=bank_version,
                bank_size=bank_size,
                model_id=self.loaded.model_id,
                worker=self.name,
                scored_at_ms=now_ms,
                timings=timings,
            )
            key = frame.frame_id.encode()
            outputs.append(Output(t.scores, key, FrameScore(**message).to_bytes()))
            self.metrics.frames.labels(outcome="scored").inc()
            if score < threshold:
                outputs.append(Output(t.alerts, key, OODAlert(**message).to_bytes()))
                self.metrics.frames.labels(outcome="alert").inc()
            if self.wants_candidates and score < self.settings.method.beta:
                candidate = Candidate(
                    frame_id=frame.frame_id,
                    camera_id=frame.camera_id,
                    source=message["source"],
                    score=score,
                    embedding=Vector.from_numpy(emb[i], self.loaded.model_id),
                    created_ms=now_ms,
                )
                outputs.append(Output(t.candidates, key, candidate.to_bytes()))
                self.metrics.frames.labels(outcome="candidate").inc()
            if frame.ts_ms is not None:
                self.metrics.end_to_end_seconds.observe(max(0.0, now_ms - frame.ts_ms) / 1000)
        self.frames_scored += n
        return outputs

    def _reject_frame(self, record: ConsumerRecord, reason: str, detail: str) -> Output:
        self.metrics.frames.labels(outcome="deadletter").inc()
        return self.reject(record, reason, detail)

    def _decode_safely(self, frame: Frame):
        try:
            return self._prepare(frame)
        except ImageRejected as exc:
            return exc


def run_scoring_worker(settings: Settings) -> int:
    return ScoringWorker.main(settings)
