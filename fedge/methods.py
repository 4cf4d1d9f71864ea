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


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError as err:
        raise ValueError(f"unknown method {name!r}; known: {sorted(METHODS)}") from err
