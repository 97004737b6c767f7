"""Test-time inversion (METHOD §4) with the tiny model."""
import numpy as np
import torch

from pipeline.inversion import TemplateBank, TextInverter
from schemas.settings import InversionSettings


def images(n=6, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, 64)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_templates_have_the_layout_of_a_one_token_word(tiny_model):
    bank = TemplateBank(tiny_model.tokenizer)
    assert len(bank) == 80
    sentences = tiny_model.tokenize([t.replace("$", "dog") for t in bank.texts])  # 'dog' is one BPE token
    length = bank.tokens.shape[1]
    for i in range(len(bank)):
        keep = torch.arange(length) != bank.positions[i]
        assert torch.equal(sentences[i, :length][keep], bank.tokens[i][keep])


def test_inversion_lowers_its_loss(tiny_model):
    result = TextInverter(tiny_model, InversionSettings(steps=10)).run(images())
    assert result.loss_history.shape == (11,)
    assert result.loss_history[-1] < result.loss_history[0] - 0.05
    np.testing.assert_allclose(np.linalg.norm(result.embeddings, axis=1), 1, atol=1e-5)
    # the reported per-image loss is 1 - cos(returned embedding, image)
    np.testing.assert_allclose(result.final_loss, 1 - (result.embeddings * images()).sum(1), atol=1e-5)


def test_inversion_repeats_under_a_seed(tiny_model):
    a = TextInverter(tiny_model, InversionSettings(seed=3)).invert(images())
    b = TextInverter(tiny_model, InversionSettings(seed=3)).invert(images())
    c = TextInverter(tiny_model, InversionSettings(seed=4)).invert(images())
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_separation_regulariser_pushes_away_from_prototypes(tiny_model):
    prototypes = images(4, seed=1)
    target = images(6, seed=2)
    plain = TextInverter(tiny_model, InversionSettings(steps=30), prototypes).invert(target)
    pushed = TextInverter(tiny_model, InversionSettings(steps=30, reg_weight=0.3), prototypes).invert(target)
    assert (pushed @ prototypes.T).mean() < (plain @ prototypes.T).mean()
