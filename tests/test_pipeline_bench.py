"""bench/pipeline_bench.py on the tiny model: structure and sanity only, no timing thresholds."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # bench/ is a top-level folder, not an installed package
    sys.path.insert(0, str(ROOT))

from bench import pipeline_bench as pb  # noqa: E402
from schemas.settings import InversionSettings  # noqa: E402

MACHINE_KEYS = {"platform", "cpu_count", "torch_threads", "device"}
SPREAD_KEYS = {"median", "min", "max", "iqr", "n"}


def positive_finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def check_rate(stats: dict, repeats: int) -> None:
    for part in ("per_s", "seconds"):
        assert SPREAD_KEYS <= stats[part].keys()
        assert stats[part]["n"] == repeats
        assert positive_finite(stats[part]["median"])
        assert stats[part]["min"] <= stats[part]["median"] <= stats[part]["max"]


def check_header(result: dict, tiny_model, name: str) -> None:
    assert result["benchmark"] == name
    assert result["model"] == tiny_model.model_id
    assert MACHINE_KEYS <= result["machine"].keys()
    assert result["machine"]["device"] == "cpu"
    json.dumps(result)  # plain JSON


def test_raw_encoder(tiny_model):
    result = pb.raw_encoder(tiny_model, batch_sizes=(1, 4), repeats=1, warmup=0)
    check_header(result, tiny_model, "raw_encoder")
    assert set(result["batches"]) == {"1", "4"}
    for row in result["batches"].values():
        check_rate(row["frames"], 1)
    assert result["best_batch"] in (1, 4)
    assert positive_finite(result["best_fps"])
    assert result["best_fps"] == max(r["frames"]["per_s"]["median"] for r in result["batches"].values())


def test_score_step_share(tiny_model):
    result = pb.score_step_share(tiny_model, n_id=100, n_neg=400, batch=16, repeats=1, encode_batch=4)
    check_header(result, tiny_model, "score_step_share")
    assert positive_finite(result["score_seconds"]["median"])
    assert positive_finite(result["encode_seconds"]["median"])
    assert result["encode_scaled"] is True and result["encode_batch"] == 4
    # the measured encode time of 4 frames, scaled per frame to 16
    assert result["encode_seconds"]["median"] == pytest.approx(4 * result["encode_measured_seconds"]["median"])
    assert 0 < result["share_min"] <= result["share"] <= result["share_max"] < 1
    assert isinstance(result["meets_target"], bool)


def test_text_encoding_truncated_matches_full_context(tiny_model):
    from pipeline.lexicon import load_lexicon

    prompts = load_lexicon().prompts
    result = pb.text_encoding(tiny_model, prompts, batch=32, repeats=1, sample=64)
    check_header(result, tiny_model, "text_encoding")
    assert result["sample"] == 64 and result["sampled"] is True
    assert result["prompts_total"] == len(prompts)
    check_rate(result["truncated"], 1)
    check_rate(result["full"], 1)
    assert positive_finite(result["speedup"])
    assert result["max_abs_diff"] <= 1e-5
    assert result["truncated_context_length"]["max"] < result["full_context_length"] == 77
    for side in ("truncated", "full"):
        assert positive_finite(result["extrapolated_seconds"][side])


def test_inversion(tiny_model):
    prototypes = pb._random_unit_rows(3, tiny_model.embed_dim, seed=0)
    result = pb.inversion(tiny_model, InversionSettings(steps=2), prototypes, batch_sizes=(1, 4), repeats=1, warmup=0)
    check_header(result, tiny_model, "inversion")
    assert result["steps"] == 2 and result["prototypes"] == 3
    assert set(result["batches"]) == {"1", "4"}
    for row in result["batches"].values():
        check_rate(row["frames"], 1)
    assert positive_finite(result["best_fps"])


def test_main_quick_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    report = pb.main(["--model", "interneg-tiny", "--device", "cpu", "--quick", "--out", str(out)])
    printed = capsys.readouterr().out
    for heading in ("1. image encoder", "2. score step", "3. text encoding", "4. inversion"):
        assert heading in printed
    saved = json.loads(out.read_text())
    assert set(saved) >= {"model", "machine", "raw_encoder", "score_step_share", "text_encoding", "inversion"}
    assert saved["text_encoding"]["max_abs_diff"] == report["text_encoding"]["max_abs_diff"] <= 1e-5
