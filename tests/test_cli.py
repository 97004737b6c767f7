"""The command line end to end: generated images, the tiny model, simulated features."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from workers.cli import main
from workers.demo import make_sample_images

INTERNEG = str(Path(sys.executable).with_name("interneg"))


@pytest.fixture(scope="module")
def tiny_env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cli-cache")
    return {
        **os.environ,
        "INTERNEG_MODEL__NAME": "interneg-tiny",
        "INTERNEG_MODEL__PRETRAINED": "",
        "INTERNEG_CACHE_DIR": str(cache),
        "INTERNEG_METHOD__NUM_NEGATIVES": "300",
        "HF_HUB_OFFLINE": "1",
    }


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_sample_images(tmp_path_factory.mktemp("images"), examples=3, test=2)


@pytest.fixture(scope="module")
def prepared(tiny_env, images, tmp_path_factory):
    bundle = tmp_path_factory.mktemp("cli") / "bundle"
    done = subprocess.run(
        [INTERNEG, "prepare", "--classes", str(images[0]), "--out", str(bundle)],
        env=tiny_env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "3 classes" in done.stderr and "interneg 300" in done.stderr
    return bundle


def run(env, *argv):
    """The installed console script, as a user runs it."""
    return subprocess.run([INTERNEG, *argv], env=env, capture_output=True, text=True, timeout=300)


def test_score_prints_json_with_explanations_and_reports_bad_files(prepared, images, tiny_env, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not really a jpeg")
    done = run(tiny_env, "score", str(images[1]), str(images[2]), str(broken), "--bundle", str(prepared), "--json")
    assert done.returncode == 1  # one input was rejected, and said so
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    scored = [r for r in rows if "score" in r]
    assert len(scored) == 6 + 4
    assert all(r["verdict"] == ("ood" if r["score"] < 0.5 else "id") for r in scored)
    assert all(len(r["negatives"]) == 3 and r["id_class"] in {"red circle", "green square", "blue circle"} for r in scored)
    assert rows[-1]["file"] == str(broken) and "not-an-image" in rows[-1]["error"]
    assert "10 scored, 1 rejected" in done.stderr


def test_eval_on_image_folders_writes_table_json_and_plots(prepared, images, tiny_env, tmp_path):
    out = tmp_path / "eval"
    done = run(tiny_env, "eval", "--bundle", str(prepared), "--id", str(images[1]), "--ood", f"novel={images[2]}",
               "--batch-size", "4", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "interneg  novel" in done.stdout and "FPR95 (OOD+)" in done.stdout
    # 'all' is every method the bundle carries (CSP is not bundled by default), the others named
    assert "not in the bundle: csp" in done.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    carried = ("mcm", "neglabel", "adaneg", "interneg")
    assert set(metrics["mean"]) == set(carried)
    assert sorted(p.name for p in out.glob("*.png")) == sorted(f"{k}_{m}.png" for k in ("roc", "hist") for m in carried)


def test_simulate_then_eval_both_protocols(tmp_path, capsys):
    assert main(["simulate", "--out", str(tmp_path / "sim")]) == 0
    sim = tmp_path / "sim"
    common = ["eval", "--bundle", str(sim / "bundle"), "--id", str(sim / "id.npz"), "--ood", f"near={sim / 'near.npz'}", "--ood", f"far={sim / 'far.npz'}"]
    assert main(common + ["--out", str(tmp_path / "paper")]) == 0
    assert main(common + ["--method", "interneg", "--protocol", "async", "--delay", "3", "--out", str(tmp_path / "async")]) == 0
    paper = json.loads((tmp_path / "paper" / "metrics.json").read_text())
    later = json.loads((tmp_path / "async" / "metrics.json").read_text())
    assert later["protocol"] == {"kind": "async", "batch_size": 256, "delay": 3, "seed": 0}
    # a simulated bundle carries all five methods, in the registry's order
    assert [r["method"] for r in paper["results"][::2]] == ["mcm", "neglabel", "csp", "adaneg", "interneg"]
    assert len(paper["results"]) == 10 and len(later["results"]) == 2
    out = capsys.readouterr().out
    assert "protocol async (delay 3 batches)" in out
    assert "adaneg/near: " in out and "interneg/far: " in out  # what each adaptive method proposed and applied
    # the threshold for the target false-alarm rate, per method and set, as printed and recorded
    assert "threshold for 5 % false alarms (ID judged OOD)" in out and "interneg/near: " in out
    for r in paper["results"]:
        assert 0 < r["threshold"] <= 1.1 and 0 <= r["ood_caught"] <= 1


def test_calibrate_writes_the_threshold_for_a_false_alarm_rate(tmp_path, capsys):
    assert main(["simulate", "--out", str(tmp_path / "sim")]) == 0
    sim = tmp_path / "sim"
    capsys.readouterr()
    assert main(["calibrate", "--bundle", str(sim / "bundle"), "--normal", str(sim / "id.npz"), "--false-alarms", "0.02",
                 "--method", "neglabel", "--out", str(tmp_path / "cal.json")]) == 0
    printed = capsys.readouterr()
    result = json.loads((tmp_path / "cal.json").read_text())
    assert printed.out.strip() == f"INTERNEG_METHOD__THRESHOLD={result['threshold']:.6g}"
    assert result["method"] == "neglabel" and result["frames"] == 2000
    assert result["false_alarms_on_these_frames"] <= 0.02  # never above the target on the frames it was set on
    assert main(["calibrate", "--bundle", str(sim / "bundle"), "--normal", str(sim / "id.npz"), "--false-alarms", "1.5"]) == 2
    assert "--false-alarms 1.5" in capsys.readouterr().err


def test_bad_inputs_get_one_error_line(tmp_path, capsys):
    sim = tmp_path / "sim"
    main(["simulate", "--out", str(sim)])
    capsys.readouterr()
    data = dict(np.load(sim / "near.npz"))
    data["features"][3] = np.nan
    np.savez(tmp_path / "nan.npz", **data)
    status = main(["eval", "--bundle", str(sim / "bundle"), "--id", str(sim / "id.npz"), "--ood", f"bad={tmp_path / 'nan.npz'}"])
    err = capsys.readouterr().err
    assert status == 2 and "error: " in err and "nan.npz: 1 of 1000 feature rows contain NaN" in err
    status = main(["eval", "--bundle", str(sim / "bundle"), "--id", str(sim / "id.npz"), "--ood", f"x={sim / 'far.npz'}", "--method", "knn"])
    assert status == 2 and "unknown knn" in capsys.readouterr().err
    status = main(["eval", "--bundle", str(sim / "bundle"), "--id", str(sim / "id.npz"), "--ood", f"x={sim / 'far.npz'}", "--profile", "paper"])
    assert status == 2 and "prepared with profile stream; prepare it again with --profile paper" in capsys.readouterr().err
    status = main(["score", str(sim / "id.npz"), "--bundle", str(tmp_path)])
    assert status == 2 and "not a detector bundle" in capsys.readouterr().err


def test_bundle_of_other_weights_is_refused(images, tiny_env, tmp_path):
    """Prepared with a weights file that later changes: the bundle no longer matches its model."""
    from pipeline.model import load_model
    from schemas.settings import ModelSettings

    weights = tmp_path / "weights.pt"
    torch.save(load_model(ModelSettings(name="interneg-tiny", pretrained="")).model.state_dict(), weights)
    env = {**tiny_env, "INTERNEG_MODEL__PRETRAINED": str(weights)}
    assert run(env, "prepare", "--classes", str(images[0]), "--out", str(tmp_path / "b")).returncode == 0
    torch.save(load_model(ModelSettings(name="interneg-tiny", pretrained="", seed=7)).model.state_dict(), weights)
    done = run(env, "score", str(images[1]), "--bundle", str(tmp_path / "b"))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: ") and "prepared with model interneg-tiny/sha256:" in done.stderr


def test_missing_weights_say_how_to_run(tmp_path, images):
    env = {**os.environ, "INTERNEG_MODEL__NAME": "ViT-B-32", "INTERNEG_MODEL__PRETRAINED": "openai", "HF_HUB_OFFLINE": "1"}
    done = run(env, "prepare", "--classes", str(images[0]), "--out", str(tmp_path / "b"))
    assert done.returncode == 2
    assert "INTERNEG_MODEL__NAME=interneg-small INTERNEG_MODEL__PRETRAINED=interneg" in done.stderr and "Traceback" not in done.stderr


def test_an_unreachable_cluster_gets_one_error_line(capsys):
    """kafka-python gives up bootstrapping after its own timeout (about 30 s); the CLI says so in one line."""
    status = main(["topics", "--bootstrap", "127.0.0.1:1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1
    assert err[0].startswith("error: Kafka: ") and "Unable to bootstrap" in err[0] and "INTERNEG_KAFKA__BOOTSTRAP_SERVERS" in err[0]
