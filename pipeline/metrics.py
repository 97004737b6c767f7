"""OOD metrics (METHOD §7) on scores where high means in-distribution."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

RECALL = 0.95


def _fpr_at_recall(labels: np.ndarray, scores: np.ndarray, recall: float = RECALL) -> float:
    """False-positive rate at the first threshold whose true-positive rate reaches ``recall``
    (OpenOOD's rule, for the OOD-positive FPR95)."""
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    return float(fpr[np.searchsorted(tpr, recall, side="left")])


def _fpr_nearest_recall(labels: np.ndarray, scores: np.ndarray, recall: float = RECALL) -> float:
    """False-positive rate at the ROC point nearest ``recall`` (MCM's and NegLabel's rule, for
    the ID-positive FPR95): over the distinct thresholds down to the first that reaches full
    recall; of equally near points, the one at the lowest threshold. MCM's code also appends
    a point (recall 1, FPR 0); it is left out here, since it reports FPR 0 whenever no real
    point lies within 0.05 of the recall asked for.
    """
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    fpr, tpr = fpr[1:], tpr[1:]  # without roc_curve's (0, 0) starting point
    last = int(np.argmax(tpr >= 1.0))
    distance = np.abs(tpr[: last + 1] - recall)
    return float(fpr[np.flatnonzero(distance == distance.min())[-1]])


def _check(name: str, scores) -> np.ndarray:
    a = np.asarray(scores, dtype=np.float64).reshape(-1)
    if a.size == 0:
        raise ValueError(f"{name}: no scores")
    bad = int((~np.isfinite(a)).sum())
    if bad:
        raise ValueError(f"{name}: {bad} NaN or infinite score(s)")
    return a


def ood_metrics(id_scores, ood_scores) -> dict[str, float]:
    """AUROC, both FPR95 conventions, AUPR-in and AUPR-out, as fractions.

    - ``fpr95_ood_positive`` (OpenOOD v1.5, InterNeg): fraction of ID samples flagged
      OOD at 95 % OOD recall.
    - ``fpr95_id_positive`` (MCM, NegLabel): fraction of OOD samples accepted as ID at
      the ROC point nearest 95 % ID recall.
    """
    id_s, ood_s = _check("id_scores", id_scores), _check("ood_scores", ood_scores)
    scores = np.concatenate([id_s, ood_s])
    is_id = np.concatenate([np.ones_like(id_s), np.zeros_like(ood_s)])
    return {
        "auroc": float(roc_auc_score(is_id, scores)),
        "fpr95_ood_positive": _fpr_at_recall(1 - is_id, -scores),
        "fpr95_id_positive": _fpr_nearest_recall(is_id, scores),
        "aupr_in": float(average_precision_score(is_id, scores)),
        "aupr_out": float(average_precision_score(1 - is_id, -scores)),
    }


def threshold_for_rate(normal_scores, rate: float) -> float:
    """The threshold at which at most ``rate`` of these normal frames would be judged OOD
    (a frame is OOD when its score is below the threshold).

    With n scores sorted ascending, it is the (floor(rate n) + 1)-th: the floor(rate n) below
    it are the false alarms allowed, ties with it are not alarms, so the rate on these frames
    never exceeds the target. On other normal frames of the same camera it is the target
    within sampling error, about sqrt(rate (1 - rate) / n).
    """
    if not 0 <= rate < 1:
        raise ValueError(f"the false-alarm rate must be in [0, 1), got {rate}")
    scores = np.sort(_check("normal_scores", normal_scores))
    return float(scores[int(np.floor(rate * len(scores)))])


def alarm_rate(scores, threshold: float) -> float:
    """The fraction judged OOD (score below the threshold)."""
    return float((_check("scores", scores) < threshold).mean())
