"""Tests of the CLIP-geometry simulation (pipeline/simulate.py).

The ranges asserted here are the realism targets documented in the module docstring
(real CLIP ViT-B/16 figures); they test the geometry only, never any detector's result.
"""

from __future__ import annotations

import time
from dataclasses import fields

import numpy as np
import pytest

from pipeline.simulate import (
    LEXICON_ROLES,
    SimulatedInverter,
    SimulatedWorld,
    SimulationParams,
    simulate_world,
)
from pipeline.features import load_features, save_features


@pytest.fixture(scope="module")
def world() -> SimulatedWorld:
    return simulate_world(SimulationParams())


def _pairs(n: int, m: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    i, j = rng.integers(0, n, size=(2, m))
    keep = i != j
    return i[keep], j[keep]


def _all_arrays(w: SimulatedWorld) -> dict[str, np.ndarray]:
    out = {f.name: getattr(w, f.name) for f in fields(w)
           if isinstance(getattr(w, f.name), np.ndarray)}
    out.update({f"ood_sets[{k}]": v for k, v in w.ood_sets.items()})
    out.update({f"ood_labels[{k}]": v for k, v in w.ood_labels.items()})
    return out


# --------------------------------------------------------------------- shapes, determinism


def test_shapes_and_dtypes(world: SimulatedWorld) -> None:
    p = world.params
    K, D, C = p.n_id_classes, p.dim, p.n_lexicon_nouns + p.n_lexicon_adjectives
    assert world.id_names == [f"class_{k:03d}" for k in range(K)]
    assert world.id_text.shape == world.id_text_mcm.shape == world.prototypes.shape == (K, D)
    assert world.id_examples.shape == (K, p.shots, D)
    assert world.id_features.shape == (p.n_id_images, D)
    assert world.id_labels.shape == (p.n_id_images,) and world.id_labels.dtype == np.int64
    assert np.bincount(world.id_labels, minlength=K).tolist() == [p.n_id_images // K] * K
    assert world.lexicon_emb.shape == (C, D) and len(world.lexicon_words) == C
    assert len(set(world.lexicon_words)) == C
    assert world.lexicon_words[0] == "noun_00001"
    assert world.lexicon_words[-1] == f"adj_{p.n_lexicon_adjectives:04d}"
    assert world.lexicon_is_adjective.dtype == bool
    assert world.lexicon_is_adjective.sum() == p.n_lexicon_adjectives
    assert all(w.startswith("adj_") == a
               for w, a in zip(world.lexicon_words, world.lexicon_is_adjective))
    assert {"near", "far"} <= set(world.ood_sets)
    for name, feats in world.ood_sets.items():
        assert feats.shape == (p.n_ood_per_set, D), name
    assert world.modality_gap.shape == world.text_mean.shape == (D,)
    assert set(np.unique(world.lexicon_role)) <= set(LEXICON_ROLES)
    for name, arr in _all_arrays(world).items():
        if arr.dtype.kind == "f":
            assert arr.dtype == np.float32, name
            assert np.all(np.isfinite(arr)), name


def test_bit_reproducible_under_seed() -> None:
    p = SimulationParams(seed=7)
    a, b = simulate_world(p), simulate_world(p)
    arrs_a, arrs_b = _all_arrays(a), _all_arrays(b)
    assert arrs_a.keys() == arrs_b.keys()
    for name in arrs_a:
        assert arrs_a[name].dtype == arrs_b[name].dtype, name
        assert arrs_a[name].tobytes() == arrs_b[name].tobytes(), name
    assert a.lexicon_words == b.lexicon_words and a.id_names == b.id_names
    c = simulate_world(SimulationParams(seed=8))
    assert not np.array_equal(a.id_features, c.id_features)
    assert not np.array_equal(a.lexicon_emb, c.lexicon_emb)


def test_all_embeddings_normalised(world: SimulatedWorld) -> None:
    embeddings = {
        "id_text": world.id_text, "id_text_mcm": world.id_text_mcm,
        "id_examples": world.id_examples.reshape(-1, world.params.dim),
        "prototypes": world.prototypes, "lexicon_emb": world.lexicon_emb,
        "id_features": world.id_features,
        **{f"ood_sets[{k}]": v for k, v in world.ood_sets.items()},
    }
    for name, e in embeddings.items():
        norms = np.linalg.norm(e.astype(np.float64), axis=1)
        assert np.abs(norms - 1).max() < 1e-5, name


def test_prototypes_are_normalised_means(world: SimulatedWorld) -> None:
    mean = world.id_examples.astype(np.float64).mean(axis=1)
    expected = mean / np.linalg.norm(mean, axis=1, keepdims=True)
    np.testing.assert_allclose(world.prototypes, expected, atol=1e-6)


def test_generation_is_fast() -> None:
    t0 = time.perf_counter()
    simulate_world(SimulationParams(seed=3))
    assert time.perf_counter() - t0 < 2.0


def test_param_validation() -> None:
    with pytest.raises(ValueError):
        SimulationParams(image_gap_share=0.9, image_concept_share=0.2)
    with pytest.raises(ValueError):
        SimulationParams(n_id_clusters=60, n_far_clusters=10, n_topic_clusters=64)
    with pytest.raises(ValueError):
        SimulationParams(lexicon_related_cos=(0.9, 0.5))


# --------------------------------------------------------------------- CLIP-like statistics


def test_modality_gap_cos_statistics(world: SimulatedWorld) -> None:
    rng = np.random.default_rng(123)
    X, y, T, L = world.id_features, world.id_labels, world.id_text, world.lexicon_emb

    i, j = _pairs(len(X), 20000, rng)
    cos_ii = np.sum(X[i] * X[j], axis=1)
    diff = y[i] != y[j]
    assert 0.4 <= np.median(cos_ii[diff]) <= 0.6          # unrelated images share the image cone
    assert np.median(cos_ii[~diff]) > np.median(cos_ii[diff]) + 0.08

    a, b = _pairs(len(L), 20000, rng)
    cos_tt = np.sum(L[a] * L[b], axis=1)
    assert 0.6 <= np.median(cos_tt) <= 0.8                # unrelated prompts share the text cone
    assert 0.6 <= np.median(T @ T.T) <= 0.8

    S = X @ T.T
    match = S[np.arange(len(X)), y]
    non = np.delete(S.reshape(-1), np.ravel_multi_index((np.arange(len(X)), y), S.shape))
    assert 0.28 <= np.median(match) <= 0.35
    assert 0.10 <= np.median(non) <= 0.22
    assert 0.05 <= np.percentile(non, 5) and np.percentile(non, 95) <= 0.25
    # the modality gap: an image is closer to any image than to any text
    assert np.median(non) < np.median(match) < np.median(cos_ii[diff])

    # the gap vector is the difference of the two cone means
    img_mean = np.concatenate([X, *world.ood_sets.values()]).mean(axis=0)
    txt_mean = L.mean(axis=0)
    emp = img_mean - txt_mean
    cos_gap = emp @ world.modality_gap / (np.linalg.norm(emp) * np.linalg.norm(world.modality_gap))
    assert cos_gap > 0.95
    assert 0.8 <= np.linalg.norm(world.modality_gap) <= 1.1


def test_zero_shot_accuracy_high_not_perfect(world: SimulatedWorld) -> None:
    for text in (world.id_text, world.id_text_mcm):
        acc = np.mean(np.argmax(world.id_features @ text.T, axis=1) == world.id_labels)
        assert 0.70 <= acc <= 0.85, acc


def test_label_text_to_own_prototype(world: SimulatedWorld) -> None:
    b = np.sum(world.id_text * world.prototypes, axis=1)
    assert 0.28 <= np.median(b) <= 0.40
    # own prototype is the closest prototype for most classes, but the cos is modest
    own = np.argmax(world.id_text @ world.prototypes.T, axis=1) == np.arange(len(b))
    assert own.mean() > 0.85
    # the two ID prompt templates describe the same concept
    assert np.median(np.sum(world.id_text * world.id_text_mcm, axis=1)) > 0.9


def test_lexicon_structure(world: SimulatedWorld) -> None:
    L, V, role = world.lexicon_emb, world.prototypes, world.lexicon_role
    b = np.sum(world.id_text * V, axis=1)
    gap_to_proto = np.max(L @ V.T - b[None, :], axis=1)   # >= 0: closer to some v_k than t_k
    inadmissible = gap_to_proto >= 0
    counts = {r: int(np.sum(role == r)) for r in LEXICON_ROLES}
    n = len(role)
    # most words are unrelated; a small fraction is tied to the ID classes
    assert (counts["unrelated"] + counts["adj"]) / n > 0.9
    assert 0 < counts["id_synonym"] / n < 0.05
    assert counts["ood_near"] > 0 and counts["ood_far"] > 0
    # near-synonyms are what an inter-modal selection has to avoid; unrelated words are not
    assert inadmissible[role == "id_synonym"].mean() > 0.2
    assert inadmissible[role == "unrelated"].mean() < 0.01
    assert inadmissible[~np.isin(role, ["id_synonym", "id_hypernym", "ood_near"])].mean() < 0.005
    # synonyms sit much closer to the ID prototypes than unrelated words
    closest = np.max(L @ V.T, axis=1)
    assert np.median(closest[role == "id_synonym"]) > np.median(closest[role == "unrelated"]) + 0.08
    # words that name OOD concepts really are close to the images of those concepts
    for set_name, r in (("near", "ood_near"), ("far", "ood_far")):
        feats, labels = world.ood_sets[set_name], world.ood_labels[set_name]
        words = np.flatnonzero(role == r)
        own = np.array([np.mean(feats[labels == world.lexicon_target[w]] @ L[w]) for w in words])
        other = np.mean(feats @ L[words].T)
        assert np.median(own) > other + 0.08, set_name
    # adjectives are weaker concepts: their spread to the image prototypes is smaller
    adj = world.lexicon_is_adjective
    assert np.std(L[adj] @ V.T) < np.std(L[~adj & (role == "unrelated")] @ V.T)


def test_ood_sets_geometry(world: SimulatedWorld) -> None:
    V = world.prototypes
    id_top = np.max(world.id_features @ V.T, axis=1)
    near_top = np.max(world.ood_sets["near"] @ V.T, axis=1)
    far_top = np.max(world.ood_sets["far"] @ V.T, axis=1)
    # near-OOD images sit between ID and far-OOD images in image-prototype similarity
    assert np.median(far_top) < np.median(near_top) < np.median(id_top)
    # near-OOD images resemble their ID parent more than other ID classes
    parent = world.near_parent[world.ood_labels["near"]]
    sims = world.ood_sets["near"] @ V.T
    own = sims[np.arange(len(parent)), parent]
    assert np.median(own) > np.median(sims) + 0.05
    # and still lie in the image cone
    assert 0.4 <= np.median(world.ood_sets["far"] @ world.id_features[:200].T) <= 0.6


# --------------------------------------------------------------------- inverter


def _cone_cos(e: np.ndarray, direction: np.ndarray) -> np.ndarray:
    return e @ (direction / np.linalg.norm(direction))


@pytest.mark.parametrize("from_world", [True, False])
def test_inverter_moves_into_text_cone(world: SimulatedWorld, from_world: bool) -> None:
    src = world if from_world else world.modality_gap
    x = world.ood_sets["far"][:300]
    e = SimulatedInverter(src, seed=5).invert(x)
    assert e.shape == x.shape and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    text_dir = world.lexicon_emb.mean(axis=0)
    assert np.all(_cone_cos(e, text_dir) > _cone_cos(x, text_dir))
    # the text cone of real prompts: the output is as "text-like" as lexicon prompts
    lex = np.median(_cone_cos(world.lexicon_emb, text_dir))
    if from_world:
        assert abs(np.median(_cone_cos(e, text_dir)) - lex) < 0.05
        assert 0.8 <= np.median(e @ world.lexicon_emb[:500].T) / np.median(
            world.lexicon_emb[:500] @ world.lexicon_emb[500:1000].T) <= 1.2
    # the inverted text keeps the image's content: it matches its own image best
    own = np.sum(e * x, axis=1)
    assert 0.3 <= np.median(own) <= 0.5
    assert np.median(own) > np.median(e @ x.T) + 0.1


def test_inverter_reproducible_and_call_order(world: SimulatedWorld) -> None:
    x = world.ood_sets["near"][:64]
    a, b = SimulatedInverter(world, seed=1), SimulatedInverter(world, seed=1)
    a1, a2 = a.invert(x[:32]), a.invert(x[32:])
    b1, b2 = b.invert(x[:32]), b.invert(x[32:])
    assert a1.tobytes() == b1.tobytes() and a2.tobytes() == b2.tobytes()
    assert not np.array_equal(SimulatedInverter(world, seed=2).invert(x[:32]), a1)
    # noise = 0 is a deterministic gap crossing
    z = SimulatedInverter(world.modality_gap, noise=0.0)
    expected = x.astype(np.float64) - world.modality_gap
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(z.invert(x), expected, atol=1e-6)
    with pytest.raises(ValueError):
        a.invert(x[:, :10])


# --------------------------------------------------------------------- feature files


def test_save_load_round_trip(tmp_path, world: SimulatedWorld) -> None:
    path = tmp_path / "feats.npz"
    save_features(path, world.id_features, model_id="sim/ViT-B-16", labels=world.id_labels)
    feats, labels, model_id = load_features(path)
    assert feats.dtype == np.float32 and feats.tobytes() == world.id_features.tobytes()
    assert labels.dtype == np.int64 and np.array_equal(labels, world.id_labels)
    assert model_id == "sim/ViT-B-16"
    path2 = tmp_path / "ood_far"  # no suffix: written exactly where asked
    save_features(path2, world.ood_sets["far"], model_id="m")
    feats2, labels2, mid2 = load_features(path2)
    assert labels2 is None and mid2 == "m" and np.array_equal(feats2, world.ood_sets["far"])
    assert not list(tmp_path.glob("*.tmp"))
    with np.load(path, allow_pickle=False) as npz:  # the documented layout
        assert set(npz.files) == {"features", "model_id", "labels"}
        assert npz["model_id"].shape == () and npz["model_id"].dtype.kind == "U"


def _write(path, **arrays) -> None:
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def test_load_rejects_bad_files(tmp_path, world: SimulatedWorld) -> None:
    good = world.id_features[:10].copy()
    mid = np.array("m")

    nan = good.copy()
    nan[2, 0] = np.nan
    nan[5, 3] = np.inf
    p = tmp_path / "nan.npz"
    _write(p, features=nan, model_id=mid)
    with pytest.raises(ValueError, match=r"nan\.npz.*2 of 10 .*NaN or inf"):
        load_features(p)

    p = tmp_path / "unnormalised.npz"
    _write(p, features=good * 1.01, model_id=mid)
    with pytest.raises(ValueError, match=r"unnormalised\.npz.*not L2-normalised"):
        load_features(p)

    p = tmp_path / "nokey.npz"
    _write(p, model_id=mid, labels=np.arange(10))
    with pytest.raises(ValueError, match=r"nokey\.npz.*missing key.*features"):
        load_features(p)

    p = tmp_path / "nomodel.npz"
    _write(p, features=good)
    with pytest.raises(ValueError, match=r"nomodel\.npz.*missing key.*model_id"):
        load_features(p)

    p = tmp_path / "onedim.npz"
    _write(p, features=good[0], model_id=mid)
    with pytest.raises(ValueError, match=r"onedim\.npz.*2-D"):
        load_features(p)

    p = tmp_path / "ints.npz"
    _write(p, features=np.eye(3, dtype=np.int64), model_id=mid)
    with pytest.raises(ValueError, match=r"ints\.npz.*floating"):
        load_features(p)

    p = tmp_path / "pickled.npz"
    _write(p, features=np.array([good, None], dtype=object), model_id=mid)
    with pytest.raises(ValueError, match=r"pickled\.npz"):
        load_features(p)

    p = tmp_path / "badlabels.npz"
    _write(p, features=good, model_id=mid, labels=np.arange(9))
    with pytest.raises(ValueError, match=r"badlabels\.npz.*labels"):
        load_features(p)

    p = tmp_path / "garbage.npz"
    p.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match=r"garbage\.npz"):
        load_features(p)

    with pytest.raises(FileNotFoundError, match=r"absent\.npz"):
        load_features(tmp_path / "absent.npz")


def test_save_rejects_bad_features(tmp_path, world: SimulatedWorld) -> None:
    p = tmp_path / "out.npz"
    with pytest.raises(ValueError, match=r"out\.npz.*not L2-normalised"):
        save_features(p, world.id_features[:4] * 2, model_id="m")
    bad = world.id_features[:4].copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match=r"out\.npz.*1 of 4"):
        save_features(p, bad, model_id="m")
    with pytest.raises(ValueError, match=r"out\.npz.*labels"):
        save_features(p, world.id_features[:4], model_id="m", labels=np.zeros(3, dtype=np.int64))
    assert not p.exists()
