"""Batched image preprocessing, equal to the evaluation transform of :func:`test_transform`
(open_clip's own at crop fraction 1).

open_clip's transform runs resize, crop, to-tensor and normalise per image. Here the
resize and crop stay per image in PIL (C code, releases the GIL, runs in decode threads)
and produce uint8 arrays; to-float and normalise run once per batch as tensor work. For
JPEG, decoding can use DCT scaling (PIL draft mode) down to the smallest size that still
covers the resize target, which skips most of the decode work for large frames; that
one step is an approximation of decoding in full and then resizing.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from pipeline.errors import ConfigError
_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


class UnsupportedTransform(ConfigError):
    """The model's preprocessing is not the resize-shortest/centre-crop kind handled here."""


def resize_for(crop: int, crop_fraction: float) -> int:
    """The shortest side to resize to before the centre crop: the crop itself at fraction 1
    (open_clip's evaluation transform), 256 for a 224 crop at 0.875 (the paper's test
    preprocessing, OpenOOD's pre_size 256)."""
    if not 0 < crop_fraction <= 1:
        raise ConfigError(f"INTERNEG_MODEL__CROP_FRACTION must be in (0, 1], got {crop_fraction}")
    return int(round(crop / crop_fraction))


def _size_of(cfg: dict) -> int:
    size = cfg.get("size", 224)
    if not isinstance(size, int):
        if size[0] != size[1]:
            raise UnsupportedTransform(f"non-square input size {size}")
        size = size[0]
    return int(size)


def test_transform(cfg: dict, crop_fraction: float):
    """PIL image -> normalised tensor: resize the shortest side to resize_for(size,
    crop_fraction) (bicubic), centre-crop to the model's size, normalise. At fraction 1 it
    equals open_clip's evaluation transform."""
    from torchvision import transforms as T

    size = _size_of(cfg)
    return T.Compose([
        T.Lambda(lambda image: image.convert("RGB")),
        T.Resize(resize_for(size, crop_fraction), interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(size),
        T.ToTensor(),
        T.Normalize(cfg["mean"], cfg["std"]),
    ])


def paper_augmentation(cfg: dict):
    """The released InterNeg code's prototype augmentation (OpenOOD's base preprocessor): each
    example image once through RandomResizedCrop(size, scale 0.08-1, bicubic) and a random
    horizontal flip, then normalised (METHOD §1). Seed torch before use."""
    from torchvision import transforms as T

    size = _size_of(cfg)
    return T.Compose([
        T.Lambda(lambda image: image.convert("RGB")),
        T.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(0.5),
        T.ToTensor(),
        T.Normalize(cfg["mean"], cfg["std"]),
    ])


class BatchPreprocessor:
    def __init__(self, cfg: dict, crop_fraction: float = 1.0):
        size = cfg.get("size", 224)
        self.height, self.width = (size, size) if isinstance(size, int) else tuple(size)
        if cfg.get("resize_mode", "shortest") != "shortest" or self.height != self.width:
            raise UnsupportedTransform(f"resize mode {cfg.get('resize_mode')} with size {size}")
        if cfg.get("interpolation", "bicubic") not in _RESAMPLE:
            raise UnsupportedTransform(f"interpolation {cfg.get('interpolation')}")
        self.resample = _RESAMPLE[cfg.get("interpolation", "bicubic")]
        self.mean = torch.tensor(cfg["mean"], dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg["std"], dtype=torch.float32).view(1, 3, 1, 1)
        self.resize = resize_for(self.height, crop_fraction)

    @classmethod
    def for_model(cls, model: torch.nn.Module, crop_fraction: float = 1.0) -> "BatchPreprocessor":
        cfg = getattr(model.visual, "preprocess_cfg", None)
        if not cfg:
            raise UnsupportedTransform("the model carries no preprocess_cfg")
        return cls(cfg, crop_fraction)

    @property
    def short_side(self) -> int:
        """What the shortest side is resized to before the centre crop."""
        return self.resize

    def to_uint8(self, image: Image.Image) -> np.ndarray:
        """Resize the shortest side (as torchvision's Resize(int) does), centre-crop: (H, W, 3) uint8."""
        image = image.convert("RGB")
        w, h = image.size
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = self.short_side, int(self.short_side * long / short)
        size = (new_short, new_long) if w <= h else (new_long, new_short)
        if size != (w, h):
            image = image.resize(size, self.resample)
        w, h = image.size
        top = int(round((h - self.height) / 2.0))
        left = int(round((w - self.width) / 2.0))
        image = image.crop((left, top, left + self.width, top + self.height))
        return np.asarray(image, dtype=np.uint8)

    def batch(self, arrays: list[np.ndarray], device: torch.device | str = "cpu") -> torch.Tensor:
        """(B, 3, H, W) float32 normalised; uint8 travels to the device (4x fewer bytes), then converts."""
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        device = torch.device(device)
        if device.type == "cuda":
            x = x.pin_memory().to(device, non_blocking=True)
        x = x.float().div_(255.0)
        return x.sub_(self.mean.to(x.device)).div_(self.std.to(x.device))


def draft_for(image: Image.Image, short_side: int) -> None:
    """Let a JPEG decode at the smallest DCT scale whose shortest side still covers ``short_side``."""
    if image.format != "JPEG":
        return
    w, h = image.size
    short = min(w, h)
    if short <= short_side:
        return
    scale = short_side / short
    image.draft("RGB", (max(1, int(np.ceil(w * scale))), max(1, int(np.ceil(h * scale)))))


def decode_jpegs_on_device(datas: list[bytes], pre: BatchPreprocessor, device: torch.device | str) -> torch.Tensor:
    """JPEG bytes -> normalised (B, 3, H, W) batch, decoded on ``device`` (nvJPEG on a GPU).

    Resize and crop run as tensor ops (bicubic with antialias), so results differ from the
    PIL path by interpolation rounding only. Callers check sizes and limits first (the
    header is read on the CPU) and fall back to the CPU path for frames this refuses.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    device = torch.device(device)
    raw = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    images = decode_jpeg(raw, mode=ImageReadMode.RGB, device=device)
    out = []
    for image in images:
        _, h, w = image.shape
        scale = pre.short_side / min(h, w)
        size = (pre.short_side, int(pre.short_side * w / h)) if h <= w else (int(pre.short_side * h / w), pre.short_side)
        x = image.unsqueeze(0).float()
        if scale != 1.0:
            x = torch.nn.functional.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
        _, _, h, w = x.shape
        top, left = int(round((h - pre.height) / 2.0)), int(round((w - pre.width) / 2.0))
        out.append(x[:, :, top : top + pre.height, left : left + pre.width].clamp_(0, 255))
    x = torch.cat(out).div_(255.0)
    return x.sub_(pre.mean.to(device)).div_(pre.std.to(device))
