"""The negative bank: static negatives (selected words) plus a bounded set of inverted ones.

Inverted negatives are ranked by deviation degree (then id, so every replica that holds
the same entries ranks them identically), near-duplicates of any kept negative are
refused, and every entry records where it came from. All vectors live in one FAISS
ID-mapped inner-product index, which answers the nearest-negative questions
(de-duplication, and which negatives weighed most for a frame). The score itself is
exact over :meth:`NegativeBank.matrix`, never a top-k.
"""
from __future__ import annotations

import hashlib
import io
import functools
import json
import threading
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
import faiss
import numpy as np

from pipeline.arrays import normalize_rows

FIRST_INVERTED_ID = 1 << 32  # static negatives use ids 0..S-1
FORMAT_VERSION = 1


def _locked(method):
    """Run ``method`` under the bank's lock: a worker's HTTP thread reads the bank (/status)
    while its main thread changes it (seen: /status answering 500 mid-update)."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)
    return wrapper


@dataclass(frozen=True)
class InvertedNegative:
    """One inverted negative and its provenance."""

    id: int
    deviation: float
    origin: str  # the frame (or image) it was inverted from
    created: float  # unix seconds
    nearest_words: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        near = f" ~ {', '.join(self.nearest_words)}" if self.nearest_words else ""
        return f"inverted#{self.id}{near}"


@dataclass(frozen=True)
class Decision:
    """What ``offer`` did; ``outcome`` is for counting, ``reason`` for people."""

    outcome: str  # admitted | not_finite | already_in_bank | duplicate | below_bound
    reason: str
    id: int | None = None
    evicted: tuple[int, ...] = ()

    @property
    def accepted(self) -> bool:
        return self.outcome == "admitted"


@dataclass
class NegativeBank:
    static_vectors: np.ndarray  # (S, D) float32
    static_words: list[str]
    capacity: int = 2000
    dedup_cos: float | None = 0.95  # None: no de-duplication (the released code has none)
    entries: dict[int, InvertedNegative] = field(default_factory=dict, init=False)
    version: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self._lock = threading.RLock()
        self.static_vectors = np.ascontiguousarray(self.static_vectors, dtype=np.float32)
        if self.static_vectors.ndim != 2:
            raise ValueError(f"static negatives must be 2-D, got shape {self.static_vectors.shape}")
        if len(self.static_words) != len(self.static_vectors):
            raise ValueError(f"{len(self.static_words)} words for {len(self.static_vectors)} static negatives")
        self.dim = self.static_vectors.shape[1]
        self._vectors: dict[int, np.ndarray] = {}
        self._index = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        self._static_index = faiss.IndexFlatIP(self.dim)
        if len(self.static_vectors):
            self._index.add_with_ids(self.static_vectors, np.arange(len(self.static_vectors), dtype=np.int64))
            self._static_index.add(self.static_vectors)
        self._next_id = FIRST_INVERTED_ID
        self._matrix: np.ndarray | None = None
        self._sha256: str | None = None

    # --- reading -------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.static_vectors) + len(self.entries)

    @_locked
    def ranked_ids(self) -> list[int]:
        """Inverted negatives, highest deviation first, ties by id."""
        return sorted(self.entries, key=lambda i: (-self.entries[i].deviation, i))

    @_locked
    def matrix(self) -> np.ndarray:
        """All negatives for scoring: static in order, then inverted by rank."""
        if self._matrix is None:
            inverted = [self._vectors[i] for i in self.ranked_ids()]
            parts = [self.static_vectors] + ([np.stack(inverted)] if inverted else [])
            self._matrix = np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)
        return self._matrix

    @_locked
    def vector(self, negative_id: int) -> np.ndarray:
        """The stored vector of an inverted negative, exactly as scored and published."""
        return self._vectors[negative_id]

    def label(self, negative_id: int) -> str:
        if 0 <= negative_id < len(self.static_words):
            return self.static_words[negative_id]
        return self.entries[negative_id].label

    @_locked
    def nearest(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """FAISS search over all negatives: (cosines (B, k), ids (B, k), -1 where fewer)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        k = min(k, len(self))
        if k == 0:
            empty = np.zeros((len(queries), 0))
            return empty.astype(np.float32), empty.astype(np.int64)
        return self._index.search(queries, k)

    @_locked
    def explain(self, image_emb: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        """The k negatives that weighed most for each image: the largest λ·cos, hence e^{z_j}."""
        sims, ids = self.nearest(image_emb, k)
        return [
            [(self.label(int(i)), float(s)) for s, i in zip(row_s, row_i) if i >= 0]
            for row_s, row_i in zip(sims, ids)
        ]

    def nearest_words(self, vector: np.ndarray, k: int = 3) -> tuple[str, ...]:
        if not len(self.static_words):
            return ()
        _, idx = self._static_index.search(vector.reshape(1, -1).astype(np.float32), min(k, len(self.static_words)))
        return tuple(self.static_words[i] for i in idx[0] if i >= 0)

    @_locked
    def digest(self) -> str:
        """Hash of the scoring matrix and the ranked ids: equal digests, equal banks."""
        h = hashlib.sha256()
        h.update(np.asarray(self.ranked_ids(), dtype=np.int64).tobytes())
        h.update(self.matrix().tobytes())
        return h.hexdigest()

    # --- changing ------------------------------------------------------------------
    @_locked
    def put(self, entry: InvertedNegative, vector: np.ndarray) -> tuple[int, ...]:
        """Insert or replace one inverted negative byte for byte (what a replica applies), then
        keep the bound: returns the ids that now ranked below the capacity and were dropped.

        The bound lives here, not with the callers, so that however the entries arrive (an
        offer, a replica applying the topic, a writer publishing past the capacity) every
        bank evicts the same lowest-ranked entries and none grows without bound."""
        vec = np.ascontiguousarray(vector, dtype=np.float32).reshape(1, -1)
        if vec.shape[1] != self.dim:
            raise ValueError(f"negative {entry.id} has dimension {vec.shape[1]}, the bank {self.dim}")
        if not np.isfinite(vec).all() or abs(float(np.linalg.norm(vec)) - 1) > 1e-3:
            raise ValueError(f"negative {entry.id} is not a finite unit vector")
        if entry.id < FIRST_INVERTED_ID:
            raise ValueError(f"inverted negative ids start at {FIRST_INVERTED_ID}, got {entry.id}")
        if entry.id in self.entries:
            self._index.remove_ids(np.array([entry.id], dtype=np.int64))
        self._index.add_with_ids(vec, np.array([entry.id], dtype=np.int64))
        self.entries[entry.id] = entry
        self._vectors[entry.id] = vec[0]
        self._next_id = max(self._next_id, entry.id + 1)
        self._changed()
        evicted = tuple(self.ranked_ids()[self.capacity :])
        for negative_id in evicted:
            self.remove(negative_id)
        return evicted

    @_locked
    def remove(self, negative_id: int) -> bool:
        """Drop one inverted negative (a tombstone); False if it was not there."""
        if negative_id not in self.entries:
            return False
        self._index.remove_ids(np.array([negative_id], dtype=np.int64))
        del self.entries[negative_id]
        del self._vectors[negative_id]
        self._changed()
        return True

    @_locked
    def reset(self) -> None:
        for negative_id in list(self.entries):
            self.remove(negative_id)

    @staticmethod
    def stored_form(vector: np.ndarray) -> np.ndarray:
        """The float32 unit vector ``offer`` stores for ``vector``, bit for bit: what a caller
        must compute a ranking value from to rank as every replica of the stored vector will."""
        return normalize_rows(np.asarray(vector, dtype=np.float32).reshape(1, -1))[0]

    @_locked
    def offer(
        self, vector: np.ndarray, deviation: float, origin: str, *, created: float | None = None, id: int | None = None
    ) -> Decision:
        """Admit an (already admissible) inverted negative if it is new and ranks inside the bound.

        ``id`` lets the caller name the entry (a stable id per origin makes a replayed
        offer a no-op); by default ids count up from :data:`FIRST_INVERTED_ID`.
        """
        vec = self.stored_form(vector).reshape(1, -1)
        if not np.isfinite(vec).all() or not np.isfinite(deviation):
            return Decision("not_finite", "not finite")
        if id is not None and id in self.entries:
            return Decision("already_in_bank", "already in the bank", id)
        if self.dedup_cos is not None:
            sims, ids = self.nearest(vec, 1)
            if ids.shape[1] and ids[0, 0] >= 0 and sims[0, 0] >= self.dedup_cos:
                return Decision("duplicate", f"near-duplicate of {self.label(int(ids[0, 0]))} (cos {sims[0, 0]:.3f})")
        ranked = self.ranked_ids()
        if len(ranked) >= self.capacity:
            weakest = ranked[-1]
            if deviation <= self.entries[weakest].deviation:
                return Decision("below_bound", "ranks below the bank's bound")
        entry = InvertedNegative(
            id=self._next_id if id is None else id,
            deviation=float(deviation),
            origin=origin,
            created=time.time() if created is None else created,
            nearest_words=self.nearest_words(vec[0]),
        )
        evicted = self.put(entry, vec[0])
        return Decision("admitted", "admitted", entry.id, evicted)

    def _changed(self) -> None:
        self._matrix = None
        self._sha256 = None
        self.version += 1

    # --- persistence ---------------------------------------------------------------
    @_locked
    def to_bytes(self) -> bytes:
        """The bank as one .npz, no pickle, and canonical: banks with equal contents give
        equal bytes however they got there (put/remove order, compaction, replay), so a
        replica can prove it holds the same bank by a hash. Hence no change counter, fixed
        zip timestamps, and a FAISS index rebuilt in rank order rather than the live one
        (whose layout depends on its history of removals)."""
        ranked = self.ranked_ids()
        meta = {
            "format": FORMAT_VERSION,
            "capacity": self.capacity,
            "dedup_cos": self.dedup_cos,
            "static_words": self.static_words,
            "entries": [asdict(self.entries[i]) for i in ranked],
        }
        inverted = np.stack([self._vectors[i] for i in ranked]) if ranked else np.zeros((0, self.dim), np.float32)
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        index.add_with_ids(self.static_vectors, np.arange(len(self.static_vectors), dtype=np.int64))
        index.add_with_ids(inverted, np.asarray(ranked, dtype=np.int64))
        arrays = {
            "meta": np.array(json.dumps(meta, sort_keys=True)),
            "static_vectors": self.static_vectors,
            "inverted_vectors": inverted,
            "faiss_index": faiss.serialize_index(index),
        }
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
            for name, array in arrays.items():
                with archive.open(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), "w") as member:
                    np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)
        return buffer.getvalue()

    @_locked
    def sha256(self) -> str:
        """Hash of :meth:`to_bytes`: equal hashes, byte-identical banks."""
        if self._sha256 is None:
            self._sha256 = hashlib.sha256(self.to_bytes()).hexdigest()
        return self._sha256

    def save(self, path: Path) -> None:
        Path(path).write_bytes(self.to_bytes())

    @classmethod
    def load(cls, path: Path) -> "NegativeBank":
        with np.load(Path(path), allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            if meta.get("format") != FORMAT_VERSION:
                raise ValueError(f"{path}: negative bank format {meta.get('format')}, expected {FORMAT_VERSION}")
            bank = cls(
                static_vectors=data["static_vectors"],
                static_words=list(meta["static_words"]),
                capacity=int(meta["capacity"]),
                dedup_cos=None if meta["dedup_cos"] is None else float(meta["dedup_cos"]),
            )
            for raw, vec in zip(meta["entries"], data["inverted_vectors"]):
                raw["nearest_words"] = tuple(raw["nearest_words"])
                bank.put(InvertedNegative(**raw), vec)
            stored = faiss.deserialize_index(data["faiss_index"])
        if stored.ntotal != bank._index.ntotal:
            raise ValueError(f"{path}: FAISS index holds {stored.ntotal} vectors, the bank {bank._index.ntotal}")
        return bank

