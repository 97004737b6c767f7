"""Write the README demo's classes and frames (deploy/samples/rendered) from held-out renderings.

    .venv/bin/python -m train.make_demo

Known classes (DEMO["id"] of train/dataset.py): example images from renderings the model
trained on; frames from renderings it never saw (its Tux Paint photos and one emoji style).
Unknowns: concepts held out of training entirely, near (other animals) and far (food, a
vehicle). Each frame puts a rendering on a plain, gradient or noisy background at a random
scale and place, as a JPEG; ``labels.csv`` gives each frame's concept and kind, which
``interneg local-run`` scores the verdicts against.
"""
from __future__ import annotations

import argparse
import csv
import random
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from train.dataset import DEMO, Rendering, all_renderings, split
from train.sources import SOURCES

OUT = Path(__file__).resolve().parent.parent / "deploy" / "samples" / "rendered"
FRAME = 224
FRAMES_PER_RENDERING = {"id": 5, "near": 2, "far": 2}
EXAMPLES_PER_RENDERING = 3


def background(rng: random.Random, size: int) -> Image.Image:
    c1 = np.array([rng.randrange(256) for _ in range(3)], dtype=np.float32)
    c2 = np.array([rng.randrange(256) for _ in range(3)], dtype=np.float32)
    kind = rng.choice(("plain", "gradient", "noise"))
    if kind == "plain":
        pixels = np.broadcast_to(c1, (size, size, 3)).copy()
    else:
        angle = rng.uniform(0, 2 * np.pi)
        ys, xs = np.mgrid[-1:1:size * 1j, -1:1:size * 1j]
        ramp = np.clip((xs * np.cos(angle) + ys * np.sin(angle)) * 0.5 + 0.5, 0, 1)[..., None]
        pixels = c1 + (c2 - c1) * ramp
        if kind == "noise":
            pixels += np.random.default_rng(rng.randrange(1 << 30)).normal(0, 25, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def compose(rendering: Rendering, rng: random.Random, size: int = FRAME) -> Image.Image:
    """The rendering at 55-95% of the frame, anywhere in it, maybe mirrored, on a background."""
    with Image.open(rendering.path) as im:
        thing = im.convert("RGBA")
    side = int(size * rng.uniform(0.55, 0.95))
    thing.thumbnail((side, side), Image.Resampling.LANCZOS)
    if thing.width < side and thing.height < side:  # small emoji: scale up to the chosen size
        k = side / max(thing.size)
        thing = thing.resize((max(1, round(thing.width * k)), max(1, round(thing.height * k))), Image.Resampling.BICUBIC)
    if rng.random() < 0.5:
        thing = thing.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    frame = background(rng, size)
    frame.paste(thing, (rng.randrange(size - thing.width + 1), rng.randrange(size - thing.height + 1)), thing)
    return frame.filter(ImageFilter.GaussianBlur(rng.uniform(0, 0.8)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval", type=Path, help="write an evaluation set here instead (id/, near/, far/)")
    args = parser.parse_args(argv)
    if args.eval is not None:
        write_eval_set(args.eval, args.seed)
        return
    rng = random.Random(args.seed)
    renderings = all_renderings()
    splits = split(renderings, args.seed)
    if args.out.exists():
        shutil.rmtree(args.out)
    rows = []
    for concept in DEMO["id"]:
        folder = args.out / "classes" / concept
        folder.mkdir(parents=True)
        # examples: what the model trained on, of this concept and of its "<concept> face" emoji
        examples = [r for r in renderings if splits[r.id] == "train" and r.concept in (concept, f"{concept} face")]
        for r in examples:
            for k in range(EXAMPLES_PER_RENDERING):
                compose(r, rng).save(folder / f"{r.source}-{r.path.stem}-{k}.jpg", quality=90)
    frames = args.out / "frames"
    frames.mkdir(parents=True)
    shown = []
    for kind, concepts in DEMO.items():
        wanted = "held_out" if kind == "id" else "unseen"
        for concept in concepts:
            for r in (r for r in renderings if r.concept == concept and splits[r.id] == wanted):
                for k in range(FRAMES_PER_RENDERING[kind]):
                    shown.append((kind, concept, r, k))
    rng.shuffle(shown)  # streaming order: known and unknown mixed
    for n, (kind, concept, r, k) in enumerate(shown):
        name = f"{n:03d}.jpg"
        compose(r, rng).save(frames / name, quality=90)
        rows.append({"file": name, "concept": concept, "kind": kind, "source": r.source, "rendering": r.path.name})
    with open(frames / "labels.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    write_licences(args.out, rows)
    print(f"{len(rows)} frames ({sum(r['kind'] == 'id' for r in rows)} of known classes) and "
          f"{sum(1 for _ in (args.out / 'classes').rglob('*.jpg'))} class examples in {args.out}")


def write_eval_set(out: Path, seed: int, per_id: int = 20) -> None:
    """Folders for ``interneg eval``: id/ (held-out renderings of the demo's known classes),
    near/ (every unseen animal concept) and far/ (every other unseen concept)."""
    rng = random.Random(seed)
    renderings = all_renderings()
    splits = split(renderings, seed)
    sets = {
        "id": [(r, per_id) for r in renderings if r.concept in DEMO["id"] and splits[r.id] == "held_out"],
        "near": [(r, 2) for r in renderings if splits[r.id] == "unseen" and r.animal],
        "far": [(r, 1) for r in renderings if splits[r.id] == "unseen" and not r.animal],
    }
    for name, items in sets.items():
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        for n, (r, count) in enumerate(items):  # n: Tux Paint has equal file names in different folders
            for k in range(count):
                compose(r, rng).save(folder / f"{n:04d}-{r.source}-{r.path.stem}-{k}.jpg", quality=90)
        print(f"{name}: {sum(c for _, c in items)} frames of {len({r.concept for r, _ in items})} concepts in {folder}")


def write_licences(out: Path, rows: list[dict]) -> None:
    used = sorted({r["source"] for r in rows} | {"noto", "twemoji"})
    lines = ["# Rendered demo samples: sources and licences", "",
             "Made by `python -m train.make_demo` from the packages below (see train/sources.py): each image",
             "is one rendering placed on a generated background. Frames come from renderings the shipped",
             "model `interneg-small` never trained on; `frames/labels.csv` names each frame's concept and",
             "kind (`id`: a known class; `near`, `far`: an unknown concept, never trained on).", ""]
    for name in used:
        s = SOURCES[name]
        lines.append(f"- **{s.package} {s.version}** ({s.registry}): {s.licence}. {s.licence_note}.")
    lines += ["", "Each frame's package and file are in `frames/labels.csv` (columns `source`, `rendering`); a class",
              "example is named `<source>-<file>-<k>.jpg`. The Tux Paint images are under the GPL, version 2 or",
              "later: their source is the package itself (`apt-get source tuxpaint-stamps`)."]
    out.joinpath("LICENSES.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
