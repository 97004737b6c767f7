"""The inversion worker: candidates in, inverted negatives (and tombstones) out.

One consumer group on ``ood.candidates``. Its bank is rebuilt from ``ood.negatives`` at
start and follows it, so it decides admission, ranking and eviction on the same state
every scoring worker will hold. A negative's id is derived from its origin frame, so a
redelivered candidate is recognised and never published twice.
"""
from __future__ import annotations

import time
from collections import OrderedDict

import numpy as np
from kafka.consumer.fetcher import ConsumerRecord
from pydantic import ValidationError

from pipeline.errors import ConfigError
from pipeline.inversion import TextInverter
from pipeline.methods import scorer_from_bundle
from pipeline.scorers import AdaptStats, Scores
from schemas.messages import Candidate
from schemas.settings import Settings
from workers.delivery import Output
from workers.negatives import negative_id, negative_output, tombstone_output
from workers.worker import BundleWorker


UNIT_TOLERANCE = 1e-3  # as NegativeBank.put: float16 on the wire and float32 sums stay well inside
MAX_CAMERAS = 10_000  # camera ids with a bucket; the least recently seen is forgotten (it refills to a full burst)


class TokenBucket:
    def __init__(self, rate: float, burst: int, now: float):
        self.rate, self.burst, self.tokens, self.at = rate, burst, float(burst), now

    def refill(self, now: float) -> None:
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now


class CameraRateLimit:
    """Token buckets per camera id and over all of them, on this worker's clock (a record's
    own timestamps could be forged to refill them)."""

    def __init__(self, rate: float, burst: int, total_rate: float, total_burst: int, clock=time.monotonic):
        self.rate, self.burst, self.clock = rate, burst, clock
        self.total = TokenBucket(total_rate, total_burst, clock())
        self.cameras: OrderedDict[str, TokenBucket] = OrderedDict()

    def take(self, camera: str) -> bool:
        now = self.clock()
        bucket = self.cameras.pop(camera, None) or TokenBucket(self.rate, self.burst, now)
        self.cameras[camera] = bucket  # most recently seen last
        while len(self.cameras) > MAX_CAMERAS:
            self.cameras.popitem(last=False)
        bucket.refill(now)
        self.total.refill(now)
        if bucket.tokens < 1 or self.total.tokens < 1:
            return False
        bucket.tokens -= 1
        self.total.tokens -= 1
        return True


class InversionWorker(BundleWorker):
    role = "inversion"

    def __init__(self, settings: Settings):
        super().__init__(settings)
        if self.bundle.prototypes is None:
            raise ConfigError(
                f"{settings.worker.bundle}: bundle has no image prototypes (made from a class list), so inversion is unavailable"
            )
        if self.verifier is not None and self.signer is None:
            raise ConfigError("the workers check negatives against INTERNEG_BANK__VERIFY_KEY, but the inversion worker has no "
                             "INTERNEG_BANK__SIGNING_KEY: every negative it publishes would be refused")
        self.inverter = TextInverter(self.loaded, settings.inversion, self.bundle.prototypes)
        # the scorer the scoring workers run, over this worker's bank (followed from ood.negatives): the same
        # propose/apply path as the offline evaluator, with its inverter
        self.scorer = scorer_from_bundle(self.bundle, settings, "interneg", inverter=self.inverter)
        self.bank = self.scorer.bank
        inv = settings.inversion
        self.rate = CameraRateLimit(inv.camera_rate, inv.camera_burst, inv.total_rate, inv.total_burst)
        self.candidates_seen = 0
        self.stale = 0
        self.rate_limited = 0
        self.published = 0

    def input(self) -> tuple[str, str, int]:
        s = self.settings
        return s.topics.candidates, s.kafka.inversion_group, s.worker.inversion_batch_size

    def counters(self) -> dict:
        return {"candidates": self.candidates_seen, "stale": self.stale, "rate_limited": self.rate_limited, "published": self.published}

    def handle(self, records: list[ConsumerRecord], prepared=None) -> list[Output]:
        topic = self.settings.topics.negatives
        outputs = self.restore_bound()
        candidates, vectors, sources = [], [], []
        oldest_ms = (time.time() - self.settings.inversion.max_candidate_age_s) * 1000
        for record in records:
            if record.timestamp < oldest_ms:  # the broker's time of the candidate: skipping is cheap, inverting is not
                self.stale += 1
                self.metrics.inverted.labels(outcome="stale").inc()
                continue
            try:
                candidate = Candidate.from_bytes(record.value or b"")
                vector = candidate.embedding.to_numpy(model_id=self.loaded.model_id, dim=self.loaded.embed_dim)
                if abs(float(np.linalg.norm(vector)) - 1) > UNIT_TOLERANCE:
                    raise ValueError(f"the embedding has norm {np.linalg.norm(vector):.4g}, an image embedding has norm 1")
            except ValidationError as exc:
                outputs.append(self.reject(record, "malformed-candidate", str(exc.errors()[0].get("msg", exc))))
                continue
            except ValueError as exc:  # another model's or another width's vector, or not an embedding at all
                outputs.append(self.reject(record, "wrong-vector", str(exc)))
                continue
            candidates.append(candidate)
            vectors.append(vector)
            sources.append(record)
        published = self.follower.seen_ids | self.bank.entries.keys()
        fresh = [i for i, c in enumerate(candidates) if negative_id(c.frame_id) not in published]
        if not fresh:
            self.candidates_seen += len(candidates)
            return outputs
        # the score is recomputed, never read from the record: only confidently-OOD embeddings are inverted
        scores = self.scorer.score(np.stack([vectors[i] for i in fresh]))
        beta = self.settings.method.beta
        kept = []
        for j, i in enumerate(fresh):
            if scores.score[j] >= beta:
                outputs.append(self.reject(sources[i], "not-confidently-ood",
                                           f"its score is {scores.score[j]:.4f} here, not below beta {beta} (the record says {candidates[i].score:.4f})"))
            elif self._within_rate(candidates[i].camera_id):  # the rate limit spends only on what would be inverted
                kept.append(j)
        if not kept:
            self.candidates_seen += len(candidates)
            return outputs
        origins = [candidates[fresh[j]].frame_id for j in kept]
        stats = AdaptStats()
        proposals = self.scorer.propose(np.stack([vectors[fresh[j]] for j in kept]), _rows(scores, kept), origins, stats, as_published=True)
        for _ in range(stats.inadmissible):
            self.metrics.inverted.labels(outcome="inadmissible").inc()
        for proposal in proposals:  # one at a time: a negative is published while it is in the bank, before a
            # later one of this batch can evict it (its tombstone then follows it)
            self.scorer.apply([proposal], ids=[negative_id(proposal.origin)], created=time.time())
            decision = self.scorer.decisions[0]
            self.metrics.inverted.labels(outcome=decision.outcome).inc()
            if not decision.accepted:
                continue
            self.follower.seen_ids.add(decision.id)
            entry = self.bank.entries[decision.id]
            outputs.append(negative_output(topic, entry, self.bank.vector(decision.id), self.loaded.model_id, self.signer))
            self.metrics.negatives_published.labels(kind="negative").inc()
            for evicted in decision.evicted:
                outputs.append(tombstone_output(topic, evicted, self.signer))
                self.metrics.negatives_published.labels(kind="tombstone").inc()
        self.published += sum(1 for o in outputs if o.topic == topic and o.value is not None)
        self.candidates_seen += len(candidates)  # last, so a reader of status sees a finished batch
        return outputs

    def _within_rate(self, camera: str) -> bool:
        if self.rate.take(camera):
            return True
        self.rate_limited += 1
        self.metrics.inverted.labels(outcome="rate_limited").inc()
        return False

    def restore_bound(self) -> list[Output]:
        """Tombstones for what the bank's bound evicted while following the topic without a
        tombstone there: a predecessor killed between publishing a negative and the tombstone
        of what it evicted leaves one entry too many on the compacted topic, and a replica
        replaying the compacted topic later would otherwise keep it."""
        excess = sorted(self.follower.unannounced)
        self.follower.unannounced.clear()
        for negative in excess:
            self.metrics.negatives_published.labels(kind="tombstone").inc()
            self.log.info("bound restored", evicted=negative)
        return [tombstone_output(self.settings.topics.negatives, negative, self.signer) for negative in excess]

    def on_abort(self) -> None:
        """An aborted transaction took this batch's negatives with it, but ``handle`` had
        already put them in the bank: rebuild the bank from what the topic really holds."""
        self.bank.reset()
        self.follower.restart()
        self.follower.catch_up(beat=self.ops.beat)
        self._bank_metrics()


def _rows(scores: Scores, rows: list[int]) -> Scores:
    return Scores(score=scores.score[rows], id_class=scores.id_class[rows], id_prob=scores.id_prob[rows])


def run_inversion_worker(settings: Settings) -> int:
    return InversionWorker.main(settings)
