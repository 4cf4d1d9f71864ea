"""Dense fp32 exchange: `full-fedavg` (the whole model), `lora-fedavg` (FedIT) and `ffa-lora` (exact).

FedIT averages LoRA A and B separately, and mean(B)·mean(A) differs from
mean(B·A). Its strategy aggregates with Flower's stock FedAvg and reports, per
round, the relative Frobenius gap ||mean(B_k A_k) - mean(B)mean(A)|| /
||mean(B_k A_k) - B0 A0|| averaged over LoRA modules, so users can see when the
exact variant matters. FFA-LoRA freezes A at its shared seeded init, so the
average of B gives exactly the average of the products.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy

from fedge.messages import ARRAYS_RECORD, METRICS_RECORD, scalar
from fedge.methods.base import Job, Method, RunSpec, register_method, sampling
from fedge.methods.downlink import CodedDownloads, make_downlink
from fedge.state import from_record, to_record


def train_plain(job: Job, msg: Message, context: Context) -> Message:
    """Train the exchanged parameters and send them back whole (fp32, Flower's ArrayRecord)."""
    stats = job.train_local()
    metrics = MetricRecord({"num-examples": stats.num_examples, "train-loss": stats.loss, "partition-id": job.partition_id})
    state = job.method.exchanged_state(job.model.cpu())
    return Message(RecordDict({ARRAYS_RECORD: to_record(state), METRICS_RECORD: metrics}), reply_to=msg)


def lora_pairs(state: dict[str, np.ndarray]) -> list[tuple[str, str]]:
    return [(k, k.replace("lora_A", "lora_B")) for k in state if "lora_A" in k and k.replace("lora_A", "lora_B") in state]


def _delta_weight(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)


def product_gap(previous: dict[str, np.ndarray], clients: list[dict[str, np.ndarray]], weights: list[float]) -> float:
    """Mean over LoRA modules of the relative gap between FedIT's product and the exact mean product."""
    w = np.asarray(weights, dtype=np.float64) / float(sum(weights))
    gaps = []
    for ka, kb in lora_pairs(previous):
        exact = sum(wi * _delta_weight(c[ka], c[kb]) for wi, c in zip(w, clients, strict=True))
        mean_a = sum(wi * c[ka] for wi, c in zip(w, clients, strict=True))
        mean_b = sum(wi * c[kb] for wi, c in zip(w, clients, strict=True))
        fedit = _delta_weight(mean_a, mean_b)
        change = np.linalg.norm(exact - _delta_weight(previous[ka], previous[kb]))
        if change > 0:
            gaps.append(float(np.linalg.norm(exact - fedit) / change))
    return float(np.mean(gaps)) if gaps else 0.0


class CodedFedAvg(CodedDownloads, FedAvg):
    """Flower's FedAvg, its downloads coded (`fedge.methods.downlink`): the clients' states average to the reference
    plus their mean update."""


class FedITStrategy(CodedFedAvg):
    """Flower's FedAvg over LoRA A and B, with the aggregation gap measured each round."""

    _sent: OrderedDict[str, np.ndarray] | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._sent = from_record(arrays)
        return super().configure_train(server_round, arrays, config, grid)

    def starts_from(self, reference: OrderedDict[str, np.ndarray]) -> None:
        self._sent = reference

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        ok = [r for r in replies if not r.has_error()]
        if arrays is not None and ok and self._sent:
            states = [from_record(r.content.array_records[ARRAYS_RECORD]) for r in ok]
            weights = [scalar(r.content.metric_records[METRICS_RECORD]["num-examples"]) for r in ok]
            metrics = metrics or MetricRecord()
            metrics["lora-product-gap"] = product_gap(self._sent, states, weights)
        return arrays, metrics


def _fedavg(spec: RunSpec, initial: OrderedDict[str, np.ndarray]) -> Strategy:
    downlink = make_downlink(spec, initial)
    if downlink is None:
        return FedAvg(**sampling(spec.settings))  # type: ignore[arg-type]
    return CodedFedAvg(downlink=downlink, **sampling(spec.settings))


def _fedit(spec: RunSpec, initial: OrderedDict[str, np.ndarray]) -> Strategy:
    return FedITStrategy(downlink=make_downlink(spec, initial), **sampling(spec.settings))


register_method(Method(
    "full-fedavg", "Flower's stock FedAvg on the whole model in fp32 (peer baseline).",
    payload="full", train=train_plain, strategy=_fedavg, lr=1e-3,
))
register_method(Method(
    "lora-fedavg", "FedIT: dense fp32 LoRA A and B averaged separately (mean(B)mean(A) != mean(BA); "
                   "the gap is measured each round as lora_product_gap).",
    payload="lora", train=train_plain, strategy=_fedit, coded_downlink=True,
))
register_method(Method(
    "ffa-lora", "FFA-LoRA: A frozen at its shared seeded init, only B trained and averaged, so aggregation is exact.",
    payload="lora-b", train=train_plain, strategy=_fedavg, coded_downlink=True,
))
