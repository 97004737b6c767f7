"""Feature files: cached image embeddings for the offline evaluator.

Layout of a feature file (.npz, never pickled):

- ``features``: (N, D) float32, every row L2-normalised (|norm - 1| <= 1e-3), all finite
- ``model_id``: 0-d unicode string array, the model the features were made with
- ``labels``: optional (N,) int64 class indices
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from pipeline.errors import InputError

_NORM_TOL = 1e-3


class FeatureFileError(InputError, ValueError):
    """A feature file (or features to save) that breaks the layout; the message names the file.

    Also a ValueError: tests/test_simulate.py expects one."""


def _check_features(features: np.ndarray, where: str) -> np.ndarray:
    if features.ndim != 2:
        raise FeatureFileError(f"{where}: 'features' must be 2-D (N, D), got shape {features.shape}")
    if not np.issubdtype(features.dtype, np.floating):
        raise FeatureFileError(f"{where}: 'features' must be floating point, got {features.dtype}")
    bad = ~np.all(np.isfinite(features), axis=1)
    if bad.any():
        raise FeatureFileError(f"{where}: {int(bad.sum())} of {len(features)} feature rows contain "
                               f"NaN or inf")
    norms = np.linalg.norm(features.astype(np.float64), axis=1)
    off = np.abs(norms - 1.0) > _NORM_TOL
    if off.any():
        raise FeatureFileError(f"{where}: {int(off.sum())} of {len(features)} feature rows are not "
                               f"L2-normalised (|norm - 1| > {_NORM_TOL}; worst norm "
                               f"{norms[off][np.argmax(np.abs(norms[off] - 1))]:.4f})")
    return np.ascontiguousarray(features, dtype=np.float32)


def _check_labels(labels: np.ndarray, n: int, where: str) -> np.ndarray:
    if labels.ndim != 1 or len(labels) != n:
        raise FeatureFileError(f"{where}: 'labels' must have shape ({n},), got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise FeatureFileError(f"{where}: 'labels' must be integers, got {labels.dtype}")
    return labels.astype(np.int64)


def save_features(path: str | os.PathLike, features: np.ndarray, *, model_id: str,
                  labels: np.ndarray | None = None) -> None:
    """Write ``features`` (and optional ``labels``) to ``path`` in the feature-file layout.

    The file is written to a temporary name and renamed, so readers never see half a file.
    Raises FeatureFileError (naming the path) when the features would not pass ``load_features``.
    """
    path = Path(path)
    where = str(path)
    if not isinstance(model_id, str) or not model_id:
        raise FeatureFileError(f"{where}: model_id must be a non-empty string")
    arrays = {"features": _check_features(np.asarray(features), where),
              "model_id": np.array(model_id, dtype=np.str_)}
    if labels is not None:
        arrays["labels"] = _check_labels(np.asarray(labels), len(arrays["features"]), where)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_features(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None, str]:
    """Read a feature file; return ``(features float32, labels int64 or None, model_id)``.

    Raises FileNotFoundError if the file is missing and FeatureFileError (naming the file) if it
    is not a readable .npz, lacks a key, holds pickled objects, has non-2-D or non-float
    features, NaN/inf rows (with their count), rows off unit norm, or bad labels.
    """
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise FileNotFoundError(f"{where}: feature file not found")
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = set(npz.files)
            missing = [k for k in ("features", "model_id") if k not in keys]
            if missing:
                raise FeatureFileError(f"{where}: missing key(s) {missing}; found {sorted(keys)}")
            features = npz["features"]
            model_id = npz["model_id"]
            labels = npz["labels"] if "labels" in keys else None
    except FeatureFileError:
        raise
    except ValueError as e:  # numpy's: pickled objects, a damaged archive
        raise FeatureFileError(f"{where}: not a valid feature file ({e})") from e
    except (OSError, EOFError) as e:
        raise FeatureFileError(f"{where}: not a readable .npz feature file ({e})") from e
    if model_id.ndim != 0 or model_id.dtype.kind != "U":
        raise FeatureFileError(f"{where}: 'model_id' must be a 0-d string array, got "
                               f"{model_id.dtype} shape {model_id.shape}")
    features = _check_features(features, where)
    if labels is not None:
        labels = _check_labels(labels, len(features), where)
    return features, labels, str(model_id)
