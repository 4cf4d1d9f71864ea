"""1-D k-means (Lloyd) for quantizing kept update values, as FedZip does."""

from __future__ import annotations

import itertools

import numpy as np


def kmeans_1d(values: np.ndarray, clusters: int = 3, iters: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Centroids (float32, ascending) and cluster ids (uint8) of 1-D values.

    Centroids start on linspace(min, max), as in the FedZip paper. In one
    dimension the clusters of sorted centroids are the intervals between their
    midpoints, so a Lloyd step needs only the sum and count of the values above
    each midpoint: one comparison and one dot product per midpoint, no
    per-value assignment array. The ids come from the last step's midpoints,
    so every returned centroid is the mean of its cluster; an empty cluster
    keeps its centroid.
    """
    v = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    if v.size == 0:
        return np.zeros(clusters, np.float32), np.zeros(0, np.uint8)
    n = v.size
    total = float(v.sum(dtype=np.float64))
    lo, hi = float(v.min()), float(v.max())
    centroids = [lo + (hi - lo) * j / (clusters - 1) for j in range(clusters)]
    mids: list[float] = []
    for _ in range(max(1, iters)):
        mids = [float(np.float32((a + b) / 2)) for a, b in itertools.pairwise(centroids)]
        upper_sum, upper_count = total, n  # sum and count of values above the previous midpoint
        moved = []
        for j in range(clusters):
            if j < clusters - 1:
                above = v > mids[j]
                count = int(np.count_nonzero(above))
                s = float(np.dot(above.astype(np.float32), v)) if count else 0.0
            else:
                count, s = 0, 0.0
            members = upper_count - count
            moved.append((upper_sum - s) / members if members > 0 else centroids[j])
            upper_sum, upper_count = s, count
        converged = moved == centroids
        centroids = moved
        if converged:
            break
    ids = np.zeros(n, np.uint8)
    for m in mids:
        ids += (v > m).view(np.uint8)
    return np.asarray(centroids, np.float32), ids
