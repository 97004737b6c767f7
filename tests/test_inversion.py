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


def test_prefix_cached_tower_equals_the_whole_sentence_tower(tiny_model):
    """The cached-prefix path gives the features and gradients of running every template in full."""
    from pipeline.inversion import PrefixCachedTower

    assert PrefixCachedTower.supports(tiny_model.model)
    inverter = TextInverter(tiny_model, InversionSettings())
    assert inverter.tower is not None
    generator = torch.Generator().manual_seed(0)
    template_idx = torch.cat([torch.arange(80), torch.randint(80, (5,), generator=generator)])  # every template
    fast = (torch.randn(85, tiny_model.token_width, generator=generator) * 0.02).requires_grad_(True)
    full = fast.detach().clone().requires_grad_(True)
    target = torch.nn.functional.normalize(torch.randn(85, tiny_model.embed_dim, generator=generator), dim=-1)
    a, b = inverter._encode(fast, template_idx), inverter._encode_full(full, template_idx)
    (a * target).sum().backward()
    (b * target).sum().backward()
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    torch.testing.assert_close(fast.grad, full.grad, rtol=0, atol=1e-5)
    assert full.grad.abs().max() > 0.1  # the gradient compared is not vanishing
