"""Concepts and their renderings from the packages of train/sources.py, and the held-out splits.

A concept is a normalised name ("cow"); its renderings are images of it from different
sources (a Noto emoji, a Twemoji, a Tux Paint photo or drawing), which are the natural views
for contrastive training. Held out from training, with a fixed seed:

- whole concepts (``unseen``): every rendering; they stand for what a camera was never taught;
- single renderings of concepts trained on (``held_out``): zero-shot accuracy on a drawing
  style or photo the model has not seen of a concept it knows;
- the demo's concepts (DEMO): its unknowns are unseen concepts, and its known classes keep
  at least one rendering for training and one for frames.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from train.sources import SOURCES, fetch

# The README's demo: known classes (farm animals), near unknowns (other animals), far ones.
DEMO = {
    "id": ("dog", "horse", "cow"),
    "near": ("pig", "tiger", "elephant", "rabbit", "sheep"),
    "far": ("banana", "pizza", "pineapple", "fire engine"),
}
UNSEEN_FRACTION = 0.08
HELD_OUT_FRACTION = 0.15


@dataclass
class Rendering:
    concept: str
    source: str
    path: Path
    captions: list[str] = field(default_factory=list)
    animal: bool = False  # an animal (emoji subcategory animal-*, Tux Paint's animals folder): a near unknown

    @property
    def id(self) -> str:
        return f"{self.source}:{self.path.name}"


def normalise(name: str) -> str:
    name = re.sub(r"[_\-]+", " ", name.strip().lower())
    name = re.sub(r"\s*\d+$", "", name)  # "frog 1", "strawberry2", "tree336": the same concept
    return re.sub(r"\s+", " ", name).strip()


def article(name: str) -> str:
    return "an" if name[:1] in "aeiou" else "a"


def emoji_renderings(source: str, folder: Path) -> list[Rendering]:
    entries = json.loads((folder / "package" / "emoji.json").read_text())
    images = folder / "package" / "img" / ("google" if source == "noto" else "twitter") / "64"
    out = []
    for entry in entries:
        if entry["category"] == "Component" or not entry.get("name"):
            continue
        path = images / entry["image"]
        if not path.is_file():
            continue
        name = normalise(entry["name"])
        captions = [f"a photo of {article(name)} {name}.", name, f"an emoji of {article(name)} {name}.",
                    f"a drawing of {article(name)} {name}."]
        for short in entry.get("short_names") or []:
            alias = normalise(short)
            if alias and alias != name and not alias.startswith("flag "):
                captions.append(f"a photo of {article(alias)} {alias}.")
        out.append(Rendering(name, source, path, captions, animal=entry.get("subcategory", "").startswith("animal")))
    return out


def tuxpaint_renderings(folder: Path) -> list[Rendering]:
    out = []
    for path in sorted(folder.glob(SOURCES["tuxpaint"].images)):
        name = normalise(path.stem)
        if not name or not re.search("[a-z]", name):
            continue
        captions = [f"a photo of {article(name)} {name}.", name]
        text = path.with_suffix(".txt")
        if text.is_file():
            first = text.read_text(errors="replace").splitlines()[:1]
            if first and first[0].strip():
                captions.append(first[0].strip())
        out.append(Rendering(name, "tuxpaint", path, captions, animal="animals" in path.parts))
    return out


def all_renderings() -> list[Rendering]:
    renderings = tuxpaint_renderings(fetch(SOURCES["tuxpaint"]))
    for source in ("noto", "twemoji"):
        renderings += emoji_renderings(source, fetch(SOURCES[source]))
    return renderings


def split(renderings: list[Rendering], seed: int = 0) -> dict[str, str]:
    """rendering id -> "train" | "held_out" | "unseen"."""
    rng = random.Random(seed)
    by_concept: dict[str, list[Rendering]] = {}
    for r in renderings:
        by_concept.setdefault(r.concept, []).append(r)
    concepts = sorted(by_concept)
    demo_unknown = set(DEMO["near"]) | set(DEMO["far"])
    missing = [c for c in (*DEMO["id"], *demo_unknown) if c not in by_concept]
    if missing:
        raise ValueError(f"demo concepts without renderings: {missing}")
    free = [c for c in concepts if c not in demo_unknown and c not in DEMO["id"]]
    unseen = set(rng.sample(free, int(UNSEEN_FRACTION * len(concepts)))) | demo_unknown
    out: dict[str, str] = {}
    for concept in concepts:
        group = sorted(by_concept[concept], key=lambda r: r.id)
        for r in group:
            out[r.id] = "unseen" if concept in unseen else "train"
        if concept in unseen or len(group) < 2:
            continue
        if concept in DEMO["id"]:
            # the demo's frames: its photos and one emoji style; the other style stays for training
            for r in group:
                if r.source in ("tuxpaint", "twemoji"):
                    out[r.id] = "held_out"
            if all(out[r.id] != "train" for r in group):
                out[group[0].id] = "train"
        elif rng.random() < HELD_OUT_FRACTION:
            out[rng.choice(group).id] = "held_out"
    return out
