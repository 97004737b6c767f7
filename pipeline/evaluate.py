"""The offline evaluator: ID features against OOD sets, any scorer, two protocols.

- ``paper``: for each OOD set, the ID and OOD samples are mixed and shuffled (seed),
  scored in batches of 256; an adaptive scorer inverts the batch's confident OOD
  images, grows its bank and re-scores the batch; the bank is reset for each set.
- ``async``: the streaming adaptation of METHOD §5: what a batch proposes reaches the
  bank only before the batch ``delay`` batches later, and nothing is re-scored.

Both reset the bank per OOD set, so the two differ only in the asynchrony.
"""
from __future__ import annotations

import json
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from pipeline.errors import ConfigError
from pipeline.metrics import alarm_rate, ood_metrics, threshold_for_rate
from pipeline.scorers import AdaptStats, Scorer

METRIC_COLUMNS = [
    ("auroc", "AUROC"),
    ("fpr95_ood_positive", "FPR95 (OOD+)"),
    ("fpr95_id_positive", "FPR95 (ID+)"),
    ("aupr_in", "AUPR-in"),
    ("aupr_out", "AUPR-out"),
]


@dataclass(frozen=True)
class Protocol:
    kind: Literal["paper", "async"] = "paper"
    batch_size: int = 256
    delay: int = 1  # async only: batches between proposing and applying
    seed: int = 0

    def __post_init__(self):
        if self.batch_size <= 0:
            raise ConfigError(f"batch size must be positive, got {self.batch_size}")
        if self.kind == "async" and self.delay < 1:
            raise ConfigError(f"async delay must be at least one batch, got {self.delay}")


@dataclass
class SetResult:
    method: str
    ood_set: str
    metrics: dict[str, float]
    adapt: dict = field(default_factory=dict)
    bank_size: int = 0
    threshold: float = 0.0  # the threshold at the report's target false-alarm rate on this run's ID scores
    ood_caught: float = 0.0  # the fraction of this set's OOD samples below that threshold


@dataclass
class Report:
    protocol: Protocol
    results: list[SetResult]
    scores: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]  # (method, set) -> (id, ood)
    target_rate: float = 0.05  # false alarms (ID judged OOD) the reported thresholds allow

    def thresholds(self) -> str:
        """Per method and set: the threshold for the target false-alarm rate, and the OOD it catches."""
        lines = [f"threshold for {100 * self.target_rate:g} % false alarms (ID judged OOD), and the OOD it catches:"]
        lines += [f"  {r.method}/{r.ood_set}: {r.threshold:.6g} ({100 * r.ood_caught:.1f} % caught)" for r in self.results]
        return "\n".join(lines)

    def methods(self) -> list[str]:
        return list(dict.fromkeys(r.method for r in self.results))

    def mean(self, method: str) -> dict[str, float]:
        rows = [r.metrics for r in self.results if r.method == method]
        return {key: float(np.mean([row[key] for row in rows])) for key, _ in METRIC_COLUMNS}

    def table(self) -> str:
        header = ["method", "OOD set"] + [title for _, title in METRIC_COLUMNS]
        lines = []
        for method in self.methods():
            for r in (r for r in self.results if r.method == method):
                lines.append([method, r.ood_set] + [f"{100 * r.metrics[k]:.2f}" for k, _ in METRIC_COLUMNS])
            lines.append([method, "mean"] + [f"{100 * v:.2f}" for v in self.mean(method).values()])
        widths = [max(len(str(row[i])) for row in [header] + lines) for i in range(len(header))]
        fmt = lambda row: "  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        rule = "  ".join("-" * w for w in widths)
        return "\n".join([fmt(header), rule] + [fmt(row) for row in lines]) + "\n(percent)"

    def to_json(self) -> dict:
        return {
            "protocol": asdict(self.protocol),
            "results": [asdict(r) for r in self.results],
            "mean": {m: self.mean(m) for m in self.methods()},
            "target_rate": self.target_rate,
        }


def run_stream(scorer: Scorer, features: np.ndarray, origins: list[str], protocol: Protocol, stats: AdaptStats) -> np.ndarray:
    """Score a shuffled stream in batches under the protocol; returns scores in input order."""
    order = np.random.default_rng(protocol.seed).permutation(len(features))
    scores = np.empty(len(features), dtype=np.float64)
    pending: deque = deque()  # (batch number at which to apply, proposals)
    for number, start in enumerate(range(0, len(order), protocol.batch_size)):
        idx = order[start : start + protocol.batch_size]
        batch = features[idx]
        while pending and pending[0][0] <= number:
            scorer.apply(pending.popleft()[1], stats)
        result = scorer.score(batch)
        proposals = scorer.propose(batch, result, [origins[i] for i in idx], stats)
        if protocol.kind == "paper":
            if scorer.apply(proposals, stats):
                result = scorer.score(batch)
        elif proposals:
            pending.append((number + protocol.delay, proposals))
        scores[idx] = result.score
    return scores


def evaluate(
    scorers: dict[str, Scorer],
    id_features: np.ndarray,
    ood_sets: dict[str, np.ndarray],
    protocol: Protocol = Protocol(),
    progress: bool = False,
    target_rate: float = 0.05,
) -> Report:
    from tqdm import tqdm

    if not ood_sets:
        raise ConfigError("no OOD sets to evaluate against")
    results, all_scores = [], {}
    jobs = [(m, s) for m in scorers for s in ood_sets]
    for method, set_name in tqdm(jobs, desc="evaluating", unit="run", disable=not progress):
        scorer = scorers[method]
        scorer.reset()
        ood = ood_sets[set_name]
        features = np.concatenate([id_features, ood]).astype(np.float32)
        origins = [f"id:{i}" for i in range(len(id_features))] + [f"{set_name}:{i}" for i in range(len(ood))]
        stats = AdaptStats()
        scores = run_stream(scorer, features, origins, protocol, stats)
        id_scores, ood_scores = scores[: len(id_features)], scores[len(id_features) :]
        threshold = threshold_for_rate(id_scores, target_rate)
        bank = scorer.bank if scorer.has_negatives else None
        results.append(
            SetResult(
                method=method,
                ood_set=set_name,
                metrics=ood_metrics(id_scores, ood_scores),
                adapt=asdict(stats),
                bank_size=len(bank.entries) if bank is not None else 0,
                threshold=threshold,
                ood_caught=alarm_rate(ood_scores, threshold),
            )
        )
        all_scores[(method, set_name)] = (id_scores, ood_scores)
    return Report(protocol, results, all_scores, target_rate)


def write_report(report: Report, out_dir: Path) -> list[Path]:
    """metrics.json, metrics.txt, and per method a ROC and a score-histogram PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "metrics.json", out / "metrics.txt"]
    written[0].write_text(json.dumps(report.to_json(), indent=2))
    written[1].write_text(report.table() + "\n")
    for method in report.methods():
        sets = [r.ood_set for r in report.results if r.method == method]
        fig, ax = plt.subplots(figsize=(5, 5))
        for name in sets:
            id_s, ood_s = report.scores[(method, name)]
            fpr, tpr, _ = roc_curve(np.r_[np.ones_like(id_s), np.zeros_like(ood_s)], np.r_[id_s, ood_s])
            auroc = next(r.metrics["auroc"] for r in report.results if r.method == method and r.ood_set == name)
            ax.plot(fpr, tpr, label=f"{name} (AUROC {100 * auroc:.1f})")
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        ax.set(xlabel="OOD accepted as ID (FPR, ID positive)", ylabel="ID recall (TPR)", title=f"ROC: {method}")
        ax.legend(loc="lower right")
        fig.tight_layout()
        roc_path = out / f"roc_{method}.png"
        fig.savefig(roc_path, dpi=100)
        plt.close(fig)
        fig, axes = plt.subplots(1, len(sets), figsize=(4.5 * len(sets), 3.5), squeeze=False)
        for ax, name in zip(axes[0], sets):
            id_s, ood_s = report.scores[(method, name)]
            bins = np.linspace(min(id_s.min(), ood_s.min()), max(id_s.max(), ood_s.max()), 50)
            ax.hist(id_s, bins=bins, alpha=0.6, label="ID", density=True)
            ax.hist(ood_s, bins=bins, alpha=0.6, label=name, density=True)
            threshold = next(r.threshold for r in report.results if r.method == method and r.ood_set == name)
            ax.axvline(threshold, color="black", ls="--", lw=1,
                       label=f"threshold {threshold:.4g} ({100 * report.target_rate:g} % false alarms)")
            ax.set(xlabel="score (high = ID)", title=f"{method}: ID vs {name}")
            ax.legend()
        fig.tight_layout()
        hist_path = out / f"hist_{method}.png"
        fig.savefig(hist_path, dpi=100)
        plt.close(fig)
        written += [roc_path, hist_path]
    return written
