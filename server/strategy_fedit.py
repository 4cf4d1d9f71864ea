"""FedIT: LoRA A and B averaged separately, with the aggregation error made visible.

mean(B)·mean(A) differs from mean(B·A); this strategy aggregates with Flower's
stock FedAvg and reports, per round, the relative Frobenius gap
||mean(B_k A_k) - mean(B)mean(A)|| / ||mean(B_k A_k) - B0 A0|| averaged over
LoRA modules, so users can see when the exact FFA-LoRA variant matters.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg

from fedge.state import from_record


def lora_pairs(state: dict[str, np.ndarray]) -> list[tuple[str, str]]:
    return [(k, k.replace("lora_A", "lora_B")) for k in state if "lora_A" in k and k.replace("lora_A", "lora_B") in state]


def _delta_weight(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)


def product_gap(previous: dict[str, np.ndarray], clients: list[dict[str, np.ndarray]], weights: list[float]) -> float:
    """Mean over LoRA modules of the relative gap between FedIT's product and the exact mean product."""
    w = np.asarray(weights, dtype=np.float64) / float(sum(weights))
    gaps = []
    for ka, kb in lora_pairs(previous):
        exact = sum(wi * _delta_weight(c[ka], c[kb]) for wi, c in zip(w, clients))
        mean_a = sum(wi * c[ka] for wi, c in zip(w, clients))
        mean_b = sum(wi * c[kb] for wi, c in zip(w, clients))
        fedit = _delta_weight(mean_a, mean_b)
        change = np.linalg.norm(exact - _delta_weight(previous[ka], previous[kb]))
        if change > 0:
            gaps.append(float(np.linalg.norm(exact - fedit) / change))
    return float(np.mean(gaps)) if gaps else 0.0


class FedITStrategy(FedAvg):
    def configure_train(self, server_round, arrays, config, grid):  # type: ignore[no-untyped-def]
        self._sent = from_record(arrays)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        ok = [r for r in replies if not r.has_error()]
        if arrays is not None and ok and getattr(self, "_sent", None):
            states = [from_record(r.content.array_records["arrays"]) for r in ok]
            weights = [float(r.content.metric_records["metrics"]["num-examples"]) for r in ok]
            metrics = metrics or MetricRecord()
            metrics["lora-product-gap"] = product_gap(self._sent, states, weights)
        return arrays, metrics
