"""The terminal every fedge command prints to (rich), wide enough that tables are not cut, and its progress bars."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from fedge.progress import listening

console = Console(width=None if Console().is_terminal else 200)
#: errors go to stderr, so a command's output stays clean when piped
err_console = Console(stderr=True, width=None if Console(stderr=True).is_terminal else 200)


class _Bars(Progress):
    """Starts drawing at its first task, so a command that stops before any work prints only its error."""

    def add_task(self, *args: Any, **kwargs: Any) -> TaskID:
        if not self.live.is_started:
            self.start()
        return super().add_task(*args, **kwargs)


@contextmanager
def progress_bars() -> Iterator[Progress]:
    """Bars for this block: the command's own tasks (`add_task(..., note="")`) and every
    `fedge.progress.report` made in it (base-model training, export, a fleet rollout), one bar per task."""
    progress = _Bars(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                     TextColumn("{task.fields[note]}"), TimeElapsedColumn(), console=console)
    tasks: dict[str, TaskID] = {}

    def show(task: str, completed: float, total: float | None, note: str) -> None:
        if task not in tasks:
            tasks[task] = progress.add_task(task, total=total, note=note)
        progress.update(tasks[task], completed=completed, total=total, note=note)

    try:
        with listening(show):
            yield progress
    finally:
        if progress.live.is_started:
            progress.stop()
