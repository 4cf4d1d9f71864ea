"""What every codec shares: tensor specs, the encoded result and its size account.

A codec turns an update (names -> float arrays) into one payload of bytes.
Its account lists every section of that payload with its exact size, so the
sum of the sections is `len(payload)`, and, for the sections that were entropy
coded, the symbols that were coded, so the Shannon bound can be reported next
to the coded size without slowing the encoder down.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

#: dtypes an update tensor may have on the wire (decoded arrays come back in this dtype).
SUPPORTED_DTYPES = ("float32", "float16", "float64")


class CodecError(ValueError):
    """A payload that cannot be decoded (truncated, inconsistent with its specs, corrupt)."""


class NonFiniteError(CodecError):
    """A payload that decodes, but to NaN or infinite values."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def size(self) -> int:
        return math.prod(self.shape)  # exact Python ints: absurd shapes cannot wrap around


@dataclass
class Section:
    """One part of a payload: `nbytes` is its exact size, framing included.

    `bound` computes the Shannon bound (bytes) of what the section carries;
    it is evaluated only when asked for. Raw sections are their own bound.
    """

    name: str
    nbytes: int
    entropy_coded: bool = False
    bound: Callable[[], float] | None = None

    def bound_bytes(self) -> float:
        return float(self.bound()) if self.bound is not None else float(self.nbytes)


@dataclass
class Encoded:
    payload: bytes
    specs: list[TensorSpec]
    sections: list[Section] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return len(self.payload)

    def accounted_bytes(self) -> int:
        return sum(s.nbytes for s in self.sections)

    def raw_bytes(self) -> int:
        """Size of the update as dense fp32, the reference every ratio is taken against."""
        return 4 * sum(s.size for s in self.specs)


@runtime_checkable
class Codec(Protocol):
    name: str
    version: int

    def params(self) -> dict[str, str]:
        """The parameters as strings, enough to build an identical decoder on the other side."""
        ...

    def encode(self, update: Mapping[str, np.ndarray]) -> Encoded: ...

    def decode(self, payload: bytes, specs: list[TensorSpec]) -> OrderedDict[str, np.ndarray]: ...


@runtime_checkable
class Accumulating(Protocol):
    """A codec that can add its decoded update straight into a running sum (what a server does with every upload).

    `accumulate(payload, specs, into, weight)` adds `weight * decode(payload, specs)` to `into` (one flat
    float64 vector per spec) without building the dense update when the payload is sparse or block-coded.
    It decodes and checks everything first (`CodecError`; `NonFiniteError` for NaN or infinite values)
    and only then adds, so a payload it refuses leaves `into` untouched.
    """

    def accumulate(self, payload: bytes, specs: list[TensorSpec], into: Sequence[np.ndarray],
                   weight: float) -> None: ...


def specs_of(update: Mapping[str, np.ndarray]) -> list[TensorSpec]:
    specs = []
    for name, arr in update.items():
        dtype = str(np.asarray(arr).dtype)
        if dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"tensor {name!r} has dtype {dtype}; codecs take {SUPPORTED_DTYPES}")
        specs.append(TensorSpec(name, tuple(int(d) for d in np.shape(arr)), dtype))
    return specs


def flat_f32(arr: np.ndarray) -> np.ndarray:
    """A 1-D float32 view (copy only when the input is not already contiguous float32)."""
    return np.ascontiguousarray(arr, dtype=np.float32).reshape(-1)


def assemble(specs: list[TensorSpec], flats: list[np.ndarray]) -> OrderedDict[str, np.ndarray]:
    """Reshape decoded flat float32 vectors to the specs' shapes and dtypes, in spec order."""
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    for spec, flat in zip(specs, flats, strict=True):
        arr = flat.reshape(spec.shape)
        out[spec.name] = arr if spec.dtype == "float32" else arr.astype(spec.dtype)
    return out


def to_int(value: object, name: str) -> int:
    """Codec parameters arrive as ints, floats (method configs) or strings (the envelope)."""
    f = float(value)  # type: ignore[arg-type]
    if not f.is_integer():
        raise ValueError(f"parameter {name} must be an integer, got {value!r}")
    return int(f)


def to_fraction(value: object, name: str) -> float:
    """A kept fraction of an update: a number in (0, 1] (parameters arrive as numbers or strings)."""
    f = float(value)  # type: ignore[arg-type]
    if not 0.0 < f <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")
    return f


def fmt_float(value: float) -> str:
    """A float as a string that parses back to the identical value."""
    return repr(float(value))


def require_finite(values: np.ndarray, what: str) -> None:
    """Refuse NaN or infinite values (checked on a payload's compact values, before they are spread out)."""
    if not np.isfinite(values).all():
        raise NonFiniteError(f"{what} hold NaN or infinite values")


def scatter_add(into: Sequence[np.ndarray], indices: Sequence[np.ndarray], values: np.ndarray, weight: float) -> None:
    """Add `weight * values` at each tensor's kept `indices` (values run tensor by tensor, as sparse payloads list them)."""
    start = 0
    for target, idx in zip(into, indices, strict=True):
        if idx.size:
            target[idx] += weight * values[start:start + idx.size]  # kept indices are unique within a tensor
        start += idx.size


def spread(specs: list[TensorSpec], indices: Sequence[np.ndarray], values: np.ndarray) -> OrderedDict[str, np.ndarray]:
    """A sparse payload's dense update: `values` (tensor by tensor) at their kept `indices`, zero elsewhere."""
    flats = [np.zeros(spec.size, np.float32) for spec in specs]
    scatter_add(flats, indices, values, 1.0)
    return assemble(specs, flats)


class SparseDecoding:
    """Decoding shared by codecs whose payload is kept values at kept positions (fedzip, flasc, ternary).

    A codec gives `kept(payload, specs)`: the kept values, tensor by tensor, and each tensor's kept indices,
    checked against the specs. Decoding spreads them into zeros; accumulating adds them to a running sum in
    place, after checking they are finite.
    """

    def kept(self, payload: bytes, specs: list[TensorSpec]) -> tuple[np.ndarray, list[np.ndarray]]:
        raise NotImplementedError

    def decode(self, payload: bytes, specs: list[TensorSpec]) -> OrderedDict[str, np.ndarray]:
        values, indices = self.kept(payload, specs)
        return spread(specs, indices, values)

    def accumulate(self, payload: bytes, specs: list[TensorSpec], into: Sequence[np.ndarray], weight: float) -> None:
        values, indices = self.kept(payload, specs)
        require_finite(values, f"{getattr(self, 'name', 'sparse')} values")
        scatter_add(into, indices, values, weight)
