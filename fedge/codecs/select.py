"""Top-k selection by magnitude: the sparsifying stage shared by fedzip, flasc and ternary."""

from __future__ import annotations

import math

import numpy as np


def keep_count(size: int, fraction: float) -> int:
    """How many of `size` entries a fraction keeps (at least one of a non-empty tensor)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    return min(size, max(1, math.ceil(fraction * size))) if size else 0


def topk_indices(magnitude: np.ndarray, k: int) -> np.ndarray:
    """Sorted flat indices of exactly k largest entries of a 1-D magnitude array.

    A partition finds the threshold, a comparison selects, so no sort of the
    whole array is needed; ties at the threshold are broken by position.
    """
    n = magnitude.size
    if k <= 0:
        return np.zeros(0, np.int64)
    if k >= n:
        return np.arange(n, dtype=np.int64)
    threshold = np.partition(magnitude, n - k)[n - k]
    chosen = np.flatnonzero(magnitude >= threshold)
    extra = chosen.size - k
    if extra:  # ties at the threshold: keep the earliest
        ties = np.flatnonzero(magnitude[chosen] == threshold)
        chosen = np.delete(chosen, ties[ties.size - extra:])
    return chosen.astype(np.int64, copy=False)


def gaps_of(indices: np.ndarray) -> np.ndarray:
    """Sorted indices -> non-negative gaps (index differences minus one; the first is the index itself)."""
    if indices.size == 0:
        return np.zeros(0, np.int64)
    gaps = np.empty(indices.size, np.int64)
    gaps[0] = indices[0]
    np.subtract(indices[1:], indices[:-1], out=gaps[1:])
    gaps[1:] -= 1
    return gaps


def indices_of(gaps: np.ndarray) -> np.ndarray:
    """Inverse of `gaps_of`."""
    return np.cumsum(gaps + 1, dtype=np.int64) - 1
