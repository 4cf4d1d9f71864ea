"""Run settings: one typed view over Flower's run config, with fedge's defaults."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass
class RunSettings:
    method: str = "lora-fedavg"
    num_server_rounds: int = 5
    scenario: str = "digits-shift"
    seed: int = 0
    alpha: float = 0.5
    num_clients: int = 8
    clients_per_round: int = 0  # 0: all clients every round
    local_epochs: int = 3
    batch_size: int = 16
    lr: float = 0.0  # 0: the method's default
    lora_rank: int = 16
    lora_alpha: int = 32
    device: str = "auto"
    client_threads: int = 1
    round_timeout: float = 600.0
    out_dir: str = "fedge-out"

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> RunSettings:
        """Accept Flower's kebab-case keys (`num-server-rounds`) and python names alike."""
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in config.items():
            name = key.replace("-", "_")
            if name in known:
                values[name] = type(getattr(cls(), name))(value)
        return cls(**values)

    def to_config(self) -> dict[str, Any]:
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}

    def scenario_options(self) -> dict[str, Any]:
        return {"seed": self.seed, "alpha": self.alpha}
