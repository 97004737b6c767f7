"""Test-time inversion (METHOD §4): a pseudo-word per confidently-OOD image.

For each image one token embedding p is optimised so that a CLIP template sentence with
p in place of the class word, run through the frozen text transformer, matches the image
embedding. The batch is encoded at its own context length (METHOD §6). The result is an
inverted negative only if it passes the admissibility test of §2.

Every template's words before the placeholder are fixed, and the text transformer is
causal, so their keys and values are the same at every step: ``PrefixCachedTower``
computes them once and runs only the placeholder, the words after it and EOT through the
transformer (3.1 of 8.5 positions on average for the 80 templates), packed without padding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

from pipeline.arrays import as_tensor
from pipeline.errors import ConfigError
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
        self.lengths = torch.tensor([len(r) for r in rows])  # up to and including EOT
        self.texts = [template(self.PLACEHOLDER) for template in templates]

    @staticmethod
    def _inner(tokenizer, text: str, eot: int) -> list[int]:
        ids = tokenizer([text])[0].tolist()
        return ids[1 : ids.index(eot)]

    def __len__(self) -> int:
        return len(self.tokens)


class PrefixCachedTower:
    """The text tower on template sentences, computing only the positions from the pseudo-word on.

    Equal to ``text_tower`` on the full sentences (the tests compare them): keys and values
    of the fixed prefixes come from a cache built once per model; the placeholder, the
    suffix and EOT of every sentence in a batch are packed into one (N, W) matrix for the
    linear layers and the MLP, and unpacked only for attention. The last layer runs only
    the EOT rows, the only ones pooled.
    """

    def __init__(self, model: torch.nn.Module, templates: TemplateBank):
        self.model = model
        self.blocks = list(model.transformer.resblocks)
        device = model.positional_embedding.device
        self.tokens = templates.tokens.to(device)
        self.positions = templates.positions.to(device)
        self.lengths = templates.lengths.to(device)
        prefix = int(self.positions.max())
        dtype = model.transformer.get_cast_dtype()
        self.prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        with torch.no_grad():
            # rows whose prefix is shorter see their placeholder and suffix here; those
            # slots are masked out below, and causality keeps them from changing the prefix
            x = model.token_embedding(self.tokens[:, :prefix]).to(dtype) + model.positional_embedding[:prefix].to(dtype)
            mask = model.attn_mask[:prefix, :prefix]
            for block in self.blocks:
                _, k, v = self._qkv(block, block.ln_1(x))
                self.prefix_kv.append((k, v))
                x = block(x, attn_mask=mask)

    @staticmethod
    def supports(model: torch.nn.Module) -> bool:
        """open_clip's standard causal text transformer (CLIP ViT-B/16, ViT-B/32, the tiny model)."""
        from open_clip.transformer import ResidualAttentionBlock

        if not (isinstance(model, open_clip.CLIP) and getattr(model, "text_pool_type", None) == "argmax"):
            return False
        if getattr(model, "attn_mask", None) is None or not model.transformer.batch_first:
            return False
        return all(
            type(block) is ResidualAttentionBlock
            and not hasattr(block, "ln_1_kv")
            and block.attn._qkv_same_embed_dim
            and block.attn.bias_k is None
            and not block.attn.add_zero_attn
            for block in model.transformer.resblocks
        )

    @staticmethod
    def _qkv(block, x: torch.Tensor):
        return F.linear(x, block.attn.in_proj_weight, block.attn.in_proj_bias).chunk(3, dim=-1)

    def __call__(self, pseudo: torch.Tensor, template_idx: torch.Tensor) -> torch.Tensor:
        """Unnormalised text features (B, D) of the templates with ``pseudo`` (B, W) as the word."""
        model = self.model
        dtype = model.transformer.get_cast_dtype()
        batch = template_idx.shape[0]
        starts = self.positions[template_idx]  # the placeholder's position
        spans = self.lengths[template_idx] - starts  # placeholder .. EOT
        width_s, width_p = int(spans.max()), int(starts.max())
        live = torch.arange(width_s, device=starts.device) < spans[:, None]  # (B, S)
        rows, cols = live.nonzero(as_tuple=True)  # packed order: row by row
        position = starts[rows] + cols
        embeds = model.token_embedding(self.tokens[template_idx[rows], position])
        embeds = torch.where((cols == 0)[:, None], pseudo.to(embeds.dtype)[rows], embeds)
        x = embeds.to(dtype) + model.positional_embedding[position].to(dtype)

        prefix_live = torch.arange(width_p, device=starts.device) < starts[:, None]  # (B, P)
        causal = torch.ones(width_s, width_s, dtype=torch.bool, device=starts.device).tril()
        mask = torch.cat(
            [prefix_live[:, None, :].expand(batch, width_s, width_p), causal.expand(batch, -1, -1) & live[:, None, :]],
            dim=2,
        )  # (B, S, P + S): may query i attend to key j
        last_rows = torch.arange(batch, device=starts.device)
        eot = torch.cumsum(spans, 0) - 1  # packed index of each sentence's EOT

        for layer, block in enumerate(self.blocks):
            final = layer == len(self.blocks) - 1
            q, k, v = self._qkv(block, block.ln_1(x))
            prefix_k, prefix_v = self.prefix_kv[layer]
            keys = torch.cat([prefix_k[template_idx, :width_p].to(k.dtype), self._unpack(k, rows, cols, batch, width_s)], 1)
            values = torch.cat([prefix_v[template_idx, :width_p].to(v.dtype), self._unpack(v, rows, cols, batch, width_s)], 1)
            if final:  # only EOT is pooled
                x, q = x[eot], q[eot]
                queries, query_mask = q[:, None], mask[last_rows, spans - 1][:, None]
            else:
                queries, query_mask = self._unpack(q, rows, cols, batch, width_s), mask
            attended = self._attend(block, queries, keys, values, query_mask)
            attended = attended[:, 0] if final else attended[rows, cols]
            x = x + block.ls_1(F.linear(attended, block.attn.out_proj.weight, block.attn.out_proj.bias))
            x = x + block.ls_2(block.mlp(block.ln_2(x)))
        x = model.ln_final(x)
        projection = model.text_projection
        return projection(x) if isinstance(projection, torch.nn.Linear) else x @ projection

    @staticmethod
    def _unpack(packed: torch.Tensor, rows, cols, batch: int, width: int) -> torch.Tensor:
        out = packed.new_zeros((batch, width, packed.shape[-1]))
        return out.index_put((rows, cols), packed)

    @staticmethod
    def _attend(block, queries, keys, values, mask) -> torch.Tensor:
        heads = block.attn.num_heads
        batch, width = queries.shape[0], queries.shape[-1]

        def split(t):
            return t.reshape(batch, t.shape[1], heads, width // heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(queries), split(keys), split(values), attn_mask=mask[:, None])
        return out.transpose(1, 2).reshape(batch, queries.shape[1], width)


class TextInverter:
    """Batched pseudo-token optimisation through the frozen text tower of a loaded model."""

    def __init__(self, loaded: LoadedModel, settings: InversionSettings, prototypes: np.ndarray | None = None):
        self.loaded = loaded
        self.settings = settings
        self.templates = TemplateBank(loaded.tokenizer)
        self.tower = PrefixCachedTower(loaded.model, self.templates) if PrefixCachedTower.supports(loaded.model) else None
        self.prototypes = None if prototypes is None else as_tensor(prototypes, "prototypes").to(loaded.device)
        if settings.reg_weight > 0 and self.prototypes is None:
            raise ConfigError("INTERNEG_INVERSION__REG_WEIGHT > 0 needs ID prototypes: prepare the bundle from a class folder with examples")

    def invert(self, image_emb: np.ndarray) -> np.ndarray:
        return self.run(image_emb).embeddings

    def _encode(self, pseudo: torch.Tensor, template_idx: torch.Tensor) -> torch.Tensor:
        if self.tower is not None:
            return F.normalize(self.tower(pseudo, template_idx).float(), dim=-1)
        return self._encode_full(pseudo, template_idx)

    def _encode_full(self, pseudo: torch.Tensor, template_idx: torch.Tensor) -> torch.Tensor:
        """The whole sentences through ``text_tower``: any open_clip text model."""
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
