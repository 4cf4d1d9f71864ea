"""Block-wise absmax quantization of the dense update to 8 or 4 bits (the q8 / q4 baselines).

Each tensor is cut into blocks of `block` consecutive entries; a block stores
one fp32 scale (absmax / qmax) and a signed integer code per entry, so the
error of every entry is at most half its block's scale. fp32 scales (not fp16)
keep small adapter updates (often below fp16's normal range) representable.
With block 64 the payload is 1 + 4/64 bytes per entry for q8 (26.6% of fp32)
and 0.5 + 4/64 for q4 (14.1%). Codes are fixed width, not entropy coded.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence

import numpy as np

from fedge.codecs.base import Encoded, TensorSpec, assemble, flat_f32, require_finite, specs_of, to_int
from fedge.codecs.primitives.entropy import shannon_bytes
from fedge.codecs.primitives.frame import PayloadReader, PayloadWriter
from fedge.codecs.registry import register_codec


def _blocks(size: int, block: int) -> int:
    return -(-size // block)


class BlockQuantCodec:
    """Payload sections: scales (fp32, one per block), codes (int8, or 4-bit pairs packed in a byte)."""

    name = "q"
    version = 1
    bits = 8

    def __init__(self, block: int = 64) -> None:
        self.block = to_int(block, "block")
        if not 1 <= self.block <= 1 << 20:
            raise ValueError(f"{self.name} block must be in [1, 2**20], got {block}")
        self.qmax = (1 << (self.bits - 1)) - 1

    def params(self) -> dict[str, str]:
        return {"block": str(self.block)}

    def _quantize(self, flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        nblocks = _blocks(flat.size, self.block)
        padded = np.zeros(nblocks * self.block, np.float32)
        padded[:flat.size] = flat
        rows = padded.reshape(nblocks, self.block)
        scale = (np.abs(rows).max(axis=1) / np.float32(self.qmax)).astype(np.float32)
        inverse = np.divide(np.float32(1.0), scale, out=np.zeros_like(scale), where=scale > 0)
        codes = np.rint(rows * inverse[:, None])
        np.clip(codes, -self.qmax, self.qmax, out=codes)
        return scale, codes.astype(np.int8).reshape(-1)[:flat.size]

    def encode(self, update: Mapping[str, np.ndarray]) -> Encoded:
        specs = specs_of(update)
        parts = [self._quantize(flat_f32(a)) for a in update.values()]
        scales = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.float32)
        codes = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int8)
        writer = PayloadWriter()
        writer.add("scales", scales.astype("<f4"))
        writer.add("codes", self._pack(codes), bound=lambda: shannon_bytes(codes.astype(np.int16) + self.qmax + 1))
        return Encoded(writer.payload(), specs, writer.sections)

    def _pack(self, codes: np.ndarray) -> bytes:
        if self.bits == 8:
            return codes.tobytes()
        nibbles = (codes.astype(np.int16) + 8).astype(np.uint8)
        if nibbles.size % 2:
            nibbles = np.append(nibbles, np.uint8(8))
        return (nibbles[0::2] | (nibbles[1::2] << 4)).tobytes()

    def _unpack(self, blob: memoryview, count: int) -> np.ndarray:
        if self.bits == 8:
            return PayloadReader.as_array(blob, "codes", "i1", count).astype(np.float32)
        packed = PayloadReader.as_array(blob, "codes", "u1", (count + 1) // 2)
        nibbles = np.empty(packed.size * 2, np.int8)
        nibbles[0::2] = packed & 0x0F
        nibbles[1::2] = packed >> 4
        return (nibbles[:count] - 8).astype(np.float32)

    def _parts(self, payload: bytes, specs: list[TensorSpec]) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """Scales (fp32, one per block), codes (int8, every entry) and each tensor's block count."""
        reader = PayloadReader(payload)
        nblocks = [_blocks(s.size, self.block) for s in specs]
        scales = reader.array("scales", "<f4", sum(nblocks)).astype(np.float32)
        codes = self._unpack(reader.take("codes"), sum(s.size for s in specs))
        reader.finish()
        return scales, codes, nblocks

    def decode(self, payload: bytes, specs: list[TensorSpec]) -> OrderedDict[str, np.ndarray]:
        scales, codes, nblocks = self._parts(payload, specs)
        flats, at_code, at_block = [], 0, 0
        for spec, nb in zip(specs, nblocks, strict=True):
            block_scale = np.repeat(scales[at_block:at_block + nb], self.block)[:spec.size]
            flats.append(codes[at_code:at_code + spec.size] * block_scale)
            at_code += spec.size
            at_block += nb
        return assemble(specs, flats)

    def accumulate(self, payload: bytes, specs: list[TensorSpec], into: Sequence[np.ndarray], weight: float) -> None:
        """Whole blocks are scaled as rows (no per-entry scale vector is built); a tensor's last partial block apart."""
        scales, codes, nblocks = self._parts(payload, specs)
        require_finite(scales, f"{self.name} scales")
        at_code, at_block = 0, 0
        for target, spec, nb in zip(into, specs, nblocks, strict=True):
            tensor_codes, tensor_scales = codes[at_code:at_code + spec.size], scales[at_block:at_block + nb]
            full = spec.size // self.block
            whole = full * self.block
            if full:
                rows = tensor_codes[:whole].reshape(full, self.block) * tensor_scales[:full, None]
                target[:whole].reshape(full, self.block)[...] += weight * rows
            if whole < spec.size:
                target[whole:] += weight * (tensor_codes[whole:] * tensor_scales[full])
            at_code += spec.size
            at_block += nb


@register_codec
class Q8Codec(BlockQuantCodec):
    name = "q8"
    bits = 8


@register_codec
class Q4Codec(BlockQuantCodec):
    name = "q4"
    bits = 4


