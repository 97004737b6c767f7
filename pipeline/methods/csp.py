"""CSP (Chen et al., NeurIPS 2024, "Conjugated Semantic Pool"): NegLabel's score over a
larger negative pool, in which every adjective is conjugated with a superclass word
("{adjective} creature", "{adjective} landscape", ...) so that it names a cluster of
things rather than a property, and every prompt is an ensemble of templates
(docs/METHOD.md §3b). Written from the authors' released code (MengyuanChen21/NeurIPS2024-CSP).
"""
from __future__ import annotations

import random

import numpy as np

from pipeline.methods.neglabel import NegLabel
from pipeline.scorers import MethodInputs, MethodState, TextEncoder
from pipeline.selection import select_lowest_per_part, neglabel_distance

NOUN_TEMPLATES = (
    "a close-up photo of the nice {}.",
    "a photo with the nice {}.",
    "a good photo with the nice {}.",
    "a photo of the nice {}.",
    "{}",
    "the {}",
    "the good {}",
    "the nice {}",
)
# the superclass words an adjective is conjugated with, one drawn per adjective
CONJUGATIONS = (
    "{} environment", "{} space", "{} object", "{} scene", "{} place", "{} item", "{} area",
    "{} view", "{} thing", "{} pattern", "{} structure", "{} landscape", "{} vista", "{} creature",
)
ADJECTIVE_TEMPLATES = ("{}", "a nice photo of {}", "a good photo of {}", "a close-up photo of {}")
NEAR_DUPLICATE_COS = 0.95  # a candidate this close to some ID text is never a negative


def ensemble(encode: TextEncoder, phrases: list[str], templates: tuple[str, ...]) -> np.ndarray:
    """normalise(mean over templates of E_T(template.format(phrase))), one row per phrase."""
    prompts = [t.format(p) for p in phrases for t in templates]
    emb = encode(prompts).reshape(len(phrases), len(templates), -1).mean(axis=1)
    return (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)


def conjugate(adjectives: list[str], seed: int) -> list[str]:
    """Each adjective with one superclass word, drawn in order from a generator seeded once."""
    draw = random.Random(seed)
    return [draw.choice(CONJUGATIONS).format(a) for a in adjectives]


def csp_distance(cand_emb: np.ndarray, id_text: np.ndarray, percentile: float) -> np.ndarray:
    """NegLabel's η-quantile of cos to the ID texts, set to 1 (never chosen) for a candidate
    whose cos to any ID text exceeds 0.95: a near-duplicate of a class name."""
    distance = neglabel_distance(cand_emb, id_text, percentile)
    nearest = (np.asarray(cand_emb, np.float32) @ np.asarray(id_text, np.float32).T).max(axis=1) if len(cand_emb) else np.zeros(0)
    distance[nearest > NEAR_DUPLICATE_COS] = 1.0
    return distance


class CSP(NegLabel):
    """NegLabel's grouped score (G = 100) over the conjugated pool and template-ensembled texts."""

    name = "csp"

    @classmethod
    def prepare(cls, inputs: MethodInputs, settings) -> MethodState:
        m = settings.method
        lex = inputs.lexicon
        phrase = lambda w: w.replace("_", " ")  # noqa: E731 - WordNet joins compound words with '_'
        nouns = [phrase(w) for w, adj in zip(lex.words, lex.is_adjective) if not adj]
        adjectives = conjugate([phrase(w) for w, adj in zip(lex.words, lex.is_adjective) if adj], m.csp_seed)
        id_text = ensemble(inputs.encode, inputs.class_names, NOUN_TEMPLATES)
        pool = np.concatenate([ensemble(inputs.encode, nouns, NOUN_TEMPLATES), ensemble(inputs.encode, adjectives, ADJECTIVE_TEMPLATES)])
        is_adjective = np.r_[np.zeros(len(nouns), bool), np.ones(len(adjectives), bool)]
        words = nouns + adjectives
        distance = csp_distance(pool, id_text, m.neglabel_percentile)
        chosen = select_lowest_per_part(distance, is_adjective, m.neglabel_fraction, words=words)
        return MethodState(
            arrays={"id_text": id_text, "negatives": pool[chosen]},
            words={"words": [words[i] for i in chosen]},
            info={"pool": len(words), "negatives": len(chosen), "adjectives": int(is_adjective[chosen].sum())},
        )

    @classmethod
    def from_bundle(cls, bundle, settings, inverter=None) -> "CSP":
        state = bundle.state(cls.name)
        bank = bundle.bank(cls.name, 0, settings.bank.dedup_cos)
        return cls(state.arrays["id_text"], bank, scale=bundle.logit_scale, groups=settings.method.csp_groups)
