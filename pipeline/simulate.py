"""A documented simulation of CLIP's embedding geometry, for running the evaluator offline.

Why this exists
---------------
No pretrained CLIP weights and no image data sets are available where CI runs, yet the
whole evaluation path (negative selection, scoring, the synchronous and streaming
protocols, metrics, plots) has to run end to end. This module produces feature arrays with
the *geometry* of CLIP ViT-B/16 embeddings, so that path can be exercised. It is a test
fixture, not a benchmark: numbers measured on it say that the evaluator works, never which
method is better. The parameters were fixed from published/observed CLIP statistics
before any method was run on the simulated features, and must not be tuned to make any
method win.

The generative model
--------------------
Everything lives in R^D and every embedding is L2-normalised.

*Modality cones.* Two unit vectors ``m_I`` (image mean direction) and ``m_T`` (text mean
direction) with ``cos(m_I, m_T) = gap_cos``. The remaining D-2 dimensions, orthogonal to
both, form the *semantic subspace*; every concept, noise and cluster vector below is a
random unit vector of that subspace. This reproduces the "modality gap" (Liang et al.,
NeurIPS 2022): image embeddings crowd in one narrow cone, text embeddings in another.

*Concepts.* There are ``n_topic_clusters`` topics (animals, vehicles, plants, ...) with
unit centres ``C_g``. A concept of topic g is ``c = sqrt(h) C_g + sqrt(1-h) u`` (u fresh,
then normalised), ``h = cluster_share``: two concepts of one topic have cos ~ h, two
concepts of different topics ~ 0. Every class (ID or OOD) has such a *true* concept z;
an ID class's *name* is one imperfect wording of it, a concept at cos
``name_concept_cos`` to z (so a synonym worded closer to z can beat the label itself).
The ID classes occupy the first ``n_id_clusters`` topics (unevenly, like ImageNet's many
dog breeds); far-OOD concepts occupy the next ``n_far_clusters`` topics, which no ID class
uses (like iNaturalist's plants); the lexicon spreads over all topics.

*Text embeddings.* A prompt about concept c::

    t = normalise( sqrt(a_T) m_T + sqrt(b_T) c + sqrt(1 - a_T - b_T) eta )

with eta fresh per (word, prompt template): "prompt noise" (the same class under two
templates has cos ~ 0.95, as in CLIP). Nouns use ``text_gap_share``/``text_concept_share``;
adjectives (prompt "This is a {w} photo.") carry less concept and more noise
(``adjective_concept_share``) and their concept is diffuse: a blend of
``adjective_n_topics`` topic centres rather than one object.

*Image embeddings.* Each visual class (ID or OOD) has a class-level visual concept
``mu = normalise( sqrt(1 - concept_noise) z + sqrt(concept_noise) zeta )``: what the
pictures of a class look like is not exactly its true concept ("concept noise"; with the
name noise it caps zero-shot accuracy and sets how far ``t_k`` is from the prototype ``v_k``).
An image of that class::

    v = normalise( sqrt(a_I) m_I + sqrt(b_I) mu + sqrt(1 - a_I - b_I) eps )

where eps is per-image "instance noise" (pose, background, other objects). A fraction
``instance_sibling_share`` of eps points at the other concepts of the class's own topic (a
husky photographed so that it looks like a malamute), the rest is isotropic: this is what
makes zero-shot errors fall mostly between related classes, as with real CLIP.

*ID side.* ``id_text`` = prompt "The nice {y}.", ``id_text_mcm`` = "a photo of a {y}"
(the same concept, an independent prompt-noise draw), ``id_examples`` = ``shots`` images
per class, ``prototypes`` = their normalised mean, ``id_features`` = ``n_id_images`` test
images with balanced labels.

*OOD sets.* ``far``: ``n_far_concepts`` concepts from the far topics (unrelated to every
ID class: the iNaturalist case). ``near``: ``n_near_concepts`` concepts, each made from one
random ID parent class k as ``near_parent_cos * z_k + sqrt(1 - near_parent_cos^2) f``,
with f a fresh concept of k's topic orthogonalised against z_k: a new class adjacent to an
ID class and as similar to its siblings as they are to each other (the SSB-hard / NINCO
case). Both sets are imaged exactly like ID images.

*Lexicon.* Stand-in for the WordNet candidates. Nouns:

- ``lexicon_synonym_frac``: near-synonyms of one ID class, concept cos to its true
  concept drawn uniformly in ``lexicon_related_cos`` (WordNet lemmas/close hyponyms of a
  class name); about a third of them end up closer to the class's image prototype than
  its own label text (inadmissible under METHOD §2);
- ``lexicon_hypernym_frac``: hypernyms, an ID topic centre (squared weight 0.8) plus noise
  ("dog");
- words naming OOD concepts: each OOD concept is, with probability
  ``ood_lexicon_coverage``, named by 1..``ood_words_max`` words with concept cos in
  ``lexicon_related_cos`` (this is why negative labels work at all);
- the rest: unrelated concepts of uniformly random topics (so some of them sit in ID
  topics without naming an ID class, as WordNet animals that are not ImageNet classes).

Adjectives: a fraction ``adjective_id_frac`` is centred on an ID topic (squared weight
0.6, e.g. "canine"), the rest on random blends of topic centres. Word names
("noun_00001", "adj_0001") are assigned after shuffling, so they carry no information
about a word's role; ``lexicon_role`` records the role for diagnostics only.

*Inversion.* ``SimulatedInverter`` replaces test-time text inversion (METHOD.md §4): it
keeps an image's semantic content, adds the residual error of a short optimisation, and
places the result in the text cone (``modality_gap`` is the difference of the two cones'
expected means, ``text_mean`` the text cone's expected mean).

Figures measured on the defaults (seeds 0-9; medians, [5th, 95th] percentiles)
--------------------------------------------------------------------------------
image-image cos, different classes 0.51 [0.43, 0.59]; same class 0.65 [0.56, 0.76].
text-text cos, different lexicon words 0.70 [0.67, 0.74]; same class, two templates 0.95.
image-text cos, matching 0.30 [0.22, 0.37]; non-matching 0.15 [0.11, 0.22].
cos(t_k, v_k) 0.36 [0.34, 0.39]: above a single matching pair because the 16-shot mean
averages the instance noise away (prototype norm ~0.82 before normalising; the same
arithmetic on real CLIP, whose same-class image cos is ~0.65-0.7, gives the same lift).
Zero-shot top-1 over the 100 classes 0.80-0.83 (either ID prompt).
Inverted text vs its own image 0.39.
Generation: ~0.2-0.5 s on one CPU core. tests/test_simulate.py checks these ranges.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "SimulationParams",
    "SimulatedWorld",
    "SimulatedInverter",
    "simulate_world",
    "LEXICON_ROLES",
]

#: Values of ``SimulatedWorld.lexicon_role`` (diagnostics only; a method never sees them).
LEXICON_ROLES = ("unrelated", "id_synonym", "id_hypernym", "ood_near", "ood_far", "adj_id", "adj")


@dataclass(frozen=True)
class SimulationParams:
    """All knobs of the simulation. Defaults imitate CLIP ViT-B/16 (see module docstring).

    Squared weights ("shares") are fractions of an embedding's squared norm before
    normalisation; the components are near-orthogonal, so a share is also the expected
    squared cosine of the embedding with that component.
    """

    # --- sizes ---------------------------------------------------------------------
    dim: int = 256
    """Embedding width. CLIP ViT-B/16 has 512; 256 keeps CI fast and is still far above
    the ~tens of effective dimensions CLIP features actually use."""
    n_id_classes: int = 100
    """A 100-class ID set (ImageNet-100 scale); large enough for a non-trivial argmax."""
    shots: int = 16
    """Example images per ID class for the prototypes; the paper uses 16."""
    n_id_images: int = 2000
    """ID test images (20 per class, balanced)."""
    n_ood_per_set: int = 1000
    """Images per OOD set."""
    n_lexicon_nouns: int = 12000
    """Candidate nouns; WordNet has ~58k, scaled down with the number of classes."""
    n_lexicon_adjectives: int = 2000
    """Candidate adjectives; keeps WordNet's ~1:5 adjective:noun ratio."""
    logit_scale: float = 100.0
    """lambda = exp(logit_scale) of OpenAI CLIP is 100 (temperature 0.01)."""
    seed: int = 0
    """Seed of the single numpy Generator that draws everything."""

    # --- modality gap --------------------------------------------------------------
    image_gap_share: float = 0.5
    """Share of the image mean direction: unrelated images have cos ~0.5 (CLIP: 0.4-0.6)."""
    text_gap_share: float = 0.7
    """Share of the text mean direction: unrelated prompts have cos ~0.7 (CLIP: 0.6-0.8)."""
    gap_cos: float = 0.25
    """cos(m_I, m_T). Non-matching image-text cos ~ sqrt(0.5*0.7)*0.25 = 0.15 (CLIP:
    0.10-0.22); the gap vector then has norm ~0.95 (Liang et al. report ~0.82 for CLIP)."""

    # --- concepts ------------------------------------------------------------------
    image_concept_share: float = 0.15
    """Share of the class's visual concept in an image. With text_concept_share,
    concept_noise and name_concept_cos it puts matching image-text cos at ~0.30 (CLIP:
    0.28-0.35) and same-class image-image cos at ~0.65. The rest (0.35) is instance noise."""
    text_concept_share: float = 0.25
    """Share of the concept in a noun prompt; the rest (0.05) is prompt noise, so one
    class under two templates has cos ~0.95."""
    concept_noise: float = 0.25
    """Squared share of class-level mismatch between what a class's pictures show and its
    true concept: cos(visual concept, true concept) = sqrt(0.75) ~ 0.87."""
    name_concept_cos: float = 0.9
    """cos(concept of the class *name*, true concept): a label is one imperfect wording of
    its class; a synonym worded closer to the true concept is nearer the image prototype
    than the label itself (WordNet lemmas often are: "tabby" vs "tabby cat")."""
    instance_sibling_share: float = 0.35
    """Fraction of an image's instance-noise energy that points at other concepts of its
    own topic (fine-grained confusions). With cluster_share and name_concept_cos it gives
    zero-shot top-1 over 100 classes of ~80 % (CLIP ViT-B/16 on 100-class ImageNet
    subsets: 70-85 %)."""
    n_topic_clusters: int = 64
    """Number of topics in the whole simulated world (lexicon spreads over all)."""
    n_id_clusters: int = 10
    """Topics used by the ID classes (~10 classes each, uneven)."""
    cluster_share: float = 0.45
    """Squared weight of the topic centre in a concept: same-topic concepts have cos ~0.45."""

    # --- OOD sets ------------------------------------------------------------------
    n_near_concepts: int = 50
    """Classes in the near-OOD set (SSB-hard / NINCO-like)."""
    near_parent_cos: float = 0.7
    """Concept cos of a near-OOD class with its ID parent (siblings have ~0.45): hard."""
    n_far_concepts: int = 50
    """Classes in the far-OOD set (iNaturalist-like)."""
    n_far_clusters: int = 3
    """Topics of the far-OOD set; none of them has an ID class (iNaturalist = plants)."""

    # --- lexicon -------------------------------------------------------------------
    lexicon_synonym_frac: float = 0.02
    """Nouns that are near-synonyms of an ID class (~2.4 per class, like WordNet lemmas and
    close hyponyms of an ImageNet synset); they are what a good selection must avoid."""
    lexicon_hypernym_frac: float = 0.005
    """Nouns that name an ID topic ("dog", "vehicle")."""
    lexicon_related_cos: tuple[float, float] = (0.75, 0.98)
    """Range of concept cos between a synonym / OOD-naming word and the concept it names."""
    ood_lexicon_coverage: float = 0.6
    """Probability that an OOD class is named by some lexicon word (WordNet covers many but
    not all SSB/iNaturalist classes)."""
    ood_words_max: int = 3
    """A covered OOD class is named by 1..ood_words_max words."""
    adjective_concept_share: float = 0.12
    """Adjectives are weaker concepts: half the concept share of nouns, more prompt noise."""
    adjective_n_topics: int = 3
    """An unrelated adjective's concept blends this many topic centres (diffuse)."""
    adjective_id_frac: float = 0.03
    """Adjectives centred on an ID topic ("canine", "feline")."""

    def __post_init__(self) -> None:
        ints = dict(dim=self.dim, n_id_classes=self.n_id_classes, shots=self.shots,
                    n_id_images=self.n_id_images, n_ood_per_set=self.n_ood_per_set,
                    n_topic_clusters=self.n_topic_clusters, n_id_clusters=self.n_id_clusters,
                    n_near_concepts=self.n_near_concepts, n_far_concepts=self.n_far_concepts,
                    n_far_clusters=self.n_far_clusters, ood_words_max=self.ood_words_max,
                    adjective_n_topics=self.adjective_n_topics)
        for name, value in ints.items():
            if value < 1:
                raise ValueError(f"SimulationParams.{name} must be >= 1, got {value}")
        if self.n_lexicon_nouns < 0 or self.n_lexicon_adjectives < 0:
            raise ValueError("lexicon sizes must be >= 0")
        if self.dim < 8:
            raise ValueError(f"SimulationParams.dim must be >= 8, got {self.dim}")
        if self.n_id_clusters + self.n_far_clusters > self.n_topic_clusters:
            raise ValueError("n_id_clusters + n_far_clusters must not exceed n_topic_clusters")
        for name in ("image_gap_share", "text_gap_share", "image_concept_share",
                     "text_concept_share", "adjective_concept_share", "concept_noise",
                     "instance_sibling_share", "cluster_share", "lexicon_synonym_frac",
                     "lexicon_hypernym_frac", "ood_lexicon_coverage", "adjective_id_frac"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"SimulationParams.{name} must be in [0, 1], got {value}")
        if not -1.0 < self.gap_cos < 1.0:
            raise ValueError("gap_cos must be in (-1, 1)")
        for name in ("near_parent_cos", "name_concept_cos"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"SimulationParams.{name} must be in [0, 1]")
        if self.image_gap_share + self.image_concept_share > 1.0:
            raise ValueError("image_gap_share + image_concept_share must be <= 1")
        if self.text_gap_share + max(self.text_concept_share, self.adjective_concept_share) > 1.0:
            raise ValueError("text_gap_share + concept share must be <= 1")
        lo, hi = self.lexicon_related_cos
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError("lexicon_related_cos must be (lo, hi) with 0 <= lo <= hi <= 1")
        if self.lexicon_synonym_frac + self.lexicon_hypernym_frac > 1.0:
            raise ValueError("lexicon_synonym_frac + lexicon_hypernym_frac must be <= 1")


@dataclass
class SimulatedWorld:
    """Everything the evaluator needs, as CLIP-like embeddings (float32, L2-normalised)."""

    params: SimulationParams
    id_names: list[str]                # "class_000", ...
    id_text: np.ndarray                # (K, D) E_T("The nice {y}.")
    id_text_mcm: np.ndarray            # (K, D) E_T("a photo of a {y}")
    id_examples: np.ndarray            # (K, shots, D) few-shot example images
    prototypes: np.ndarray             # (K, D) normalised mean of id_examples
    lexicon_words: list[str]           # "noun_00001", ..., "adj_0001", ...
    lexicon_is_adjective: np.ndarray   # (C,) bool
    lexicon_emb: np.ndarray            # (C, D) E_T of the lexicon prompts
    id_features: np.ndarray            # (N_id, D) ID test images
    id_labels: np.ndarray              # (N_id,) int64 class index
    ood_sets: dict[str, np.ndarray]    # "near", "far" -> (N, D)
    modality_gap: np.ndarray           # (D,) expected image mean minus expected text mean
    # Diagnostics (a method must not use them):
    lexicon_role: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype="<U16"))
    """(C,) role of each word, one of LEXICON_ROLES."""
    lexicon_target: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    """(C,) index of the ID class (id_synonym), ID topic (id_hypernym, adj_id) or OOD class
    within its set (ood_near, ood_far) that a word names; -1 otherwise."""
    ood_labels: dict[str, np.ndarray] = field(default_factory=dict)
    """Per OOD set, (N,) index of the OOD class of each image."""
    near_parent: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    """(n_near_concepts,) ID parent class of each near-OOD class."""
    text_mean: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    """(D,) expected text embedding (text cone axis times its share); the image mean is
    ``modality_gap + text_mean``."""
    word_concepts: dict[str, np.ndarray] = field(default_factory=dict)
    """The concept each word names (ID class names and lexicon words), for :class:`SimulatedTextEncoder`."""


# ----------------------------------------------------------------------------------
# geometry helpers


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


class _Space:
    """The two cone directions and a sampler of unit vectors in the semantic subspace."""

    def __init__(self, rng: np.random.Generator, dim: int, gap_cos: float) -> None:
        self.rng = rng
        self.dim = dim
        q, _ = np.linalg.qr(rng.standard_normal((dim, 2)))
        e0, e1 = q[:, 0], q[:, 1]
        self.m_T = e0
        self.m_I = gap_cos * e0 + np.sqrt(1.0 - gap_cos**2) * e1
        self._basis = q.T  # (2, D) orthonormal basis of span(m_I, m_T)

    def project(self, x: np.ndarray) -> np.ndarray:
        """Remove the cone directions (x: (..., D))."""
        return x - (x @ self._basis.T) @ self._basis

    def semantic(self, n: int) -> np.ndarray:
        """n random unit vectors of the semantic subspace."""
        return _normalise(self.project(self.rng.standard_normal((n, self.dim))))

    def mix(self, a: np.ndarray, b: np.ndarray, share_a: np.ndarray | float) -> np.ndarray:
        """normalise(sqrt(s) a + sqrt(1-s) b), row-wise."""
        s = np.asarray(share_a, dtype=np.float64)
        if s.ndim == 1:
            s = s[:, None]
        return _normalise(np.sqrt(s) * a + np.sqrt(1.0 - s) * b)

    def at_cos(self, anchor: np.ndarray, cos: np.ndarray | float, fresh: np.ndarray) -> np.ndarray:
        """Unit vectors with exactly the given cos to ``anchor`` rows, the rest from ``fresh``."""
        ortho = _normalise(fresh - np.sum(fresh * anchor, axis=-1, keepdims=True) * anchor)
        c = np.asarray(cos, dtype=np.float64)
        if c.ndim == 1:
            c = c[:, None]
        return c * anchor + np.sqrt(1.0 - c**2) * ortho


def _texts(space: _Space, concepts: np.ndarray, gap_share: float,
           concept_share: float) -> np.ndarray:
    noise = space.semantic(len(concepts))
    noise_share = max(0.0, 1.0 - gap_share - concept_share)
    t = (np.sqrt(gap_share) * space.m_T + np.sqrt(concept_share) * concepts
         + np.sqrt(noise_share) * noise)
    return _normalise(t)


def _images(space: _Space, p: SimulationParams, visual: np.ndarray, labels: np.ndarray,
            siblings: list[np.ndarray]) -> np.ndarray:
    """Images of classes ``labels`` whose visual concepts are ``visual`` (n_classes, D).

    ``siblings[c]`` holds the true concepts of the (other) classes of class c's topic; a
    fraction ``instance_sibling_share`` of the instance noise is a random blend of them.
    """
    n = len(labels)
    iso = space.semantic(n)
    sib = np.zeros_like(iso)
    weights = space.rng.standard_normal((n, max((len(s) for s in siblings), default=0) + 1))
    for i, c in enumerate(labels):
        s = siblings[c]
        if len(s):
            sib[i] = weights[i, : len(s)] @ s
    has_sib = np.linalg.norm(sib, axis=1) > 0
    sib[has_sib] = _normalise(sib[has_sib])
    f = np.where(has_sib, p.instance_sibling_share, 0.0)[:, None]
    eps = _normalise(np.sqrt(f) * sib + np.sqrt(1.0 - f) * iso)
    inst_share = max(0.0, 1.0 - p.image_gap_share - p.image_concept_share)
    v = (np.sqrt(p.image_gap_share) * space.m_I + np.sqrt(p.image_concept_share) * visual[labels]
         + np.sqrt(inst_share) * eps)
    return _normalise(v)


def _visual(space: _Space, p: SimulationParams, concepts: np.ndarray) -> np.ndarray:
    return space.mix(concepts, space.semantic(len(concepts)), 1.0 - p.concept_noise)


def _siblings(concepts: np.ndarray, topic: np.ndarray, pool: np.ndarray, pool_topic: np.ndarray,
              exclude_self: bool) -> list[np.ndarray]:
    out = []
    for c in range(len(concepts)):
        mask = pool_topic == topic[c]
        if exclude_self:
            mask = mask.copy()
            mask[c] = False
        out.append(pool[mask])
    return out


# ----------------------------------------------------------------------------------
# the world


def simulate_world(params: SimulationParams = SimulationParams()) -> SimulatedWorld:
    """Draw a complete simulated world from ``params`` (bit-reproducible under params.seed)."""
    p = params
    rng = np.random.default_rng(p.seed)
    space = _Space(rng, p.dim, p.gap_cos)
    K = p.n_id_classes

    # topics and ID concepts: the true concept, its name, its look
    centres = space.semantic(p.n_topic_clusters)
    id_topic = rng.integers(0, p.n_id_clusters, size=K)
    id_true = space.mix(centres[id_topic], space.semantic(K), p.cluster_share)
    id_name_concepts = space.at_cos(id_true, p.name_concept_cos, space.semantic(K))

    # ID text, visual concepts, examples, prototypes, test images
    id_text = _texts(space, id_name_concepts, p.text_gap_share, p.text_concept_share)
    id_text_mcm = _texts(space, id_name_concepts, p.text_gap_share, p.text_concept_share)
    id_visual = _visual(space, p, id_true)
    id_sibs = _siblings(id_true, id_topic, id_true, id_topic, exclude_self=True)
    ex_labels = np.repeat(np.arange(K), p.shots)
    id_examples = _images(space, p, id_visual, ex_labels, id_sibs).reshape(K, p.shots, p.dim)
    prototypes = _normalise(id_examples.mean(axis=1))
    id_labels = rng.permutation(np.arange(p.n_id_images) % K).astype(np.int64)
    id_features = _images(space, p, id_visual, id_labels, id_sibs)

    # OOD concepts
    near_parent = rng.integers(0, K, size=p.n_near_concepts).astype(np.int64)
    near_fresh = space.mix(centres[id_topic[near_parent]], space.semantic(p.n_near_concepts),
                           p.cluster_share)
    near_concepts = space.at_cos(id_true[near_parent], p.near_parent_cos, near_fresh)
    near_topic = id_topic[near_parent]
    far_topic = rng.integers(p.n_id_clusters, p.n_id_clusters + p.n_far_clusters,
                             size=p.n_far_concepts)
    far_concepts = space.mix(centres[far_topic], space.semantic(p.n_far_concepts), p.cluster_share)

    ood_sets: dict[str, np.ndarray] = {}
    ood_labels: dict[str, np.ndarray] = {}
    for name, concepts, topic, pool, pool_topic in (
        # a near-OOD image is confusable with the ID classes of its topic
        ("near", near_concepts, near_topic, id_true, id_topic),
        ("far", far_concepts, far_topic, far_concepts, far_topic),
    ):
        visual = _visual(space, p, concepts)
        sibs = _siblings(concepts, topic, pool, pool_topic, exclude_self=(name == "far"))
        labels = rng.permutation(np.arange(p.n_ood_per_set) % len(concepts)).astype(np.int64)
        ood_sets[name] = _images(space, p, visual, labels, sibs)
        ood_labels[name] = labels

    # lexicon: nouns
    n_syn = int(round(p.lexicon_synonym_frac * p.n_lexicon_nouns))
    n_hyp = int(round(p.lexicon_hypernym_frac * p.n_lexicon_nouns))
    lo, hi = p.lexicon_related_cos
    roles: list[np.ndarray] = []
    targets: list[np.ndarray] = []
    concepts_list: list[np.ndarray] = []

    syn_target = rng.integers(0, K, size=n_syn)
    syn_fresh = space.mix(centres[id_topic[syn_target]], space.semantic(n_syn), p.cluster_share)
    concepts_list.append(space.at_cos(id_true[syn_target], rng.uniform(lo, hi, n_syn), syn_fresh))
    roles.append(np.full(n_syn, "id_synonym"))
    targets.append(syn_target)

    hyp_target = rng.integers(0, p.n_id_clusters, size=n_hyp)
    concepts_list.append(space.mix(centres[hyp_target], space.semantic(n_hyp), 0.8))
    roles.append(np.full(n_hyp, "id_hypernym"))
    targets.append(hyp_target)

    for role, concepts in (("ood_near", near_concepts), ("ood_far", far_concepts)):
        covered = rng.random(len(concepts)) < p.ood_lexicon_coverage
        n_words = np.where(covered, rng.integers(1, p.ood_words_max + 1, size=len(concepts)), 0)
        tgt = np.repeat(np.arange(len(concepts)), n_words)
        fresh = space.semantic(len(tgt))
        concepts_list.append(space.at_cos(concepts[tgt], rng.uniform(lo, hi, len(tgt)), fresh))
        roles.append(np.full(len(tgt), role))
        targets.append(tgt)

    n_named = sum(len(r) for r in roles)
    if n_named > p.n_lexicon_nouns:
        raise ValueError(f"lexicon too small: {n_named} related nouns exceed n_lexicon_nouns")
    n_unrel = p.n_lexicon_nouns - n_named
    unrel_topic = rng.integers(0, p.n_topic_clusters, size=n_unrel)
    concepts_list.append(space.mix(centres[unrel_topic], space.semantic(n_unrel), p.cluster_share))
    roles.append(np.full(n_unrel, "unrelated"))
    targets.append(np.full(n_unrel, -1))

    noun_concepts = np.concatenate(concepts_list)
    noun_role = np.concatenate(roles).astype("<U16")
    noun_target = np.concatenate(targets).astype(np.int64)
    order = rng.permutation(p.n_lexicon_nouns)  # names carry no role information
    noun_concepts, noun_role, noun_target = (
        noun_concepts[order], noun_role[order], noun_target[order])
    noun_emb = _texts(space, noun_concepts, p.text_gap_share, p.text_concept_share)

    # lexicon: adjectives
    A = p.n_lexicon_adjectives
    n_adj_id = int(round(p.adjective_id_frac * A))
    adj_id_target = rng.integers(0, p.n_id_clusters, size=n_adj_id)
    adj_id = space.mix(centres[adj_id_target], space.semantic(n_adj_id), 0.6)
    blend_topics = rng.integers(0, p.n_topic_clusters, size=(A - n_adj_id, p.adjective_n_topics))
    blend_w = rng.random((A - n_adj_id, p.adjective_n_topics))[:, :, None]
    blend = _normalise(np.sum(blend_w * centres[blend_topics], axis=1)) if A - n_adj_id else \
        np.zeros((0, p.dim))
    adj_other = space.mix(blend, space.semantic(A - n_adj_id), p.cluster_share)
    adj_concepts = np.concatenate([adj_id, adj_other])
    adj_role = np.concatenate(
        [np.full(n_adj_id, "adj_id"), np.full(A - n_adj_id, "adj")]).astype("<U16")
    adj_target = np.concatenate([adj_id_target, np.full(A - n_adj_id, -1)]).astype(np.int64)
    order = rng.permutation(A)
    adj_concepts, adj_role, adj_target = adj_concepts[order], adj_role[order], adj_target[order]
    adj_emb = _texts(space, adj_concepts, p.text_gap_share, p.adjective_concept_share)

    lexicon_words = [f"noun_{i + 1:05d}" for i in range(p.n_lexicon_nouns)] + \
        [f"adj_{i + 1:04d}" for i in range(A)]
    lexicon_is_adjective = np.concatenate([np.zeros(p.n_lexicon_nouns, bool), np.ones(A, bool)])

    gap = np.sqrt(p.image_gap_share) * space.m_I - np.sqrt(p.text_gap_share) * space.m_T

    f32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)  # noqa: E731
    return SimulatedWorld(
        params=p,
        id_names=[f"class_{k:03d}" for k in range(K)],
        id_text=f32(id_text),
        id_text_mcm=f32(id_text_mcm),
        id_examples=f32(id_examples),
        prototypes=f32(prototypes),
        lexicon_words=lexicon_words,
        lexicon_is_adjective=lexicon_is_adjective,
        lexicon_emb=f32(np.concatenate([noun_emb, adj_emb])),
        id_features=f32(id_features),
        id_labels=id_labels,
        ood_sets={k: f32(v) for k, v in ood_sets.items()},
        modality_gap=f32(gap),
        lexicon_role=np.concatenate([noun_role, adj_role]),
        lexicon_target=np.concatenate([noun_target, adj_target]),
        ood_labels=ood_labels,
        near_parent=near_parent,
        text_mean=f32(np.sqrt(p.text_gap_share) * space.m_T),
        word_concepts=dict(zip([f"class_{k:03d}" for k in range(K)] + lexicon_words,
                               np.concatenate([id_name_concepts, noun_concepts, adj_concepts]))),
    )


class SimulatedTextEncoder:
    """E_T for any prompt over the simulated vocabulary, so that a method that wants prompts
    of its own (CSP's template ensembles and conjugated adjectives) prepares from the same
    code as with a real model. The prompts the world already embedded return those
    embeddings; another prompt about word w is ``_texts`` of w's concept with prompt noise
    drawn from the prompt's own hash. A conjugated phrase ("adj_0001 creature") names the
    equal mix of the adjective's concept and the superclass word's, a fixed random concept
    per word; a phrase names a noun's share of concept, an adjective alone an adjective's."""

    # CSP writes compound words with spaces ("noun 00001"), as WordNet's with '_' become phrases
    WORD = re.compile(r"((?:class[_ ]\d{3})|(?:noun[_ ]\d{5})|(?:adj[_ ]\d{4}))(?: (\w+))?")

    def __init__(self, world: SimulatedWorld):
        from pipeline.classes import ID_PROMPT, MCM_PROMPT
        from pipeline.lexicon import Lexicon

        self.world = world
        self.known = dict(zip([ID_PROMPT.format(n) for n in world.id_names], world.id_text))
        self.known.update(zip([MCM_PROMPT.format(n) for n in world.id_names], world.id_text_mcm))
        self.known.update(zip(Lexicon(world.lexicon_words, world.lexicon_is_adjective).prompts, world.lexicon_emb))
        cones = np.linalg.qr(np.stack([world.text_mean, world.modality_gap], axis=1).astype(np.float64))[0].T
        self.cones = cones  # (2, D): concepts and noise live orthogonally to both cone directions
        self.m_T = world.text_mean / np.linalg.norm(world.text_mean)

    def _unit(self, key: str) -> np.ndarray:
        rng = np.random.default_rng(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big"))
        x = rng.standard_normal(len(self.m_T))
        x -= (x @ self.cones.T) @ self.cones
        return x / np.linalg.norm(x)

    def _embed(self, prompt: str) -> np.ndarray:
        p = self.world.params
        found = self.WORD.search(prompt)
        if found is None or found.group(1).replace(" ", "_") not in self.world.word_concepts:
            raise ValueError(f"simulated text encoder: no word of the simulated vocabulary in {prompt!r}")
        word, superclass = found.groups()
        word = word.replace(" ", "_")
        concept = np.asarray(self.world.word_concepts[word], np.float64)
        share = p.adjective_concept_share if word.startswith("adj_") else p.text_concept_share
        if superclass is not None and word.startswith("adj_"):
            concept = _normalise(concept + self._unit("superclass:" + superclass))
            share = p.text_concept_share
        noise_share = max(0.0, 1.0 - p.text_gap_share - share)
        t = np.sqrt(p.text_gap_share) * self.m_T + np.sqrt(share) * concept + np.sqrt(noise_share) * self._unit("prompt:" + prompt)
        return _normalise(t)

    def __call__(self, prompts: list[str]) -> np.ndarray:
        out = np.empty((len(prompts), len(self.m_T)), dtype=np.float32)
        for i, prompt in enumerate(prompts):
            known = self.known.get(prompt)
            out[i] = known if known is not None else self._embed(prompt)
        return out


# ----------------------------------------------------------------------------------
# inversion stand-in


class SimulatedInverter:
    """Stand-in for test-time text inversion (METHOD §4) on simulated features: a perfect inversion
    finds the text embedding that best matches an image, i.e. the image embedding moved across the
    modality gap into the text cone, plus the residual error a 10-step optimisation leaves.

    Given a ``SimulatedWorld`` (which knows the text mean ``t̄`` and the image mean
    ``t̄ + gap``): the image's semantic part ``s`` (x with both cone axes removed) gets the
    optimisation error ``noise * |s| * xi`` (xi ~ N(0, I/D) in the semantic subspace) and is
    put into the text cone, ``e = t̄ + sqrt(1 - |t̄|^2) * normalise(s + error)``: a real
    text embedding with the cone share every prompt has, carrying the image's content.

    Given only a gap vector: ``e = normalise(x - gap + noise * |x_perp| * xi)`` with xi
    orthogonal to the gap (the plain gap shift of Liang et al., 2022).

    With the default ``noise`` the semantic direction kept has cos ~0.6 with the image's
    (1/sqrt(1+noise^2)), so an inverted text matches its own image at cos ~0.4: better than
    the class-name prompt (~0.3), since it was optimised for that one image, but far from
    1, since 10 AdamW steps from a random token do not converge. (An assumption; the paper
    does not report this figure.)
    """

    def __init__(self, world_or_gap_vector: SimulatedWorld | np.ndarray, noise: float = 1.25,
                 seed: int = 0, *, text_mean: np.ndarray | None = None) -> None:
        if text_mean is not None:
            text_mean = np.asarray(text_mean, dtype=np.float64)
        if isinstance(world_or_gap_vector, SimulatedWorld):
            gap = world_or_gap_vector.modality_gap
            if world_or_gap_vector.text_mean.size:
                text_mean = np.asarray(world_or_gap_vector.text_mean, dtype=np.float64)
        else:
            gap = world_or_gap_vector
        gap = np.asarray(gap, dtype=np.float64)
        if gap.ndim != 1 or not np.all(np.isfinite(gap)) or not np.linalg.norm(gap) > 0:
            raise ValueError("gap vector must be a finite, non-zero 1-D array")
        if noise < 0:
            raise ValueError("noise must be >= 0")
        self.gap = gap
        self.noise = float(noise)
        self.text_mean = text_mean
        if text_mean is not None:
            # orthonormal basis of span(image mean, text mean): the two cone axes
            self._axes, _ = np.linalg.qr(np.stack([gap + text_mean, text_mean], axis=1))
        else:
            self._axes = (gap / np.linalg.norm(gap))[:, None]
        self._rng = np.random.default_rng(seed)

    def _remove_axes(self, v: np.ndarray) -> np.ndarray:
        return v - (v @ self._axes) @ self._axes.T

    def invert(self, image_emb: np.ndarray) -> np.ndarray:
        """(B, D) image embeddings -> (B, D) float32 L2-normalised inverted text embeddings."""
        x = np.asarray(image_emb, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.gap.shape[0]:
            raise ValueError(f"expected (B, {self.gap.shape[0]}) image embeddings, got {x.shape}")
        xi = self._remove_axes(self._rng.standard_normal(x.shape) / np.sqrt(x.shape[1]))
        if self.text_mean is None:
            x_perp = self._remove_axes(x)
            scale = np.linalg.norm(x_perp, axis=1, keepdims=True)
            return _normalise(x - self.gap + self.noise * scale * xi).astype(np.float32)
        s = self._remove_axes(x)
        s = s + self.noise * np.linalg.norm(s, axis=1, keepdims=True) * xi
        share = float(self.text_mean @ self.text_mean)
        e = self.text_mean + np.sqrt(max(0.0, 1.0 - share)) * _normalise(s)
        return _normalise(e).astype(np.float32)


def write_simulation(params: SimulationParams, out_dir: Path, settings) -> list[Path]:
    """A bundle (selection run on the simulated lexicon) and ID/OOD feature files for ``interneg eval``.

    The bundle's extras carry the modality gap and text mean that ``SimulatedInverter``
    needs in place of a text encoder.
    """
    from pipeline.bundle import build_bundle, save_bundle
    from pipeline.features import save_features
    from pipeline.lexicon import Lexicon

    world = simulate_world(params)
    out = Path(out_dir)
    model_id = f"simulated-clip/seed{params.seed}"
    # AdaNeg's 10,000 negatives are a seventh of the ~70,000 words of WordNet: keep that share here
    from pipeline.methods import METHOD_NAMES

    settings = settings.model_copy(deep=True)
    settings.method.bundled = list(METHOD_NAMES)  # simulated prompts cost nothing: every method, CSP included
    settings.method.adaneg_negatives = max(1, round(settings.method.adaneg_negatives * len(world.lexicon_words) / 70_000))
    bundle = build_bundle(
        model_id=model_id,
        class_names=world.id_names,
        logit_scale=params.logit_scale,
        id_text=world.id_text,
        prototypes=world.prototypes,
        lexicon=Lexicon(world.lexicon_words, world.lexicon_is_adjective),
        lexicon_emb=world.lexicon_emb,
        encode=SimulatedTextEncoder(world),
        settings=settings,
        extras={"modality_gap": world.modality_gap, "text_mean": world.text_mean},
    )
    written = [save_bundle(bundle, out / "bundle")]
    save_features(out / "id.npz", world.id_features, model_id=model_id, labels=world.id_labels)
    written.append(out / "id.npz")
    for name, features in world.ood_sets.items():
        save_features(out / f"{name}.npz", features, model_id=model_id)
        written.append(out / f"{name}.npz")
    return written
