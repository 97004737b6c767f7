"""The shipped small model through the whole path, before and after the bank grows (issue 12).

    .venv/bin/python -m train.make_demo --eval runs/small-eval      # held-out frames: id/ near/ far/
    .venv/bin/python -m bench.small_model_stream runs/small-eval --out bench/results-small-stream

Streams every frame of the evaluation set (shuffled, with labels) through a local broker, a
scoring and an inversion worker (``interneg local-run`` with its two passes), at a fixed
rate, so the inversion worker's negatives reach the scoring worker while the stream goes on.
Then, in the order the frames were scored: the AUROC and the false-alarm rate (known frames
judged OOD) over a rolling window, against the bank size each frame was scored with. Writes
stream.json and stream.png.
"""
from __future__ import annotations

import argparse
import csv
import json
import random
import shutil
from pathlib import Path

import numpy as np

from pipeline.metrics import ood_metrics
from pipeline.model import SHIPPED_TAG, SMALL_MODEL
from schemas.settings import Settings
from workers.local_run import LABELS_FILE, RENDERED_SAMPLES, local_run


def labelled_folder(eval_set: Path, out: Path, seed: int) -> Path:
    """id/, near/, far/ of ``eval_set`` as one shuffled folder with a labels.csv."""
    files = [(path, kind) for kind in ("id", "near", "far") for path in sorted((eval_set / kind).glob("*.jpg"))]
    random.Random(seed).shuffle(files)
    folder = out / "frames"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    with open(folder / LABELS_FILE, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "kind"])
        for n, (path, kind) in enumerate(files):
            name = f"{n:04d}.jpg"
            shutil.copy(path, folder / name)
            writer.writerow([name, kind])
    return folder


def rolling(rows: list[tuple[float, bool, str, int]], window: int) -> list[dict]:
    """(score, unknown, verdict, bank size) in scoring order -> metrics per window position."""
    out = []
    for end in range(window, len(rows) + 1, max(1, window // 4)):
        part = rows[end - window:end]
        known = [r for r in part if not r[1]]
        unknown = [r for r in part if r[1]]
        if not known or not unknown:
            continue
        out.append({
            "end": end,
            "bank": part[-1][3],
            "auroc": ood_metrics([r[0] for r in known], [r[0] for r in unknown])["auroc"],
            "false_alarm_rate": sum(r[2] == "ood" for r in known) / len(known),
            "unknowns_alerted": sum(r[2] == "ood" for r in unknown) / len(unknown),
        })
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("eval_set", type=Path)
    parser.add_argument("--out", type=Path, default=Path("runs/small-stream"))
    parser.add_argument("--rate", type=float, default=8.0, help="frames per second")
    parser.add_argument("--window", type=int, default=120)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    frames = labelled_folder(args.eval_set, args.out, args.seed)
    kinds = {row["file"]: row["kind"] for row in csv.DictReader(open(frames / LABELS_FILE))}
    settings = Settings()
    settings.model.name, settings.model.pretrained = SMALL_MODEL, SHIPPED_TAG
    result = local_run(settings, classes=RENDERED_SAMPLES / "classes", frames=frames, out=args.out / "run",
                       bootstrap=None, rate=args.rate, echo=print)
    rows = []
    for run_pass in result.passes:
        by_id = {s.frame_id: s for s in run_pass.scores}
        scored = sorted((by_id[f].scored_at_ms, name, by_id[f]) for name, f in run_pass.report.frames if f in by_id)
        rows += [(s.score, kinds[Path(name).name] != "id", s.verdict, s.bank_size) for _, name, s in scored]
    curve = rolling(rows, args.window)
    passes = [{"bank_at_start": p.bank_at_start, **{k: getattr(p.verdicts, k) for k in ("unknowns", "alerted", "known", "false_alarms", "auroc")}}
              for p in result.passes]
    (args.out / "stream.json").write_text(json.dumps({"passes": passes, "published": result.published,
                                                       "admitted": result.admitted, "window": args.window,
                                                       "rolling": curve}, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    x = [c["end"] for c in curve]
    ax.plot(x, [c["auroc"] for c in curve], label="AUROC (rolling)")
    ax.plot(x, [c["false_alarm_rate"] for c in curve], label="false-alarm rate (known frames alerted)")
    ax.plot(x, [c["unknowns_alerted"] for c in curve], label="unknowns alerted")
    ax.axvline(len(result.passes[0].scores), color="grey", linestyle=":", label="second pass begins")
    ax.set_xlabel(f"frames scored (window {args.window})")
    ax.set_ylim(0, 1)
    twin = ax.twinx()
    twin.plot(x, [c["bank"] for c in curve], color="black", linestyle="--", label="negatives in the scoring worker's bank")
    twin.set_ylabel("inverted negatives in the bank")
    lines = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(lines, [l.get_label() for l in lines], loc="lower right", fontsize=8)
    ax.set_title(f"{SMALL_MODEL}: verdicts through the broker as the bank grows")
    fig.tight_layout()
    fig.savefig(args.out / "stream.png", dpi=110)
    print(json.dumps(passes, indent=2))


if __name__ == "__main__":
    main()
