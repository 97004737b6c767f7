"""Model loading and the context-truncated text encoder against open_clip's own encode_text."""
import numpy as np
import pytest
import torch

from pipeline.model import ModelLoadError, encode_text_truncated, load_model, model_identity
from schemas.settings import ModelSettings

from conftest import TINY

PROMPTS = [
    "The nice dog.",
    "This is a red photo.",
    "a photo of a very small and rather unusual looking bicycle parked next to a fence.",
    "x",
]


def test_truncated_text_encoder_matches_open_clip_on_tiny(tiny_model):
    tokens = tiny_model.tokenize(PROMPTS)
    with torch.no_grad():
        full = tiny_model.model.encode_text(tokens)
        short = encode_text_truncated(tiny_model.model, tokens)
    assert torch.max(torch.abs(full - short)).item() <= 1e-5


def test_truncated_text_encoder_matches_open_clip_on_vit_b_16():
    """The same code path on ViT-B/16 geometry (random weights: no download)."""
    loaded = load_model(ModelSettings(name="ViT-B-16", pretrained="", device="cpu"))
    assert loaded.token_width == 512 and loaded.embed_dim == 512
    tokens = loaded.tokenize(PROMPTS)
    with torch.no_grad():
        full = torch.nn.functional.normalize(loaded.model.encode_text(tokens), dim=-1)
    short = loaded.encode_texts(PROMPTS, batch_size=3)  # two batches of different lengths
    assert np.max(np.abs(full.numpy() - short)) <= 1e-5


def test_random_weights_are_reproducible_and_identified(tiny_model):
    again = load_model(TINY)
    assert again.model_id == tiny_model.model_id == "interneg-tiny/random-seed0"
    np.testing.assert_array_equal(again.encode_texts(PROMPTS), tiny_model.encode_texts(PROMPTS))
    other = load_model(TINY.model_copy(update={"seed": 1}))
    assert other.model_id != tiny_model.model_id


def test_local_weights_file_loads_offline(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = tmp_path / "weights.pt"
    torch.save(tiny_model.model.state_dict(), path)
    loaded = load_model(ModelSettings(name="interneg-tiny", pretrained=str(path), device="cpu", seed=123))
    assert loaded.model_id.startswith("interneg-tiny/sha256:")
    assert loaded.model_id == model_identity(ModelSettings(name="interneg-tiny", pretrained=str(path)))
    np.testing.assert_allclose(loaded.encode_texts(PROMPTS), tiny_model.encode_texts(PROMPTS), atol=1e-6)
    images = torch.rand(2, 3, 224, 224)
    torch.testing.assert_close(loaded.encode_images(images), tiny_model.encode_images(images))


def test_clear_errors_for_bad_model_settings(tmp_path):
    with pytest.raises(ModelLoadError, match="no such weights file"):
        load_model(ModelSettings(name="interneg-tiny", pretrained=str(tmp_path / "missing.pt")))
    with pytest.raises(ModelLoadError, match="unknown model"):
        load_model(ModelSettings(name="no-such-net", pretrained=""))
    with pytest.raises(ModelLoadError, match="neither a file nor a tag"):
        load_model(ModelSettings(name="interneg-tiny", pretrained="openai"))


def test_hub_weights_offline_say_how_to_run(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="INTERNEG_MODEL__PRETRAINED=/path/to/weights.bin"):
        load_model(ModelSettings(name="ViT-B-32", pretrained="openai", device="cpu"))


def test_image_encoder_batches_and_normalises(tiny_model):
    emb = tiny_model.encode_images(torch.rand(3, 3, 224, 224))
    assert emb.shape == (3, 64)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    assert tiny_model.logit_scale == pytest.approx(1 / 0.07, rel=1e-5)
