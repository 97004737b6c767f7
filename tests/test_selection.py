"""Negative selection (METHOD §2) on a hand-built geometry."""
import numpy as np
import pytest
import torch

from pipeline.selection import base_similarity, deviation, neglabel_distance, select_intermodal, select_neglabel, split_budget

E1, E2, E3 = np.eye(3)
PROTOTYPES = np.stack([E1, E2])
ID_TEXT = np.stack([0.6 * E1 + 0.8 * E3, 0.6 * E2 + 0.8 * E3])  # b = (0.6, 0.6)
CANDS = np.stack(
    [
        E3,  # 0 noun: s=(0,0) admissible, D=0.6
        E1,  # 1 noun: s=(1,0) not admissible
        0.5 * E1 + np.sqrt(0.75) * E3,  # 2 noun: s=(0.5,0), D=0.35
        -E1,  # 3 adjective: s=(-1,0), D=1.1
        0.6 * E1 + 0.8 * E2,  # 4 adjective: s=(0.6,0.8): 0.6 is not < 0.6
        -E3,  # 5 noun: D=0.6, ties with 0
    ]
)
IS_ADJ = np.array([False, False, False, True, True, False])
WORDS = ["zebra", "one", "half", "dark", "edge", "apple"]


def test_base_similarity_and_deviation():
    np.testing.assert_allclose(base_similarity(ID_TEXT, PROTOTYPES), [0.6, 0.6], atol=1e-7)
    dev = deviation(CANDS, PROTOTYPES, base_similarity(ID_TEXT, PROTOTYPES))
    assert dev.admissible.tolist() == [True, False, True, True, False, True]
    np.testing.assert_allclose(dev.degree[[0, 2, 3, 5]], [0.6, 0.35, 1.1, 0.6], atol=1e-6)


def test_budget_split_between_adjectives_and_nouns():
    assert split_budget(2000, 3000, 7000) == (600, 1400)
    assert split_budget(10, 1, 2) == (1, 2)  # capped by the pools
    assert split_budget(7, 2, 3) == (2, 3)
    # a float product truncated, as the released code: 100 * 0.29 = 28.999999999999996, not 29
    assert split_budget(100, 290, 710) == (28, 72)


def test_intermodal_selection_adjectives_first_with_ties_by_word():
    # admissible: nouns 0, 2, 5 and adjective 3; M=2 -> M_adj = int(2*1/4) = 0, M_noun = 2
    assert select_intermodal(CANDS, IS_ADJ, ID_TEXT, PROTOTYPES, 2, words=WORDS).tolist() == [5, 0]
    # M=4 -> M_adj = 1, M_noun = 3; the adjective leads, as the released code stacks them
    assert select_intermodal(CANDS, IS_ADJ, ID_TEXT, PROTOTYPES, 4, words=WORDS).tolist() == [3, 5, 0, 2]
    # without words, ties go by index
    assert select_intermodal(CANDS, IS_ADJ, ID_TEXT, PROTOTYPES, 2).tolist() == [0, 5]


def test_neglabel_quantile_interpolates_between_ranks():
    rng = np.random.default_rng(0)
    cands = rng.normal(size=(4, 8))
    texts = rng.normal(size=(40, 8))
    sims = np.sort(cands @ texts.T, axis=1)
    # rank 0.95 * (40 - 1) = 37.05: 5 % of the way from the 38th to the 39th value
    np.testing.assert_allclose(neglabel_distance(cands, texts, 0.95), sims[:, 37] + 0.05 * (sims[:, 38] - sims[:, 37]), rtol=1e-5)
    sims3 = np.sort(cands @ texts[:3].T, axis=1)  # rank 1.9
    np.testing.assert_allclose(neglabel_distance(cands, texts[:3], 0.95), sims3[:, 1] + 0.9 * (sims3[:, 2] - sims3[:, 1]), rtol=1e-5)


def test_neglabel_keeps_the_lowest_fraction_of_each_part():
    texts = np.stack([E1, E2])
    cands = np.stack([E1, -E1, E3, 0.5 * E1 + np.sqrt(0.75) * E3, E2, -E2])
    is_adj = np.array([False, False, False, False, True, True])
    # 0.95-quantile over the 2 texts (the smaller + 0.95 of the gap): nouns 0.95, -0.05, 0, 0.475; adjectives 0.95, -0.05
    got = select_neglabel(cands, is_adj, texts, fraction=0.5, percentile=0.95, words=["a", "b", "c", "d", "e", "f"])
    assert got.tolist() == [1, 2, 5]


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="is_adjective"):
        select_intermodal(CANDS, IS_ADJ[:3], ID_TEXT, PROTOTYPES, 2)


# --- against the released rules, restated step by step, on random tensors --------------------
def released_interneg(cands, is_adj, id_text, prototypes, m):
    """InterNeg's released selection: admissible per part, budget int(M * share), each part by
    descending mean gap, adjectives stacked before nouns."""
    base = np.sum(id_text * prototypes, axis=1)
    parts = {}
    for adj in (True, False):
        pool = np.flatnonzero(is_adj == adj)
        sims = cands[pool] @ prototypes.T
        keep = pool[(sims < base).all(axis=1)]
        gaps = (base - cands[keep] @ prototypes.T).mean(axis=1)
        parts[adj] = keep[np.argsort(-gaps, kind="stable")]
    n_adj = int(m * (len(parts[True]) / (len(parts[True]) + len(parts[False]))))
    return list(parts[True][:n_adj]) + list(parts[False][: m - n_adj])


def released_neglabel(cands, is_adj, id_text, fraction=0.15, eta=0.95):
    """NegLabel's released selection: torch.quantile per candidate, the lowest int(0.15 n) of
    nouns, then of adjectives, ascending."""
    q = torch.quantile(torch.from_numpy(cands).float() @ torch.from_numpy(id_text).float().T, eta, dim=1).numpy()
    out = []
    for adj in (False, True):
        pool = np.flatnonzero(is_adj == adj)
        out += list(pool[np.argsort(q[pool], kind="stable")][: int(len(pool) * fraction)])
    return out


def unit_rows(a):
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)


def test_both_selections_equal_the_released_rules_on_random_tensors():
    rng = np.random.default_rng(7)
    k, d, n = 40, 64, 1200
    prototypes = unit_rows(rng.normal(size=(k, d)))
    id_text = unit_rows(prototypes + 0.8 * rng.normal(size=(k, d)) / np.sqrt(d) * 4)
    cands = unit_rows(rng.normal(size=(n, d)) + 0.3 * id_text[rng.integers(0, k, n)])
    is_adj = rng.random(n) < 0.17
    chosen = select_intermodal(cands, is_adj, id_text, prototypes, 300)
    expected = released_interneg(cands.astype(np.float64), is_adj, id_text.astype(np.float64), prototypes.astype(np.float64), 300)
    assert 0 < is_adj[chosen].sum() < len(chosen)  # both parts take part
    assert chosen.tolist() == expected
    assert select_neglabel(cands, is_adj, id_text).tolist() == released_neglabel(cands, is_adj, id_text)
