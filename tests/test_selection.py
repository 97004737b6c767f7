"""Negative selection (METHOD §2) on a hand-built geometry."""
import numpy as np
import pytest

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


def test_intermodal_selection_with_ties_by_word():
    # admissible: nouns 0, 2, 5 and adjective 3; M=2 -> M_adj = floor(2*1/4) = 0, M_noun = 2
    assert select_intermodal(CANDS, IS_ADJ, ID_TEXT, PROTOTYPES, 2, words=WORDS).tolist() == [5, 0]
    # M=4 -> M_adj = 1, M_noun = 3
    assert select_intermodal(CANDS, IS_ADJ, ID_TEXT, PROTOTYPES, 4, words=WORDS).tolist() == [5, 0, 2, 3]
    # without words, ties go by index
    assert select_intermodal(CANDS, IS_ADJ, ID_TEXT, PROTOTYPES, 2).tolist() == [0, 5]


def test_neglabel_quantile_index_is_floor_eta_k():
    rng = np.random.default_rng(0)
    cands = rng.normal(size=(4, 8))
    texts = rng.normal(size=(40, 8))
    sims = np.sort(cands @ texts.T, axis=1)
    np.testing.assert_allclose(neglabel_distance(cands, texts, 0.95), sims[:, 38])  # floor(0.95*40) = 38
    np.testing.assert_allclose(neglabel_distance(cands, texts[:3], 0.95), np.sort(cands @ texts[:3].T, axis=1)[:, 2])


def test_neglabel_keeps_the_lowest_fraction_of_each_part():
    texts = np.stack([E1, E2])
    cands = np.stack([E1, -E1, E3, 0.5 * E1 + np.sqrt(0.75) * E3, E2, -E2])
    is_adj = np.array([False, False, False, False, True, True])
    # max cos over the 2 texts (floor(0.95*2)=1 -> the larger): nouns 1, 0, 0, 0.5; adjectives 1, 0
    got = select_neglabel(cands, is_adj, texts, fraction=0.5, percentile=0.95, words=["a", "b", "c", "d", "e", "f"])
    assert got.tolist() == [1, 2, 5]


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="is_adjective"):
        select_intermodal(CANDS, IS_ADJ[:3], ID_TEXT, PROTOTYPES, 2)
