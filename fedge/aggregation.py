"""The server's decode-and-aggregate path: a weighted mean of update envelopes, folded in one reply at a time.

Every compressed strategy averages its clients' envelopes here, and `fedge bench
aggregate` times this same code. Each envelope is validated and added to a
float64 running sum as it is read (sparse and block-coded payloads straight from
their compact form, see `codecs.base.Accumulating`), then dropped, so memory is
one sum of the model's size plus the envelope being read: O(P), whatever the
number of clients N, where holding every decoded update would be O(N*P).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np

from fedge.envelope import accumulate_update, expected_specs


class StreamingMean:
    """The sample-weighted mean of updates shaped like `reference`, added one envelope at a time."""

    def __init__(self, reference: Mapping[str, np.ndarray], max_update_bytes: int) -> None:
        self.expected = expected_specs(reference)
        self.max_update_bytes = max_update_bytes
        self._sum = OrderedDict((k, np.zeros(np.size(v), np.float64)) for k, v in reference.items())
        self.weight = 0.0
        self.accepted = 0
        self.envelope_bytes = 0

    def add(self, envelope: bytes, weight: float) -> None:
        """Fold one client's envelope in; `EnvelopeError` or ValueError (bad weight) leave the sum untouched."""
        if not math.isfinite(weight) or weight <= 0:
            raise ValueError(f"num-examples {weight} is not a positive number")
        accumulate_update(envelope, self.expected, self.max_update_bytes, self._sum, weight)
        self.weight += weight
        self.accepted += 1
        self.envelope_bytes += len(envelope)

    def mean(self) -> OrderedDict[str, np.ndarray] | None:
        """The weighted mean update (float32, the reference's shapes), or None when nothing was accepted."""
        if not self.accepted:
            return None
        return OrderedDict((k, (v / self.weight).astype(np.float32).reshape(self.expected[k][0]))
                           for k, v in self._sum.items())
