"""The candidate lexicons (WordNet nouns and adjectives) and their cached embeddings.

Two lexicons ship as package data, chosen by name (``INTERNEG_METHOD__LEXICON``):

- ``paper``: the word files NegLabel released and InterNeg reuses
  (``pipeline/data/paper_lexicon/``, WordNet 3.0 licence beside them), read as the released
  code reads them: the candidate pool of every published number (METHOD §1).
- ``debian``: built from Debian's wordnet-base by ``pipeline/data/build_lexicon.py``.

Encoding ~70k prompts is the slowest offline step, so embeddings are cached per model,
addressed by the model id and the exact prompts: the same model never encodes them twice.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterable, Literal

import numpy as np

from pipeline.errors import ConfigError

NOUN_PROMPT = "The nice {}."
ADJECTIVE_PROMPT = "This is a {} photo."


@dataclass(frozen=True)
class Lexicon:
    words: list[str]
    is_adjective: np.ndarray  # (C,) bool

    @property
    def prompts(self) -> list[str]:
        return [(ADJECTIVE_PROMPT if adj else NOUN_PROMPT).format(w) for w, adj in zip(self.words, self.is_adjective)]

    def without(self, names: Iterable[str]) -> tuple["Lexicon", np.ndarray]:
        """Drop candidates equal to an ID class name (exact, case-sensitive, as the released
        code: "Granny Smith" does not drop "granny smith"); returns the kept indices."""
        banned = set(names)
        keep = np.array([w not in banned for w in self.words], dtype=bool)
        kept = np.flatnonzero(keep)
        return Lexicon([self.words[i] for i in kept], self.is_adjective[kept]), kept


def _read_words(name: str) -> list[str]:
    text = resources.files("pipeline.data").joinpath(name).read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line]


LexiconName = Literal["debian", "paper"]
LEXICONS: tuple[str, ...] = ("debian", "paper")


def _paper_words() -> tuple[list[str], list[str]]:
    """Nouns and adjectives of the released word files, read as the released code reads them:
    every ``noun*``/``adj*`` .txt file, each split at newlines without its last piece, words
    kept as released (quirks included); a word that is both noun and adjective is a noun.
    The released code orders them as a Python set does (at random); here they are sorted."""
    nouns: set[str] = set()
    adjectives: set[str] = set()
    for entry in resources.files("pipeline.data").joinpath("paper_lexicon").iterdir():
        name = entry.name
        if not name.endswith("txt"):
            continue
        if name.startswith("adj"):
            adjectives.update(entry.read_text(encoding="utf-8").split("\n")[:-1])
        elif name.startswith("noun"):
            nouns.update(entry.read_text(encoding="utf-8").split("\n")[:-1])
    return sorted(nouns), sorted(adjectives - nouns)


def load_lexicon(name: str = "debian") -> Lexicon:
    """The lexicon of that name (see the module's docstring): nouns first, then adjectives."""
    if name == "paper":
        nouns, adjectives = _paper_words()
    elif name == "debian":
        nouns = _read_words("lexicon_nouns.txt")
        adjectives = _read_words("lexicon_adjectives.txt")
    else:
        raise ConfigError(f"unknown lexicon {name!r}: choose {' or '.join(LEXICONS)}")
    flags = np.array([False] * len(nouns) + [True] * len(adjectives), dtype=bool)
    return Lexicon(nouns + adjectives, flags)


def cache_key(model_id: str, prompts: list[str]) -> str:
    digest = hashlib.sha256(model_id.encode())
    for prompt in prompts:
        digest.update(b"\0" + prompt.encode())
    return digest.hexdigest()[:32]


def cached_text_embeddings(encoder, prompts: list[str], cache_dir: Path, *, batch_size: int = 1024) -> np.ndarray:
    """``encoder.encode_texts(prompts)``, read from / written to a content-addressed cache."""
    path = Path(cache_dir) / "text-embeddings" / f"{cache_key(encoder.model_id, prompts)}.npy"
    if path.exists():
        emb = np.load(path, allow_pickle=False)
        if emb.shape == (len(prompts), encoder.embed_dim):
            return emb
    emb = encoder.encode_texts(prompts, batch_size=batch_size, progress=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp.npy")
    np.save(partial, emb)
    partial.replace(path)  # atomic: a concurrent reader never sees half a file
    return emb
