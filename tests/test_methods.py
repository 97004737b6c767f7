"""The method registry, and the steps that distinguish CSP and AdaNeg, against hand-computed values."""
import math
from typing import get_args

import numpy as np
import pytest

from pipeline.bank import NegativeBank
from pipeline.lexicon import Lexicon
from pipeline.methods import METHOD_NAMES, UnknownMethod, method_class
from pipeline.methods.adaneg import AdaNeg
from pipeline.methods.csp import CONJUGATIONS, CSP, conjugate, csp_distance, ensemble
from pipeline.scorers import AdaptStats, MethodInputs, Proposal, Scorer
from pipeline.selection import select_adaneg, sorted_index_distance
from schemas.settings import Method, Settings


def unit(*xs):
    v = np.asarray(xs, dtype=np.float64)
    return (v / np.linalg.norm(v)).astype(np.float32)


def test_the_registry_is_the_one_list_of_methods():
    assert METHOD_NAMES == ("mcm", "neglabel", "csp", "adaneg", "interneg")
    assert get_args(Method) == METHOD_NAMES  # the setting accepts exactly the registered names
    for name in METHOD_NAMES:
        cls = method_class(name)
        assert issubclass(cls, Scorer) and cls.name == name
    with pytest.raises(UnknownMethod, match="unknown method 'odin'.*mcm, neglabel, csp, adaneg, interneg"):
        method_class("odin")


# --- CSP ---------------------------------------------------------------------------------

def test_csp_distance_is_neglabels_quantile_except_for_near_duplicates_of_a_class():
    id_text = np.array([[1, 0, 0], [0, 1, 0]], np.float32)
    candidates = np.stack([unit(0.96, 0.28, 0), unit(0.6, 0.8, 0), unit(0, 0, 1)])
    # cos to the two ID texts: (0.96, 0.28), (0.6, 0.8), (0, 0); torch.quantile(0.95) of two values a<b is a + 0.95 (b - a)
    got = csp_distance(candidates, id_text, 0.95)
    np.testing.assert_allclose(got, [1.0, 0.6 + 0.95 * 0.2, 0.0], atol=1e-6)  # 0.96 > 0.95: never a negative


def test_csp_ensembles_average_the_templates_then_normalise():
    table = {"a x": unit(1, 0), "b x": unit(0, 1), "a y": unit(1, 0), "b y": unit(1, 0)}
    got = ensemble(lambda prompts: np.stack([table[p] for p in prompts]), ["x", "y"], ("a {}", "b {}"))
    np.testing.assert_allclose(got, [unit(1, 1), unit(1, 0)], atol=1e-6)


def test_csp_conjugates_each_adjective_with_one_superclass_word_drawn_from_a_seeded_generator():
    import random

    adjectives = [f"adj{i}" for i in range(30)]
    draw = random.Random(0)
    expected = [f"adj{i} {draw.choice(CONJUGATIONS)[3:]}" for i in range(30)]  # "{} creature" -> "creature"
    assert conjugate(adjectives, 0) == expected
    assert len({p.split()[1] for p in expected}) > 5  # not one word for all
    assert conjugate(adjectives, 1) != expected


def test_csp_prepare_selects_the_lowest_half_per_part_nouns_first_over_its_own_prompts():
    # a fake text encoder: each phrase's direction is fixed, so the ensemble is that direction
    directions = {"cat": unit(1, 0, 0, 0), "wolf": unit(0.9, 0.1, 0.1, 0), "rock": unit(0, 0, 1, 0), "sea": unit(0, 0.2, 0, 1)}

    def encode(prompts):
        out = []
        for p in prompts:
            phrase = next(w for w in sorted(directions, key=len, reverse=True) if w in p)
            extra = 0.3 if any(s.split()[1] in p for s in CONJUGATIONS) else 0.0  # a conjugated phrase leans on axis 3
            out.append(unit(*(directions[phrase] + np.array([0, 0, 0, extra]))))
        return np.stack(out)

    directions.update({"furry": unit(0.8, 0.6, 0, 0), "wet": unit(0, 0, 0.2, 1), "stony": unit(0.1, 0, 1, 0.1)})
    lex = Lexicon(["wolf", "rock", "sea", "furry", "wet", "stony"], np.array([0, 0, 0, 1, 1, 1], bool))
    s = Settings()
    s.method.neglabel_fraction = 0.5  # int(3 * 0.5) = 1 noun and 1 adjective
    inputs = MethodInputs(class_names=["cat"], id_text=encode(["The nice cat."]), prototypes=None, lexicon=lex,
                          lexicon_emb=encode(lex.prompts), encode=encode)
    state = CSP.prepare(inputs, s)
    # with one ID class the 0.95-quantile is the cos itself: the farthest noun is rock (cos 0), then the farthest adjective
    words = state.words["words"]
    assert words[0] == "rock" and len(words) == 2
    assert words[1].startswith("wet ") and words[1].split()[1] in {c.split()[1] for c in CONJUGATIONS}
    np.testing.assert_allclose(state.arrays["id_text"][0], unit(1, 0, 0, 0), atol=1e-6)


# --- AdaNeg ------------------------------------------------------------------------------

def adaneg(memory_length=3, mix=0.1):
    id_text = np.stack([unit(1, 0, 0), unit(0, 1, 0)])
    bank = NegativeBank(np.stack([unit(0, 0, 1)]), ["rock"], capacity=0, dedup_cos=None)
    return AdaNeg(id_text, bank, scale=10.0, groups=1, memory_length=memory_length, threshold=0.5, gap=0.5, mix=mix)


def test_adaneg_score_is_the_adapted_grouped_score_plus_a_tenth_of_the_texts_only_one():
    scorer = adaneg()
    x = unit(0.5, 0.2, 0.3)
    z = 10.0 * np.array([x @ unit(1, 0, 0), x @ unit(0, 1, 0), x @ unit(0, 0, 1)], np.float64)
    vanilla = (math.exp(z[0]) + math.exp(z[1])) / np.exp(z).sum()
    # an empty memory: the adapted features are the texts
    np.testing.assert_allclose(scorer.score(x[None]).score, [1.1 * vanilla], rtol=1e-6)
    # one remembered image for the negative: its feature becomes normalise(text + image)
    image = unit(0.2, 0.1, 0.9)
    assert scorer.apply([Proposal(image, 0.5, "f1", slot=2)]) == 1
    feature = unit(*(unit(0, 0, 1) + image))
    np.testing.assert_allclose(scorer.features()[2].numpy(), feature, atol=1e-6)
    za = z.copy()
    za[2] = 10.0 * float(x @ feature)
    adapted = (math.exp(za[0]) + math.exp(za[1])) / np.exp(za).sum()
    np.testing.assert_allclose(scorer.score(x[None]).score, [adapted + 0.1 * vanilla], rtol=1e-6)
    scorer.reset()
    np.testing.assert_allclose(scorer.score(x[None]).score, [1.1 * vanilla], rtol=1e-6)


def test_adaneg_memory_keeps_the_lowest_entropy_images_of_a_label():
    scorer = adaneg(memory_length=3)  # the text and 3 - 1 = 2 images per label, as released
    stats = AdaptStats()
    a, b, c, d = (unit(1, i, 0) for i in (0.1, 0.2, 0.3, 0.4))
    assert scorer.apply([Proposal(a, 0.9, "a", 0), Proposal(b, 0.5, "b", 0)], stats) == 2  # free places
    assert scorer.apply([Proposal(c, 0.95, "c", 0)], stats) == 0  # higher entropy than both: refused
    assert scorer.apply([Proposal(d, 0.1, "d", 0)], stats) == 1  # replaces a, the highest entropy
    np.testing.assert_allclose(scorer.memory[0].numpy(), np.stack([d, b]), atol=1e-7)
    assert scorer.entropies[0].tolist() == [0.1, 0.5]
    assert stats.admitted == 3 and stats.refused == {"higher-entropy": 1}
    assert scorer.filled.tolist() == [2, 0, 0]


def test_adaneg_proposes_confident_id_images_to_their_class_and_confident_ood_to_their_nearest_negative():
    scorer = adaneg()
    sure_id = unit(1, 0.1, 0)  # vanilla score ~1 > 0.75
    sure_ood = unit(0.05, 0, 1)  # ~0 < 0.25
    unsure = unit(0.7, 0, 0.72)  # ~0.5: neither
    proposals = scorer.propose(np.stack([sure_ood, unsure, sure_id]), None, ["o", "u", "i"])
    assert [(p.origin, p.slot) for p in proposals] == [("i", 0), ("o", 2)]  # ID writes first, as released
    z = 10.0 * np.array([sure_id @ unit(1, 0, 0), sure_id @ unit(0, 1, 0)])
    p = np.exp(z) / np.exp(z).sum()
    assert proposals[0].rank == pytest.approx(-(p * np.log(p + 1e-8)).sum(), rel=1e-4)  # logits in float32
    assert proposals[1].rank == pytest.approx(-(1.0 * math.log(1.0 + 1e-8)), abs=1e-9)  # one negative: certain


def test_adaneg_selection_takes_the_sorted_index_distance_and_splits_m_by_the_pools_adjectives_first():
    id_text = np.stack([unit(1, 0, 0), unit(0, 1, 0), unit(0, 0, 1)])
    cand = np.stack([unit(1, 1, 0), unit(0, 0, 1), unit(1, 1, 1), unit(1, 0, 0), unit(0.1, 0.1, 1), unit(1, 1, 0.5)])
    # sorted position int(3 * 0.95) = 2: the largest of the three cos
    np.testing.assert_allclose(sorted_index_distance(cand, id_text), (cand @ id_text.T).max(axis=1), atol=1e-6)
    is_adj = np.array([0, 0, 0, 1, 1, 1], bool)
    # M = 4 over pools of 3 and 3: M_adj = int(4 * 0.5) = 2, M_noun = 2; each part ascending by distance
    got = select_adaneg(cand, is_adj, id_text, 4)
    assert got.tolist() == [5, 4, 2, 0]
