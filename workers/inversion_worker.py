"""The inversion worker: candidates in, inverted negatives (and tombstones) out.

One consumer group on ``ood.candidates``. Its bank is rebuilt from ``ood.negatives`` at
start and follows it, so it decides admission, ranking and eviction on the same state
every scoring worker will hold. A negative's id is derived from its origin frame, so a
redelivered candidate is recognised and never published twice.
"""
from __future__ import annotations

import time

import numpy as np
from kafka.consumer.fetcher import ConsumerRecord
from pydantic import ValidationError

from pipeline.inversion import TextInverter
from pipeline.selection import deviation
from schemas.messages import Candidate
from schemas.settings import Settings
from workers.delivery import Output
from workers.negatives import negative_id, negative_output, tombstone_output
from workers.worker import BundleWorker


class InversionWorker(BundleWorker):
    role = "inversion"

    def __init__(self, settings: Settings):
        super().__init__(settings)
        if self.bundle.prototypes is None:
            raise ValueError(
                f"{settings.worker.bundle}: bundle has no image prototypes (made from a class list), so inversion is unavailable"
            )
        self.inverter = TextInverter(self.loaded, settings.inversion, self.bundle.prototypes)
        self.base = self.bundle.base_similarity
        self.bank = self.bundle.bank("interneg", settings.bank.capacity, settings.bank.dedup_cos)
        self.candidates_seen = 0
        self.stale = 0
        self.published = 0

    def input(self) -> tuple[str, str, int]:
        s = self.settings
        return s.topics.candidates, s.kafka.inversion_group, s.worker.inversion_batch_size

    def counters(self) -> dict:
        return {"candidates": self.candidates_seen, "stale": self.stale, "published": self.published}

    def handle(self, records: list[ConsumerRecord], prepared=None) -> list[Output]:
        topic = self.settings.topics.negatives
        outputs = self.restore_bound()
        candidates, vectors = [], []
        oldest_ms = (time.time() - self.settings.inversion.max_candidate_age_s) * 1000
        for record in records:
            if record.timestamp < oldest_ms:  # the broker's time of the candidate: skipping is cheap, inverting is not
                self.stale += 1
                self.metrics.inverted.labels(outcome="stale").inc()
                continue
            try:
                candidate = Candidate.from_bytes(record.value or b"")
                vectors.append(candidate.embedding.to_numpy(model_id=self.loaded.model_id, dim=self.loaded.embed_dim))
                candidates.append(candidate)
            except ValidationError as exc:
                outputs.append(self.reject(record, "malformed-candidate", str(exc.errors()[0].get("msg", exc))))
            except ValueError as exc:  # another model's or another width's vector
                outputs.append(self.reject(record, "wrong-vector", str(exc)))
        published = self.follower.seen_ids | self.bank.entries.keys()
        fresh = [i for i, c in enumerate(candidates) if negative_id(c.frame_id) not in published]
        if not fresh:
            self.candidates_seen += len(candidates)
            return outputs
        images = np.stack([vectors[i] for i in fresh])
        inverted = self.inverter.invert(images)
        dev = deviation(inverted, self.bundle.prototypes, self.base)
        for j, i in enumerate(fresh):
            candidate = candidates[i]
            if not dev.admissible[j]:
                self.metrics.inverted.labels(outcome="inadmissible").inc()
                continue
            decision = self.bank.offer(
                inverted[j], float(dev.degree[j]), candidate.frame_id, id=negative_id(candidate.frame_id), created=time.time()
            )
            self.metrics.inverted.labels(outcome=decision.outcome).inc()
            if not decision.accepted:
                continue
            self.follower.seen_ids.add(decision.id)
            entry = self.bank.entries[decision.id]
            outputs.append(negative_output(topic, entry, self.bank.vector(decision.id), self.loaded.model_id))
            self.metrics.negatives_published.labels(kind="negative").inc()
            for evicted in decision.evicted:
                outputs.append(tombstone_output(topic, evicted))
                self.metrics.negatives_published.labels(kind="tombstone").inc()
        self.published += sum(1 for o in outputs if o.topic == topic and o.value is not None)
        self.candidates_seen += len(candidates)  # last, so a reader of status sees a finished batch
        return outputs

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
        return [tombstone_output(self.settings.topics.negatives, negative) for negative in excess]

    def on_abort(self) -> None:
        """An aborted transaction took this batch's negatives with it, but ``handle`` had
        already put them in the bank: rebuild the bank from what the topic really holds."""
        self.bank.reset()
        self.follower.restart()
        self.follower.catch_up(beat=self.ops.beat)
        self._bank_metrics()


def run_inversion_worker(settings: Settings) -> int:
    return InversionWorker.main(settings)
