"""The scores of METHOD §3: the grouped negative-label score and MCM.

Embeddings are assumed L2-normalised. Everything is computed in log space: with
λ·cos reaching 100, raw exponentials overflow float32. The reductions run in float64 and
scores come out in float64: in float32, S rounds to exactly 1.0 once a frame's ID margin
passes about 17 logits, and those ties erase the ranking that AUROC, FPR95 and a
recall-oriented threshold need (METHOD §3). The logits themselves may stay float32.
"""
from __future__ import annotations

import numpy as np
import torch

from pipeline.errors import ConfigError
from pipeline.arrays import ArrayLike, as_tensor, like_input


def group_permutation(num_negatives: int, groups: int, seed: int = 0) -> torch.Tensor:
    """Indices of the negatives in each group, shape (G, N // G).

    As the released NegLabel/InterNeg code does: the trailing N mod G negatives are
    dropped first, then the rest is shuffled with ``torch.randperm`` from a generator
    seeded with ``seed`` and cut into G equal consecutive groups.
    """
    if groups <= 0:
        raise ConfigError(f"groups must be positive, got {groups}")
    size = num_negatives // groups
    if size == 0:
        raise ConfigError(f"{num_negatives} negatives cannot fill {groups} groups; lower the groups setting")
    kept = size * groups
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(kept, generator=generator).reshape(groups, size)


def grouped_logits_score(id_logits: torch.Tensor, neg_logits: torch.Tensor, groups: int, seed: int = 0) -> torch.Tensor:
    """S(x) = mean_g Σ_k e^{z_k} / (Σ_k e^{z_k} + Σ_{j∈g} e^{z_j}), from logits, in float64."""
    index = group_permutation(neg_logits.shape[1], groups, seed).to(neg_logits.device)  # tiny; cheap to rebuild
    id_lse = torch.logsumexp(id_logits.double(), dim=1)  # (B,)
    group_lse = torch.logsumexp(neg_logits.double()[:, index], dim=2)  # (B, G)
    log_s = id_lse[:, None] - torch.logaddexp(id_lse[:, None], group_lse)
    return log_s.exp().mean(dim=1)


def grouped_score(
    image_emb: ArrayLike,
    id_text_emb: ArrayLike,
    neg_emb: ArrayLike,
    *,
    scale: float,
    groups: int,
    seed: int = 0,
) -> ArrayLike:
    """The NegLabel/InterNeg score per image (high = in-distribution), METHOD §3.

    ``scale`` is λ = exp(logit_scale). Negatives are split into ``groups`` groups by
    :func:`group_permutation`; the result has one float64 value in (0, 1] per image.
    """
    images = as_tensor(image_emb, "image_emb")
    id_text = as_tensor(id_text_emb, "id_text_emb")
    negs = as_tensor(neg_emb, "neg_emb")
    if not (images.shape[1] == id_text.shape[1] == negs.shape[1]):
        raise ValueError(
            f"embedding widths differ: images {images.shape[1]}, ID texts {id_text.shape[1]}, negatives {negs.shape[1]}"
        )
    score = grouped_logits_score(scale * images @ id_text.T, scale * images @ negs.T, groups, seed)
    return like_input(score, image_emb)


def id_prediction(id_logits: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The most likely ID class and its softmax probability among the ID classes (float64:
    MCM's score is this probability)."""
    top = torch.softmax(id_logits.double(), dim=1).max(dim=1)
    return top.indices.cpu().numpy(), top.values.cpu().numpy()


def mcm_score(image_emb: ArrayLike, id_text_emb: ArrayLike, *, temperature: float = 1.0) -> ArrayLike:
    """MCM: max_k softmax_k(cos(x, t_k) / T), METHOD §3."""
    images = as_tensor(image_emb, "image_emb")
    id_text = as_tensor(id_text_emb, "id_text_emb")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    _, prob = id_prediction((images @ id_text.T).double() / temperature)
    return like_input(torch.from_numpy(prob), image_emb)
