"""The federation methods by name: what is trained, what is exchanged, and how it is coded.

Client and server both read this table, so a method is defined once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Payload = Literal["full", "lora", "lora-b"]


@dataclass(frozen=True)
class Method:
    name: str
    #: which parameters are trained and exchanged: the whole model, LoRA A and B, or LoRA B only
    payload: Payload
    #: codec for the upload; None means plain fp32 arrays in Flower's ArrayRecord (stock FedAvg)
    codec: str | None = None
    codec_params: dict[str, float] = field(default_factory=dict)
    error_feedback: bool = False
    #: client-side family: which train/evaluate functions of the ClientApp handle it
    client: str = "plain"
    #: server-side aggregation: "fedavg" (Flower's stock FedAvg) or a fedge strategy name
    strategy: str = "fedavg"
    #: local Adam learning rate unless the run sets one (adapters want a larger step than full models)
    lr: float = 3e-3
    summary: str = ""


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    METHODS[method.name] = method
    return method


register(Method("full-fedavg", "full", lr=1e-3, summary="Flower's stock FedAvg on the whole model in fp32 (peer baseline)."))
register(Method(
    "lora-fedavg", "lora",
    summary="FedIT: dense fp32 LoRA A and B averaged separately (mean(B)mean(A) != mean(BA); "
            "the gap is measured each round as lora_product_gap).",
))
register(Method(
    "ffa-lora", "lora-b",
    summary="FFA-LoRA: A frozen at its shared seeded init, only B trained and averaged, so aggregation is exact.",
))


_COMPRESSED = dict(payload="lora", client="codec", strategy="compressed", error_feedback=True)
register(Method(
    "fedzip", codec="fedzip", **_COMPRESSED,  # type: ignore[arg-type]
    summary="FedZip: per-layer top-z (20%) of the LoRA update, 3-cluster k-means values, entropy-coded ids and positions.",
))
register(Method(
    "flasc", codec="flasc", **{**_COMPRESSED, "strategy": "flasc"},  # type: ignore[arg-type]
    summary="FLASC: global top-k of the LoRA update at density d_up, sparse top-k download at d_down, "
            "server SGD (lr 2) or AdamW on the averaged pseudo-gradient, stepping from the downloaded model.",
))
register(Method(
    "ternary", codec="ternary", **_COMPRESSED,  # type: ignore[arg-type]
    summary="ComPEFT: top-20% of the LoRA update as signs plus one scale per tensor.",
))
register(Method(
    "q8", codec="q8", **{**_COMPRESSED, "error_feedback": False},  # type: ignore[arg-type]
    summary="Block-wise 8-bit quantization of the dense LoRA update (NVIDIA FLARE's filter as the peer baseline).",
))
register(Method(
    "q4", codec="q4", **{**_COMPRESSED, "error_feedback": False},  # type: ignore[arg-type]
    summary="Block-wise 4-bit quantization of the dense LoRA update (NVIDIA FLARE's filter as the peer baseline).",
))
register(Method(
    "pfedgate", "full", client="pfedgate", strategy="blockavg", lr=2e-3,
    summary="pFedGate: a personal gate per client scores blocks of the shared model; a knapsack under the "
            "device's sparsity budget keeps and scales blocks; only kept blocks go up, averaged per block.",
))


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError as err:
        raise ValueError(f"unknown method {name!r}; known: {sorted(METHODS)}") from err
