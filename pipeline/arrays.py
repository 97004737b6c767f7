"""Array plumbing shared by the method's functions: numpy or torch in, the same kind out."""
from __future__ import annotations

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor


def as_tensor(x: ArrayLike, name: str, *, ndim: int = 2) -> torch.Tensor:
    """A float32 tensor (on the input tensor's device; CPU for numpy), checked for shape and finiteness."""
    t = x.detach() if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    if t.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D array, got shape {tuple(t.shape)}")
    t = t.float()
    bad = ~torch.isfinite(t)
    if bad.any():
        rows = int(bad.reshape(t.shape[0], -1).any(dim=1).sum()) if t.ndim > 1 else int(bad.sum())
        raise ValueError(f"{name}: {rows} row(s) contain NaN or infinite values")
    return t


def like_input(result: torch.Tensor, reference: ArrayLike) -> ArrayLike:
    """Return torch for torch input and numpy for anything else."""
    if isinstance(reference, torch.Tensor):
        return result
    return result.cpu().numpy()


def normalize_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)
