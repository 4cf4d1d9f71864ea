"""FedZip (Malekijoo et al. 2021): per-tensor top-z, 3-cluster k-means, entropy-coded ids and positions."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fedge.codecs.base import (
    CodecError,
    Encoded,
    SparseDecoding,
    TensorSpec,
    flat_f32,
    fmt_float,
    require_finite,
    specs_of,
    to_fraction,
    to_int,
)
from fedge.codecs.primitives.entropy import decode_symbols, encode_symbols, shannon_bytes
from fedge.codecs.primitives.frame import PayloadReader, PayloadWriter
from fedge.codecs.primitives.kmeans import kmeans_1d
from fedge.codecs.primitives.positions import read_positions, write_positions
from fedge.codecs.primitives.select import keep_count, topk_indices
from fedge.codecs.registry import register_codec


@register_codec
class FedZipCodec(SparseDecoding):
    """Payload sections: counts, centroids (fp32, `clusters` per tensor), cluster ids, positions.

    The paper codes ids and addresses with Huffman; here both go through an
    ANS coder with a fitted model, which gets closer to the entropy than whole-bit Huffman codes.
    """

    name = "fedzip"
    version = 1

    def __init__(self, z: float = 0.2, clusters: int = 3, iters: int = 5) -> None:
        self.z = to_fraction(z, "fedzip z")
        self.clusters = to_int(clusters, "clusters")
        self.iters = to_int(iters, "iters")
        if not 2 <= self.clusters <= 256:
            raise ValueError(f"fedzip clusters must be in [2, 256], got {clusters}")

    def params(self) -> dict[str, str]:
        return {"z": fmt_float(self.z), "clusters": str(self.clusters), "iters": str(self.iters)}

    def encode(self, update: Mapping[str, np.ndarray]) -> Encoded:
        specs = specs_of(update)
        indices, centroids, ids = [], [], []
        for arr in update.values():
            flat = flat_f32(arr)
            idx = topk_indices(np.abs(flat), keep_count(flat.size, self.z))
            c, i = kmeans_1d(flat[idx], self.clusters, self.iters)
            indices.append(idx)
            centroids.append(c)
            ids.append(i)
        all_ids = np.concatenate(ids) if ids else np.zeros(0, np.uint8)
        writer = PayloadWriter()
        writer.add("centroids", np.concatenate(centroids).astype("<f4") if centroids else b"")
        writer.add("ids", encode_symbols(all_ids), entropy_coded=True, bound=lambda: shannon_bytes(all_ids))
        write_positions(writer, indices)
        return Encoded(writer.payload(), specs, writer.sections)

    def _parts(self, payload: bytes, specs: list[TensorSpec]) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """Centroids (one row per tensor), cluster ids (tensor by tensor) and each tensor's kept indices."""
        reader = PayloadReader(payload)
        centroids = reader.array("centroids", "<f4", self.clusters * len(specs)).reshape(len(specs), self.clusters)
        ids_blob = reader.take("ids")
        indices = read_positions(reader, specs, per_tensor=self.z)
        reader.finish()
        ids = decode_symbols(ids_blob, sum(i.size for i in indices))
        if ids.size and ids.max() >= self.clusters:
            raise CodecError("a cluster id exceeds the number of clusters")
        return centroids, ids, indices

    def kept(self, payload: bytes, specs: list[TensorSpec]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Each tensor's cluster ids looked up in its own centroid row, at its kept positions."""
        centroids, ids, indices = self._parts(payload, specs)
        row = np.repeat(np.arange(len(indices)), [i.size for i in indices])
        return centroids[row, ids], indices

    def accumulate(self, payload: bytes, specs: list[TensorSpec], into: Sequence[np.ndarray], weight: float) -> None:
        """Every kept value is one of its tensor's centroids: check and weigh the centroids (a few numbers), then add
        each tensor's weighted centroids at its kept positions, looked up by id, with no float32 copy of the values.
        The server's hot path (`fedge bench aggregate`)."""
        centroids, ids, indices = self._parts(payload, specs)
        require_finite(centroids, "fedzip centroids")
        weighted = weight * centroids.astype(np.float64)
        start = 0
        for target, table, idx in zip(into, weighted, indices, strict=True):
            if idx.size:
                target[idx] += table[ids[start:start + idx.size]]  # kept indices are unique within a tensor
            start += idx.size
