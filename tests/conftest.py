"""Shared fixtures: the tiny random-weights model, generated images, a prepared bundle."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub

from schemas.settings import ModelSettings, Settings  # noqa: E402
from workers.demo import draw_image  # noqa: E402

TINY = ModelSettings(name="interneg-tiny", pretrained="", device="cpu")


@pytest.fixture(scope="session")
def tiny_model():
    from pipeline.model import load_model

    return load_model(TINY)


@pytest.fixture(scope="session")
def class_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("classes")
    for k, (name, colour, shape) in enumerate(
        [("red_circle", (220, 30, 30), "circle"), ("green square", (30, 200, 40), "square"), ("blue_circle", (30, 40, 220), "circle")]
    ):
        folder = root / name
        folder.mkdir()
        for i in range(3):
            draw_image(folder / f"{i}.png", colour, "ellipse" if shape == "circle" else "rectangle", seed=10 * k + i)
    return root


@pytest.fixture(scope="session")
def tiny_settings(tmp_path_factory) -> Settings:
    settings = Settings(_env_file=None)
    settings.model = TINY.model_copy()
    settings.cache_dir = tmp_path_factory.mktemp("cache")
    settings.method.num_negatives = 200
    return settings


@pytest.fixture(scope="session")
def tiny_bundle_dir(tiny_model, class_folder, tiny_settings, tmp_path_factory) -> Path:
    from pipeline.bundle import prepare_bundle, save_bundle

    bundle = prepare_bundle(tiny_model, class_folder, tiny_settings)
    return save_bundle(bundle, tmp_path_factory.mktemp("bundle") / "tiny")


# --- the real Kafka broker -------------------------------------------------------------
import subprocess  # noqa: E402
import uuid  # noqa: E402

BROKER = Path(__file__).resolve().parent.parent / "deploy" / "kafka" / "broker.sh"


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory):
    """One single-node KRaft broker for the whole session, started from the Maven jars."""
    subprocess.run(["bash", str(BROKER), "fetch"], check=True, capture_output=True, timeout=600)
    home = tmp_path_factory.mktemp("kafka")
    started = subprocess.run(["bash", str(BROKER), "start", str(home)], capture_output=True, text=True, timeout=180)
    assert started.returncode == 0, started.stdout + started.stderr
    yield started.stdout.strip().splitlines()[-1]
    subprocess.run(["bash", str(BROKER), "stop", str(home)], capture_output=True, timeout=120)


@pytest.fixture
def stream_settings(kafka_bootstrap, tiny_settings) -> Settings:
    """Settings of a fresh deployment: its own topics and groups on the shared broker."""
    from workers.topics import ensure_topics

    run = uuid.uuid4().hex[:8]
    settings = tiny_settings.model_copy(deep=True)
    settings.kafka.bootstrap_servers = kafka_bootstrap
    settings.kafka.scoring_group = f"scoring-{run}"
    settings.kafka.inversion_group = f"inversion-{run}"
    settings.kafka.session_timeout_ms = 6000
    for name in ("frames", "scores", "alerts", "candidates", "negatives", "deadletter"):
        setattr(settings.topics, name, f"{run}.{getattr(settings.topics, name)}")
    settings.topics.partitions = 4
    settings.worker.batch_size = 8
    settings.worker.batch_timeout_ms = 100
    ensure_topics(settings)
    return settings
