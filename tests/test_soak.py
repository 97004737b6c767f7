"""bench.soak end to end: its own broker, a scoring and an inversion worker, a paced stream, the report."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parent.parent
MINUTES, RATE, SAMPLE_S = 0.4, 20.0, 2.0


def test_soak_scores_every_frame_and_writes_its_report(tmp_path):
    out = tmp_path / "soak"
    done = subprocess.run(
        [sys.executable, "-m", "bench.soak", "--minutes", str(MINUTES), "--rate", str(RATE), "--model", "interneg-tiny",
         "--workers", "1", "--sample-s", str(SAMPLE_S), "--settle-s", "1", "--lexicon-sample", "500", "--drain-s", "60", "--out", str(out)],
        cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "lost 0" in done.stdout

    report = json.loads((out / "soak.json").read_text())
    summary, samples = report["summary"], report["samples"]
    assert report["settings"]["model"].startswith("interneg-tiny")
    assert report["settings"]["workers"] == 1 and report["settings"]["rate_fps"] == RATE
    assert report["machine"]["cpu_count"] >= 1

    # every frame produced was scored, none lost; the frames topic holds exactly what was sent
    frames = summary["frames"]
    expected = round(MINUTES * 60 * RATE)
    assert frames["sent"] == expected == frames["frames_topic_records"]
    assert frames["scored"] == frames["sent"]
    assert frames["lost"] == 0 and frames["send_failed"] == 0
    assert frames["score_records"] == frames["scored"] + frames["duplicated"]
    assert frames["deadletters"] == 0
    assert summary["workers_exited"] == []

    # the samples cover the run: from the first frame to the end of production, then the drain
    run = [s for s in samples if s["phase"] == "run"]
    assert run[0]["t"] < 1.0 and run[0]["sent"] <= 1
    assert run[-1]["t"] >= MINUTES * 60 - 1.0 and run[-1]["sent"] == expected
    assert len(run) >= 0.5 * MINUTES * 60 / SAMPLE_S
    assert all(b["t"] > a["t"] for a, b in zip(samples, samples[1:]))
    assert all(b["sent"] >= a["sent"] and b["scored"] >= a["scored"] for a, b in zip(samples, samples[1:]))
    # the lag comes back to 0 once production stops, and every sample measured each process
    assert samples[-1]["lag"] == 0 and summary["final_lag"] == 0 and summary["drained"]
    assert summary["max_lag"] >= 0
    for s in samples:
        assert {"score-0", "invert", "broker"} <= set(s["rss_kib"]) and min(s["rss_kib"].values()) > 0
    for label in ("score-0", "invert"):
        assert summary["rss"][label]["end_kib"] > 0 and summary["rss"][label]["growth_pct"] is not None

    # throughput within a sensible factor of the paced rate
    assert 0.5 * RATE <= summary["produced_fps"] <= 1.5 * RATE
    assert 0.5 * RATE <= summary["mean_throughput_fps"] <= 1.5 * RATE
    assert summary["latency_s"]["n"] == expected and summary["latency_s"]["p50"] > 0

    with Image.open(out / "soak.png") as image:
        image.verify()
    with Image.open(out / "soak.png") as image:
        assert image.format == "PNG" and image.size == (1000, 900)
