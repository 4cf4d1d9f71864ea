"""FedAvg over compressed updates.

Each reply carries one envelope. The strategy opens them one at a time as
they are read (a running weighted sum; never all decoded updates at once),
refuses any that does not validate (that client loses its round, the round goes
on), and applies the mean update to the global adapter.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedge.envelope import EnvelopeError, decode_update, expected_specs
from fedge.state import add, from_record, to_record
from fedge.update_record import UPDATE_RECORD, envelope_bytes

log = logging.getLogger("fedge.server")


class CompressedFedAvg(FedAvg):
    def __init__(self, *, max_update_bytes: int, **sampling: float) -> None:
        super().__init__(**sampling)  # type: ignore[arg-type]
        self.max_update_bytes = max_update_bytes
        self._current: OrderedDict[str, np.ndarray] | None = None
        self.rejected: list[dict[str, object]] = []

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._current = from_record(arrays)
        return super().configure_train(server_round, arrays, config, grid)

    def _weight(self, reply: Message) -> float:
        weight = float(reply.content.metric_records["metrics"]["num-examples"])
        if not math.isfinite(weight) or weight <= 0:
            raise ValueError(f"num-examples {weight} is not a positive number")
        return weight

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self._current is None:
            raise RuntimeError("aggregate_train before configure_train")
        expected = expected_specs(self._current)
        total: OrderedDict[str, np.ndarray] | None = None
        weight_sum, accepted, rejected, update_bytes = 0.0, 0, 0, 0
        for reply in replies:
            if reply.has_error():
                continue
            node = reply.metadata.src_node_id
            try:
                weight = self._weight(reply)
                envelope = envelope_bytes(reply.content, UPDATE_RECORD)
                update = decode_update(envelope, expected, self.max_update_bytes)
            except (EnvelopeError, ValueError, KeyError, TypeError) as err:
                rejected += 1
                reason = getattr(err, "reason", type(err).__name__)
                self.rejected.append({"round": server_round, "node": node, "reason": reason, "detail": str(err)})
                log.warning("round %d: refused the update from node %s (%s): %s", server_round, node, reason, err)
                continue
            update_bytes += len(envelope)
            accepted += 1
            weight_sum += weight
            if total is None:
                total = OrderedDict((k, weight * v.astype(np.float64)) for k, v in update.items())
            else:
                for k, v in update.items():
                    total[k] += weight * v
        metrics = MetricRecord({"accepted": accepted, "rejected": rejected, "envelope-bytes": update_bytes})
        if total is None:
            return None, metrics
        mean = OrderedDict((k, (v / weight_sum).astype(np.float32)) for k, v in total.items())
        return to_record(self.apply(self._current, mean)), metrics

    def apply(self, current: OrderedDict[str, np.ndarray], mean_update: OrderedDict[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
        """FedAvg: the new global is the old one plus the mean update (server SGD with lr 1)."""
        return add(current, mean_update)
