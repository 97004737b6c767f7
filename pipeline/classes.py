"""The operator's in-distribution classes: from a folder of examples, or a plain list."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import InputError
from pipeline.images import list_images, load_image_file
from schemas.settings import ClassesSettings, ImageSettings

ID_PROMPT = "The nice {}."
MCM_PROMPT = "a photo of a {}"  # no full stop, as MCM's released code (METHOD §3)


class ClassesError(InputError):
    """The class definition is unusable; the message names the folder or setting."""


@dataclass(frozen=True)
class IdClasses:
    names: list[str]
    examples: list[list[Path]] | None  # per class, None when only names are known

    @property
    def has_examples(self) -> bool:
        return self.examples is not None


def _class_name(folder: Path) -> str:
    return folder.name.replace("_", " ").strip()


def classes_from_folder(root: Path, settings: ClassesSettings) -> IdClasses:
    """One sub-folder per class, holding a few example images."""
    root = Path(root)
    if not root.is_dir():
        raise ClassesError(f"{root}: not a folder of class sub-folders")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise ClassesError(f"{root}: no class sub-folders")
    names, examples, seen = [], [], {}
    for folder in folders:
        name = _class_name(folder)
        if name.lower() in seen:
            raise ClassesError(f"{folder}: class name '{name}' repeats {seen[name.lower()]}")
        seen[name.lower()] = folder
        images = list_images(folder)
        if not images:
            raise ClassesError(f"{folder}: class '{name}' has no example images")
        if len(images) < settings.min_examples:
            raise ClassesError(
                f"{folder}: class '{name}' has {len(images)} example image(s), fewer than "
                f"INTERNEG_CLASSES__MIN_EXAMPLES={settings.min_examples}"
            )
        names.append(name)
        examples.append(images[: settings.max_examples])
    return IdClasses(names, examples)


def classes_from_list(path: Path) -> IdClasses:
    """A text file with one class name per line (blank lines and '#' comments ignored)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ClassesError(f"{path}: cannot read class list ({exc.strerror or exc})") from exc
    names = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not names:
        raise ClassesError(f"{path}: no class names")
    lowered = [n.lower() for n in names]
    repeated = sorted({n for n in lowered if lowered.count(n) > 1})
    if repeated:
        raise ClassesError(f"{path}: repeated class names: {', '.join(repeated)}")
    return IdClasses(names, None)


def load_classes(source: Path, settings: ClassesSettings) -> IdClasses:
    source = Path(source)
    return classes_from_folder(source, settings) if source.is_dir() else classes_from_list(source)


def compute_prototypes(loaded, classes: IdClasses, settings: ClassesSettings, images: ImageSettings) -> np.ndarray:
    """v_k: the normalised mean image embedding of each class's examples (METHOD §1)."""
    import torch  # here, not at the top: load_classes checks a class folder before torch is loaded

    from pipeline.arrays import normalize_rows

    if not classes.has_examples:
        raise ClassesError("image prototypes need a class folder with example images")
    transform = loaded.augment if settings.prototype_augment else loaded.preprocess
    torch.manual_seed(settings.seed)  # the augmentation is random: seeded, each image passes once
    prototypes = []
    for paths in classes.examples:
        batch = torch.stack(
            [transform(load_image_file(p, max_bytes=images.max_bytes, max_pixels=images.max_pixels)) for p in paths]
        )
        emb = loaded.encode_images(batch).cpu().numpy()
        prototypes.append(emb.mean(axis=0))
    return normalize_rows(np.stack(prototypes))
