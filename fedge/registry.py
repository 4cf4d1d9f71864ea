"""Named plug-ins: codecs, methods and scenarios are each found by name in one `Registry`.

A registry holds what this process registered (`register`, by object or lazily
by a "module:attribute" string) and what installed packages declare under the
registry's entry-point group. Modules named in the `FEDGE_PLUGINS` environment
variable (comma-separated) are imported before the first lookup, so a node
operator can add a codec, a method or a scenario without packaging it; Flower's
simulation workers inherit the variable, so the same plug-ins load there.
"""

from __future__ import annotations

import importlib
import os
import threading
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Generic, TypeVar

T = TypeVar("T")

PLUGINS_ENV = "FEDGE_PLUGINS"
_plugins_lock = threading.Lock()
_plugins_loaded: set[str] = set()


def load_plugins() -> None:
    """Import the modules named in FEDGE_PLUGINS (once each per process)."""
    names = [n.strip() for n in os.environ.get(PLUGINS_ENV, "").split(",") if n.strip()]
    with _plugins_lock:
        for name in names:
            if name not in _plugins_loaded:
                _plugins_loaded.add(name)
                try:
                    importlib.import_module(name)
                except ImportError as err:
                    _plugins_loaded.discard(name)
                    raise ImportError(f"{PLUGINS_ENV} names {name!r}, which does not import: {err}") from err


def resolve_reference(ref: str) -> object:
    """The object a "package.module:attribute" string names."""
    module, _, attr = ref.partition(":")
    if not module or not attr:
        raise ValueError(f"{ref!r} is not a 'module:attribute' reference")
    return getattr(importlib.import_module(module), attr)


class Registry(Generic[T]):
    """Name -> item; items may be registered as objects or as lazy "module:attribute" references."""

    def __init__(self, kind: str, group: str) -> None:
        self.kind = kind
        self.group = group
        self._items: dict[str, T | str] = {}
        self._lock = threading.Lock()
        self._discovered = False

    def register(self, name: str, item: T | str, *, replace: bool = False) -> None:
        with self._lock:
            if name in self._items and not replace and self._items[name] is not item:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = item

    def decorator(self, name: str) -> Callable[[T], T]:
        """`@registry.decorator("name")` registers the decorated object under `name`."""

        def wrap(item: T) -> T:
            self.register(name, item)
            return item

        return wrap

    def _discover(self) -> None:
        """Plug-in modules named now, and entry points once per process (a lookup may sit on a hot path)."""
        load_plugins()
        if self._discovered:
            return
        for ep in entry_points(group=self.group):
            with self._lock:
                self._items.setdefault(ep.name, ep.value)
        self._discovered = True

    def names(self) -> list[str]:
        self._discover()
        return sorted(self._items)

    def get(self, name: str) -> T:
        if name not in self._items:
            self._discover()
        try:
            item = self._items[name]
        except KeyError:
            raise ValueError(f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self._items))}") from None
        if isinstance(item, str):
            loaded = resolve_reference(item)
            with self._lock:
                self._items[name] = loaded  # type: ignore[assignment]
            return loaded  # type: ignore[return-value]
        return item

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self.names()
