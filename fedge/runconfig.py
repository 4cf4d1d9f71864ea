"""Run settings: one typed view over Flower's run config, with fedge's defaults."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


def _coerce(default: Any, value: Any, key: str) -> Any:
    if isinstance(default, bool) and isinstance(value, str):
        if value.lower() not in {"true", "false", "1", "0", "yes", "no"}:
            raise ValueError(f"run config {key}={value!r} is not a boolean")
        return value.lower() in {"true", "1", "yes"}
    try:
        return type(default)(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"run config {key}={value!r} is not a {type(default).__name__}") from err


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
    # ---- real fleets: dropouts and checkpoints ----
    min_replies: float = 0.5  # below 1: fraction of the nodes sent to; 1 or more: a node count
    round_retries: int = 2  # a round with too few replies is sent again, at most this often
    node_wait: float = 300.0  # seconds to wait for num-clients nodes to connect before starting
    checkpoint: str = "auto"  # auto: resume from the last complete round; fresh: start over; off
    checkpoint_dir: str = ""  # default: <out-dir>/checkpoints
    # ---- compressed updates (papers' defaults) ----
    error_feedback: bool = True  # for the methods that keep a residual (sparsifying codecs)
    fedzip_z: float = 0.2
    kmeans_clusters: int = 3
    density_up: float = 1 / 16  # FLASC upload density
    flasc_values: str = "float16"  # FLASC upload value precision: float16 or float32
    density_down: float = 0.5  # FLASC download density (0.25 cost 1-2 points on the default scenario)
    ternary_k: float = 0.2
    quant_block: int = 64
    server_opt: str = "sgd"  # FLASC server optimizer: sgd or adamw
    server_lr: float = 0.0  # 0: 2.0 for sgd (1.0 would be plain FedAvg of the sparse updates), 1e-3 for adamw
    max_update_bytes: int = 64 << 20
    #: fault drill: comma-separated partition ids whose uploads are deliberately damaged
    fault_partitions: str = ""
    fault_kind: str = "corrupt"
    # ---- pFedGate ----
    gate_splits: int = 16  # blocks of whole rows per shared tensor
    gate_lr: float = 0.05
    gate_prior: float = 2.0  # initial gate logits fall from 0 to -gate_prior along each tensor's blocks (nested sparse models)
    budgets: str = ""  # per-tier sparsity budgets "strong,mid,weak", e.g. "1.0,0.5,0.3"; empty: the device profiles'
    novel_clients: int = 0  # last partitions held out of training; they join at the end and train only their gate
    novel_epochs: int = 10  # the novel clients' gate-only epochs (cheap: no shared-model gradients)
    gate_tune_epochs: int = 3  # gate-only epochs on each new shared model before a client evaluates its personal model
    out_dir: str = "fedge-out"

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> RunSettings:
        """Accept Flower's kebab-case keys (`num-server-rounds`) and python names alike."""
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in config.items():
            name = key.replace("-", "_")
            if name in known:
                values[name] = _coerce(getattr(cls(), name), value, key)
        return cls(**values)

    def to_config(self) -> dict[str, Any]:
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}

    def codec_params(self, codec: str) -> dict[str, Any]:
        """The run's knobs for one codec, by the codec's own parameter names."""
        params: dict[str, dict[str, Any]] = {
            "fedzip": {"z": self.fedzip_z, "clusters": self.kmeans_clusters},
            "flasc": {"density": self.density_up, "value_dtype": self.flasc_values},
            "ternary": {"k": self.ternary_k},
            "q8": {"block": self.quant_block},
            "q4": {"block": self.quant_block},
        }
        return params.get(codec, {})

    def scenario_options(self) -> dict[str, Any]:
        return {"seed": self.seed, "alpha": self.alpha}
