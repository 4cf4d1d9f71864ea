"""Label-skewed partitions: Dirichlet over class proportions per client."""

from __future__ import annotations

import numpy as np


def dirichlet_partition(
    labels: np.ndarray, num_partitions: int, alpha: float, seed: int, min_size: int = 8
) -> list[np.ndarray]:
    """Split sample indices among clients with per-class Dirichlet(alpha) proportions.

    Smaller alpha means stronger skew. Redraws (up to a bound) until every client
    holds at least `min_size` samples, so no client is left with nothing to train on.
    """
    if num_partitions < 1:
        raise ValueError("num_partitions must be >= 1")
    if alpha <= 0:
        raise ValueError("alpha must be > 0")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(1000):
        parts: list[list[int]] = [[] for _ in range(num_partitions)]
        for c in classes:
            idx = np.flatnonzero(labels == c)
            rng.shuffle(idx)
            share = rng.dirichlet(np.full(num_partitions, alpha))
            cuts = (np.cumsum(share)[:-1] * len(idx)).astype(int)
            for part, chunk in zip(parts, np.split(idx, cuts)):
                part.extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise ValueError(
        f"could not give every one of {num_partitions} clients {min_size} samples "
        f"from {len(labels)} with alpha={alpha}; use fewer clients or a larger alpha"
    )


def dirichlet_draw(labels: np.ndarray, size: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """`size` indices into `labels`, drawn with replacement: class proportions from Dirichlet(alpha), then images
    of each class uniformly. A client of a fleet larger than its data pool gets its own label-skewed shard this way."""
    if alpha <= 0:
        raise ValueError("alpha must be > 0")
    classes = np.unique(labels)
    share = rng.dirichlet(np.full(classes.size, alpha))
    counts = rng.multinomial(size, share)
    picked = [rng.choice(np.flatnonzero(labels == c), n) for c, n in zip(classes, counts, strict=True) if n]
    return rng.permutation(np.concatenate(picked)) if picked else np.zeros(0, np.int64)
