"""One loader over open_clip, and batched encoders.

Architectures are config data (open_clip's registry); the project's tiny test architecture
``interneg-tiny`` is registered from ``pipeline/model_configs`` and goes through the same
factory as ViT-B/16. Text is encoded at the batch's own context length (METHOD §6).
"""
from __future__ import annotations

import hashlib
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

from pipeline.errors import ConfigError
from pipeline.preprocess import paper_augmentation, test_transform
from schemas.settings import ModelSettings

_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(_CONFIG_DIR)

TINY_MODEL = "interneg-tiny"
# The small CLIP-style model trained here (train/, issue 12), shipped with its weights: the
# model that runs when no CLIP weights are at hand. Its weights are named by a tag, like
# open_clip's pretrained tags, and checked against their recorded sha256 before loading.
SMALL_MODEL = "interneg-small"
SHIPPED_TAG = "interneg"
WEIGHTS_DIR = Path(__file__).parent / "weights"
SHIPPED_WEIGHTS = {(SMALL_MODEL, SHIPPED_TAG): WEIGHTS_DIR / f"{SMALL_MODEL}.safetensors"}


class ModelLoadError(ConfigError):
    """The model could not be built; the message says what to do instead."""


@dataclass
class LoadedModel:
    """An open_clip model with everything needed to encode, and a stable identity."""

    model: torch.nn.Module
    preprocess: Callable  # evaluation transform (PIL image -> tensor), see preprocess.test_transform
    augment: Callable  # the paper's prototype augmentation, see preprocess.paper_augmentation
    tokenizer: Callable
    model_id: str
    device: torch.device
    dtype: torch.dtype
    crop_fraction: float = 1.0  # of the evaluation transform (ModelSettings.crop_fraction)

    @property
    def logit_scale(self) -> float:
        """λ = exp(logit_scale) of the loaded model (METHOD §1)."""
        return float(self.model.logit_scale.detach().float().exp().item())

    @property
    def embed_dim(self) -> int:
        return int(self.model.text_projection.shape[1])

    @property
    def token_width(self) -> int:
        return int(self.model.token_embedding.weight.shape[1])

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Preprocessed image batch (B, 3, H, W) -> L2-normalised float32 embeddings (B, D)."""
        with torch.no_grad():
            x = images.to(self.device, dtype=self.dtype, non_blocking=True)
            out = self.model.encode_image(x)
        return F.normalize(out.float(), dim=-1)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts))

    def encode_texts(self, texts: Sequence[str], batch_size: int = 1024, progress: bool = False) -> np.ndarray:
        """Texts -> L2-normalised float32 embeddings (N, D), truncated context per batch."""
        from tqdm import tqdm

        out = np.empty((len(texts), self.embed_dim), dtype=np.float32)
        starts = range(0, len(texts), batch_size)
        for start in tqdm(starts, desc="encoding texts", unit="batch", disable=not progress):
            tokens = self.tokenize(texts[start : start + batch_size])
            with torch.no_grad():
                emb = encode_text_truncated(self.model, tokens.to(self.device))
            out[start : start + len(tokens)] = F.normalize(emb.float(), dim=-1).cpu().numpy()
        return out


def _supports_truncation(model: torch.nn.Module) -> bool:
    return (
        isinstance(model, open_clip.CLIP)
        and getattr(model, "text_pool_type", None) == "argmax"
        and getattr(model, "attn_mask", None) is not None
    )


def context_length_needed(tokens: torch.Tensor) -> int:
    """Positions up to the last EOT of the batch; CLIP's EOT has the largest token id."""
    return int(tokens.argmax(dim=-1).max().item()) + 1


def text_tower(model: torch.nn.Module, token_embeds: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Run open_clip's text transformer from token embeddings (B, L, W) at length L.

    The same steps as ``CLIP.encode_text`` (positional embedding, causal transformer,
    final norm, EOT pooling, projection), so a caller may substitute embeddings (the
    inversion's pseudo-word) or shorten L: with a causal mask and EOT pooling, positions
    after the batch's last EOT cannot change the output. Returns unnormalised features.
    """
    length = token_embeds.shape[1]
    cast_dtype = model.transformer.get_cast_dtype()
    x = token_embeds.to(cast_dtype) + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
    projection = model.text_projection
    if isinstance(projection, torch.nn.Linear):
        return projection(x)
    return x @ projection


def encode_text_truncated(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``model.encode_text(tokens)`` computed at the batch's own context length."""
    if not _supports_truncation(model):
        return model.encode_text(tokens)
    length = context_length_needed(tokens)
    tokens = tokens[:, :length]
    return text_tower(model, model.token_embedding(tokens), tokens)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"INTERNEG_MODEL__DEVICE={name} but no CUDA device is available")
    return device


def _resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if precision in ("fp16", "bf16") and device.type == "cpu":
        raise ModelLoadError(f"INTERNEG_MODEL__PRECISION={precision} needs a GPU; use fp32 on a CPU")
    return precision


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _weights_sha256(path: Path) -> str:
    """file_sha256 of a weights file, hashed once per version of the file: load_model checks
    the shipped weights and then names them, each by their sha256."""
    stat = path.stat()
    return _sha256_of_version(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=8)
def _sha256_of_version(path: str, size: int, mtime_ns: int) -> str:
    return file_sha256(Path(path))


def shipped_weights(settings: ModelSettings) -> Path | None:
    """The file of shipped weights the settings name, checked against its sha256; else None."""
    path = SHIPPED_WEIGHTS.get((settings.name, settings.pretrained))
    if path is None:
        return None
    recorded = path.with_suffix(".sha256")
    if not path.is_file() or not recorded.is_file():
        raise ModelLoadError(f"the shipped weights {path} (or their .sha256) are missing: is this a complete checkout?")
    expected = recorded.read_text().split()[0]
    if _weights_sha256(path) != expected:
        raise ModelLoadError(f"{path}: sha256 differs from {recorded.name}; the file is damaged (git lfs? a partial copy?)")
    return path


def weights_at_hand(settings: ModelSettings) -> bool:
    """Whether load_model can find the weights without a network: random weights, shipped ones,
    a local file, or a pretrained tag already in open_clip's or the Hugging Face cache."""
    name, pretrained = settings.name, settings.pretrained
    if not pretrained or (name, pretrained) in SHIPPED_WEIGHTS:
        return True
    if name.startswith(("hf-hub:", "local-dir:")):
        return name.startswith("local-dir:")
    if Path(pretrained).expanduser().is_file():
        return True
    cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if not cfg:
        return False
    if cfg.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache

        repo, _, folder = cfg["hf_hub"].partition("/")
        repo = f"{repo}/{folder.split('/')[0]}" if folder else repo
        for filename in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
            if isinstance(try_to_load_from_cache(repo.rstrip("/"), filename), str):
                return True
    url = cfg.get("url")
    return bool(url) and (Path.home() / ".cache" / "clip" / Path(url).name).is_file()


def model_identity(settings: ModelSettings) -> str:
    """A string that names the weights: two models with equal ids embed identically."""
    name, pretrained = settings.name, settings.pretrained
    if (name, pretrained) in SHIPPED_WEIGHTS:
        pretrained = str(SHIPPED_WEIGHTS[(name, pretrained)])
    if name.startswith(("hf-hub:", "local-dir:")):
        return name
    if not pretrained:
        return f"{name}/random-seed{settings.seed}"
    path = Path(pretrained).expanduser()
    if path.is_file():
        return f"{name}/sha256:{_weights_sha256(path)[:16]}"
    return f"{name}/{pretrained}"


def _how_to_run_offline(settings: ModelSettings) -> str:
    return (
        f"could not load weights '{settings.pretrained}' for {settings.name} (offline?): "
        f"set INTERNEG_MODEL__PRETRAINED=/path/to/weights.bin (a local open_clip/OpenAI checkpoint), "
        f"or run the small model shipped with the project with INTERNEG_MODEL__NAME={SMALL_MODEL} "
        f"INTERNEG_MODEL__PRETRAINED={SHIPPED_TAG}"
    )


class _RandomInitNotice(logging.Filter):
    """open_clip's warning that a model was initialised randomly, which it logs on the root logger."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded for model")


@contextmanager
def _random_init_asked(asked: bool):
    """Silence open_clip's random-initialisation warning while building a model whose settings
    ask for random weights (the tiny test model): every command would print it, and it warns
    of nothing. Any other warning, and this one when weights were asked for, still shows."""
    if not asked:
        yield
        return
    notice = _RandomInitNotice()
    logging.getLogger().addFilter(notice)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(notice)


def load_model(settings: ModelSettings) -> LoadedModel:
    """Build the model named by settings with open_clip's one factory."""
    device = resolve_device(settings.device)
    precision = _resolve_precision(settings.precision, device)
    shipped = shipped_weights(settings)
    pretrained = str(shipped) if shipped is not None else settings.pretrained or None
    name = settings.name
    if name not in open_clip.list_models() and not name.startswith(("hf-hub:", "local-dir:")):
        raise ModelLoadError(
            f"unknown model INTERNEG_MODEL__NAME={name!r}; open_clip knows e.g. ViT-B-16, ViT-B-32, {SMALL_MODEL}, {TINY_MODEL}"
        )
    if pretrained is not None and not name.startswith(("hf-hub:", "local-dir:")):
        path = Path(pretrained).expanduser()
        looks_like_path = "/" in pretrained or path.suffix in (".bin", ".pt", ".pth", ".safetensors")
        if looks_like_path and not path.is_file():
            raise ModelLoadError(f"INTERNEG_MODEL__PRETRAINED={pretrained}: no such weights file")
        known = open_clip.list_pretrained_tags_by_model(name)
        if not path.is_file() and pretrained not in known:
            raise ModelLoadError(
                f"INTERNEG_MODEL__PRETRAINED={pretrained!r} is neither a file nor a tag of {name} (tags: {', '.join(known) or 'none'})"
            )
    torch.manual_seed(settings.seed)  # random-weight models are then reproducible
    try:
        with _random_init_asked(pretrained is None):
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=pretrained, device=device, precision=precision, weights_only=True
            )
    except ModelLoadError:
        raise
    except Exception as exc:  # network errors come in many types from hub clients
        raise ModelLoadError(f"{_how_to_run_offline(settings)} [{type(exc).__name__}: {exc}]") from exc
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(name)
    dtype = next(model.visual.parameters()).dtype
    cfg = getattr(model.visual, "preprocess_cfg", None)
    if not cfg and settings.crop_fraction != 1.0:
        raise ModelLoadError(f"{name} carries no preprocess_cfg: INTERNEG_MODEL__CROP_FRACTION must stay 1")
    if cfg and settings.crop_fraction != 1.0:
        preprocess = test_transform(cfg, settings.crop_fraction)
    return LoadedModel(
        model=model,
        preprocess=preprocess,
        augment=paper_augmentation(cfg) if cfg else preprocess,
        crop_fraction=settings.crop_fraction,
        tokenizer=tokenizer,
        model_id=model_identity(settings),
        device=device,
        dtype=dtype,
    )
