"""The review page end to end (issue 14), in a real headless browser (Debian's chromium):
frames -> scoring worker -> alerts -> events worker -> events -> recorder -> store -> page;
then "Normal" on the page -> ood.control -> every scoring worker's next batch.

Screenshots go to $INTERNEG_SCREENSHOTS (default: the test's tmp folder); their paths are printed.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.bundle import load_bundle_with_model
from pipeline.images import decode_image
from schemas.messages import AllowEntry, FrameScore, OODAlert
from test_events_stream import LOOP, looped, storm_settings
from test_streaming import frame_record, read_topic
from workers.processes import free_port, settings_env
from workers.producer import produce_records

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# What the machine's closed network needs (and a root user): see the environment notes in docs
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def wait_until(check, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.5)
    raise AssertionError(f"not within {timeout_s} s: {what}")


@pytest.fixture
def review_ui(stream_settings, tmp_path):
    port = free_port()
    log = open(tmp_path / "ui.log", "ab")
    env = {**os.environ, **settings_env(stream_settings), "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "workers.cli", "ui", "--store", f"sqlite:///{tmp_path}/review.db",
                                "--port", str(port), "--operator", "tester"], env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"

    def up():
        if process.poll() is not None:
            raise AssertionError(f"ui exited: {(tmp_path / 'ui.log').read_text()[-2000:]}")
        try:
            return get_json(base + "/healthz")["ok"]
        except OSError:
            return False

    wait_until(up, 60, "the review page answers")
    yield base
    process.terminate()
    process.wait(20)
    log.close()


def embeddings(bundle_dir, images: list[bytes]) -> np.ndarray:
    _, loaded = load_bundle_with_model(bundle_dir, "cpu")
    batch = torch.stack([loaded.preprocess(decode_image(b, max_bytes=10**7, max_pixels=10**8)) for b in images])
    e = loaded.encode_images(batch).numpy()
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def test_the_page_shows_events_with_snapshots_and_normal_changes_what_workers_do(stream_settings, tiny_bundle_dir, workers, review_ui, tmp_path):
    from playwright.sync_api import sync_playwright

    s = storm_settings(stream_settings, tiny_bundle_dir)
    s.events = s.events.model_copy(update={"quiet_s": 3})
    scorer, events = workers("score-worker", s, "scorer"), workers("events-worker", s, "events")
    scorer.wait_ready()
    events.wait_ready()
    produce_records(s, list(looped(0, 60, int(time.time() * 1000), camera="yard")))
    closed = wait_until(lambda: [e for e in get_json(review_ui + "/api/events?verdict=") if e["status"] == "closed" and e["has_thumbnail"]],
                        120, "a closed event with its snapshot in the store")
    assert len(closed) == 1 and closed[0]["camera_id"] == "yard" and closed[0]["frames"] == 60

    shots = Path(os.environ.get("INTERNEG_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1100, "height": 700})
        page.goto(review_ui + "/")
        card = page.locator(".event").first
        card.wait_for(timeout=20_000)
        page.wait_for_function("() => [...document.querySelectorAll('.event img')].every(i => i.complete && i.naturalWidth > 0)", timeout=20_000)
        text = card.inner_text()
        assert "yard" in text and "60 frames" in text and "negatives:" in text and closed[0]["id_class"] in text
        width = page.evaluate("() => document.querySelector('.event img').naturalWidth")
        assert 0 < width <= 320
        page.screenshot(path=str(shots / "review-events.png"), full_page=True)
        card.locator("button[data-verdict=normal]").click()
        page.wait_for_function("() => document.getElementById('message').textContent.includes('normal')", timeout=20_000)
        page.select_option("#verdict", "normal")
        page.locator(".event .badge.normal").first.wait_for(timeout=20_000)
        page.screenshot(path=str(shots / "review-after-normal.png"), full_page=True)
        browser.close()
    print(f"\n[review] screenshots: {shots / 'review-events.png'}, {shots / 'review-after-normal.png'}")

    reviewed = get_json(review_ui + f"/api/events/{closed[0]['event_id']}")
    assert (reviewed["verdict"], reviewed["verdict_by"]) == ("normal", "tester")
    entries = [AllowEntry.from_bytes(r.value) for r in read_topic(s, s.topics.control, idle_s=1)]
    assert [(e.camera_id, e.event_id) for e in entries] == [("yard", closed[0]["event_id"])]
    wait_until(lambda: scorer.status().get("allow_entries") == 1, 30, "the scoring worker applied the entry")

    # What the worker does next: the best frame again is in-distribution now (no alert, no
    # candidate), on that camera only; a frame far from it still alerts.
    best = int(closed[0]["best_frame_id"].split("-")[1]) % len(LOOP)
    e = embeddings(tiny_bundle_dir, LOOP)
    far = int(np.argmin(e @ e[best]))
    assert float(e[far] @ e[best]) < s.method.allow_cos, "the tiny model sees every loop image as the same scene"
    produce_records(s, [frame_record(1000, LOOP[best], camera="yard"), frame_record(1001, LOOP[far], camera="yard"),
                        frame_record(1002, LOOP[best], camera="gate")])
    scores = {FrameScore.from_bytes(r.value).frame_id: FrameScore.from_bytes(r.value) for r in read_topic(s, s.topics.scores, expect=63)}
    assert (scores["f1000"].verdict, scores["f1000"].allowed_by) == ("id", entries[0].entry_id)
    assert (scores["f1001"].verdict, scores["f1001"].allowed_by) == ("ood", None)
    assert (scores["f1002"].verdict, scores["f1002"].allowed_by) == ("ood", None)  # another camera: not covered
    alerted = {OODAlert.from_bytes(r.value).frame_id for r in read_topic(s, s.topics.alerts, idle_s=1)}
    assert "f1000" not in alerted and {"f1001", "f1002"} <= alerted
