"""Progress of long work, reported where the work happens and shown by whoever listens.

Library code (base-model training, export, quantization, a fleet rollout)
calls `report`; a command that wants bars wraps its work in `listening` (the
CLI's rich bars: `fedge.console.progress_bars`). With no listener, as in Ray
workers or a deployed ServerApp, a report costs one context-variable lookup
and shows nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

#: (task, completed, total or None when unknown, a short note such as the current step)
Listener = Callable[[str, float, float | None, str], None]

_listener: ContextVar[Listener | None] = ContextVar("fedge_progress_listener", default=None)


def report(task: str, completed: float, total: float | None = None, note: str = "") -> None:
    """Say how far `task` has come; shown only where a command listens."""
    listener = _listener.get()
    if listener is not None:
        listener(task, completed, total, note)


@contextmanager
def listening(listener: Listener) -> Iterator[None]:
    """Send the reports made in this block (in this thread) to `listener`."""
    token = _listener.set(listener)
    try:
        yield
    finally:
        _listener.reset(token)
