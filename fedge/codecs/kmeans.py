"""1-D k-means (Lloyd) for quantizing kept update values, as FedZip does."""

from __future__ import annotations

import numpy as np


def kmeans_1d(values: np.ndarray, clusters: int = 3, iters: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Centroids (float32, ascending) and cluster ids (uint8) of 1-D values.

    Centroids start on linspace(min, max), as in the FedZip paper. In one
    dimension nearest-centroid assignment is a search among the midpoints of
    sorted centroids, so a Lloyd step is one searchsorted and two bincounts.
    The last step ends on an update, so each centroid is the mean of its cluster.
    """
    v = np.asarray(values, dtype=np.float32).reshape(-1)
    if v.size == 0:
        return np.zeros(clusters, np.float32), np.zeros(0, np.uint8)
    centroids = np.linspace(float(v.min()), float(v.max()), clusters)
    ids = np.zeros(v.size, np.intp)
    for _ in range(max(1, iters)):
        centroids = np.sort(centroids)
        mids = ((centroids[1:] + centroids[:-1]) / 2).astype(np.float32)
        ids = np.searchsorted(mids, v)
        sums = np.bincount(ids, weights=v, minlength=clusters)
        counts = np.bincount(ids, minlength=clusters)
        filled = counts > 0
        moved = centroids.copy()
        moved[filled] = sums[filled] / counts[filled]  # an empty cluster keeps its centroid
        if np.array_equal(moved, centroids):
            break
        centroids = moved
    order = np.argsort(centroids, kind="stable")
    if not np.array_equal(order, np.arange(clusters)):
        centroids = centroids[order]
        ids = np.argsort(order)[ids]
    return centroids.astype(np.float32), ids.astype(np.uint8)
