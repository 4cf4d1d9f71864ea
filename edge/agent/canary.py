"""The canary: a verified candidate runs on a few local inputs and must behave before it may serve.

It must give finite logits for every input, as many classes as the serving
model, not collapse to one class, and (where labels exist: a classifier's own, or
a language model's next tokens) reach an absolute accuracy floor and not fall
more than `max_accuracy_drop` below the serving model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedge.edge.agent.serving import Served
from fedge.edge.runtime import Model
from fedge.edge.scoring import scored


class CanaryError(Exception):
    """A verified artifact that nonetheless must not serve (non-finite, wrong shape, collapsed, worse)."""


@dataclass(frozen=True)
class Canary:
    """The first `size` local samples (`y` may be None: unlabelled) and the accuracy bounds."""

    x: np.ndarray | None
    y: np.ndarray | None
    size: int
    min_accuracy: float
    max_accuracy_drop: float

    @property
    def inputs(self) -> np.ndarray | None:
        """The local inputs every candidate runs on (labels or not)."""
        return None if self.x is None else self.x[: self.size]

    def check(self, candidate: Model, current: Served | None, out: np.ndarray | None = None) -> float | None:
        """Raise CanaryError unless `candidate` may replace `current`; its canary accuracy (if labelled).

        `out`: the candidate's logits on `inputs`, where the caller already has them.
        """
        x = self.inputs
        if x is None:
            return None
        out = candidate.predict(x) if out is None else out
        if out.ndim not in (2, 3) or out.shape[0] != len(x):
            raise CanaryError(f"output shape {out.shape} for a batch of {len(x)}")
        if current is not None:
            expected = current.model.predict(x[:1]).shape[-1]
            if out.shape[-1] != expected:
                raise CanaryError(f"{out.shape[-1]} classes, serving model has {expected}")
        if not np.isfinite(out).all():
            raise CanaryError("non-finite outputs")
        try:
            rows, y = scored(x, out, None if self.y is None else self.y[: len(x)])
        except ValueError as err:
            raise CanaryError(str(err)) from err
        if y is None:
            return None
        pred = rows.argmax(1)
        if len(rows) >= 10 and len(np.unique(pred)) == 1 and len(np.unique(y)) > 1:
            raise CanaryError(f"collapsed: predicts class {int(pred[0])} for all {len(rows)} canary predictions")
        accuracy = float((pred == y).mean())
        if accuracy < self.min_accuracy:
            raise CanaryError(f"accuracy {accuracy:.3f} below the floor {self.min_accuracy:.3f}")
        if current is not None:
            baseline = current.canary_accuracy
            if baseline is None:
                rows, y = scored(x, current.model.predict(x), y if out.ndim == 2 else None)
                baseline = float((rows.argmax(1) == y).mean())
            if accuracy < baseline - self.max_accuracy_drop:
                raise CanaryError(f"accuracy {accuracy:.3f} vs {baseline:.3f} for the serving model")
        return accuracy
