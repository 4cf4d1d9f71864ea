"""The terminal every fedge command prints to (rich), wide enough that tables are not cut."""

from __future__ import annotations

from rich.console import Console

console = Console(width=None if Console().is_terminal else 200)
