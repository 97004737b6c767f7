"""Train the small CLIP-style model ``interneg-small`` on the renderings of train/dataset.py.

    .venv/bin/python -m train.train_clip --out models/interneg-small

open_clip's own architecture (pipeline/model_configs/interneg-small.json, registered like
the tiny model, so the weights load through the same factory) and its own contrastive loss
(``open_clip.ClipLoss``). Seeded: the same command on the same packages gives the same
weights on the same torch build and thread count. Batches hold distinct concepts, one
rendering each, so no two images of a batch are the same thing (no false negatives).
Images are placed at a random scale and position on a random background (plain, gradient
or noise), which is what the demo's frames and a camera look like more than a transparent
emoji does.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.model import encode_text_truncated  # importing it registers pipeline/model_configs
from train.dataset import Rendering, all_renderings, split

MODEL = "interneg-small"
SIZE = 64
MEAN = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)


def rgba_canvas(path: Path, size: int = SIZE) -> np.ndarray:
    """The image fitted into a transparent size x size square, centred: (4, size, size) uint8."""
    with Image.open(path) as im:
        im = im.convert("RGBA")
        im.thumbnail((size, size), Image.Resampling.LANCZOS)
        canvas = Image.new("RGBA", (size, size), (0, 0, 0, 0))
        canvas.paste(im, ((size - im.width) // 2, (size - im.height) // 2), im)
    return np.asarray(canvas).transpose(2, 0, 1).copy()


def backgrounds(n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """(n, 3, size, size) in [0, 1]: plain, two-colour gradients in any direction, or noise."""
    c1, c2 = torch.rand(n, 3, 1, 1, generator=gen), torch.rand(n, 3, 1, 1, generator=gen)
    angle = torch.rand(n, 1, 1, 1, generator=gen) * 2 * math.pi
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    ramp = ((xs * torch.cos(angle) + ys * torch.sin(angle)) * 0.5 + 0.5).clamp(0, 1)
    kind = torch.randint(0, 3, (n, 1, 1, 1), generator=gen)
    ramp = torch.where(kind == 0, torch.zeros_like(ramp), ramp)
    bg = c1 + (c2 - c1) * ramp
    noise = torch.rand(n, 3, size, size, generator=gen) * torch.rand(n, 1, 1, 1, generator=gen) * 0.6
    return torch.where(kind == 2, (bg + noise - 0.3).clamp(0, 1), bg)


def place(images: torch.Tensor, gen: torch.Generator, scale=(0.55, 1.0)) -> torch.Tensor:
    """RGBA (n, 4, s, s) in [0, 1], scaled, moved and flipped at random, then put on a
    background: RGB (n, 3, s, s), normalised as open_clip's preprocessing does."""
    n, _, size, _ = images.shape
    s = torch.empty(n).uniform_(*scale, generator=gen)
    room = 1 - s
    tx = (torch.rand(n, generator=gen) * 2 - 1) * room
    ty = (torch.rand(n, generator=gen) * 2 - 1) * room
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = flip / s, 1 / s
    theta[:, 0, 2], theta[:, 1, 2] = -tx / s * flip, -ty / s
    grid = F.affine_grid(theta, images.shape, align_corners=False)
    moved = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    alpha, thing = moved[:, 3:4], jitter(moved[:, :3], gen)
    rgb = alpha * thing + (1 - alpha) * backgrounds(n, size, gen)
    return (rgb - MEAN) / STD


def jitter(rgb: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Brightness and saturation changed at random, a fifth of the images grey: the flat
    colours of emoji should not be what the model learns a concept by (photos have others)."""
    n = rgb.shape[0]
    grey = (rgb * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    saturation = torch.empty(n, 1, 1, 1).uniform_(0.4, 1.4, generator=gen)
    saturation = torch.where(torch.rand(n, 1, 1, 1, generator=gen) < 0.2, torch.zeros_like(saturation), saturation)
    brightness = torch.empty(n, 1, 1, 1).uniform_(0.7, 1.3, generator=gen)
    return ((grey + (rgb - grey) * saturation) * brightness).clamp(0, 1)


def centred(images: torch.Tensor) -> torch.Tensor:
    """Evaluation view: the rendering as it is, on white."""
    alpha = images[:, 3:4]
    return (alpha * images[:, :3] + (1 - alpha) - MEAN) / STD


def prompt(concept: str) -> str:
    return f"a photo of {'an' if concept[:1] in 'aeiou' else 'a'} {concept}."


@torch.no_grad()
def zero_shot(model, tokenizer, images: torch.Tensor, truth: list[str], names: list[str]) -> dict:
    """Top-1 and top-5 accuracy of classifying images among all concept names."""
    text = torch.cat([encode_text_truncated(model, tokenizer([prompt(c) for c in names[i:i + 512]]))
                      for i in range(0, len(names), 512)])
    text = F.normalize(text, dim=-1)
    feats = F.normalize(torch.cat([model.encode_image(centred(images[i:i + 256]))
                                   for i in range(0, len(images), 256)]), dim=-1)
    top5 = (feats @ text.T).topk(5, dim=-1).indices
    index = {c: i for i, c in enumerate(names)}
    target = torch.tensor([index[c] for c in truth])
    return {"n": len(truth), "top1": float((top5[:, 0] == target).float().mean()),
            "top5": float((top5 == target[:, None]).any(-1).float().mean())}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("models") / MODEL)
    parser.add_argument("--steps", type=int, default=1600)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    random.seed(args.seed), np.random.seed(args.seed), torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    started = time.monotonic()

    renderings = all_renderings()
    splits = split(renderings, args.seed)
    pixels = torch.from_numpy(np.stack([rgba_canvas(r.path) for r in renderings])).float() / 255
    names = sorted({r.concept for r in renderings})
    train_by_concept: dict[str, list[int]] = {}
    for i, r in enumerate(renderings):
        if splits[r.id] == "train":
            train_by_concept.setdefault(r.concept, []).append(i)
    concepts = sorted(train_by_concept)
    photos = {c: [i for i in idx if renderings[i].source == "tuxpaint"] for c, idx in train_by_concept.items()}
    photos = {c: idx for c, idx in photos.items() if idx}
    print(f"{len(renderings)} renderings, {len(names)} concepts; training on {sum(map(len, train_by_concept.values()))} "
          f"renderings of {len(concepts)} concepts", flush=True)

    model = open_clip.create_model(MODEL)
    tokenizer = open_clip.get_tokenizer(MODEL)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optimiser = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    warmup = max(1, args.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, args.steps) / args.steps)))
    loss_fn = open_clip.ClipLoss()
    rng = random.Random(args.seed)
    order: list[str] = []
    for step in range(args.steps):
        if len(order) < args.batch:
            more = concepts[:]
            rng.shuffle(more)
            order += more
        batch, order = order[:args.batch], order[args.batch:]
        # a concept's photo or drawing from Tux Paint half the time: they are few (777 of
        # 4,589) and the nearest thing to a camera frame in the data
        picks = [rng.choice(photos[c] if c in photos and rng.random() < 0.5 else train_by_concept[c]) for c in batch]
        images = place(pixels[picks], gen)
        texts = tokenizer([rng.choice(renderings[i].captions) for i in picks])
        # the text tower at the batch's own context length (captions are short): same output, a
        # fraction of the work (pipeline.model.encode_text_truncated)
        image_features = F.normalize(model.encode_image(images), dim=-1)
        text_features = F.normalize(encode_text_truncated(model, texts), dim=-1)
        logit_scale = model.logit_scale.exp()
        loss = loss_fn(image_features, text_features, logit_scale)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step} loss {loss.item():.3f} scale {logit_scale.item():.1f} "
                  f"{time.monotonic() - started:.0f} s", flush=True)

    model.eval()
    report = {"steps": args.steps, "batch": args.batch, "lr": args.lr, "seed": args.seed,
              "train_seconds": round(time.monotonic() - started), "concepts": len(names),
              "renderings": {s: sum(1 for r in renderings if r.source == s) for s in sorted({r.source for r in renderings})},
              "split": {k: sum(1 for v in splits.values() if v == k) for k in ("train", "held_out", "unseen")}}
    for part in ("train", "held_out", "unseen"):
        index = [i for i, r in enumerate(renderings) if splits[r.id] == part]
        report[f"zero_shot_{part}"] = zero_shot(model, tokenizer, pixels[index], [renderings[i].concept for i in index], names)
    args.out.mkdir(parents=True, exist_ok=True)
    weights = args.out / f"{MODEL}.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.detach().half().contiguous() for k, v in model.state_dict().items()}, str(weights))
    (args.out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
