"""AdaNeg (Zhang & Zhang, NeurIPS 2024): negatives that adapt at test time. Every label (ID
class or negative) keeps a small memory of test images confidently assigned to it; the
score is the grouped score against the labels' memory-adapted features plus a fraction
of the grouped score against their texts (docs/METHOD.md §4b). Written from the authors'
released code (YBZh/OpenOOD-VLM, ``TTAPromptPostprocessor_noadagap``, as its ImageNet
script runs it).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from pipeline.arrays import as_tensor
from pipeline.bank import NegativeBank
from pipeline.scorers import AdaptStats, MethodInputs, MethodState, Proposal, Scorer, Scores
from pipeline.scoring import grouped_logits_score
from pipeline.selection import select_adaneg

ENTROPY_EPS = 1e-8  # inside the log, as released


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """-Σ p log(p + 1e-8) of softmax(logits), per row, in float64."""
    p = torch.softmax(logits.double(), dim=1)
    return -(p * torch.log(p + ENTROPY_EPS)).sum(dim=1)


class AdaNeg(Scorer):
    name = "adaneg"

    def __init__(self, id_text_emb: np.ndarray, bank: NegativeBank, *, scale: float, groups: int, memory_length: int,
                 threshold: float, gap: float, mix: float, seed: int = 0):
        if memory_length < 2:
            raise ValueError(f"the memory length must be at least 2 (the text and one image), got {memory_length}")
        self.id_text = as_tensor(id_text_emb, "id_text_emb").float()
        self.bank = bank  # the static negatives (explanations read them); never grows
        self.labels = torch.cat([self.id_text, torch.from_numpy(bank.matrix()).float()])  # (L, D): ID first
        self.k = len(self.id_text)
        self.scale, self.groups, self.seed = scale, groups, seed
        # as released: a label's memory holds its text and memory_length - 1 images
        self.capacity = memory_length - 1
        self.id_above = threshold + gap * (1 - threshold)  # vanilla score above: an ID image for the memory
        self.ood_below = threshold - gap * threshold  # below: an OOD image for its nearest negative's memory
        self.mix = mix
        self.reset()

    @classmethod
    def prepare(cls, inputs: MethodInputs, settings) -> MethodState:
        lex, m = inputs.lexicon, settings.method
        chosen = select_adaneg(inputs.lexicon_emb, lex.is_adjective, inputs.id_text, m.adaneg_negatives,
                               m.neglabel_percentile, words=lex.words)
        return MethodState(arrays={"negatives": inputs.lexicon_emb[chosen]}, words={"words": [lex.words[i] for i in chosen]},
                           info={"negatives": len(chosen), "adjectives": int(lex.is_adjective[chosen].sum())})

    @classmethod
    def from_bundle(cls, bundle, settings, inverter=None) -> "AdaNeg":
        m = settings.method
        bank = bundle.bank(cls.name, 0, None)
        return cls(bundle.id_text, bank, scale=bundle.logit_scale, groups=m.adaneg_groups, memory_length=m.adaneg_memory,
                   threshold=m.adaneg_threshold, gap=m.adaneg_gap, mix=m.adaneg_mix)

    @property
    def adapts(self) -> bool:
        return True

    @property
    def has_negatives(self) -> bool:
        return True

    def reset(self) -> None:
        n, d = self.labels.shape
        self.memory = torch.zeros(n, self.capacity, d, dtype=torch.float32)
        self.entropies = torch.zeros(n, self.capacity, dtype=torch.float64)
        self.filled = torch.zeros(n, dtype=torch.long)
        self._features = None

    def features(self) -> torch.Tensor:
        """Each label's adapted feature: normalise(text + Σ remembered images)."""
        if self._features is None:
            summed = self.labels + self.memory.sum(dim=1)
            self._features = summed / summed.norm(dim=1, keepdim=True)
        return self._features

    def _vanilla(self, images: torch.Tensor) -> torch.Tensor:
        return self.scale * images @ self.labels.to(images.device).T

    def _grouped(self, logits: torch.Tensor) -> torch.Tensor:
        return grouped_logits_score(logits[:, : self.k], logits[:, self.k :], self.groups, self.seed)

    def score(self, image_emb) -> Scores:
        images = as_tensor(image_emb, "image_emb").float()
        vanilla = self._vanilla(images)
        adapted = self.scale * images @ self.features().to(images.device).T
        score = self._grouped(adapted) + self.mix * self._grouped(vanilla)
        # the class: of softmax(vanilla) + mix * softmax(adapted) over all labels, the best ID one
        joint = torch.softmax(vanilla.double(), dim=1) + self.mix * torch.softmax(adapted.double(), dim=1)
        id_joint = joint[:, : self.k]
        top = id_joint.max(dim=1)
        return Scores(score=score.cpu().numpy(), id_class=top.indices.cpu().numpy(),
                      id_prob=(top.values / id_joint.sum(dim=1)).cpu().numpy())

    def propose(self, image_emb: np.ndarray, scores: Scores, origins: Sequence[str], stats: AdaptStats | None = None) -> list[Proposal]:
        """Memory writes: an image whose vanilla score (texts only, so independent of the memory)
        is confidently ID goes to its predicted class, one confidently OOD to its nearest
        negative, each ranked by the entropy of that prediction. ID writes first, as released."""
        images = as_tensor(image_emb, "image_emb").float()
        vanilla = self._vanilla(images)
        sure = self._grouped(vanilla).cpu()
        vectors = images.cpu().numpy()
        proposals = []
        for picked, logits, offset in ((sure > self.id_above, vanilla[:, : self.k], 0),
                                       (sure < self.ood_below, vanilla[:, self.k :], self.k)):
            rows = torch.nonzero(picked).flatten()
            if len(rows) == 0:
                continue
            slot = logits[rows].argmax(dim=1).cpu() + offset
            rank = entropy(logits[rows]).cpu()
            proposals += [Proposal(vectors[i], float(rank[j]), origins[i], int(slot[j])) for j, i in enumerate(rows.tolist())]
        if stats is not None:
            stats.candidates += len(proposals)
        return proposals

    def apply(self, proposals: Sequence[Proposal], stats: AdaptStats | None = None) -> int:
        """Write in order: into a free place of the label's memory, or over its highest-entropy
        image if the new one's entropy is lower; otherwise the write is refused."""
        written = 0
        for p in proposals:
            slot, n = p.slot, int(self.filled[p.slot])
            if n < self.capacity:
                place = n
                self.filled[slot] += 1
            else:
                place = int(self.entropies[slot].argmax())
                if not p.rank < float(self.entropies[slot, place]):
                    if stats is not None:
                        stats.refuse("higher-entropy")
                    continue
            self.memory[slot, place] = torch.from_numpy(np.asarray(p.vector, np.float32))
            self.entropies[slot, place] = p.rank
            written += 1
        if written:
            self._features = None
        if stats is not None:
            stats.admitted += written
        return written

    def explain(self, image_emb: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        return self.bank.explain(image_emb, k)
