"""Codecs by name: a new codec is one module plus one entry here."""

from __future__ import annotations

from collections.abc import Callable

from fedge.codecs.base import Codec
from fedge.codecs.blockquant import Q4Codec, Q8Codec
from fedge.codecs.dense import DenseCodec
from fedge.codecs.fedzip import FedZipCodec
from fedge.codecs.flasc import FlascCodec
from fedge.codecs.ternary import TernaryCodec

_REGISTRY: dict[str, Callable[..., Codec]] = {
    "dense": DenseCodec,
    "fedzip": FedZipCodec,
    "flasc": FlascCodec,
    "ternary": TernaryCodec,
    "q8": Q8Codec,
    "q4": Q4Codec,
}


def available_codecs() -> list[str]:
    return sorted(_REGISTRY)


def known_codecs() -> dict[str, int]:
    """Codec name -> the wire version this build encodes and accepts."""
    return {name: int(factory.version) for name, factory in _REGISTRY.items()}  # type: ignore[attr-defined]


def build_codec(name: str, **params: object) -> Codec:
    """Build a codec from its name and parameters (numbers, or the strings an envelope carries)."""
    try:
        factory = _REGISTRY[name]
    except KeyError as err:
        raise ValueError(f"unknown codec {name!r}; known: {available_codecs()}") from err
    try:
        return factory(**params)
    except TypeError as err:
        raise ValueError(f"bad parameters for codec {name!r}: {err}") from err
