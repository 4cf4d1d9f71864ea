"""Codecs by name: a new codec is one module whose class is decorated with `@register_codec`.

Built-in codecs are imported by `fedge.codecs`; a codec of your own registers
the same way from a module named in FEDGE_PLUGINS (or under the `fedge.codecs`
entry-point group), so servers and clients both find it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from fedge.codecs.base import Codec
from fedge.registry import Registry

CODECS: Registry[Callable[..., Codec]] = Registry("codec", "fedge.codecs")

C = TypeVar("C")


def register_codec(cls: C) -> C:
    """Class decorator: register a codec class under its `name` (its `version` goes on the wire)."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not isinstance(getattr(cls, "version", None), int):
        raise TypeError(f"{cls!r} needs a str `name` and an int `version` class attribute to be a codec")
    CODECS.register(name, cls)  # type: ignore[arg-type]
    return cls


def available_codecs() -> list[str]:
    return CODECS.names()


def known_codecs() -> dict[str, int]:
    """Codec name -> the wire version this build encodes and accepts."""
    return {name: int(CODECS.get(name).version) for name in CODECS.names()}  # type: ignore[attr-defined]


def build_codec(name: str, **params: object) -> Codec:
    """Build a codec from its name and parameters (numbers, or the strings an envelope carries)."""
    factory = CODECS.get(name)
    try:
        return factory(**params)
    except TypeError as err:
        raise ValueError(f"bad parameters for codec {name!r}: {err}") from err
