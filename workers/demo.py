"""The offline demo: every user-facing command once, on data made here.

1. ``simulate`` + ``eval``: MCM, NegLabel and InterNeg on simulated CLIP features, under
   the paper protocol and the asynchronous one.
2. ``prepare`` + ``score`` + ``eval`` with a real open_clip model on generated images:
   the tiny random-weights model unless INTERNEG_MODEL__* name another (with weights).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

SHAPES = {
    "red circle": ((220, 30, 30), "ellipse"),
    "green square": ((30, 200, 40), "rectangle"),
    "blue circle": ((30, 40, 220), "ellipse"),
}
NOVEL = {"yellow triangle": ((230, 220, 20), "polygon"), "purple stripes": ((150, 40, 160), "stripes")}


def draw_image(path: Path, colour: tuple[int, int, int], shape: str, seed: int, size=(160, 120)) -> Path:
    """A small synthetic photo: a coloured shape on a noisy background."""
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 70, size=(size[1], size[0], 3), dtype=np.uint8))
    draw = ImageDraw.Draw(image)
    w, h = size
    jitter = rng.integers(-10, 11, size=4)
    box = [w * 0.2 + jitter[0], h * 0.2 + jitter[1], w * 0.8 + jitter[2], h * 0.8 + jitter[3]]
    if shape == "polygon":
        draw.polygon([(box[0], box[3]), ((box[0] + box[2]) / 2, box[1]), (box[2], box[3])], fill=colour)
    elif shape == "stripes":
        for x in range(0, w, 16):
            draw.rectangle([x, 0, x + 7, h], fill=colour)
    else:
        getattr(draw, shape)(box, fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, quality=90)
    return path


def make_sample_images(root: Path, examples: int = 4, test: int = 4) -> tuple[Path, Path, Path]:
    """Class folders of examples, a folder of ID test images, a folder of novel (OOD) ones."""
    classes, id_test, novel = root / "classes", root / "test-id", root / "test-novel"
    for k, (name, (colour, shape)) in enumerate(SHAPES.items()):
        for i in range(examples):
            draw_image(classes / name.replace(" ", "_") / f"{i}.jpg", colour, shape, seed=100 * k + i)
        for i in range(test):
            draw_image(id_test / f"{name.replace(' ', '-')}-{i}.jpg", colour, shape, seed=100 * k + 50 + i)
    for k, (name, (colour, shape)) in enumerate(NOVEL.items()):
        for i in range(test):
            draw_image(novel / f"{name.replace(' ', '-')}-{i}.jpg", colour, shape, seed=1000 + 100 * k + i)
    return classes, id_test, novel


def run_demo(out: Path, echo: Callable[[str], None]) -> int:
    from workers.cli import main

    out = Path(out)

    def step(title: str, *argv: str) -> None:
        echo(f"\n== {title}\n$ interneg {' '.join(argv)}")
        status = main(list(argv))
        if status != 0:
            raise SystemExit(status)

    sim = out / "simulated"
    step("simulated CLIP features (a test of the evaluator, not a ranking of methods)", "simulate", "--out", str(sim))
    common = ["--bundle", str(sim / "bundle"), "--id", str(sim / "id.npz"), "--ood", f"near={sim / 'near.npz'}", "--ood", f"far={sim / 'far.npz'}"]
    step("all methods, paper protocol", "eval", *common, "--out", str(out / "eval-simulated-paper"))
    step("InterNeg, asynchronous bank updates 2 batches late", "eval", *common, "--method", "interneg", "--protocol", "async", "--delay", "2", "--out", str(out / "eval-simulated-async"))

    if "INTERNEG_MODEL__NAME" not in os.environ:
        os.environ["INTERNEG_MODEL__NAME"] = "interneg-tiny"
        os.environ["INTERNEG_MODEL__PRETRAINED"] = ""
    model = os.environ["INTERNEG_MODEL__NAME"]
    classes, id_test, novel = make_sample_images(out / "images")
    bundle = str(out / f"bundle-{model}")
    note = " (random weights: the numbers only show the path works)" if model == "interneg-tiny" else ""
    step(f"prepare a bundle with {model}{note}", "prepare", "--classes", str(classes), "--out", bundle)
    step("score images", "score", str(id_test), str(novel), "--bundle", bundle)
    step("evaluate on image folders with real inversion through the text encoder", "eval", "--bundle", bundle, "--id", str(id_test), "--ood", f"novel={novel}", "--batch-size", "8", "--out", str(out / "eval-images"))
    echo(f"\ndemo done: outputs under {out}")
    return 0
