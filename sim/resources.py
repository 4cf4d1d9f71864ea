"""Memory of a whole process tree over time: this process and every child (Ray's workers and services included).

A simulated federation spreads over processes: the driver (ServerApp and the
simulation engine, which holds every node's `context.state`), Ray's GCS and
raylet, and one worker per concurrent client. Their memory is sampled from a
background thread with psutil. Resident sizes double-count pages the processes
share (libraries, Ray's object store), so the tree's figure is the sum of
proportional set sizes (PSS: a shared page counted once, split among its
users); the plain RSS sum is kept beside it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from types import TracebackType
from typing import Self

import psutil


@dataclass
class TreeMemory:
    pss_bytes: int
    rss_bytes: int
    processes: int


def tree_memory(root: psutil.Process | None = None) -> TreeMemory:
    """PSS and RSS summed over `root` (default: this process) and all its descendants, now."""
    root = root or psutil.Process()
    pss = rss = count = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            info = proc.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue  # a process that ended between listing and reading
        pss += getattr(info, "pss", info.rss)
        rss += info.rss
        count += 1
    return TreeMemory(pss, rss, count)


class PeakMemory:
    """Samples the tree's memory every `interval` seconds; keeps the run's peak and the peak since the last `lap()`."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.peak = TreeMemory(0, 0, 0)
        self._lap = TreeMemory(0, 0, 0)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fedge-peak-memory", daemon=True)

    def _sample(self) -> None:
        now = tree_memory()
        with self._lock:
            if now.pss_bytes > self.peak.pss_bytes:
                self.peak = now
            if now.pss_bytes > self._lap.pss_bytes:
                self._lap = now

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def lap(self) -> TreeMemory:
        """The peak since the previous lap (or the start), then start a new lap."""
        self._sample()
        with self._lock:
            peak, self._lap = self._lap, TreeMemory(0, 0, 0)
        return peak

    def __enter__(self) -> Self:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
