"""The streaming service against a real Kafka broker: workers as real processes."""
from __future__ import annotations

import io
import time
from collections import Counter

import numpy as np
import torch
from kafka import TopicPartition
from PIL import Image

from pipeline.bundle import load_bundle_with_model
from pipeline.images import decode_image
from pipeline.methods import scorer_from_bundle
from schemas.messages import OODAlert, H_CAMERA_ID, H_CONTENT_TYPE, H_FRAME_ID, H_TS, Candidate, FrameScore, Vector
from workers.kafka_clients import make_consumer
from workers.producer import produce_records


def jpeg(seed: int, size=(96, 72)) -> bytes:
    rng = np.random.default_rng(seed)
    colour = rng.integers(0, 256, size=3)
    pixels = np.clip(rng.normal(colour, 40, size=(size[1], size[0], 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def frame_record(i: int, data: bytes, camera: str = "cam-1"):
    headers = [(H_FRAME_ID, f"f{i}".encode()), (H_CAMERA_ID, camera.encode()), (H_TS, str(int(time.time() * 1000)).encode()), (H_CONTENT_TYPE, b"image/jpeg")]
    return camera.encode(), data, headers


def read_topic(settings, topic: str, *, expect: int | None = None, timeout_s: float = 90.0, idle_s: float = 3.0):
    """All records of a topic (read_committed) until ``expect`` are seen, or nothing new for idle_s after that."""
    consumer = make_consumer(settings.kafka, group_id=None, isolation_level="read_committed")
    partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
    consumer.assign(partitions)
    consumer.seek_to_beginning(*partitions)
    records, deadline, last_new = [], time.monotonic() + timeout_s, time.monotonic()
    while time.monotonic() < deadline:
        polled = consumer.poll(timeout_ms=300)
        for batch in polled.values():
            records.extend(batch)
            last_new = time.monotonic()
        if expect is not None and len(records) >= expect and time.monotonic() - last_new > idle_s:
            break
        if expect is None and time.monotonic() - last_new > idle_s:
            break
    consumer.close()
    return records


def expected_scores(bundle_dir, settings, frames: list[bytes]) -> np.ndarray:
    bundle, loaded = load_bundle_with_model(bundle_dir, "cpu")
    scorer = scorer_from_bundle(bundle, settings)
    images = [loaded.preprocess(decode_image(f, max_bytes=10**7, max_pixels=10**8)) for f in frames]
    return scorer.score(loaded.encode_images(torch.stack(images)).numpy()).score


def scores_by_frame(records) -> dict[str, list[FrameScore]]:
    out: dict[str, list[FrameScore]] = {}
    for r in records:
        score = FrameScore.from_bytes(r.value)
        assert r.key.decode() == score.frame_id
        out.setdefault(score.frame_id, []).append(score)
    return out


def test_every_frame_gets_exactly_one_score_and_alerts_follow_the_threshold(stream_settings, tiny_bundle_dir, workers):
    settings = stream_settings
    frames = [jpeg(i) for i in range(40)]
    expected = expected_scores(tiny_bundle_dir, settings, frames)
    ordered = np.sort(expected)
    gap = int(np.argmax(np.diff(ordered[10:30]))) + 10  # a threshold far from every score, mid-range
    settings.method.threshold = float((ordered[gap] + ordered[gap + 1]) / 2)
    settings.worker.bundle = tiny_bundle_dir
    worker = workers("score-worker", settings, "scorer-a")
    worker.wait_ready()
    produce_records(settings, [frame_record(i, f) for i, f in enumerate(frames)])
    records = read_topic(settings, settings.topics.scores, expect=40)
    scores = scores_by_frame(records)
    assert sorted(scores) == sorted(f"f{i}" for i in range(40))
    assert all(len(v) == 1 for v in scores.values())
    got = np.array([scores[f"f{i}"][0].score for i in range(40)])
    np.testing.assert_allclose(got, expected, atol=1e-4)
    alert_records = read_topic(settings, settings.topics.alerts, idle_s=1)
    assert {r.key for r in alert_records} == {b"cam-1"}  # keyed by camera: the events worker's order
    alerts = {OODAlert.from_bytes(r.value).frame_id for r in alert_records}
    assert alerts == {f"f{i}" for i in range(40) if expected[i] < settings.method.threshold}
    assert 0 < len(alerts) < 40
    first = scores["f0"][0]
    assert first.negatives and first.model_id == "interneg-tiny/random-seed0" and first.camera_id == "cam-1"
    # every frame below beta became an inversion candidate carrying its embedding
    candidates = read_topic(settings, settings.topics.candidates, idle_s=1)
    assert {r.key.decode() for r in candidates} == {f"f{i}" for i in range(40) if expected[i] < settings.method.beta}
    status = worker.status()
    assert status["frames_scored"] == 40
    assert worker.terminate() == 0  # SIGTERM drains and exits cleanly


def test_two_workers_split_partitions_and_a_killed_one_loses_nothing(stream_settings, tiny_bundle_dir, workers):
    settings = stream_settings
    settings.worker.bundle = tiny_bundle_dir
    a = workers("score-worker", settings, "scorer-a")
    b = workers("score-worker", settings, "scorer-b")
    a.wait_ready()
    b.wait_ready()
    n = 400
    sent = produce_records(settings, [frame_record(i, jpeg(i % 50), camera=f"cam-{i % 8}") for i in range(n)])
    inputs = {(m.partition, m.offset) for m in sent}
    deadline = time.monotonic() + 60
    while a.status().get("frames_scored", 0) < 40 and time.monotonic() < deadline:
        time.sleep(0.2)
    a.kill()
    records = read_topic(settings, settings.topics.scores, expect=n, timeout_s=180, idle_s=8)
    scores = [FrameScore.from_bytes(r.value) for r in records]
    scored_inputs = Counter((s.source.partition, s.source.offset) for s in scores)
    assert set(scored_inputs) == inputs  # every input offset has a score: nothing lost
    duplicates = sum(c - 1 for c in scored_inputs.values())
    assert duplicates <= 4 * settings.worker.batch_size  # only the killed worker's uncommitted batches repeat
    by_worker = Counter(s.worker for s in scores)
    assert by_worker["scorer-a"] > 0 and by_worker["scorer-b"] > 0
    # the survivor took over every partition: frames sent now, to all of them, are all its own
    later = produce_records(settings, [frame_record(n + i, jpeg(i), camera=f"cam-{i % 8}") for i in range(40)])
    assert {m.partition for m in later} == {0, 1, 2, 3}
    records = read_topic(settings, settings.topics.scores, expect=len(records) + 40, timeout_s=120, idle_s=2)
    fresh = [s for s in map(lambda r: FrameScore.from_bytes(r.value), records) if int(s.frame_id[1:]) >= n]
    assert {(s.source.partition, s.source.offset) for s in fresh} == {(m.partition, m.offset) for m in later}
    assert {s.worker for s in fresh} == {"scorer-b"}


def crafted_candidates(bundle_dir, n: int, seed: int = 0) -> list[Candidate]:
    """Embeddings pointing away from every ID prototype: their inversions are admissible."""
    bundle, loaded = load_bundle_with_model(bundle_dir, "cpu")
    rng = np.random.default_rng(seed)
    away = -bundle.prototypes.mean(axis=0)
    out = []
    for i in range(n):
        v = away / np.linalg.norm(away) + 0.6 * rng.normal(size=away.shape) / np.sqrt(away.size)
        v = (v / np.linalg.norm(v)).astype(np.float32)
        out.append(
            Candidate(
                frame_id=f"c{seed}-{i}", camera_id="cam-x", source={"topic": "frames", "partition": 0, "offset": i},
                score=0.01, embedding=Vector.from_numpy(v, loaded.model_id), created_ms=0,
            )
        )
    return out


def test_negatives_reach_every_scoring_worker_identically_and_survive_a_restart(stream_settings, tiny_bundle_dir, workers):
    settings = stream_settings
    settings.worker.bundle = tiny_bundle_dir
    settings.bank.capacity = 4
    inverter = workers("invert-worker", settings, "inverter")
    a = workers("score-worker", settings, "scorer-a")
    b = workers("score-worker", settings, "scorer-b")
    for w in (inverter, a, b):
        w.wait_ready()
    candidates = crafted_candidates(tiny_bundle_dir, 12)
    produce_records(settings, [(c.frame_id, c.to_bytes(), None) for c in candidates], topic=settings.topics.candidates)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and inverter.status().get("candidates", 0) < 12:
        time.sleep(0.3)
    truth = inverter.status()
    assert truth["candidates"] == 12 and truth["published"] > 0
    assert 0 < truth["bank_size"] <= 4  # the bound holds, enforced with tombstones
    # scoring workers apply updates between batches: keep frames flowing until both converge
    produce = lambda: produce_records(settings, [frame_record(i, jpeg(i)) for i in range(4)])  # noqa: E731
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        produce()
        time.sleep(1)
        if a.status()["bank_digest"] == b.status()["bank_digest"] == truth["bank_digest"]:
            break
    sa, sb = a.status(), b.status()
    assert sa["bank_ids"] == sb["bank_ids"] == truth["bank_ids"]
    assert sa["bank_digest"] == sb["bank_digest"] == truth["bank_digest"]
    negatives = read_topic(settings, settings.topics.negatives, idle_s=1)
    tombstones = [r for r in negatives if r.value is None]
    assert len(negatives) - len(tombstones) == truth["published"]
    assert len(tombstones) == truth["published"] - truth["bank_size"]
    # a restarted scoring worker rebuilds the identical bank from the compacted topic
    a.terminate()
    again = workers("score-worker", settings, "scorer-a2")
    again.wait_ready()
    assert again.status()["bank_digest"] == truth["bank_digest"]
    # replayed candidates: whatever was published once is never published again
    produce_records(settings, [(c.frame_id, c.to_bytes(), None) for c in candidates], topic=settings.topics.candidates)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and inverter.status()["candidates"] < 24:
        time.sleep(0.3)
    published = Counter(r.key for r in read_topic(settings, settings.topics.negatives, idle_s=1) if r.value is not None)
    assert published and max(published.values()) == 1


def test_topics_are_created_idempotently_with_their_settings(stream_settings):
    from kafka.admin import ConfigResource, ConfigResourceType

    from workers.kafka_clients import make_admin
    from workers.topics import ensure_topics

    actions = ensure_topics(stream_settings)  # the fixture created them already
    assert set(actions.values()) == {"exists, configs updated"}
    admin = make_admin(stream_settings.kafka)
    try:
        t = stream_settings.topics
        described = {d["name"]: len(d["partitions"]) for d in admin.describe_topics([t.frames, t.negatives])}
        assert described == {t.frames: 4, t.negatives: 1}
        resources = [ConfigResource(ConfigResourceType.TOPIC, name, configs=None) for name in (t.negatives, t.frames)]
        configs = admin.describe_configs(resources)["topic"]
        assert configs[t.negatives]["cleanup.policy"]["value"] == "compact"
        assert configs[t.frames]["cleanup.policy"]["value"] == "delete"
        for name in (t.negatives, t.frames):
            assert configs[name]["max.message.bytes"]["value"] == str(stream_settings.kafka.max_message_bytes)
    finally:
        admin.close()


def test_an_adaneg_worker_adapts_its_own_memory_and_publishes_no_candidates(stream_settings, tiny_bundle_dir, workers):
    settings = stream_settings
    settings.method.method = "adaneg"
    settings.method.adaneg_gap = 0.0  # every frame is remembered: the random tiny model is never confident
    settings.worker.bundle = tiny_bundle_dir
    images = [jpeg(i) for i in range(16)]
    expected = expected_scores(tiny_bundle_dir, settings, images)  # an empty memory: the texts alone
    worker = workers("score-worker", settings, "adaneg-a")
    worker.wait_ready()
    produce_records(settings, [frame_record(i, f) for i, f in enumerate(images)])
    first = scores_by_frame(read_topic(settings, settings.topics.scores, expect=16))
    # the same pictures again, once the memory holds the first ones
    produce_records(settings, [frame_record(100 + i, f) for i, f in enumerate(images)])
    both = scores_by_frame(read_topic(settings, settings.topics.scores, expect=32))
    assert sorted(both) == sorted([f"f{i}" for i in range(16)] + [f"f{100 + i}" for i in range(16)])
    assert all(len(v) == 1 and v[0].method == "adaneg" for v in both.values())
    # the batch scored first saw an empty memory: exactly the offline scores
    earliest = min(s[0].scored_at_ms for s in first.values())
    opening = [i for i in range(16) if first[f"f{i}"][0].scored_at_ms == earliest]
    np.testing.assert_allclose([first[f"f{i}"][0].score for i in opening], expected[opening], atol=1e-4)
    # the second time round the memory has moved the scores
    again = np.array([both[f"f{100 + i}"][0].score for i in range(16)])
    assert np.abs(again - expected).max() > 1e-3
    assert worker.status()["adaptations"] > 0
    assert read_topic(settings, settings.topics.candidates, idle_s=1) == []  # AdaNeg adapts here, not through inversion
