"""InterNeg (CVPR 2026): inter-modal negative selection plus test-time inversion of
confidently-OOD images into extra negatives (docs/METHOD.md §2-§5)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from pipeline.bank import NegativeBank
from pipeline.inversion import Inverter
from pipeline.methods.neglabel import NegLabel
from pipeline.scorers import AdaptStats, MethodInputs, MethodState, Proposal, Scores
from pipeline.selection import base_similarity, deviation, select_intermodal, select_neglabel


class InterNeg(NegLabel):
    """The grouped score over static plus inverted negatives, growing its bank (G = 5 by default)."""

    name = "interneg"

    def __init__(
        self,
        id_text_emb: np.ndarray,
        bank: NegativeBank,
        *,
        scale: float,
        groups: int,
        beta: float,
        prototypes: np.ndarray | None,
        inverter: Inverter | None,
        seed: int = 0,
    ):
        super().__init__(id_text_emb, bank, scale=scale, groups=groups, seed=seed)
        self.beta = beta
        self.prototypes = prototypes
        self.inverter = inverter if prototypes is not None else None
        self.base = None if prototypes is None else base_similarity(self.id_text, prototypes)

    @classmethod
    def prepare(cls, inputs: MethodInputs, settings) -> MethodState:
        lex, m = inputs.lexicon, settings.method
        if inputs.prototypes is None:
            chosen = select_neglabel(inputs.lexicon_emb, lex.is_adjective, inputs.id_text, m.neglabel_fraction,
                                     m.neglabel_percentile, words=lex.words)
            note = "no example images: inter-modal selection and inversion are unavailable; InterNeg uses NegLabel's selection"
        else:
            chosen = select_intermodal(inputs.lexicon_emb, lex.is_adjective, inputs.id_text, inputs.prototypes,
                                       m.num_negatives, words=lex.words)
            note = f"inter-modal selection: {len(chosen)} negatives"
        return MethodState(
            arrays={"negatives": inputs.lexicon_emb[chosen]},
            words={"words": [lex.words[i] for i in chosen]},
            info={"negatives": len(chosen), "adjectives": int(lex.is_adjective[chosen].sum()), "selection_note": note},
        )

    @classmethod
    def from_bundle(cls, bundle, settings, inverter=None) -> "InterNeg":
        bank = bundle.bank(cls.name, settings.bank.capacity, settings.bank.dedup_cos)
        return cls(bundle.id_text, bank, scale=bundle.logit_scale, groups=settings.method.groups, beta=settings.method.beta,
                   prototypes=bundle.prototypes, inverter=inverter if settings.inversion.enabled else None)

    @property
    def adapts(self) -> bool:
        return self.prototypes is not None

    @property
    def adapts_remotely(self) -> bool:
        return self.adapts  # inverting takes seconds: an inversion worker proposes for everyone

    def reset(self) -> None:
        self.bank.reset()

    def propose(self, image_emb: np.ndarray, scores: Scores, origins: Sequence[str], stats: AdaptStats | None = None,
                *, as_published: bool = False) -> list[Proposal]:
        """Invert the images scoring below β and keep the admissible results (METHOD §4).

        ``as_published`` ranks each result as a follower of the negatives topic will, from
        the vector the bank stores (:meth:`NegativeBank.stored_form`), so that every replica
        ranks it the same."""
        picked = np.flatnonzero(scores.score < self.beta)
        if self.inverter is None or len(picked) == 0:
            return []
        inverted = self.inverter.invert(np.asarray(image_emb)[picked])
        measured = np.stack([NegativeBank.stored_form(v) for v in inverted]) if as_published else inverted
        dev = deviation(measured, self.prototypes, self.base)
        if stats is not None:
            stats.candidates += len(picked)
            stats.inadmissible += int((~dev.admissible).sum())
        return [Proposal(inverted[i], float(dev.degree[i]), origins[picked[i]]) for i in np.flatnonzero(dev.admissible)]

    def apply(self, proposals: Sequence[Proposal], stats: AdaptStats | None = None, *, ids: Sequence[int] | None = None,
              created: float | None = None) -> int:
        """Offer each proposal to the bank; ``ids`` names the entries (the stream derives them
        from the origin frame, so a redelivered candidate is recognised)."""
        self.decisions = []
        for n, proposal in enumerate(proposals):
            extra = {} if ids is None else {"id": ids[n], "created": created}
            decision = self.bank.offer(proposal.vector, proposal.rank, proposal.origin, **extra)
            self.decisions.append(decision)
            if stats is not None and not decision.accepted:
                stats.refuse(decision.outcome)
        admitted = sum(d.accepted for d in self.decisions)
        if stats is not None:
            stats.admitted += admitted
        return admitted
