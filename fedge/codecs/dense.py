"""Dense fp32: the uncompressed reference every other codec is measured against."""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np

from fedge.codecs.base import CodecError, Encoded, Section, TensorSpec, assemble, flat_f32, specs_of
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

    def decode(self, payload: bytes, specs: list[TensorSpec]) -> OrderedDict[str, np.ndarray]:
        total = sum(s.size for s in specs)
        if len(payload) != 4 * total:
            raise CodecError(f"dense payload has {len(payload)} bytes, the specs need {4 * total}")
        flat = np.frombuffer(payload, dtype="<f4").astype(np.float32)
        bounds = np.cumsum([0] + [s.size for s in specs])
        return assemble(specs, [flat[a:b] for a, b in itertools.pairwise(bounds)])
