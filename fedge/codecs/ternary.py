"""ComPEFT-style ternary updates: top-k% by magnitude, a sign each, one scale per tensor.

ComPEFT scales the signs by alpha * std(update) and tunes alpha on held-out
data. Without a validation set at encode time the default here is the scale
that minimises the L2 reconstruction error for the chosen support and signs,
which is the mean magnitude of the kept entries (d/ds ||x_S - s*sign(x_S)||^2 = 0).
`scale="std"` gives the paper's alpha * std rule instead.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedge.codecs.base import (
    CodecError,
    Encoded,
    SparseDecoding,
    TensorSpec,
    flat_f32,
    fmt_float,
    specs_of,
    to_fraction,
)
from fedge.codecs.primitives.entropy import decode_symbols, encode_symbols, shannon_bytes
from fedge.codecs.primitives.frame import PayloadReader, PayloadWriter
from fedge.codecs.primitives.positions import read_positions, write_positions
from fedge.codecs.primitives.select import keep_count, topk_indices
from fedge.codecs.registry import register_codec

_SCALE_RULES = ("l2", "std")


@register_codec
class TernaryCodec(SparseDecoding):
    """Payload sections: scales (fp32 per tensor), signs (entropy-coded bits), counts, positions."""

    name = "ternary"
    version = 1

    def __init__(self, k: float = 0.2, scale: str = "l2", alpha: float = 1.0) -> None:
        self.k = to_fraction(k, "ternary k")
        if scale not in _SCALE_RULES:
            raise ValueError(f"ternary scale must be one of {_SCALE_RULES}, got {scale!r}")
        self.scale = scale
        self.alpha = float(alpha)

    def params(self) -> dict[str, str]:
        return {"k": fmt_float(self.k), "scale": self.scale, "alpha": fmt_float(self.alpha)}

    def encode(self, update: Mapping[str, np.ndarray]) -> Encoded:
        specs = specs_of(update)
        indices, scales, signs = [], [], []
        for arr in update.values():
            flat = flat_f32(arr)
            magnitude = np.abs(flat)
            idx = topk_indices(magnitude, keep_count(flat.size, self.k))
            if self.scale == "l2":
                s = float(magnitude[idx].mean(dtype=np.float64)) if idx.size else 0.0
            else:
                s = self.alpha * float(flat.std(dtype=np.float64)) if flat.size else 0.0
            indices.append(idx)
            scales.append(s)
            signs.append((flat[idx] > 0).astype(np.uint8))
        all_signs = np.concatenate(signs) if signs else np.zeros(0, np.uint8)
        writer = PayloadWriter()
        writer.add("scales", np.asarray(scales, dtype="<f4"))
        writer.add("signs", encode_symbols(all_signs), entropy_coded=True, bound=lambda: shannon_bytes(all_signs))
        write_positions(writer, indices)
        return Encoded(writer.payload(), specs, writer.sections)

    def kept(self, payload: bytes, specs: list[TensorSpec]) -> tuple[np.ndarray, list[np.ndarray]]:
        """+-scale of each tensor at its kept positions."""
        reader = PayloadReader(payload)
        scales = reader.array("scales", "<f4", len(specs)).astype(np.float32)
        signs_blob = reader.take("signs")
        indices = read_positions(reader, specs, per_tensor=self.k)
        reader.finish()
        signs = decode_symbols(signs_blob, sum(i.size for i in indices))
        if signs.size and signs.max() > 1:
            raise CodecError("a sign symbol is neither 0 nor 1")
        magnitude = np.repeat(scales, [i.size for i in indices])
        return np.where(signs > 0, magnitude, -magnitude), indices
