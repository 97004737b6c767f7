"""One scorer interface; each method is one class behind it (as OpenOOD's postprocessors).

The evaluator and the workers hold a :class:`Scorer` and never ask which method it is:
what differs between methods is declared as capabilities (:attr:`Scorer.adapts`,
:attr:`Scorer.adapts_remotely`, :attr:`Scorer.has_negatives`). The classes live in
:mod:`pipeline.methods`, one file each, listed in its registry.

Test-time adaptation is one path, used alike by the offline evaluator and the workers:
``propose`` turns a scored batch into proposals (InterNeg: inverted negatives, slow;
AdaNeg: memory writes, cheap), ``apply`` adds them to the method's state. Where each
half runs in the stream is the method's business (docs/ARCHITECTURE.md).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Sequence

import numpy as np

from pipeline.lexicon import Lexicon

TextEncoder = Callable[[list[str]], np.ndarray]  # prompts -> L2-normalised (N, D) float32


@dataclass
class Scores:
    score: np.ndarray  # (B,) float64, high = in-distribution
    id_class: np.ndarray  # (B,) index of the most likely ID class
    id_prob: np.ndarray  # (B,) its probability among the ID classes


@dataclass(frozen=True)
class Proposal:
    """A change a scored image proposes to an adaptive method's state, not yet applied.

    ``rank`` orders proposals the way the method keeps them (InterNeg: the deviation
    degree, larger is kept; AdaNeg: the prediction's entropy, smaller is kept); ``slot``
    is the label whose memory an AdaNeg write goes to (None for InterNeg).
    """

    vector: np.ndarray
    rank: float
    origin: str
    slot: int | None = None


@dataclass
class AdaptStats:
    candidates: int = 0
    inadmissible: int = 0
    admitted: int = 0
    refused: dict[str, int] = field(default_factory=dict)

    def refuse(self, outcome: str) -> None:
        self.refused[outcome] = self.refused.get(outcome, 0) + 1


@dataclass
class MethodInputs:
    """What ``prepare`` gives every method to build its state from (one model's embeddings)."""

    class_names: list[str]
    id_text: np.ndarray  # (K, D) "The nice {y}."
    prototypes: np.ndarray | None  # (K, D) ID image prototypes, None without example images
    lexicon: Lexicon  # the candidate words, ID class names already dropped
    lexicon_emb: np.ndarray  # (C, D) the lexicon's prompts (noun "The nice {w}.", adjective "This is a {w} photo.")
    encode: TextEncoder  # any other prompts, through the same model (cached)


@dataclass
class MethodState:
    """A method's part of a bundle: arrays and word lists under names the method chooses.

    Stored as ``{method}.{name}.npy`` / ``{method}.{name}.json`` beside the manifest.
    """

    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    words: dict[str, list[str]] = field(default_factory=dict)
    info: dict = field(default_factory=dict)


def judge(score: float, threshold: float) -> str:
    """The one verdict rule: a frame scoring below the threshold is out of distribution ("ood")."""
    return "ood" if score < threshold else "id"


class Scorer(ABC):
    name: ClassVar[str]
    needs_prototypes: ClassVar[bool] = False  # prepare refuses a bundle without example images

    @classmethod
    def prepare(cls, inputs: MethodInputs, settings) -> MethodState:
        """This method's state, selected from the inputs (run once by ``interneg prepare``)."""
        raise NotImplementedError(f"{cls.__name__} cannot be prepared from a bundle's inputs")

    @classmethod
    def from_bundle(cls, bundle, settings, inverter=None) -> "Scorer":
        """A scorer over the bundle's state for this method (and, if it inverts, the inverter)."""
        raise NotImplementedError(f"{cls.__name__} cannot be built from a bundle")

    @abstractmethod
    def score(self, image_emb: np.ndarray) -> Scores: ...

    # --- capabilities: what the workers and the evaluator ask instead of the class ---
    @property
    def adapts(self) -> bool:
        """Whether ``propose``/``apply`` change anything (test-time adaptation)."""
        return False

    @property
    def adapts_remotely(self) -> bool:
        """Whether proposing is too slow for a scoring worker: it publishes candidates, and an
        adaptation worker proposes and publishes what every scoring worker applies (InterNeg)."""
        return False

    @property
    def has_negatives(self) -> bool:
        """Whether ``explain`` names negatives and the scorer keeps a bank (``self.bank``)."""
        return False

    def explain(self, image_emb: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        """The negatives that weighed most for each image (none for methods without negatives)."""
        return [[] for _ in range(len(image_emb))]

    def reset(self) -> None:
        """Forget test-time state (the paper resets per OOD test set)."""

    def propose(self, image_emb: np.ndarray, scores: Scores, origins: Sequence[str], stats: AdaptStats | None = None) -> list[Proposal]:
        return []

    def apply(self, proposals: Sequence[Proposal], stats: AdaptStats | None = None) -> int:
        """Apply proposals; the number that changed the state."""
        return 0
