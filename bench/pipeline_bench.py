"""Throughput of the pipeline's steps on one loaded model, on one machine (no Kafka).

    .venv/bin/python -m bench.pipeline_bench --model ViT-B-32 [--quick] [--out bench.json]

Four measurements, each a function returning a plain JSON-serialisable dict:

- :func:`raw_encoder`: frames/s of ``LoadedModel.encode_images`` on pre-made preprocessed
  tensors per batch size (the limit for any scoring worker);
- :func:`score_step_share`: the grouped score (METHOD §3) for one batch, as a share of
  that batch's encode + score time;
- :func:`text_encoding`: context-truncated text encoding (METHOD §6) vs open_clip's
  ``encode_text`` at 77 tokens: speed-up and largest embedding difference;
- :func:`inversion`: frames/s of ``TextInverter.invert`` (METHOD §4) per batch size.

Random weights (``pretrained=""``) give the same compute as trained ones. Every timing is
``time.perf_counter`` around work forced to finish (``torch.cuda.synchronize`` on a GPU);
each dict has medians over ``repeats`` runs with min, max and IQR, the model and the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.model import LoadedModel, context_length_needed
from pipeline.scoring import grouped_logits_score
from schemas.settings import InversionSettings

SCORE_SHARE_TARGET = 0.03  # the score step should take ≤ 3 % of a batch's time
TEXT_SPEEDUP_TARGET = 4.0  # truncated context ≥ 4x faster than 77 tokens ...
TEXT_MAX_DIFF_TARGET = 1e-5  # ... at a max abs difference ≤ 1e-5


# --- timing helpers ----------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_calls(fn: Callable[[], object], device: torch.device, *, repeats: int, warmup: int = 0) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn``, after ``warmup`` untimed calls."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    for _ in range(warmup):
        fn()
        _sync(device)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def _spread(values: Sequence[float]) -> dict:
    """Median, min, max and interquartile range of a list of numbers."""
    arr = np.asarray(values, dtype=np.float64)
    q1, q3 = np.percentile(arr, [25, 75])
    return {
        "median": float(np.median(arr)),
        "min": float(arr.min()),
        "max": float(arr.max()),
        "iqr": float(q3 - q1),
        "n": int(arr.size),
    }


def _rate(items: int, times: Sequence[float]) -> dict:
    """Items per second of each run, summarised; plus the run times themselves."""
    return {"per_s": _spread([items / t for t in times]), "seconds": _spread(times)}


def machine_info(loaded: LoadedModel | None = None) -> dict:
    """Where the numbers were taken: platform, CPUs, torch threads, device."""
    try:
        usable_cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable_cpus = os.cpu_count()
    info = {
        "node": platform.node(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable_cpus,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
    }
    if hasattr(os, "getloadavg"):  # a busy machine makes every number here meaningless
        info["load_average_1m"] = round(os.getloadavg()[0], 2)
    if loaded is not None:
        info["device"] = str(loaded.device)
        info["dtype"] = str(loaded.dtype).replace("torch.", "")
        if loaded.device.type == "cuda":
            info["gpu"] = torch.cuda.get_device_name(loaded.device)
    return info


def _header(loaded: LoadedModel, what: str) -> dict:
    return {"benchmark": what, "model": loaded.model_id, "machine": machine_info(loaded)}


def _image_size(loaded: LoadedModel) -> tuple[int, int]:
    size = getattr(loaded.model.visual, "image_size", 224)
    if isinstance(size, int):
        return size, size
    return int(size[0]), int(size[1])


def _random_images(loaded: LoadedModel, batch: int, seed: int = 0) -> torch.Tensor:
    """A preprocessed-looking batch on the host, in the model's dtype (pinned on a GPU)."""
    h, w = _image_size(loaded)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, 3, h, w), generator=generator).to(loaded.dtype)
    if loaded.device.type == "cuda":
        x = x.pin_memory()  # encode_images copies with non_blocking=True
    return x


def _random_unit_rows(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# --- 1. the image encoder alone ----------------------------------------------------------


def raw_encoder(
    loaded: LoadedModel,
    batch_sizes: Sequence[int] = (1, 8, 32, 64, 128, 256),
    repeats: int = 3,
    warmup: int = 1,
) -> dict:
    """Frames/s of ``loaded.encode_images`` per batch size: the limit of a scoring worker.

    Inputs are random tensors (B, 3, H, W) made before timing, in the model's dtype, in
    pinned host memory on a GPU (the copy to the device is timed, as in a worker). Each
    batch size gets ``warmup`` untimed calls first.
    """
    out = _header(loaded, "raw_encoder")
    out.update(image_size=list(_image_size(loaded)), repeats=repeats, warmup=warmup, batches={})
    for batch in batch_sizes:
        images = _random_images(loaded, batch)
        times = _time_calls(lambda images=images: loaded.encode_images(images), loaded.device, repeats=repeats, warmup=warmup)
        out["batches"][str(batch)] = {"batch": int(batch), "frames": _rate(batch, times)}
        del images
    best = max(out["batches"].values(), key=lambda row: row["frames"]["per_s"]["median"])
    out["best_batch"] = best["batch"]
    out["best_fps"] = best["frames"]["per_s"]["median"]
    return out


# --- 2. the score step vs encoding -------------------------------------------------------


def score_step_share(
    loaded: LoadedModel,
    *,
    n_id: int = 1000,
    n_neg: int = 4000,
    batch: int = 256,
    groups: int = 5,
    repeats: int = 5,
    encode_batch: int | None = None,
    encode_repeats: int | None = None,
    warmup: int = 1,
) -> dict:
    """Time of the grouped score for one batch vs encoding that batch; share = score / (score + encode).

    The score step is what ``NegLabelScorer.score`` computes: ``λ·X Tᵀ`` for the ID texts
    and ``λ·X Nᵀ`` for the negatives (two matrix products) and
    :func:`pipeline.scoring.grouped_logits_score` (the log-sum-exp), on the CPU as in the
    scorer (its embeddings and bank are numpy). The encode time is measured on
    ``encode_batch`` frames (default: ``batch`` on a GPU, at most 32 on a CPU, where 256
    ViT-B frames take tens of seconds) and scaled per frame to ``batch``; the result says so.
    """
    dim = loaded.embed_dim
    scale = loaded.logit_scale
    images = torch.from_numpy(_random_unit_rows(batch, dim, seed=1))
    id_text = torch.from_numpy(_random_unit_rows(n_id, dim, seed=2))
    negs = torch.from_numpy(_random_unit_rows(n_neg, dim, seed=3))
    cpu = torch.device("cpu")

    def score() -> torch.Tensor:
        with torch.no_grad():
            id_logits = scale * images @ id_text.T
            neg_logits = scale * images @ negs.T
            return grouped_logits_score(id_logits, neg_logits, groups, 0)

    score_times = _time_calls(score, cpu, repeats=repeats, warmup=warmup)

    if encode_batch is None:
        encode_batch = batch if loaded.device.type == "cuda" else min(batch, 32)
    encode_repeats = repeats if encode_repeats is None else encode_repeats
    frames = _random_images(loaded, encode_batch)
    encode_raw = _time_calls(lambda: loaded.encode_images(frames), loaded.device, repeats=encode_repeats, warmup=warmup)
    encode_times = [t * batch / encode_batch for t in encode_raw]  # per frame, scaled to `batch`

    s, e = _spread(score_times), _spread(encode_times)
    share = s["median"] / (s["median"] + e["median"])
    out = _header(loaded, "score_step_share")
    out.update(
        n_id=n_id,
        n_neg=n_neg,
        groups=groups,
        batch=batch,
        embed_dim=dim,
        score_device="cpu",
        repeats=repeats,
        score_seconds=s,
        encode_batch=encode_batch,
        encode_repeats=encode_repeats,
        encode_scaled=encode_batch != batch,
        encode_measured_seconds=_spread(encode_raw),
        encode_seconds=e,  # for `batch` frames (scaled per frame when encode_scaled)
        share=share,
        share_min=s["min"] / (s["min"] + e["max"]),
        share_max=s["max"] / (s["max"] + e["min"]),
        target_share=SCORE_SHARE_TARGET,
        meets_target=share <= SCORE_SHARE_TARGET,
        note=(
            f"score: 2 matmuls + grouped log-sum-exp over {n_id} ID + {n_neg} negatives for {batch} embeddings (CPU); "
            + (
                f"encode measured on {encode_batch} frames and scaled per frame to {batch}"
                if encode_batch != batch
                else f"encode measured on {batch} frames"
            )
        ),
    )
    return out


# --- 3. truncated vs full-context text encoding ------------------------------------------


def _encode_full_context(loaded: LoadedModel, prompts: Sequence[str], batch: int) -> np.ndarray:
    """open_clip's own ``encode_text`` at the full 77 tokens, normalised, as numpy."""
    out = []
    with torch.no_grad():
        for start in range(0, len(prompts), batch):
            tokens = loaded.tokenize(prompts[start : start + batch]).to(loaded.device)
            out.append(F.normalize(loaded.model.encode_text(tokens).float(), dim=-1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, loaded.embed_dim), np.float32)


def text_encoding(
    loaded: LoadedModel,
    prompts: Sequence[str],
    batch: int = 256,
    repeats: int = 1,
    *,
    sample: int | None = None,
    seed: int = 0,
    warmup: int = 1,
) -> dict:
    """Prompts/s of ``loaded.encode_texts`` (truncated context) vs ``model.encode_text`` (77 tokens).

    ``sample`` encodes a seeded random sample of ``prompts`` (None: all of them); the
    whole-list time of both encoders is extrapolated from the sample's rate. Both sides
    include tokenisation and the copy back to numpy. ``max_abs_diff`` compares the
    normalised embeddings of the last run of each. ``warmup`` untimed calls of each encoder
    on the first batch precede the timing.
    """
    prompts = list(prompts)
    if sample is not None and sample < len(prompts):
        idx = np.sort(np.random.default_rng(seed).choice(len(prompts), sample, replace=False))
        picked = [prompts[i] for i in idx]
    else:
        picked = prompts
    n = len(picked)
    if n == 0:
        raise ValueError("no prompts to encode")

    result: dict[str, np.ndarray] = {}

    def truncated() -> None:
        result["truncated"] = loaded.encode_texts(picked, batch_size=batch)

    def full() -> None:
        result["full"] = _encode_full_context(loaded, picked, batch)

    first = picked[:batch]
    for _ in range(warmup):
        loaded.encode_texts(first, batch_size=batch)
        _encode_full_context(loaded, first, batch)
    t_trunc = _time_calls(truncated, loaded.device, repeats=repeats)
    t_full = _time_calls(full, loaded.device, repeats=repeats)
    diff = float(np.max(np.abs(result["full"] - result["truncated"])))
    lengths = [context_length_needed(loaded.tokenize(picked[i : i + batch])) for i in range(0, n, batch)]

    trunc, fullr = _rate(n, t_trunc), _rate(n, t_full)
    speedup = _spread([f / t for f, t in zip(t_full, t_trunc)])
    out = _header(loaded, "text_encoding")
    out.update(
        prompts_total=len(prompts),
        sample=n,
        sampled=n < len(prompts),
        seed=seed,
        batch=batch,
        repeats=repeats,
        warmup=warmup,
        full_context_length=int(loaded.model.context_length) if hasattr(loaded.model, "context_length") else 77,
        truncated_context_length={"mean": float(np.mean(lengths)), "max": int(max(lengths))},
        truncated=trunc,
        full=fullr,
        speedup=speedup["median"],
        speedup_spread=speedup,
        max_abs_diff=diff,
        extrapolated_seconds={
            "truncated": len(prompts) / trunc["per_s"]["median"],
            "full": len(prompts) / fullr["per_s"]["median"],
        },
        target_speedup=TEXT_SPEEDUP_TARGET,
        target_max_abs_diff=TEXT_MAX_DIFF_TARGET,
        meets_target=speedup["median"] >= TEXT_SPEEDUP_TARGET and diff <= TEXT_MAX_DIFF_TARGET,
    )
    return out


# --- 4. test-time inversion --------------------------------------------------------------


def inversion(
    loaded: LoadedModel,
    settings: InversionSettings,
    prototypes: np.ndarray | None,
    batch_sizes: Sequence[int] = (1, 8, 32),
    repeats: int = 2,
    warmup: int = 1,
) -> dict:
    """Frames inverted per second by ``TextInverter.invert`` per batch size.

    One call optimises a batch of random unit image embeddings together (``settings.steps``
    AdamW steps through the frozen text tower at the templates' own context length, AMP on
    a GPU). ``warmup`` untimed calls precede each batch size. Divide ``best_fps`` by a
    scoring worker's frames/s for the share of the stream one inversion worker can invert.
    """
    from pipeline.inversion import TextInverter

    inverter = TextInverter(loaded, settings, prototypes)
    out = _header(loaded, "inversion")
    out.update(
        steps=settings.steps,
        reg_weight=settings.reg_weight,
        prototypes=0 if prototypes is None else int(len(prototypes)),
        template_context_length=int(inverter.templates.tokens.shape[1]),
        repeats=repeats,
        warmup=warmup,
        batches={},
    )
    for batch in batch_sizes:
        emb = _random_unit_rows(batch, loaded.embed_dim, seed=100 + batch)
        times = _time_calls(lambda: inverter.invert(emb), loaded.device, repeats=repeats, warmup=warmup)
        out["batches"][str(batch)] = {"batch": int(batch), "frames": _rate(batch, times)}
    best = max(out["batches"].values(), key=lambda row: row["frames"]["per_s"]["median"])
    out["best_batch"] = best["batch"]
    out["best_fps"] = best["frames"]["per_s"]["median"]
    return out


# --- the command line --------------------------------------------------------------------


def _fmt_rate(stats: dict) -> str:
    p = stats["per_s"]
    return f"{p['median']:10.2f}/s  [{p['min']:.2f} .. {p['max']:.2f}]"


def _fmt_seconds(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.2f} s"


def render(report: dict) -> str:
    """A readable table of the four results of :func:`run_all`."""
    m = report["machine"]
    lines = [
        f"model {report['model']}  |  {m['processor']}, {m['cpu_count']} CPUs ({m['usable_cpus']} usable), "
        f"torch {m['torch']} threads {m['torch_threads']}, device {m.get('device')} {m.get('gpu', '')} {m.get('dtype', '')}",
        f"platform {m['platform']}, load average (1 min) at start {m.get('load_average_1m', 'n/a')}",
        "",
    ]
    enc = report["raw_encoder"]
    lines.append(f"1. image encoder (encode_images, {enc['repeats']} repeats; median [min .. max] frames/s)")
    for row in enc["batches"].values():
        lines.append(f"   batch {row['batch']:4d}: {_fmt_rate(row['frames'])}")
    lines.append(f"   best: batch {enc['best_batch']} at {enc['best_fps']:.2f} frames/s")
    lines.append("")

    sc = report["score_step_share"]
    lines.append(f"2. score step ({sc['note']})")
    lines.append(
        f"   score {sc['score_seconds']['median'] * 1e3:.2f} ms, encode {sc['encode_seconds']['median'] * 1e3:.1f} ms "
        f"per {sc['batch']} frames -> share {100 * sc['share']:.2f} % [{100 * sc['share_min']:.2f} .. {100 * sc['share_max']:.2f}] "
        f"(target <= {100 * sc['target_share']:.0f} %: {'yes' if sc['meets_target'] else 'NO'})"
    )
    lines.append("")

    tx = report["text_encoding"]
    lines.append(
        f"3. text encoding ({tx['sample']} of {tx['prompts_total']} lexicon prompts, batch {tx['batch']}, "
        f"context {tx['truncated_context_length']['mean']:.1f} mean / {tx['truncated_context_length']['max']} max vs {tx['full_context_length']})"
    )
    lines.append(f"   open_clip encode_text (full): {_fmt_rate(tx['full'])}  whole lexicon ~{_fmt_seconds(tx['extrapolated_seconds']['full'])}")
    lines.append(
        f"   truncated context          : {_fmt_rate(tx['truncated'])}  whole lexicon ~{_fmt_seconds(tx['extrapolated_seconds']['truncated'])}"
    )
    lines.append(
        f"   speed-up {tx['speedup']:.2f}x, max abs difference {tx['max_abs_diff']:.2e} "
        f"(target >= {tx['target_speedup']:.0f}x at <= {tx['target_max_abs_diff']:.0e}: {'yes' if tx['meets_target'] else 'NO'})"
    )
    lines.append("")

    inv = report["inversion"]
    lines.append(f"4. inversion ({inv['steps']} steps, template context {inv['template_context_length']}, {inv['repeats']} repeats; frames/s)")
    for row in inv["batches"].values():
        lines.append(f"   batch {row['batch']:4d}: {_fmt_rate(row['frames'])}")
    ratio = inv["best_fps"] / enc["best_fps"]
    lines.append(
        f"   best: batch {inv['best_batch']} at {inv['best_fps']:.2f} frames/s; / raw encoder best = {ratio:.3f} "
        f"(a scoring worker is no faster than the raw encoder, so inversion / worker >= this)"
    )
    return "\n".join(lines)


def run_all(loaded: LoadedModel, *, quick: bool = False, sample: int | None = None, prompts: Sequence[str] | None = None) -> dict:
    """The four benchmarks on one model; ``quick`` uses tiny sizes (a smoke run, seconds on a CPU).

    ``sample``: lexicon prompts for the text benchmark; None: 2048 (64 when quick); 0: all.
    """
    from pipeline.lexicon import load_lexicon

    if prompts is None:
        prompts = load_lexicon().prompts
    if quick:
        enc_kw = dict(batch_sizes=(1, 8), repeats=1, warmup=1)
        score_kw = dict(repeats=3, encode_batch=4, encode_repeats=1)
        text_kw = dict(batch=64, repeats=1, sample=64 if sample is None else (sample or None))
        inv_kw = dict(batch_sizes=(1, 4), repeats=1, warmup=0)
    else:
        enc_kw = dict()
        score_kw = dict()
        text_kw = dict(sample=2048 if sample is None else (sample or None))
        inv_kw = dict()
    rng = np.random.default_rng(7)
    prototypes = rng.normal(size=(10, loaded.embed_dim)).astype(np.float32)
    prototypes /= np.linalg.norm(prototypes, axis=1, keepdims=True)
    report = {"model": loaded.model_id, "machine": machine_info(loaded), "quick": quick}
    report["raw_encoder"] = raw_encoder(loaded, **enc_kw)
    report["score_step_share"] = score_step_share(loaded, **score_kw)
    report["text_encoding"] = text_encoding(loaded, prompts, **text_kw)
    report["inversion"] = inversion(loaded, InversionSettings(), prototypes, **inv_kw)
    return report


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16", help="open_clip model name (ViT-B-16, ViT-B-32, interneg-tiny, ...)")
    parser.add_argument("--pretrained", default="", help="weights tag or file; empty: random weights (same compute)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run in seconds")
    parser.add_argument(
        "--sample", type=int, default=None, help="lexicon prompts to encode (default 2048, 64 with --quick; 0: all ~70k)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads before measuring")
    parser.add_argument("--out", default=None, help="also write the results as JSON to this file")
    args = parser.parse_args(argv)

    from pipeline.model import load_model
    from schemas.settings import ModelSettings

    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(ModelSettings(name=args.model, pretrained=args.pretrained, device=args.device))
    report = run_all(loaded, quick=args.quick, sample=args.sample)
    print(render(report))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)
        print(f"\nwrote {args.out}")
    return report


if __name__ == "__main__":
    main()
