"""NegLabel (Jiang et al., ICLR 2024): the grouped score against negatives chosen by their
distance to the ID label texts (docs/METHOD.md §2, §3)."""
from __future__ import annotations

import numpy as np
import torch

from pipeline.arrays import as_tensor
from pipeline.bank import NegativeBank
from pipeline.scorers import MethodInputs, MethodState, Scorer, Scores
from pipeline.scoring import grouped_logits_score, id_prediction
from pipeline.selection import select_neglabel


class NegLabel(Scorer):
    """The grouped score against a fixed set of negatives (G = 100 by default)."""

    name = "neglabel"

    def __init__(self, id_text_emb: np.ndarray, bank: NegativeBank, *, scale: float, groups: int, seed: int = 0):
        self.id_text = as_tensor(id_text_emb, "id_text_emb")
        self.bank = bank
        self.scale = scale
        self.groups = groups
        self.seed = seed
        self._resident_key = None

    @classmethod
    def prepare(cls, inputs: MethodInputs, settings) -> MethodState:
        m = settings.method
        lex = inputs.lexicon
        chosen = select_neglabel(inputs.lexicon_emb, lex.is_adjective, inputs.id_text, m.neglabel_fraction,
                                 m.neglabel_percentile, words=lex.words)
        return MethodState(arrays={"negatives": inputs.lexicon_emb[chosen]}, words={"words": [lex.words[i] for i in chosen]},
                           info={"negatives": len(chosen)})

    @classmethod
    def from_bundle(cls, bundle, settings, inverter=None) -> "NegLabel":
        bank = bundle.bank(cls.name, 0, settings.bank.dedup_cos)
        return cls(bundle.id_text, bank, scale=bundle.logit_scale, groups=settings.method.neglabel_groups)

    @property
    def has_negatives(self) -> bool:
        return True

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
        id_class, id_prob = id_prediction(id_logits)
        score = grouped_logits_score(id_logits, neg_logits, self.groups, self.seed).cpu().numpy()
        return Scores(score=score, id_class=id_class, id_prob=id_prob)

    def explain(self, image_emb: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        return self.bank.explain(image_emb, k)
