"""The detector bundle: everything a scorer needs, made once by ``interneg prepare``.

A bundle is a directory: ``manifest.json`` (model id and settings, class names, counts,
sha256 of every file) beside plain ``.npy``/``.json`` arrays: the shared ones (ID texts,
prototypes) and each bundled method's own state as ``{method}.{name}.npy``/``.json``
(see :class:`pipeline.scorers.MethodState`), plus a FAISS index of InterNeg's static
negatives. Nothing is pickled. Loading verifies the hashes and refuses a bundle
made with another model than the one it will be used with.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from pipeline.bank import NegativeBank
from pipeline.errors import InputError
from pipeline.classes import ID_PROMPT, IdClasses, compute_prototypes, load_classes
from pipeline.lexicon import Lexicon, cached_text_embeddings, load_lexicon
from pipeline.model import file_sha256, load_model, model_identity
from pipeline.scorers import MethodInputs, MethodState, TextEncoder
from pipeline.selection import base_similarity
from schemas.settings import ModelSettings, Settings

FORMAT_VERSION = 2  # 2: per-method state under each method's name
MANIFEST = "manifest.json"


class BundleError(InputError):
    """A bundle that cannot be used; the message names the bundle and the problem."""


@dataclass
class Bundle:
    model_id: str
    class_names: list[str]
    logit_scale: float
    id_text: np.ndarray  # (K, D) "The nice {y}."
    prototypes: np.ndarray | None  # (K, D), None without example images
    methods: dict[str, MethodState]  # each method's own state, under its registry name
    settings: dict = field(default_factory=dict)  # the Settings used to prepare, as JSON data
    extras: dict[str, np.ndarray] = field(default_factory=dict)  # e.g. a simulation's modality gap
    info: dict = field(default_factory=dict)  # counts and notes shown to the user
    path: Path | None = None  # where it was read from, for messages

    @property
    def base_similarity(self) -> np.ndarray | None:
        return None if self.prototypes is None else base_similarity(self.id_text, self.prototypes)

    @property
    def selection(self) -> str:
        return "intermodal" if self.prototypes is not None else "neglabel (no example images)"

    def state(self, method: str) -> MethodState:
        """The method's state; a clear error when the bundle was prepared without it."""
        if method not in self.methods:
            where = self.path or "the bundle"
            raise BundleError(f"{where}: prepared without method {method!r} (it carries {', '.join(self.methods) or 'none'}); "
                              f"prepare it again with --methods {method} (or INTERNEG_METHOD__BUNDLED)")
        return self.methods[method]

    def negatives(self, method: str) -> tuple[np.ndarray, list[str]]:
        state = self.state(method)
        return state.arrays["negatives"], state.words["words"]

    def bank(self, method: str, capacity: int, dedup_cos: float | None) -> NegativeBank:
        vectors, words = self.negatives(method)
        return NegativeBank(vectors, list(words), capacity=capacity, dedup_cos=dedup_cos)


def build_bundle(
    *,
    model_id: str,
    class_names: list[str],
    logit_scale: float,
    id_text: np.ndarray,
    prototypes: np.ndarray | None,
    lexicon: Lexicon,
    lexicon_emb: np.ndarray,
    encode: TextEncoder,
    settings: Settings,
    extras: dict[str, np.ndarray] | None = None,
) -> Bundle:
    """Every bundled method's state, from embedded arrays and a text encoder for other prompts."""
    from pipeline.methods import method_class

    total_candidates = len(lexicon.words)
    lexicon, kept = lexicon.without(class_names)
    inputs = MethodInputs(class_names=list(class_names), id_text=id_text.astype(np.float32),
                          prototypes=None if prototypes is None else prototypes.astype(np.float32),
                          lexicon=lexicon, lexicon_emb=lexicon_emb[kept].astype(np.float32), encode=encode)
    methods = {}
    for name in settings.method.bundled:
        state = method_class(name).prepare(inputs, settings)
        state.arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state.arrays.items()}
        methods[name] = state
    info = {
        "lexicon": settings.method.lexicon,
        "lexicon_candidates": len(lexicon.words),
        "dropped_as_class_names": total_candidates - len(kept),
        "methods": {name: state.info for name, state in methods.items()},
    }
    return Bundle(
        model_id=model_id,
        class_names=list(class_names),
        logit_scale=float(logit_scale),
        id_text=inputs.id_text,
        prototypes=inputs.prototypes,
        methods=methods,
        # the deployment's connection settings (Kafka addresses, credentials) stay out of a bundle
        settings=json.loads(settings.model_dump_json(exclude={"kafka"})),
        extras=dict(extras or {}),
        info=info,
    )


def prepare_bundle(loaded, classes_source: Path, settings: Settings) -> Bundle:
    """Encode the ID classes, their examples and the lexicon with a loaded model, then select."""
    classes: IdClasses = load_classes(classes_source, settings.classes)
    prototypes = compute_prototypes(loaded, classes, settings.classes, settings.images) if classes.has_examples else None
    lexicon = load_lexicon(settings.method.lexicon)

    def encode(prompts: list[str]) -> np.ndarray:
        return cached_text_embeddings(loaded, prompts, settings.cache_dir, batch_size=settings.model.text_batch_size)

    bundle = build_bundle(
        model_id=loaded.model_id,
        class_names=classes.names,
        logit_scale=loaded.logit_scale,
        id_text=loaded.encode_texts([ID_PROMPT.format(n) for n in classes.names]),
        prototypes=prototypes,
        lexicon=lexicon,
        lexicon_emb=encode(lexicon.prompts),
        encode=encode,
        settings=settings,
    )
    bundle.info["examples_per_class"] = [len(e) for e in classes.examples] if classes.examples else []
    return bundle


def _checked_name(method: str, name: str) -> str:
    if not (method.isidentifier() and name.isidentifier()):
        raise BundleError(f"state names must be identifiers, got {method}.{name}")
    return f"{method}.{name}"


def save_bundle(bundle: Bundle, out_dir: Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    arrays = {"id_text": bundle.id_text}
    if bundle.prototypes is not None:
        arrays["prototypes"] = bundle.prototypes
        arrays["base_similarity"] = bundle.base_similarity.astype(np.float32)
    arrays.update({f"extra_{k}": v for k, v in bundle.extras.items()})
    words = {}
    for method, state in bundle.methods.items():
        arrays.update({_checked_name(method, k): v for k, v in state.arrays.items()})
        words.update({_checked_name(method, k): v for k, v in state.words.items()})
    files = []
    for name, array in arrays.items():
        np.save(out / f"{name}.npy", np.ascontiguousarray(array))
        files.append(f"{name}.npy")
    for name, word_list in words.items():
        (out / f"{name}.json").write_text(json.dumps(word_list, ensure_ascii=False), encoding="utf-8")
        files.append(f"{name}.json")
    if "interneg" in bundle.methods:  # the FAISS index of the static negatives, for tools that want one
        negatives = bundle.methods["interneg"].arrays["negatives"]
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(bundle.id_text.shape[1]))
        index.add_with_ids(negatives, np.arange(len(negatives), dtype=np.int64))
        faiss.write_index(index, str(out / "interneg.negatives.faiss"))
        files.append("interneg.negatives.faiss")
    manifest = {
        "format": FORMAT_VERSION,
        "model_id": bundle.model_id,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "class_names": bundle.class_names,
        "logit_scale": bundle.logit_scale,
        "embed_dim": int(bundle.id_text.shape[1]),
        "selection": bundle.selection,
        "methods": {m: {"arrays": sorted(s.arrays), "words": sorted(s.words), "info": s.info} for m, s in bundle.methods.items()},
        "extras": sorted(bundle.extras),
        "info": bundle.info,
        "settings": bundle.settings,
        "files": {name: file_sha256(out / name) for name in sorted(files)},
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False), encoding="utf-8")
    return out


def manifest_digest(path: Path) -> str:
    """The sha256 of a bundle's manifest, which holds the sha256 of every file: the bundle's identity."""
    try:
        return file_sha256(Path(path) / MANIFEST)
    except OSError as exc:
        raise BundleError(f"{path}: not a detector bundle (no readable {MANIFEST})") from exc


def read_manifest(path: Path) -> dict:
    manifest_path = Path(path) / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise BundleError(f"{path}: not a detector bundle (no readable {MANIFEST})") from exc
    except json.JSONDecodeError as exc:
        raise BundleError(f"{manifest_path}: malformed JSON ({exc})") from exc
    if manifest.get("format") != FORMAT_VERSION:
        raise BundleError(f"{path}: bundle format {manifest.get('format')}, this version reads {FORMAT_VERSION}; prepare it again with 'interneg prepare'")
    return manifest


# The model settings that choose the weights: a bundle fixes them.
MODEL_IDENTITY = ("name", "pretrained", "seed")


def contradicting_model(path: Path, manifest: dict, given: ModelSettings) -> None:
    """Refuse model settings that were set (environment, .env or code) and name other weights
    than the bundle's: it carries its model, so they would be ignored without a word."""
    recorded = ModelSettings(**manifest["settings"]["model"])
    chosen = {k: getattr(given, k) for k in MODEL_IDENTITY if k in given.model_fields_set}
    wanted = recorded.model_copy(update=chosen)
    if model_identity(wanted) != model_identity(recorded):
        named = " ".join(f"INTERNEG_MODEL__{k.upper()}={v}" for k, v in chosen.items())
        raise BundleError(
            f"{path}: prepared with model {manifest['model_id']}, but {named} names {model_identity(wanted)}; "
            f"a bundle carries its model: unset those settings, or prepare a bundle with that model"
        )


def load_bundle_with_model(path: Path, device: str = "auto", precision: str = "auto", *, model: ModelSettings | None = None):
    """The bundle and the model it was prepared with (device and precision may differ). With
    ``model``, the caller's model settings: refused if they name other weights (contradicting_model)."""
    manifest = read_manifest(path)
    if model is not None:
        contradicting_model(path, manifest, model)
    recorded = manifest["settings"]["model"]
    loaded = load_model(ModelSettings(**{**recorded, "device": device, "precision": precision}))
    return load_bundle(path, model_id=loaded.model_id), loaded


def load_bundle(path: Path, *, model_id: str | None = None) -> Bundle:
    """Read and verify a bundle; with ``model_id``, refuse one made with another model."""
    path = Path(path)
    manifest = read_manifest(path)
    if model_id is not None and manifest["model_id"] != model_id:
        raise BundleError(
            f"{path}: bundle was prepared with model {manifest['model_id']}, but the loaded model is {model_id}; "
            f"prepare a bundle with this model or load the bundle's model"
        )
    files = manifest["files"]
    for name, digest in files.items():
        # a plain file of the folder: not a path out of it, not a link to elsewhere
        if not isinstance(name, str) or Path(name).name != name or name in (".", "..") or "\\" in name:
            raise BundleError(f"{path}: the manifest lists {name!r}, which is not a file name in the bundle folder")
        file = path / name
        if file.is_symlink():
            raise BundleError(f"{file}: a symbolic link; a bundle holds plain files only")
        if not file.is_file():
            raise BundleError(f"{file}: missing from the bundle")
        if file_sha256(file) != digest:
            raise BundleError(f"{file}: content does not match the manifest's sha256 (modified or corrupt)")

    def verified(name: str) -> Path:
        """Only files whose hash the manifest lists (and was just checked) are read."""
        if name not in files:
            raise BundleError(f"{path}: {name} is not listed in the manifest")
        return path / name

    def array(name: str) -> np.ndarray:
        return np.load(verified(f"{name}.npy"), allow_pickle=False)

    def words(name: str) -> list[str]:
        return json.loads(verified(f"{name}.json").read_text(encoding="utf-8"))

    has_prototypes = "prototypes.npy" in manifest["files"]
    methods = {}
    for method, listed in manifest.get("methods", {}).items():
        methods[method] = MethodState(
            arrays={k: array(_checked_name(method, k)) for k in listed["arrays"]},
            words={k: words(_checked_name(method, k)) for k in listed["words"]},
            info=listed.get("info", {}),
        )
        for k, vectors in methods[method].arrays.items():
            if k in methods[method].words and len(methods[method].words[k]) != len(vectors):
                raise BundleError(f"{path}: {method}: {len(methods[method].words[k])} words for {len(vectors)} vectors")
        if "negatives" in methods[method].arrays and len(methods[method].words.get("words", [])) != len(methods[method].arrays["negatives"]):
            raise BundleError(f"{path}: {method}: {len(methods[method].words.get('words', []))} words for "
                              f"{len(methods[method].arrays['negatives'])} negatives")
    bundle = Bundle(
        model_id=manifest["model_id"],
        class_names=list(manifest["class_names"]),
        logit_scale=float(manifest["logit_scale"]),
        id_text=array("id_text"),
        prototypes=array("prototypes") if has_prototypes else None,
        methods=methods,
        settings=manifest["settings"],
        extras={name: array(f"extra_{name}") for name in manifest.get("extras", [])},
        info=manifest.get("info", {}),
        path=path,
    )
    return bundle
