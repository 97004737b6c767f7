"""Per-camera settings (issue 14): the cameras file, checked whole, and applied live to
running scoring and events workers through ood.control."""
from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.bundle import load_bundle_with_model
from pipeline.errors import ConfigError
from pipeline.images import ImageRejected, decode_image
from pipeline.methods import scorer_from_bundle
from schemas.messages import FrameScore, OODEvent
from test_streaming import frame_record, jpeg, read_topic
from workers.cameras import load_cameras_file
from workers.processes import settings_env
from workers.producer import produce_records
from workers.scoring_worker import crop_to


def write(tmp_path, text: str):
    path = tmp_path / "cameras.toml"
    path.write_text(text)
    return path


def test_the_file_is_checked_whole_and_every_problem_named(tmp_path):
    path = write(tmp_path, """
[cameras.yard]
threshold = -1
[cameras.yard.events]
quiet_s = 0
typo = 1
[cameras.gate]
roi = [0.5, 0.0, 0.4, 1.0]
[zones]
x = 1
""")
    with pytest.raises(ConfigError) as caught:
        load_cameras_file(path)
    message = str(caught.value)
    for part in ("zones: unknown section", "cameras.yard.threshold: Input should be greater than 0 (got -1)",
                 "cameras.yard.events.quiet_s: Input should be greater than 0 (got 0)", "cameras.yard.events.typo: Extra inputs",
                 "cameras.gate: Value error, roi must be x0, y0, x1, y1 with 0 <= x0 < x1 <= 1"):
        assert part in message, message
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_cameras_file(write(tmp_path, "[cameras.yard\n"))
    with pytest.raises(ConfigError, match="no such file"):
        load_cameras_file(tmp_path / "missing.toml")
    good = load_cameras_file(write(tmp_path, "[cameras.yard]\nthreshold = 0.4\nroi = [0, 0.5, 1, 1]\n[cameras.yard.events]\nopen_frames = 2\n"))
    assert good["yard"].threshold == 0.4 and good["yard"].roi == (0, 0.5, 1, 1) and good["yard"].events.open_frames == 2
    assert good["yard"].events.quiet_s == 30  # what it leaves out is the default


def test_a_region_of_interest_crops_and_a_sliver_is_refused():
    image = Image.new("RGB", (400, 300))
    assert crop_to(image, (0.25, 0.5, 0.75, 1.0), 20).size == (200, 150)
    with pytest.raises(ImageRejected, match="extreme-aspect-ratio"):
        crop_to(image, (0.0, 0.0, 1.0, 0.01), 20)


def apply(settings, path) -> str:
    env = {**__import__("os").environ, **settings_env(settings)}
    done = subprocess.run([sys.executable, "-m", "workers.cli", "cameras", "apply", str(path), "--by", "tester"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def wait_configured(worker, n: int) -> None:
    deadline = time.monotonic() + 30
    while worker.status().get("cameras_configured") != n:
        assert time.monotonic() < deadline, worker.status()
        time.sleep(0.3)


def local_score(bundle_dir, settings, data: bytes, roi=None, method=None) -> float:
    bundle, loaded = load_bundle_with_model(bundle_dir, "cpu")
    image = decode_image(data, max_bytes=10**7, max_pixels=10**8)
    if roi is not None:
        image = crop_to(image, roi, 20)
    emb = loaded.encode_images(torch.stack([loaded.preprocess(image)])).numpy()
    return float(scorer_from_bundle(bundle, settings, method).score(emb).score[0])


def test_camera_settings_reach_running_workers_and_can_be_withdrawn(stream_settings, tiny_bundle_dir, other_bundle, workers, tmp_path):
    s = stream_settings
    s.worker.bundle = tiny_bundle_dir
    s.method.threshold = 0.9999  # the workers' setting: every frame OOD
    scorer, events = workers("score-worker", s, "scorer"), workers("events-worker", s, "events")
    scorer.wait_ready()
    events.wait_ready()
    produce_records(s, [frame_record(0, jpeg(0), camera="b")])
    read_topic(s, s.topics.scores, expect=1)

    out = apply(s, write(tmp_path, """
[cameras.b]
threshold = 0.0001
[cameras.q.events]
open_frames = 1
[cameras.r]
roi = [0.0, 0.0, 0.5, 0.5]
[cameras.m]
method = "mcm"
threshold = 0.2
[cameras.c]
method = "csp"
[cameras.farm]
bundle = "%s"
[cameras.lost]
bundle = "%s"
""" % (other_bundle, tmp_path / "no-such-bundle")))
    assert "b: added" in out and "q: added" in out and "r: added" in out
    wait_configured(scorer, 7)
    wait_configured(events, 7)
    frame = jpeg(7, size=(128, 96))
    produce_records(s, [frame_record(1, jpeg(1), camera="b"), frame_record(2, jpeg(2), camera="q"),
                        frame_record(3, frame, camera="r"), frame_record(4, frame, camera="plain"),
                        frame_record(6, frame, camera="m"), frame_record(7, frame, camera="c"),
                        frame_record(8, frame, camera="farm"), frame_record(9, frame, camera="lost")])
    scores = {FrameScore.from_bytes(r.value).frame_id: FrameScore.from_bytes(r.value) for r in read_topic(s, s.topics.scores, expect=9)}
    # farm's own known classes (a bundle of the same model), scored as that bundle scores it; lost's bundle is not there
    assert scores["f8"].id_class in {"yellow square", "purple disc"}
    np.testing.assert_allclose(scores["f8"].score, local_score(other_bundle, s, frame), atol=1e-4)
    assert scores["f9"].id_class in {"red circle", "green square", "blue circle"}
    # m's own method, with its own threshold, in the same batches as the others' InterNeg
    assert (scores["f6"].method, scores["f6"].threshold, scores["f4"].method) == ("mcm", 0.2, "interneg")
    np.testing.assert_allclose(scores["f6"].score, local_score(tiny_bundle_dir, s, frame, method="mcm"), atol=1e-4)
    assert scores["f7"].method == "interneg"  # CSP is not in the bundle: the worker's method, and a warning in its log
    assert (scores["f0"].verdict, scores["f0"].threshold) == ("ood", 0.9999)
    assert (scores["f1"].verdict, scores["f1"].threshold) == ("id", 0.0001)  # b's own threshold, live
    assert scores["f3"].score != scores["f4"].score  # r scores its region only
    np.testing.assert_allclose(scores["f3"].score, local_score(tiny_bundle_dir, s, frame, roi=(0, 0, 0.5, 0.5)), atol=1e-4)
    np.testing.assert_allclose(scores["f4"].score, local_score(tiny_bundle_dir, s, frame), atol=1e-4)
    deadline = time.monotonic() + 30
    while not any(e.camera_id == "q" and e.status == "opened" for e in (OODEvent.from_bytes(r.value) for r in read_topic(s, s.topics.events, idle_s=1))):
        assert time.monotonic() < deadline, "q's one OOD frame opened no event (its open_frames = 1)"
    assert "q" in {OODEvent.from_bytes(r.value).camera_id for r in read_topic(s, s.topics.events, idle_s=1)}
    assert "b" not in {OODEvent.from_bytes(r.value).camera_id for r in read_topic(s, s.topics.events, idle_s=1)}  # 1 OOD frame < 3

    out = apply(s, write(tmp_path, "[cameras.q.events]\nopen_frames = 1\n[cameras.r]\nroi = [0.0, 0.0, 0.5, 0.5]\n"))
    assert "b: withdrawn" in out and "q: unchanged" in out
    wait_configured(scorer, 2)
    produce_records(s, [frame_record(5, jpeg(5), camera="b")])
    scores = {FrameScore.from_bytes(r.value).frame_id: FrameScore.from_bytes(r.value) for r in read_topic(s, s.topics.scores, expect=10)}
    assert (scores["f5"].verdict, scores["f5"].threshold) == ("ood", 0.9999)  # back to the workers' setting


def test_calibrate_from_a_cameras_recorded_scores_over_a_time_range(stream_settings, tiny_bundle_dir, workers):
    """`interneg calibrate --camera --since --until`: the threshold from the scores the workers
    recorded for that camera in that time, other cameras and times left out."""
    from datetime import datetime, timezone

    from pipeline.metrics import threshold_for_rate

    s = stream_settings
    s.worker.bundle = tiny_bundle_dir
    scorer = workers("score-worker", s, "scorer")
    scorer.wait_ready()
    produce_records(s, [frame_record(i, jpeg(i), camera="lobby") for i in range(5)])  # before the range
    read_topic(s, s.topics.scores, expect=5)
    time.sleep(1.5)
    since = datetime.now(timezone.utc).isoformat()
    produce_records(s, [frame_record(100 + i, jpeg(100 + i), camera="lobby") for i in range(40)]
                    + [frame_record(200 + i, jpeg(200 + i), camera="street") for i in range(10)])
    recorded = [FrameScore.from_bytes(r.value) for r in read_topic(s, s.topics.scores, expect=55)]
    until = datetime.now(timezone.utc).isoformat()
    produce_records(s, [frame_record(300 + i, jpeg(300 + i), camera="lobby") for i in range(5)])  # after it
    read_topic(s, s.topics.scores, expect=60)
    in_range = [r.score for r in recorded if r.camera_id == "lobby" and int(r.frame_id[1:]) >= 100]
    assert len(in_range) == 40
    env = {**__import__("os").environ, **settings_env(s)}
    done = subprocess.run([sys.executable, "-m", "workers.cli", "calibrate", "--camera", "lobby", "--since", since, "--until", until,
                           "--false-alarms", "0.1"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    expected = threshold_for_rate(np.array(in_range), 0.1)
    assert done.stdout.strip() == f"INTERNEG_METHOD__THRESHOLD={expected:.6g}"
    assert "interneg: 40 normal frames, 10.00 % of them below it" in done.stderr
