"""Context-truncated text encoding vs open_clip's encode_text, in one run on one machine.

    .venv/bin/python bench/text_encoder.py [--model ViT-B-16] [--prompts 2048] [--batch 256]

Random weights (no download) give the same compute as trained ones. Prints prompts/s of
both, the speed-up, and the largest absolute difference of the normalised embeddings.
"""
from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.lexicon import load_lexicon
from pipeline.model import load_model
from schemas.settings import ModelSettings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--prompts", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()

    loaded = load_model(ModelSettings(name=args.model, pretrained="", device="auto"))
    prompts = load_lexicon().prompts
    picked = [prompts[i] for i in np.random.default_rng(0).choice(len(prompts), args.prompts, replace=False)]

    start = time.perf_counter()
    short = loaded.encode_texts(picked, batch_size=args.batch)
    t_short = time.perf_counter() - start

    start = time.perf_counter()
    full = []
    with torch.no_grad():
        for i in range(0, len(picked), args.batch):
            tokens = loaded.tokenize(picked[i : i + args.batch]).to(loaded.device)
            full.append(F.normalize(loaded.model.encode_text(tokens).float(), dim=-1).cpu().numpy())
    t_full = time.perf_counter() - start
    diff = float(np.max(np.abs(np.concatenate(full) - short)))

    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}, device {loaded.device}")
    print(f"model {args.model} (random weights), {args.prompts} lexicon prompts, batch {args.batch}")
    print(f"open_clip encode_text (77 tokens): {args.prompts / t_full:8.1f} prompts/s")
    print(f"truncated context                : {args.prompts / t_short:8.1f} prompts/s")
    print(f"speed-up {t_full / t_short:.2f}x, max abs difference {diff:.2e}")


if __name__ == "__main__":
    main()
