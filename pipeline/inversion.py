"""Test-time inversion (METHOD §4): a pseudo-word per confidently-OOD image.

For each image one token embedding p is optimised so that a CLIP template sentence with
p in place of the class word, run through the frozen text transformer, matches the image
embedding. The batch is encoded at its own context length (METHOD §6). The result is an
inverted negative only if it passes the admissibility test of §2.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

from pipeline.arrays import as_tensor
from pipeline.model import LoadedModel, text_tower
from schemas.settings import InversionSettings


class Inverter(Protocol):
    """Turns image embeddings (B, D) into L2-normalised text-side embeddings (B, D)."""

    def invert(self, image_emb: np.ndarray) -> np.ndarray: ...


@dataclass
class InversionResult:
    embeddings: np.ndarray  # (B, D) float32, normalised
    loss_history: np.ndarray  # (steps + 1,) batch-mean loss before each step and after the last
    final_loss: np.ndarray  # (B,) per-image loss of the returned embeddings


class TemplateBank:
    """The 80 CLIP ImageNet templates tokenised with a one-token placeholder word.

    Tokenising "a photo of a $." would merge "$." into one BPE token, so each template is
    assembled from its tokenised prefix and suffix around a single placeholder token:
    exactly the layout of the sentence with a one-token class word.
    """

    PLACEHOLDER = "$"

    def __init__(self, tokenizer, templates=OPENAI_IMAGENET_TEMPLATES):
        rows, positions = [], []
        sot, placeholder, eot = (int(t) for t in tokenizer([self.PLACEHOLDER])[0, :3])
        for template in templates:
            prefix, suffix = template("{}").split("{}")
            pre = self._inner(tokenizer, prefix, eot)
            post = self._inner(tokenizer, suffix, eot)
            positions.append(1 + len(pre))
            rows.append([sot, *pre, placeholder, *post, eot])
        length = max(len(r) for r in rows)
        self.tokens = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            self.tokens[i, : len(row)] = torch.tensor(row)
        self.positions = torch.tensor(positions)
        self.texts = [template(self.PLACEHOLDER) for template in templates]

    @staticmethod
    def _inner(tokenizer, text: str, eot: int) -> list[int]:
        ids = tokenizer([text])[0].tolist()
        return ids[1 : ids.index(eot)]

    def __len__(self) -> int:
        return len(self.tokens)


class TextInverter:
    """Batched pseudo-token optimisation through the frozen text tower of a loaded model."""

    def __init__(self, loaded: LoadedModel, settings: InversionSettings, prototypes: np.ndarray | None = None):
        self.loaded = loaded
        self.settings = settings
        self.templates = TemplateBank(loaded.tokenizer)
        self.prototypes = None if prototypes is None else as_tensor(prototypes, "prototypes").to(loaded.device)
        if settings.reg_weight > 0 and self.prototypes is None:
            raise ValueError("inversion.reg_weight > 0 needs ID prototypes (a class folder with examples)")

    def invert(self, image_emb: np.ndarray) -> np.ndarray:
        return self.run(image_emb).embeddings

    def _encode(self, pseudo: torch.Tensor, template_idx: torch.Tensor) -> torch.Tensor:
        model = self.loaded.model
        tokens = self.templates.tokens.to(pseudo.device)[template_idx]
        positions = self.templates.positions.to(pseudo.device)[template_idx]
        embeds = model.token_embedding(tokens)
        slot = F.one_hot(positions, tokens.shape[1]).unsqueeze(-1).to(embeds.dtype)  # (B, L, 1)
        embeds = embeds * (1 - slot) + pseudo.to(embeds.dtype).unsqueeze(1) * slot
        return F.normalize(text_tower(model, embeds, tokens).float(), dim=-1)

    def _loss(self, text: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Per-image loss: 1 - cos(text, image), plus the optional separation term."""
        loss = 1 - (text * images).sum(dim=-1)
        if self.settings.reg_weight > 0:
            loss = loss + self.settings.reg_weight * (1 + text @ self.prototypes.T).mean(dim=-1)
        return loss

    def run(self, image_emb: np.ndarray) -> InversionResult:
        s = self.settings
        device = self.loaded.device
        images = F.normalize(as_tensor(image_emb, "image_emb"), dim=-1).to(device)
        batch = images.shape[0]
        if batch == 0:
            empty = np.zeros((0, images.shape[1]), np.float32)
            return InversionResult(empty, np.zeros(0), np.zeros(0))
        generator = torch.Generator().manual_seed(s.seed)
        pseudo = (torch.randn((batch, self.loaded.token_width), generator=generator) * s.init_std).to(device)
        pseudo.requires_grad_(True)
        optimizer = torch.optim.AdamW([pseudo], lr=s.lr, weight_decay=s.weight_decay)
        use_amp = device.type == "cuda"
        history = []
        template_idx = None
        for _ in range(s.steps):
            template_idx = torch.randint(len(self.templates), (batch,), generator=generator).to(device)
            with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                loss = self._loss(self._encode(pseudo, template_idx), images)
            history.append(float(loss.mean().detach()))
            optimizer.zero_grad(set_to_none=True)
            loss.mean().backward()
            optimizer.step()
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
            text = self._encode(pseudo, template_idx)  # the template of the last step
            final = self._loss(text, images)
        history.append(float(final.mean()))
        return InversionResult(
            embeddings=text.float().cpu().numpy(),
            loss_history=np.asarray(history),
            final_loss=final.float().cpu().numpy(),
        )
