"""The model a device serves, the last good one behind it, and the statistics of the serving window.

A swap is one reference assignment, so a request sees the old model or the new
one, never a mix; the previous model stays loaded, and a live failure
(an error or non-finite outputs) hands control back to it through `on_failure`.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from fedge.edge.artifacts import Manifest
from fedge.edge.runtime import Model
from fedge.edge.scoring import scored


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def entropy(logits: np.ndarray) -> np.ndarray:
    """Prediction entropy per row (nats): reported as a label-free health signal."""
    logp = log_softmax(logits)
    return -(np.exp(logp) * logp).sum(axis=1)


@dataclass(frozen=True)
class Served:
    """One loaded version: swapped as a whole, never mutated."""

    version: int
    manifest: Manifest
    format: str  # which format of the version: int8, fp16, fp32, ...
    model: Model
    canary_accuracy: float | None


@dataclass
class Window:
    """Serving statistics of the current version since it was swapped in."""

    version: int
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=2000))
    predictions: int = 0  # inputs served (a language model's: sequences)
    scored: int = 0       # predictions scored (a language model's: next tokens)
    labelled: int = 0
    correct: int = 0
    entropy_sum: float = 0.0
    failures: int = 0


class Serving:
    """The served/last-good pair; `on_failure(reason)` is called when the served model fails a live request."""

    def __init__(self, on_failure: Callable[[str], object]) -> None:
        self._served: Served | None = None
        self._last_good: Served | None = None
        self._on_failure = on_failure
        self._window = Window(version=0)
        self._window_lock = threading.Lock()

    @property
    def served(self) -> Served | None:
        return self._served

    @property
    def version(self) -> int:
        served = self._served
        return served.version if served else 0

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, int]:
        """Logits and the version that produced them; raises if nothing verified is loaded yet."""
        served = self._served  # one read: a concurrent swap cannot mix two models in one request
        if served is None:
            raise RuntimeError("no verified model loaded yet")
        return served.model.predict(x), served.version

    def swap(self, new: Served) -> None:
        old = self._served
        if old is not None:
            self._last_good = old
        self._served = new
        self._reset_window(new.version)

    def rollback(self) -> tuple[Served, Served] | None:
        """Serve the last good model again; (failed, restored), or None when there is nothing to return to."""
        failed, good = self._served, self._last_good
        if good is None or failed is None:
            return None
        self._served, self._last_good = good, None
        self._reset_window(good.version)
        return failed, good

    def kept_versions(self) -> list[int]:
        """The versions a restart or a rollback may need: the served and the last good one."""
        return [s.version for s in (self._served, self._last_good) if s is not None]

    def _reset_window(self, version: int) -> None:
        with self._window_lock:
            self._window = Window(version=version)

    def window(self) -> Window:
        """A copy of the current window (the serving loop keeps adding to the original)."""
        with self._window_lock:
            return replace(self._window, latencies_ms=deque(self._window.latencies_ms, maxlen=2000))

    def serve_once(self, x: np.ndarray, y: np.ndarray | None = None) -> None:
        """One request through the serving path, recorded for telemetry; live failure triggers rollback."""
        if self._served is None:
            return
        start = time.perf_counter()
        try:
            logits, version = self.predict(x)
            latency_ms = (time.perf_counter() - start) * 1000.0
            if not np.isfinite(logits).all():
                raise FloatingPointError("non-finite outputs")
            rows, labels = scored(x, logits, y)
        except Exception as err:  # noqa: BLE001 - a live failure of any kind sends us back to the last good model
            with self._window_lock:
                self._window.failures += 1
            self._on_failure(f"serving failed: {type(err).__name__}: {err}")
            return
        with self._window_lock:
            w = self._window
            if w.version != version:
                return
            w.latencies_ms.append(latency_ms)
            w.predictions += len(x)
            w.scored += len(rows)
            w.entropy_sum += float(entropy(rows).sum())
            if labels is not None:
                w.labelled += len(labels)
                w.correct += int((rows.argmax(1) == labels).sum())

    def replay(self, x: np.ndarray, y: np.ndarray | None, *, batch: int, passes: int, interval_s: float,
               stop: threading.Event) -> None:
        """Replay local data as a request stream, from its start for each new version, until `stop`.

        With `passes` > 0 it stops after that many passes per version, so a
        version's telemetry covers each local sample exactly that often.
        """
        n, b = len(x), max(1, batch)
        version, i, served = -1, 0, 0
        while not stop.is_set():
            if self.version != version:
                version, i, served = self.version, 0, 0
            if passes and served >= passes * n:
                stop.wait(0.05)
                continue
            sel = slice(i, min(i + b, n))
            self.serve_once(x[sel], None if y is None else y[sel])
            served += sel.stop - sel.start
            i = sel.stop % n
            stop.wait(interval_s)
