"""Choosing negative labels from the lexicon (METHOD §2).

Inter-modal selection (InterNeg) measures each candidate against the ID image
prototypes; NegLabel's intra-modal selection against the ID label texts. Both return
indices into the candidate array, each part ordered by how far from ID the candidate is
(ties by word, or by index when no words are given), the parts in the order each
method's released code stacks them: InterNeg adjectives first, NegLabel nouns first. The
order matters: the grouped score's permutation runs over positions (METHOD §2.6).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from pipeline.arrays import ArrayLike, as_tensor


@dataclass(frozen=True)
class Deviation:
    """The admissibility test and deviation degree of some embeddings (METHOD §2 steps 1-4)."""

    admissible: np.ndarray  # (N,) bool: cos(e, v_k) < b_k for every k
    degree: np.ndarray  # (N,) float64: mean_k (b_k - cos(e, v_k))


def base_similarity(id_text_emb: ArrayLike, prototypes: ArrayLike) -> np.ndarray:
    """b_k = cos(t_k, v_k)."""
    t = as_tensor(id_text_emb, "id_text_emb").double().numpy()
    v = as_tensor(prototypes, "prototypes").double().numpy()
    if t.shape != v.shape:
        raise ValueError(f"ID text embeddings {t.shape} and prototypes {v.shape} must have the same shape")
    return np.einsum("kd,kd->k", t, v)


def deviation(emb: ArrayLike, prototypes: ArrayLike, base: np.ndarray) -> Deviation:
    """Admissibility and deviation degree of each row of ``emb`` against the prototypes."""
    e = as_tensor(emb, "emb").double().numpy()
    v = as_tensor(prototypes, "prototypes").double().numpy()
    sims = e @ v.T  # (N, K)
    gaps = np.asarray(base, dtype=np.float64)[None, :] - sims
    return Deviation(admissible=(gaps > 0).all(axis=1), degree=gaps.mean(axis=1))


def _ranked(indices: np.ndarray, key: np.ndarray, words: Sequence[str] | None, descending: bool) -> np.ndarray:
    """Sort ``indices`` by key (descending or ascending), ties by word then index."""
    primary = -key[indices] if descending else key[indices]
    tie = np.array([words[i] for i in indices], dtype=object) if words is not None else indices
    # np.lexsort sorts by the last key first
    order = np.lexsort((indices, tie, primary)) if words is not None else np.lexsort((indices, primary))
    return indices[order]


def _check_candidates(cand_emb: ArrayLike, is_adjective: ArrayLike, words: Sequence[str] | None) -> np.ndarray:
    flags = np.asarray(is_adjective, dtype=bool)
    n = as_tensor(cand_emb, "cand_emb").shape[0]
    if flags.shape != (n,):
        raise ValueError(f"is_adjective has shape {flags.shape}, expected ({n},)")
    if words is not None and len(words) != n:
        raise ValueError(f"{len(words)} words for {n} candidate embeddings")
    return flags


def split_budget(m: int, n_adj: int, n_noun: int) -> tuple[int, int]:
    """M_adj = int(M * (n_adj / (n_adj + n_noun))), M_noun = M - M_adj, each capped by its pool.

    A float product truncated, as the released code computes it: it can differ from the
    exact floor by one (M = 100, 29 of 100 admissible are adjectives: 28, not 29).
    """
    total = n_adj + n_noun
    if total == 0:
        return 0, 0
    m_adj = int(m * (n_adj / total))
    m_noun = m - m_adj
    return min(m_adj, n_adj), min(m_noun, n_noun)


def select_intermodal(
    cand_emb: ArrayLike,
    is_adjective: ArrayLike,
    id_text_emb: ArrayLike,
    prototypes: ArrayLike,
    m: int,
    *,
    words: Sequence[str] | None = None,
) -> np.ndarray:
    """InterNeg's selection: the top-M admissible candidates by deviation degree, adjectives first."""
    flags = _check_candidates(cand_emb, is_adjective, words)
    dev = deviation(cand_emb, prototypes, base_similarity(id_text_emb, prototypes))
    nouns = np.flatnonzero(dev.admissible & ~flags)
    adjs = np.flatnonzero(dev.admissible & flags)
    m_adj, m_noun = split_budget(m, len(adjs), len(nouns))
    chosen_nouns = _ranked(nouns, dev.degree, words, descending=True)[:m_noun]
    chosen_adjs = _ranked(adjs, dev.degree, words, descending=True)[:m_adj]
    return np.concatenate([chosen_adjs, chosen_nouns]).astype(np.int64)


def neglabel_distance(cand_emb: ArrayLike, id_text_emb: ArrayLike, percentile: float = 0.95) -> np.ndarray:
    """η-quantile of cos(e_c, t_k) over k, interpolated linearly between the two nearest
    ranks (``torch.quantile``, as NegLabel's released code), in float32 as it computes it."""
    c = as_tensor(cand_emb, "cand_emb").float()
    t = as_tensor(id_text_emb, "id_text_emb").float()
    rows = max(1, 2**24 // max(1, t.shape[0]))  # torch.quantile refuses inputs past 2**24 elements
    parts = [torch.quantile(c[i : i + rows] @ t.T, percentile, dim=1) for i in range(0, len(c), rows)]
    return (torch.cat(parts) if parts else torch.zeros(0)).double().numpy()


def select_neglabel(
    cand_emb: ArrayLike,
    is_adjective: ArrayLike,
    id_text_emb: ArrayLike,
    fraction: float = 0.15,
    percentile: float = 0.95,
    *,
    words: Sequence[str] | None = None,
) -> np.ndarray:
    """NegLabel's selection: the lowest ``fraction`` of nouns and of adjectives by η-quantile similarity."""
    flags = _check_candidates(cand_emb, is_adjective, words)
    return select_lowest_per_part(neglabel_distance(cand_emb, id_text_emb, percentile), flags, fraction, words=words)


def select_lowest_per_part(distance: np.ndarray, is_adjective: ArrayLike, fraction: float, *,
                           words: Sequence[str] | None = None) -> np.ndarray:
    """The lowest ``fraction`` of nouns and of adjectives by ``distance``, nouns first (NegLabel, CSP)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    flags = np.asarray(is_adjective, dtype=bool)
    parts = []
    for pool in (np.flatnonzero(~flags), np.flatnonzero(flags)):
        keep = int(len(pool) * fraction)
        parts.append(_ranked(pool, distance, words, descending=False)[:keep])
    return np.concatenate(parts).astype(np.int64)


def sorted_index_distance(cand_emb: ArrayLike, id_text_emb: ArrayLike, percentile: float = 0.95) -> np.ndarray:
    """The cos to the ID texts at sorted position ``int(K * percentile)`` (no interpolation),
    as AdaNeg's and InterNeg's released code compute NegLabel's distance."""
    sims = as_tensor(cand_emb, "cand_emb").float() @ as_tensor(id_text_emb, "id_text_emb").float().T
    index = min(int(sims.shape[1] * percentile), sims.shape[1] - 1)
    return sims.sort(dim=1).values[:, index].double().numpy()


def select_adaneg(
    cand_emb: ArrayLike,
    is_adjective: ArrayLike,
    id_text_emb: ArrayLike,
    m: int,
    percentile: float = 0.95,
    *,
    words: Sequence[str] | None = None,
) -> np.ndarray:
    """AdaNeg's selection: the M candidates farthest from the ID texts by the sorted-index
    distance, M split between adjectives and nouns in proportion to the whole pools
    (:func:`split_budget`), adjectives first."""
    flags = _check_candidates(cand_emb, is_adjective, words)
    distance = sorted_index_distance(cand_emb, id_text_emb, percentile)
    adjs, nouns = np.flatnonzero(flags), np.flatnonzero(~flags)
    m_adj, m_noun = split_budget(m, len(adjs), len(nouns))
    return np.concatenate([
        _ranked(adjs, distance, words, descending=False)[:m_adj],
        _ranked(nouns, distance, words, descending=False)[:m_noun],
    ]).astype(np.int64)
