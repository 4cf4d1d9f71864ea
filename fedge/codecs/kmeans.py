"""1-D k-means (Lloyd) for quantizing kept update values, as FedZip does."""

from __future__ import annotations

import numpy as np


def _tail_stats(v: np.ndarray, mids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sum and count of the values above each midpoint (one comparison and one dot product each)."""
    sums = np.empty(mids.size, np.float64)
    counts = np.empty(mids.size, np.int64)
    for j, m in enumerate(mids):
        above = (v > m).view(np.uint8)
        counts[j] = np.count_nonzero(above)
        sums[j] = float(np.dot(above.astype(np.float32), v))
    return sums, counts


def kmeans_1d(values: np.ndarray, clusters: int = 3, iters: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Centroids (float32, ascending) and cluster ids (uint8) of 1-D values.

    Centroids start on linspace(min, max), as in the FedZip paper. In one
    dimension the clusters of sorted centroids are the intervals between their
    midpoints, so a Lloyd step needs only the sum and count of the values above
    each midpoint: a few vectorised passes, no per-value assignment array.
    The ids come from the last step's midpoints, so every returned centroid is
    the mean of its cluster; an empty cluster keeps its centroid.
    """
    v = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    if v.size == 0:
        return np.zeros(clusters, np.float32), np.zeros(0, np.uint8)
    total = float(v.sum(dtype=np.float64))
    centroids = np.linspace(float(v.min()), float(v.max()), clusters)
    for _ in range(max(1, iters)):
        mids = ((centroids[1:] + centroids[:-1]) / 2).astype(np.float32)
        above_sums, above_counts = _tail_stats(v, mids)
        sums = np.concatenate([[total], above_sums]) - np.concatenate([above_sums, [0.0]])
        counts = np.concatenate([[v.size], above_counts]) - np.concatenate([above_counts, [0]])
        moved = centroids.copy()
        filled = counts > 0
        moved[filled] = sums[filled] / counts[filled]
        converged = np.array_equal(moved, centroids)
        centroids = moved
        if converged:
            break
    # ids from the midpoints of the last update, so each returned centroid is exactly its cluster's mean
    ids = np.zeros(v.size, np.uint8)
    for m in mids:
        ids += (v > m).view(np.uint8)
    return centroids.astype(np.float32), ids
