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
