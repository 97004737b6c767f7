"""Issue 14's everyday frictions, each as an operator met it: a second local run, inputs
refused before anything starts, no nan for a rate, model settings a bundle would ignore,
dead letters in the tail, an unreachable broker, open_clip's random-weights warning."""
from __future__ import annotations

import ast
import io
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest
from kafka.consumer.fetcher import ConsumerRecord

from conftest import TINY, fresh_deployment
from workers.cli import main
from workers.demo import draw_image

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "open_clip", "faiss")
NOWHERE = "127.0.0.1:1"  # nothing listens there


def frames_folder(root: Path, n: int = 6) -> Path:
    for i in range(n):
        draw_image(root / f"{i:02d}.jpg", (40 * i % 256, 200, 90), "ellipse" if i % 2 else "rectangle", seed=500 + i)
    return root


def cli_in_child(argv: list[str], env: dict[str, str] | None = None, timeout_s: float = 120) -> tuple[subprocess.CompletedProcess, float, list[str]]:
    """``interneg ARGV`` in a fresh interpreter: (result, seconds, the heavy modules it imported).
    A child process, because what is imported and when Kafka is first reached are per process."""
    code = ("import sys; from workers.cli import main; status = main(%r); "
            "print(sorted(m for m in %r if m in sys.modules)); sys.exit(status)" % (argv, HEAVY))
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=timeout_s,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
    seconds = time.monotonic() - started
    heavy = ast.literal_eval(done.stdout.strip().splitlines()[-1]) if done.stdout.strip() else None  # the list printed last
    return done, seconds, heavy


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.strip().splitlines() if line.strip()]


# --- 1. a second local run ---------------------------------------------------------------------
def local_run_twice(settings, classes: Path, frames: Path, out: Path, bootstrap: str | None) -> list[tuple[object, list[str]]]:
    from workers.local_run import local_run

    runs = []
    for _ in range(2):
        lines: list[str] = []
        # timeout_s bounds each wait of the run: the old second run sat out the whole of it in settle()
        result = local_run(settings.model_copy(deep=True), classes=classes, frames=frames, out=out, bootstrap=bootstrap,
                           rate=None, echo=lines.append, timeout_s=90)
        print("\n".join(lines))
        runs.append((result, lines))
    return runs


def assert_counts_only_its_own(runs, n: int) -> None:
    for result, lines in runs:
        assert result.exit_code == 0 and len(result.passes) == 1
        (run_pass,) = result.passes
        assert run_pass.report.sent == n and len(run_pass.scores) == n
        assert run_pass.bank_at_start == 0  # no negatives inherited from the run before
        # beta 0.99: every frame is an inversion candidate, and only this run's are counted
        assert f"  inversion candidates      {n}" in lines


@pytest.fixture
def every_frame_a_candidate(tiny_settings):
    settings = tiny_settings.model_copy(deep=True)
    settings.method.beta = 0.99
    return settings


def test_the_readme_local_run_twice_in_the_same_folder(every_frame_a_candidate, class_folder, tmp_path):
    """The README's command run again: its own broker on the same folder starts on empty storage."""
    frames = frames_folder(tmp_path / "frames")
    runs = local_run_twice(every_frame_a_candidate, class_folder, frames, tmp_path / "run", bootstrap=None)
    assert_counts_only_its_own(runs, 6)
    assert all(any(line.endswith("empty)") and "kafka broker started" in line for line in lines) for _, lines in runs)


def test_local_run_twice_on_a_given_cluster_uses_topics_of_its_own(every_frame_a_candidate, class_folder, kafka_bootstrap, tmp_path):
    """--bootstrap: the same settings (the same topics and groups) twice; each run has its own and deletes them."""
    from workers.kafka_clients import make_admin

    def runs_topics() -> set[str]:
        admin = make_admin(settings.kafka)
        try:
            return {t for t in admin.list_topics() if t.startswith("local-run-")}
        finally:
            admin.close()

    settings = fresh_deployment(every_frame_a_candidate, kafka_bootstrap)
    before = runs_topics()  # other tests' runs on the session broker
    frames = frames_folder(tmp_path / "frames")
    runs = local_run_twice(settings, class_folder, frames, tmp_path / "run", bootstrap=kafka_bootstrap)
    assert_counts_only_its_own(runs, 6)
    deadline = time.monotonic() + 30
    while runs_topics() - before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not runs_topics() - before, f"topics the runs left behind: {sorted(runs_topics() - before)}"
    # nothing of the deployment's own topics was read or written: they are as fresh_deployment made them
    from workers.local_run import _count_topic

    assert _count_topic(settings, settings.topics.frames) == 0


# --- 2 and 3. inputs refused before anything starts ----------------------------------------------
def bad_local_runs(tmp_path: Path, class_folder: Path) -> dict[str, tuple[list[str], str]]:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a frame")
    frames = frames_folder(tmp_path / "frames", 2)
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    return {
        "frames typo": (["--frames", str(tmp_path / "typo"), "--classes", str(class_folder)], f"--frames {tmp_path / 'typo'}: no such folder or file"),
        "empty frames": (["--frames", str(empty)], f"--frames {empty}: a folder with no image files in it"),
        "classes missing": (["--classes", str(tmp_path / "nope"), "--frames", str(frames)], f"--classes {tmp_path / 'nope'}: no such folder or file"),
        "classes without examples": (["--classes", str(empty), "--frames", str(frames)], f"--classes {empty}: no class sub-folders"),
        "out under a file": (["--frames", str(frames), "--out", str(a_file / "run")], f"--out {a_file / 'run'}: cannot write there"),
    }


@pytest.mark.parametrize("case", ["frames typo", "empty frames", "classes missing", "classes without examples", "out under a file"])
def test_local_run_refuses_bad_inputs_before_starting_anything(case, tmp_path, class_folder):
    argv, expected = bad_local_runs(tmp_path, class_folder)[case]
    out = tmp_path / "run"
    if "--out" not in argv:
        argv = argv + ["--out", str(out)]
    done, seconds, heavy = cli_in_child(["local-run", *argv])
    lines = error_lines(done.stderr)
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {expected}"), done.stderr
    assert heavy == [], "torch, open_clip or faiss were loaded: the model was on its way before the inputs were checked"
    assert not out.exists()  # no broker, no bundle, no logs
    assert seconds < 15  # interpreter and settings only: seconds, not the ~50 s of starting everything


def test_no_rate_is_printed_as_nan(stream_settings, tmp_path):
    """A run whose frames were all skipped (image names, no image inside): a summary with "-" and exit 1, not nan and 0."""
    from workers.local_run import RunPass, RunResult, _summary
    from workers.producer import ProduceReport, Skipped

    report = ProduceReport(topic=stream_settings.topics.frames, camera_id="local-camera",
                           skipped=[Skipped("00.jpg", "not-an-image", "not a JPEG, PNG or WebP file (magic bytes)")])
    result = RunResult([RunPass(report, [], 0.0, 0)])

    class Scorer:
        def status(self) -> dict:
            return {}

    lines: list[str] = []
    _summary(stream_settings, result, None, None, Scorer(), lines.append)
    text = "\n".join(lines)
    assert not re.search(r"\b(nan|inf)\b", text, re.IGNORECASE), text
    assert "throughput                - frames/s" in text
    assert result.exit_code == 1  # nothing sent is no success
    assert "(0.0 frames/s)" in report.summary()  # the produce summary of no time at all


# --- 4. model settings that a bundle would ignore ----------------------------------------------
def test_score_refuses_model_settings_that_contradict_the_bundle(tiny_bundle_dir, class_folder, monkeypatch, capsys, caplog):
    image = str(next((class_folder / "red_circle").iterdir()))
    monkeypatch.setenv("INTERNEG_MODEL__NAME", "interneg-small")
    monkeypatch.setenv("INTERNEG_MODEL__PRETRAINED", "interneg")
    assert main(["score", image, "--bundle", str(tiny_bundle_dir)]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith(f"error: {tiny_bundle_dir}: prepared with model interneg-tiny/random-seed0")
    assert "INTERNEG_MODEL__NAME=interneg-small INTERNEG_MODEL__PRETRAINED=interneg" in lines[0] and "names interneg-small/" in lines[0]
    # the bundle's own model named: no contradiction, and no random-weights warning either (7)
    monkeypatch.setenv("INTERNEG_MODEL__NAME", "interneg-tiny")
    monkeypatch.setenv("INTERNEG_MODEL__PRETRAINED", "")
    with caplog.at_level(logging.WARNING):
        assert main(["score", image, "--bundle", str(tiny_bundle_dir)]) == 0
    assert "1 scored" in capsys.readouterr().err
    assert not [r for r in caplog.records if "No pretrained weights" in r.getMessage()]


def test_a_worker_refuses_model_settings_that_contradict_its_bundle(stream_settings, tiny_bundle_dir):
    from pipeline.bundle import BundleError
    from workers.scoring_worker import ScoringWorker

    s = stream_settings.model_copy(deep=True)
    s.worker.bundle = tiny_bundle_dir
    s.model.seed = 7  # random weights of another seed: another model
    with pytest.raises(BundleError, match=r"prepared with model interneg-tiny/random-seed0, but .*INTERNEG_MODEL__SEED=7 names interneg-tiny/random-seed7"):
        ScoringWorker(s)


# --- 5. dead letters in the tail ------------------------------------------------------------------
def test_tail_shows_why_and_where_from_for_each_dead_letter(stream_settings):
    from workers.delivery import dead_letter
    from workers.producer import produce_records
    from workers.tail import tail

    s = stream_settings
    original = ConsumerRecord(s.topics.frames, 2, 0, 17, 0, 0, b"cam\x1b[2J", b"\x00not an image",
                              [("frame-id", b"f17"), ("x-dl-reason", b"forged")], None, 3, 4, -1)
    letter = dead_letter(s.topics.deadletter, original, "not-an-image", "unrecognised image format\x1b[31m", "scorer-1")
    produce_records(s, [(letter.key, letter.value, letter.headers)], topic=s.topics.deadletter)
    out = io.StringIO()
    assert tail(s, topic=s.topics.deadletter, from_beginning=True, max_records=1, timeout_s=30, out=out) == 1
    line = out.getvalue().strip()
    assert "DEAD-LETTER  reason=not-an-image  " in line  # ours, not the frame's forged one
    assert f"source={s.topics.frames}[2]@17  worker=scorer-1  key=cam\\x1b[2J  13 bytes" in line
    assert line.endswith("detail=unrecognised image format\\x1b[31m") and "\x1b" not in line
    out = io.StringIO()
    tail(s, topic=s.topics.deadletter, from_beginning=True, max_records=1, timeout_s=30, out=out, as_json=True)
    shown = json.loads(out.getvalue())
    assert shown["reason"] == "not-an-image" and shown["detail"] == "unrecognised image format\x1b[31m"
    assert shown["source"] == {"topic": s.topics.frames, "partition": 2, "offset": 17} and shown["bytes"] == 13
    assert "\x1b" not in out.getvalue()  # JSON escapes it


# --- 6. an unreachable broker ----------------------------------------------------------------------
def assert_one_line_naming(done_or_lines, where: str = NOWHERE) -> None:
    lines = done_or_lines if isinstance(done_or_lines, list) else error_lines(done_or_lines.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: ") and where in lines[0], lines


def test_an_unreachable_broker_is_reported_within_the_connect_timeout(monkeypatch, capsys, tmp_path):
    """topics with the default (10 s); tail and produce with INTERNEG_KAFKA__CONNECT_TIMEOUT_MS=2000."""
    started = time.monotonic()
    assert main(["topics", "--bootstrap", NOWHERE]) == 2
    assert time.monotonic() - started < 20  # kafka-python's own bootstrap gave up after 30 s
    assert_one_line_naming(error_lines(capsys.readouterr().err))
    monkeypatch.setenv("INTERNEG_KAFKA__CONNECT_TIMEOUT_MS", "2000")
    frames = frames_folder(tmp_path / "frames", 1)
    for argv in (["tail"], ["produce", str(frames)]):
        started = time.monotonic()
        assert main([*argv, "--bootstrap", NOWHERE]) == 2, argv
        assert time.monotonic() - started < 8, argv
        assert_one_line_naming(error_lines(capsys.readouterr().err))


def test_a_worker_and_local_run_give_up_on_an_unreachable_broker_at_start(tiny_bundle_dir, tmp_path):
    env = {"INTERNEG_KAFKA__CONNECT_TIMEOUT_MS": "2000", "INTERNEG_MODEL__NAME": "interneg-tiny", "INTERNEG_MODEL__PRETRAINED": ""}
    done, _, _ = cli_in_child(["score-worker", "--bundle", str(tiny_bundle_dir), "--bootstrap", NOWHERE], env)
    exited = time.time()
    assert done.returncode == 2
    # the worker's own log says when it was ready to connect (imports and the model take anything from 5 to 40 s before)
    logged = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    starting = next(r for r in logged if r.get("event") == "starting")
    assert exited - datetime.fromisoformat(starting["timestamp"].replace("Z", "+00:00")).timestamp() < 8
    assert_one_line_naming([line for line in done.stderr.splitlines() if line.startswith("error: ")])
    done, seconds, heavy = cli_in_child(["local-run", "--bootstrap", NOWHERE, "--out", str(tmp_path / "run")], env)
    assert_one_line_naming(done)
    assert done.returncode == 2 and heavy == [] and seconds < 15 and not (tmp_path / "run").exists()


def test_once_reached_a_lost_broker_is_waited_for(own_broker, tiny_settings):
    """Only the first contact fails fast: a client made while a reached broker restarts waits for it,
    as a running worker's renewed consumer must (tests/test_faults.py restarts a broker under workers)."""
    from workers.kafka_clients import make_admin, make_producer

    start, stop = own_broker
    kafka = tiny_settings.kafka.model_copy(update={"bootstrap_servers": start(), "connect_timeout_ms": 1000})
    make_admin(kafka).close()
    stop()
    made, failed = [], []
    began = time.monotonic()

    def connect() -> None:
        try:
            made.append(make_producer(kafka))
        except Exception as exc:  # noqa: BLE001 - what a worker would die of
            failed.append((exc, time.monotonic() - began))

    thread = threading.Thread(target=connect)
    thread.start()
    time.sleep(4)  # four times the connect timeout
    assert not failed and thread.is_alive()
    assert start() == kafka.bootstrap_servers
    thread.join(60)
    # kafka-python's own bootstrap (30 s, its retries backing off up to ~27 s apart) may miss a
    # broker that came back late in it; what matters is that connect_timeout_ms did not cut it short
    assert made or failed[0][1] > 25, failed
    for producer in made:
        producer.close()


# --- 7. open_clip's random-weights warning ------------------------------------------------------
def test_random_weights_asked_for_load_without_open_clips_warning(caplog):
    import open_clip

    from pipeline.model import load_model

    with caplog.at_level(logging.WARNING):
        load_model(TINY)
    assert not [r for r in caplog.records if "No pretrained weights" in r.getMessage()]
    with caplog.at_level(logging.WARNING):  # open_clip itself still warns: only the expected case is silenced
        open_clip.create_model(TINY.name)
    assert [r for r in caplog.records if "No pretrained weights" in r.getMessage()]
