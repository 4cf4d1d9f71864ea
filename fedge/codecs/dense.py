"""Dense fp32: the uncompressed reference every other codec is measured against."""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import numpy as np

from fedge.codecs.base import CodecError, Encoded, Section, TensorSpec, assemble, flat_f32, require_finite, specs_of
from fedge.codecs.registry import register_codec


@register_codec
class DenseCodec:
    """The raw little-endian float32 bytes of every tensor, concatenated in order (no framing)."""

    name = "dense"
    version = 1

    def params(self) -> dict[str, str]:
        return {}

    def encode(self, update: Mapping[str, np.ndarray]) -> Encoded:
        specs = specs_of(update)
        payload = b"".join(flat_f32(a).astype("<f4", copy=False).tobytes() for a in update.values())
        return Encoded(payload, specs, [Section("values", len(payload))])

    def _values(self, payload: bytes, specs: list[TensorSpec]) -> tuple[np.ndarray, np.ndarray]:
        total = sum(s.size for s in specs)
        if len(payload) != 4 * total:
            raise CodecError(f"dense payload has {len(payload)} bytes, the specs need {4 * total}")
        return np.frombuffer(payload, dtype="<f4"), np.cumsum([0] + [s.size for s in specs])

    def decode(self, payload: bytes, specs: list[TensorSpec]) -> OrderedDict[str, np.ndarray]:
        flat, bounds = self._values(payload, specs)
        flat = flat.astype(np.float32)
        return assemble(specs, [flat[a:b] for a, b in itertools.pairwise(bounds)])

    def accumulate(self, payload: bytes, specs: list[TensorSpec], into: Sequence[np.ndarray], weight: float) -> None:
        flat, bounds = self._values(payload, specs)  # read in place: no copy of the payload
        require_finite(flat, "dense values")
        for target, (a, b) in zip(into, itertools.pairwise(bounds), strict=True):
            target += weight * flat[a:b]
