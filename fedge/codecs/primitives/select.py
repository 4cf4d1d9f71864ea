"""Top-k selection by magnitude: the sparsifying stage shared by fedzip, flasc and ternary."""

from __future__ import annotations

import math

import numpy as np

_SAMPLE = 4096  # strided sample that brackets the k-th largest value


def keep_count(size: int, fraction: float) -> int:
    """How many of `size` entries a fraction keeps (at least one of a non-empty tensor)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    return min(size, max(1, math.ceil(fraction * size))) if size else 0


def kth_largest(magnitude: np.ndarray, k: int) -> float:
    """The k-th largest value of a 1-D array (1 <= k <= size), exactly.

    A strided sample brackets the answer; only the values inside the bracket
    are partitioned, which is several times cheaper than partitioning the
    whole array. If the bracket misses (the sample was unlucky), the whole
    array is partitioned.
    """
    n = magnitude.size
    if n <= 8 * _SAMPLE:
        return magnitude[np.argpartition(magnitude, n - k)[n - k]]
    sample = np.sort(magnitude[:: n // _SAMPLE])[::-1]  # descending
    expect = sample.size * k / n
    margin = 5.0 * math.sqrt(expect * (1 - k / n)) + 2
    hi_rank, lo_rank = int(expect - margin), math.ceil(expect + margin)
    above = 0
    band_mask = None
    if hi_rank >= 0:
        hi = sample[hi_rank]
        above = int(np.count_nonzero(magnitude > hi))
        band_mask = magnitude <= hi
    if lo_rank < sample.size:
        low_mask = magnitude > sample[lo_rank]
        band_mask = low_mask if band_mask is None else band_mask & low_mask
    if band_mask is not None:
        band = magnitude[band_mask]
        if above < k <= above + band.size:
            return band[np.argpartition(band, band.size - (k - above))[band.size - (k - above)]]
    return np.partition(magnitude, n - k)[n - k]



def topk_indices(magnitude: np.ndarray, k: int) -> np.ndarray:
    """Sorted flat indices of exactly k largest entries of a 1-D magnitude array.

    The exact k-th largest value is the threshold and a comparison selects,
    so no sort of the whole array is needed; ties at the threshold are broken
    by position (the earliest are kept).
    """
    n = magnitude.size
    if k <= 0:
        return np.zeros(0, np.int64)
    if k >= n:
        return np.arange(n, dtype=np.int64)
    threshold = kth_largest(magnitude, k)
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
