"""MCM (Ming et al., NeurIPS 2022): the maximum softmax over the ID label texts alone."""
from __future__ import annotations

import numpy as np

from pipeline.arrays import as_tensor
from pipeline.classes import MCM_PROMPT
from pipeline.scorers import MethodInputs, MethodState, Scorer, Scores
from pipeline.scoring import id_prediction


class MCM(Scorer):
    """S(x) = max_k softmax_k(cos(x, t_k) / T), with MCM's own prompt (docs/METHOD.md §3)."""

    name = "mcm"

    def __init__(self, id_text_emb: np.ndarray, temperature: float = 1.0):
        self.id_text = as_tensor(id_text_emb, "id_text_emb")
        self.temperature = temperature

    @classmethod
    def prepare(cls, inputs: MethodInputs, settings) -> MethodState:
        return MethodState(arrays={"id_text": inputs.encode([MCM_PROMPT.format(n) for n in inputs.class_names])})

    @classmethod
    def from_bundle(cls, bundle, settings, inverter=None) -> "MCM":
        return cls(bundle.state(cls.name).arrays["id_text"], settings.method.mcm_temperature)

    def score(self, image_emb) -> Scores:
        images = as_tensor(image_emb, "image_emb")
        cos = images @ self.id_text.to(images.device).T
        id_class, id_prob = id_prediction(cos / self.temperature)
        return Scores(score=id_prob.copy(), id_class=id_class, id_prob=id_prob)
