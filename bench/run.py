"""The benchmark entry point: the encoder's limit and the pipeline against it, in one run.

    .venv/bin/python -m bench.run --model ViT-B-32 [--quick] [--rss-minutes 10] [--out FILE]

Prints a table and writes JSON. Random weights have the compute of trained ones. The
streaming figures run through a real Kafka broker started from deploy/kafka.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import pipeline_bench, stream_bench
from pipeline.bundle import build_bundle, save_bundle
from pipeline.classes import ID_PROMPT, classes_from_folder, compute_prototypes
from pipeline.lexicon import Lexicon, load_lexicon
from pipeline.model import load_model
from schemas.settings import ModelSettings, Settings
from workers.local_run import SAMPLES


def bench_bundle(loaded, settings: Settings, out: Path, lexicon_sample: int) -> Path:
    """The sample classes with a seeded sample of the lexicon (worker cost does not depend on its size)."""
    classes = classes_from_folder(SAMPLES / "classes", settings.classes)
    lexicon = load_lexicon()
    keep = np.sort(np.random.default_rng(0).choice(len(lexicon.words), min(lexicon_sample, len(lexicon.words)), replace=False))
    sub = Lexicon([lexicon.words[i] for i in keep], lexicon.is_adjective[keep])
    bundle = build_bundle(
        model_id=loaded.model_id,
        class_names=classes.names,
        logit_scale=loaded.logit_scale,
        id_text=loaded.encode_texts([ID_PROMPT.format(n) for n in classes.names]),
        prototypes=compute_prototypes(loaded, classes, settings.classes, settings.images),
        lexicon=sub,
        lexicon_emb=loaded.encode_texts(sub.prompts, batch_size=256, progress=True),
        encode=loaded.encode_texts,
        settings=settings,
    )
    return save_bundle(bundle, out)


def table(report: dict) -> str:
    p, s = report["pipeline"], report["stream"]
    lines = [f"machine: {p['machine']}", f"model: {report['model']}", ""]
    lines.append("raw encoder (the limit), frames/s by batch: " + ", ".join(
        f"{b}: {v['frames']['per_s']['median']:.1f}" for b, v in p["raw_encoder"]["batches"].items()))
    t = s["throughput"]
    lines.append(
        f"scoring worker, batch {t['batch_size']}: {t['steady_fps']['median']:.2f} frames/s in batches "
        f"(wall {t['wall_fps']['median']:.2f}); ratio to the encoder at that batch: {s['ratio_steady']:.3f} "
        f"[{t['ratio_steady']['min']:.3f} .. {t['ratio_steady']['max']:.3f}] (wall {s['ratio_wall']:.3f}); "
        f"encoder measured around the runs: " + ", ".join(f"{x:.2f}" for x in t["limit_fps"]) + " frames/s"
    )
    lines.append("per-frame stage ms: " + ", ".join(f"{k} {v['median']:.2f}" for k, v in t["stage_ms_per_frame"].items()))
    if "tiny_overhead_ms" in s:
        lines.append(f"tiny model: non-encoder overhead {s['tiny_overhead_ms']:.2f} ms per 640x480 JPEG frame "
                     f"(worker {s['tiny_throughput']['steady_fps']['median']:.1f} vs encoder {s['tiny_encoder_fps']:.1f} frames/s)")
    sc = p["score_step_share"]
    lines.append(f"score step share of a batch (ID 1000 + negatives 4000, batch 256): {100 * sc['share']:.2f} %")
    te = p["text_encoding"]
    lines.append(f"text encoding: truncated {te['speedup']:.2f}x faster than encode_text, max abs diff {te['max_abs_diff']:.2e} ({te['sample']} of {te['prompts_total']} prompts)")
    lines.append(f"inversion: {p['inversion']['best_fps']:.2f} frames/s (batch {p['inversion']['best_batch']}); ratio to the scoring worker {s['inversion_ratio']:.2f}")
    if "propagation" in s:
        d = s["propagation"]["delay_s"]
        missed = s["propagation"].get("not_applied_in_30s", 0)
        lines.append(f"negative propagation to {s['propagation']['workers']} workers: p50 {d['p50']:.3f} s, p99 {d['p99']:.3f} s"
                     + (f"; NOT APPLIED within 30 s: {missed} of {s['propagation']['negatives']}" if missed else ""))
    if "latency" in s:
        lat, rss = s["latency"]["latency_s"], s["latency"]["rss_kib"]
        lines.append(f"alert latency at {s['latency']['rate_fps']:.1f} frames/s: p50 {lat['p50']:.3f} s, p99 {lat['p99']:.3f} s")
        growth = f"{rss['growth_pct']:.2f} %" if rss["growth_pct"] is not None else "too short to say"
        lines.append(f"scoring-worker RSS over {s['latency']['seconds'] / 60:.1f} min: {rss['after_warmup']} -> {rss['end']} KiB ({growth})")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run of every benchmark")
    parser.add_argument("--batch", type=int, default=32, help="scoring-worker batch size")
    parser.add_argument("--frames", type=int, default=320, help="frames per throughput run")
    parser.add_argument("--rss-minutes", type=float, default=10.0, help="length of the latency/RSS run")
    parser.add_argument("--lexicon-sample", type=int, default=6000)
    parser.add_argument("--bootstrap", default=None, help="use this broker instead of starting one")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.frames, args.rss_minutes, args.lexicon_sample = min(args.frames, 64), min(args.rss_minutes, 0.3), 500

    work = Path(tempfile.mkdtemp(prefix="interneg-bench-"))
    settings = Settings(_env_file=None)
    settings.model = ModelSettings(name=args.model, pretrained="", device="auto")
    settings.cache_dir = work / "cache"
    loaded = load_model(settings.model)
    report = {"model": loaded.model_id, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "args": vars(args)}
    report["pipeline"] = pipeline_bench.run_all(loaded, quick=args.quick)
    if str(args.batch) not in report["pipeline"]["raw_encoder"]["batches"]:  # the limit at the worker's batch size
        extra = pipeline_bench.raw_encoder(loaded, batch_sizes=(args.batch,))
        report["pipeline"]["raw_encoder"]["batches"].update(extra["batches"])
    settings.worker.bundle = bench_bundle(loaded, settings, work / "bundle", args.lexicon_sample)
    stream: dict = {}
    with stream_bench.Deployment(settings, work, args.bootstrap) as deployment:
        def limit() -> float:  # the raw encoder at the worker's batch, between the worker's runs
            raw = pipeline_bench.raw_encoder(loaded, batch_sizes=(args.batch,), repeats=3)
            return raw["batches"][str(args.batch)]["frames"]["per_s"]["median"]

        t = stream_bench.worker_throughput(
            deployment, frames=args.frames, batch_size=args.batch, repeats=1 if args.quick else 3, limit=limit
        )
        stream["throughput"] = t
        stream["encoder_fps_at_batch"] = float(np.median(t["limit_fps"]))
        stream["ratio_steady"] = t["ratio_steady"]["median"]
        stream["ratio_wall"] = t["ratio_wall"]["median"]
        stream["inversion_ratio"] = report["pipeline"]["inversion"]["best_fps"] / t["steady_fps"]["median"]
        rate = 0.5 * t["wall_fps"]["median"]
        stream["latency"] = stream_bench.alert_latency(deployment, rate=rate, seconds=60 * args.rss_minutes, batch_size=args.batch)
    report["stream"] = stream

    # the tiny model: what the pipeline costs around an encoder that costs almost nothing
    tiny_settings = settings.model_copy(deep=True)
    tiny_settings.model = ModelSettings(name="interneg-tiny", pretrained="", device="auto")
    tiny = load_model(tiny_settings.model)
    tiny_encoder = pipeline_bench.raw_encoder(tiny, batch_sizes=(args.batch,), repeats=5)
    tiny_settings.worker.bundle = bench_bundle(tiny, tiny_settings, work / "bundle-tiny", args.lexicon_sample)
    with stream_bench.Deployment(tiny_settings, work, args.bootstrap) as deployment:
        tt = stream_bench.worker_throughput(deployment, frames=10 * args.frames, batch_size=args.batch, repeats=1 if args.quick else 3)
        stream["tiny_throughput"] = tt
        encoder_fps = tiny_encoder["batches"][str(args.batch)]["frames"]["per_s"]["median"]
        stream["tiny_encoder_fps"] = encoder_fps
        stream["tiny_overhead_ms"] = 1000 / tt["steady_fps"]["median"] - 1000 / encoder_fps
        stream["propagation"] = stream_bench.propagation(deployment, negatives=5 if args.quick else 30, workers=2, rate=10.0, batch_size=args.batch)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2, default=str))
        print(f"wrote {args.out}", file=sys.stderr)
    print(table(report))
    return report


if __name__ == "__main__":
    main()
