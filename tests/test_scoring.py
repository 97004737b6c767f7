"""The scores of METHOD §3 against hand-computed values."""
import math

import numpy as np
import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.scoring import group_permutation, grouped_score, mcm_score


def unit(*v):
    a = np.array(v, dtype=np.float64)
    return a / np.linalg.norm(a)


X = np.array([unit(1, 0)], dtype=np.float32)
ID = np.array([unit(1, 0), unit(0, 1)], dtype=np.float32)  # cos 1 and 0


def test_one_group_matches_the_formula():
    negs = np.array([unit(0.6, 0.8), unit(-1, 0)], dtype=np.float32)  # cos 0.6 and -1
    lam = 2.0
    num = math.exp(2.0) + math.exp(0.0)
    expected = num / (num + math.exp(1.2) + math.exp(-2.0))
    got = grouped_score(X, ID, negs, scale=lam, groups=1)
    assert got.shape == (1,)
    assert got[0] == pytest.approx(expected, rel=1e-6)


def test_groups_follow_the_seeded_permutation_and_are_averaged():
    cosines = [0.6, -1.0, 0.0, 0.8]
    negs = np.array([unit(c, math.sqrt(1 - c * c)) for c in cosines], dtype=np.float32)
    lam = 3.0
    perm = torch.randperm(4, generator=torch.Generator().manual_seed(0)).reshape(2, 2)
    assert torch.equal(group_permutation(4, 2, seed=0), perm)
    num = math.exp(lam) + 1.0
    per_group = [num / (num + sum(math.exp(lam * cosines[j]) for j in group)) for group in perm.tolist()]
    got = grouped_score(X, ID, negs, scale=lam, groups=2, seed=0)
    assert got[0] == pytest.approx(sum(per_group) / 2, rel=1e-6)


def test_remainder_is_dropped_from_the_end():
    rng = np.random.default_rng(1)
    negs = rng.normal(size=(5, 2)).astype(np.float32)
    negs /= np.linalg.norm(negs, axis=1, keepdims=True)
    with_fifth = grouped_score(X, ID, negs, scale=10.0, groups=2)
    changed = negs.copy()
    changed[4] = unit(1, 0)  # would dominate if it were used
    assert grouped_score(X, ID, changed, scale=10.0, groups=2)[0] == with_fifth[0]
    assert grouped_score(X, ID, negs[:4], scale=10.0, groups=2)[0] == with_fifth[0]


def test_log_sum_exp_survives_a_scale_of_100():
    negs = np.array([unit(1, 0), unit(0.99, math.sqrt(1 - 0.99**2))], dtype=np.float32)
    got = grouped_score(X, ID, negs, scale=100.0, groups=1)
    # e^100 overflows float32; in float64 by hand, divided through by e^100:
    num = 1 + math.exp(-100)
    expected = num / (num + 1 + math.exp(100 * (float(negs[1, 0]) - 1)))
    assert np.isfinite(got).all()
    assert got[0] == pytest.approx(expected, rel=1e-5)


def test_torch_in_torch_out_and_too_few_negatives_is_an_error():
    got = grouped_score(torch.from_numpy(X), torch.from_numpy(ID), torch.from_numpy(ID), scale=1.0, groups=1)
    assert isinstance(got, torch.Tensor)
    with pytest.raises(ConfigError, match="cannot fill 5 groups"):
        grouped_score(X, ID, ID, scale=1.0, groups=5)


def test_nan_input_is_refused_with_a_count():
    bad = X.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="image_emb: 1 row"):
        grouped_score(bad, ID, ID, scale=1.0, groups=1)


def test_mcm_is_the_max_softmax_of_cosines():
    assert mcm_score(X, ID)[0] == pytest.approx(math.e / (math.e + 1), rel=1e-6)
    assert mcm_score(X, ID, temperature=0.5)[0] == pytest.approx(math.exp(2) / (math.exp(2) + 1), rel=1e-6)


def test_scores_keep_their_resolution_past_an_id_margin_of_17_logits():
    """In float32, S rounds to exactly 1.0 once the ID margin passes ~17 logits: these three
    frames (margins 20, 25 and 30 logits over the one negative) tied at 1.0 before."""
    negs = np.array([unit(1, 0)], dtype=np.float32)
    frames = np.array([unit(1.0, math.tan(math.acos(c))) for c in (0.8, 0.75, 0.7)], dtype=np.float32)
    ids = np.array([unit(1, 0), unit(0, 1)], dtype=np.float32)
    # the frames' cosine to the negative and to the first ID text are equal; an ID text that
    # only the frames resemble gives the margin
    ids[1] = frames.mean(axis=0) / np.linalg.norm(frames.mean(axis=0))
    got = grouped_score(frames, ids, negs, scale=100.0, groups=1)
    assert got.dtype == np.float64
    z = 100.0 * frames.astype(np.float64) @ ids.T.astype(np.float64)
    zn = 100.0 * frames.astype(np.float64) @ negs.T.astype(np.float64)
    lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
    expected = 1.0 / (1.0 + np.exp(zn[:, 0] - lse))
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert (got < 1.0).all() and len(set(got.tolist())) == 3
    # the scorers carry it through
    from pipeline.bank import NegativeBank
    from pipeline.methods.neglabel import NegLabel as NegLabelScorer

    scores = NegLabelScorer(ids, NegativeBank(negs, ["n"], capacity=0), scale=100.0, groups=1).score(frames)
    assert scores.score.dtype == np.float64 and len(set(scores.score.tolist())) == 3
