"""One scorer interface, one class per method (as OpenOOD's postprocessors).

The evaluator and the workers hold a :class:`Scorer` and never ask which method it is.
Only InterNeg adapts at test time: ``propose`` turns confidently-OOD images into
candidate negatives (possibly slowly, elsewhere), ``apply`` adds them to its bank.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar, Sequence

import numpy as np
import torch

from pipeline.arrays import as_tensor
from pipeline.bank import NegativeBank
from pipeline.inversion import Inverter
from pipeline.scoring import grouped_logits_score
from pipeline.selection import base_similarity, deviation


@dataclass
class Scores:
    score: np.ndarray  # (B,) float64, high = in-distribution
    id_class: np.ndarray  # (B,) index of the most likely ID class
    id_prob: np.ndarray  # (B,) its probability among the ID classes


@dataclass(frozen=True)
class Proposal:
    """An admissible inverted negative, not yet in any bank."""

    vector: np.ndarray
    deviation: float
    origin: str


@dataclass
class AdaptStats:
    candidates: int = 0
    inadmissible: int = 0
    admitted: int = 0
    refused: dict[str, int] = field(default_factory=dict)


def _id_prediction(id_logits: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    probs = torch.softmax(id_logits.double(), dim=1)  # float64: MCM's score is this probability
    top = probs.max(dim=1)
    return top.indices.cpu().numpy(), top.values.cpu().numpy()


class Scorer(ABC):
    name: ClassVar[str]

    @abstractmethod
    def score(self, image_emb: np.ndarray) -> Scores: ...

    def explain(self, image_emb: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        """The negatives that weighed most for each image (none for methods without negatives)."""
        return [[] for _ in range(len(image_emb))]

    def reset(self) -> None:
        """Forget test-time state (the paper resets per OOD test set)."""

    def propose(self, image_emb: np.ndarray, scores: Scores, origins: Sequence[str], stats: AdaptStats | None = None) -> list[Proposal]:
        return []

    def apply(self, proposals: Sequence[Proposal], stats: AdaptStats | None = None) -> int:
        return 0


class MCMScorer(Scorer):
    name = "mcm"

    def __init__(self, id_text_emb: np.ndarray, temperature: float = 1.0):
        self.id_text = as_tensor(id_text_emb, "id_text_emb")
        self.temperature = temperature

    def score(self, image_emb) -> Scores:
        images = as_tensor(image_emb, "image_emb")
        cos = images @ self.id_text.to(images.device).T
        id_class, id_prob = _id_prediction(cos / self.temperature)
        return Scores(score=id_prob.copy(), id_class=id_class, id_prob=id_prob)


class NegLabelScorer(Scorer):
    """The grouped score against a fixed set of negatives (NegLabel, G = 100 by default)."""

    name = "neglabel"

    def __init__(self, id_text_emb: np.ndarray, bank: NegativeBank, *, scale: float, groups: int, seed: int = 0):
        self.id_text = as_tensor(id_text_emb, "id_text_emb")
        self.bank = bank
        self.scale = scale
        self.groups = groups
        self.seed = seed
        self._resident_key = None

    def _matrices(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """ID texts and negatives on the images' device, copied again only when the bank changes."""
        key = (device, self.bank.version)
        if self._resident_key != key:
            self._resident = (self.id_text.to(device), torch.from_numpy(self.bank.matrix()).to(device))
            self._resident_key = key
        return self._resident

    def score(self, image_emb) -> Scores:
        images = as_tensor(image_emb, "image_emb")
        id_text, negatives = self._matrices(images.device)
        id_logits = self.scale * images @ id_text.T
        neg_logits = self.scale * images @ negatives.T
        id_class, id_prob = _id_prediction(id_logits)
        score = grouped_logits_score(id_logits, neg_logits, self.groups, self.seed).cpu().numpy()
        return Scores(score=score, id_class=id_class, id_prob=id_prob)

    def explain(self, image_emb: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        return self.bank.explain(image_emb, k)


class InterNegScorer(NegLabelScorer):
    """The grouped score over static plus inverted negatives, growing its bank (G = 5 by default)."""

    name = "interneg"

    def __init__(
        self,
        id_text_emb: np.ndarray,
        bank: NegativeBank,
        *,
        scale: float,
        groups: int,
        beta: float,
        prototypes: np.ndarray | None,
        inverter: Inverter | None,
        seed: int = 0,
    ):
        super().__init__(id_text_emb, bank, scale=scale, groups=groups, seed=seed)
        self.beta = beta
        self.prototypes = prototypes
        self.inverter = inverter if prototypes is not None else None
        self.base = None if prototypes is None else base_similarity(self.id_text, prototypes)

    @property
    def adapts(self) -> bool:
        return self.inverter is not None

    def reset(self) -> None:
        self.bank.reset()

    def propose(self, image_emb: np.ndarray, scores: Scores, origins: Sequence[str], stats: AdaptStats | None = None) -> list[Proposal]:
        """Invert the images scoring below β and keep the admissible results (METHOD §4)."""
        picked = np.flatnonzero(scores.score < self.beta)
        if not self.adapts or len(picked) == 0:
            return []
        inverted = self.inverter.invert(np.asarray(image_emb)[picked])
        dev = deviation(inverted, self.prototypes, self.base)
        if stats is not None:
            stats.candidates += len(picked)
            stats.inadmissible += int((~dev.admissible).sum())
        return [
            Proposal(inverted[i], float(dev.degree[i]), origins[picked[i]])
            for i in np.flatnonzero(dev.admissible)
        ]

    def apply(self, proposals: Sequence[Proposal], stats: AdaptStats | None = None) -> int:
        admitted = 0
        for proposal in proposals:
            decision = self.bank.offer(proposal.vector, proposal.deviation, proposal.origin)
            admitted += decision.accepted
            if stats is not None and not decision.accepted:
                stats.refused[decision.outcome] = stats.refused.get(decision.outcome, 0) + 1
        if stats is not None:
            stats.admitted += admitted
        return admitted


def scorer_from_bundle(bundle, settings, method: str | None = None, inverter: Inverter | None = None) -> Scorer:
    """The scorer a setting names, built from a prepared bundle."""
    m = settings.method
    method = method or m.method
    if method == "mcm":
        return MCMScorer(bundle.id_text_mcm, m.mcm_temperature)
    if method == "neglabel":
        return NegLabelScorer(
            bundle.id_text, bundle.bank("neglabel", 0, settings.bank.dedup_cos), scale=bundle.logit_scale, groups=m.neglabel_groups
        )
    if method == "interneg":
        return InterNegScorer(
            bundle.id_text,
            bundle.bank("interneg", settings.bank.capacity, settings.bank.dedup_cos),
            scale=bundle.logit_scale,
            groups=m.groups,
            beta=m.beta,
            prototypes=bundle.prototypes,
            inverter=inverter if settings.inversion.enabled else None,
        )
    raise ValueError(f"unknown method {method!r}: choose mcm, neglabel or interneg")
