"""The operator's allow-list (issue 14): frames an operator marked "normal".

Each entry is an embedding, for one camera or for all. A frame whose embedding has cosine
at least ``min_cos`` with an entry that covers its camera is judged in-distribution
whatever its score: the operator has seen that scene and said it is normal. Pure numpy.
"""
from __future__ import annotations

import numpy as np

MAX_ENTRIES = 10_000  # a flood of entries must not grow every worker without bound


class AllowList:
    def __init__(self, min_cos: float):
        self.min_cos = min_cos
        self.entries: dict[str, tuple[str | None, np.ndarray]] = {}  # entry id -> (camera or None, unit vector)
        self.version = 0

    def put(self, entry_id: str, camera_id: str | None, vector: np.ndarray) -> None:
        if entry_id not in self.entries and len(self.entries) >= MAX_ENTRIES:
            raise ValueError(f"the allow-list is full ({MAX_ENTRIES} entries)")
        v = np.asarray(vector, dtype=np.float32).reshape(-1)
        norm = float(np.linalg.norm(v))
        if not np.isfinite(norm) or norm == 0:
            raise ValueError("an allow-list vector must be finite and non-zero")
        self.entries[entry_id] = (camera_id, v / norm)
        self.version += 1

    def remove(self, entry_id: str) -> bool:
        removed = self.entries.pop(entry_id, None) is not None
        self.version += removed
        return removed

    def match(self, embeddings: np.ndarray, cameras: list[str]) -> list[str | None]:
        """Per frame, the entry that allows it (the closest covering one), or None."""
        if not self.entries:
            return [None] * len(cameras)
        ids = list(self.entries)
        scope = [self.entries[i][0] for i in ids]
        matrix = np.stack([self.entries[i][1] for i in ids])
        e = np.asarray(embeddings, dtype=np.float32)
        e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
        cos = e @ matrix.T
        found: list[str | None] = []
        for row, camera in zip(cos, cameras):
            covering = np.array([c is None or c == camera for c in scope])
            row = np.where(covering, row, -np.inf)
            best = int(np.argmax(row))
            found.append(ids[best] if row[best] >= self.min_cos else None)
        return found
