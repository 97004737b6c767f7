"""The batched transform against open_clip's own, and the device JPEG path."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.images import decode_image
from pipeline.preprocess import BatchPreprocessor, decode_jpegs_on_device, draft_for


def photo(size, fmt="PNG", seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=(8, 8, 3), dtype=np.uint8)
    image = Image.fromarray(base).resize(size, Image.BILINEAR)  # smooth, like a photo
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, quality=95)
    return buffer.getvalue()


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (300, 301), (224, 224), (120, 60)])
def test_batched_transform_equals_open_clip(tiny_model, size):
    pre = BatchPreprocessor.for_model(tiny_model.model)
    image = Image.open(io.BytesIO(photo(size))).convert("RGB")
    expected = tiny_model.preprocess(image)
    got = pre.batch([pre.to_uint8(image)])[0]
    assert got.shape == expected.shape == (3, 224, 224)
    assert torch.max(torch.abs(got - expected)).item() <= 1e-6


def test_jpeg_draft_decodes_at_a_reduced_scale_close_to_the_full_decode(tiny_model):
    pre = BatchPreprocessor.for_model(tiny_model.model)
    data = photo((1280, 960), fmt="JPEG")
    image = Image.open(io.BytesIO(data))
    draft_for(image, 224)
    assert image.size == (320, 240)  # 1/4 scale still covers 224
    full = pre.batch([pre.to_uint8(Image.open(io.BytesIO(data)).convert("RGB"))])
    drafted = pre.batch([pre.to_uint8(decode_image(data, max_bytes=10**7, max_pixels=10**8, draft_short_side=224))])
    assert torch.mean(torch.abs(full - drafted)).item() < 0.05  # normalised units: a few grey levels


def test_device_jpeg_decode_matches_the_pil_path(tiny_model):
    pre = BatchPreprocessor.for_model(tiny_model.model)
    datas = [photo((640, 480), fmt="JPEG", seed=s) for s in range(3)]
    on_device = decode_jpegs_on_device(datas, pre, "cpu")  # nvJPEG on a GPU; the same code on the CPU here
    cpu = pre.batch([pre.to_uint8(Image.open(io.BytesIO(d)).convert("RGB")) for d in datas])
    assert on_device.shape == cpu.shape == (3, 3, 224, 224)
    assert torch.mean(torch.abs(on_device - cpu)).item() < 0.05


def test_the_paper_crop_resizes_to_256_and_centre_crops_224_in_both_paths(tiny_model):
    """crop fraction 0.875 (the paper profile): the per-image transform and the batched one
    resize the shortest side to 256 (bicubic) and keep the central 224 x 224."""
    from pipeline.preprocess import test_transform

    cfg = tiny_model.model.visual.preprocess_cfg
    image = Image.open(io.BytesIO(photo((640, 480)))).convert("RGB")
    resized = image.resize((341, 256), Image.BICUBIC)  # 640 x 480 -> shortest side 256
    left, top = int(round((341 - 224) / 2)), int(round((256 - 224) / 2))
    by_hand = np.asarray(resized.crop((left, top, left + 224, top + 224)), dtype=np.float32) / 255.0
    mean, std = np.array(cfg["mean"]), np.array(cfg["std"])
    expected = torch.from_numpy(((by_hand - mean) / std).transpose(2, 0, 1)).float()
    got = test_transform(cfg, 224 / 256)(image)
    assert torch.max(torch.abs(got - expected)).item() < 1e-5
    pre = BatchPreprocessor.for_model(tiny_model.model, 224 / 256)
    assert pre.short_side == 256
    assert torch.max(torch.abs(pre.batch([pre.to_uint8(image)])[0] - expected)).item() < 1e-5


def test_prototype_augmentation_is_the_papers():
    """RandomResizedCrop(224, scale 0.08-1, bicubic) and a horizontal flip with p = 0.5,
    then normalised (METHOD §1); open_clip's training transform crops at 0.9-1, no flip."""
    from torchvision import transforms as T

    from pipeline.preprocess import paper_augmentation

    cfg = {"size": 224, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    steps = {type(t): t for t in paper_augmentation(cfg).transforms}
    crop, flip = steps[T.RandomResizedCrop], steps[T.RandomHorizontalFlip]
    assert crop.size == (224, 224) and crop.scale == (0.08, 1.0) and crop.interpolation == T.InterpolationMode.BICUBIC
    assert flip.p == 0.5
    image = Image.open(io.BytesIO(photo((300, 200)))).convert("RGB")
    torch.manual_seed(0)
    first = paper_augmentation(cfg)(image)
    torch.manual_seed(0)
    assert torch.equal(first, paper_augmentation(cfg)(image)) and first.shape == (3, 224, 224)  # seeded
