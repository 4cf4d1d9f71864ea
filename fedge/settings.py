"""Run settings: a typed view over Flower's run config, with fedge's defaults.

The run config is flat, kebab-case (`num-server-rounds`). Keys common to every
run are `RunSettings`; a method's own knobs are a section named after the
method (`fedzip.top-z`; in pyproject.toml a `[tool.flwr.app.config.fedzip]`
table, which Flower flattens to that form), parsed by the method's own
`ConfigSection`. Which keys a run may hold is decided by `fedge.methods.resolve`:
every key is used or refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any, Self


def _coerce(default: Any, value: Any, key: str) -> Any:
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "false", "1", "0", "yes", "no"}:
            return value.lower() in {"true", "1", "yes"}
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ValueError(f"run config {key}={value!r} is not a boolean")
    if isinstance(default, int) and isinstance(value, float) and not value.is_integer():
        raise ValueError(f"run config {key}={value!r} is not an integer")
    try:
        return type(default)(value)
    except (TypeError, ValueError) as err:
        kind = {int: "an integer", float: "a number", str: "a string"}.get(type(default), type(default).__name__)
        raise ValueError(f"run config {key}={value!r} is not {kind}") from err


class ConfigSection:
    """A dataclass of run-config keys (field `num_server_rounds` is key `num-server-rounds`)."""

    @classmethod
    def config_keys(cls) -> list[str]:
        return [f.name.replace("_", "-") for f in fields(cls)]  # type: ignore[arg-type]

    @classmethod
    def from_config(cls, values: Mapping[str, Any]) -> Self:
        """The section from `values` (kebab-case keys; keys of other sections are not looked at)."""
        parsed: dict[str, Any] = {}
        for f in fields(cls):  # type: ignore[arg-type]
            key = f.name.replace("_", "-")
            if key in values:
                default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
                parsed[f.name] = _coerce(default, values[key], key)
        return cls(**parsed)

    def to_config(self) -> dict[str, Any]:
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}  # type: ignore[call-overload]


#: clients evaluated after each round unless `eval-clients` says otherwise (all of a fleet at most this large)
DEFAULT_EVAL_CLIENTS = 50
#: training precisions (`fedge.training.autocast_dtype` says what each means on a device)
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class NoOptions(ConfigSection):
    """A method without knobs of its own."""


#: auto: resume from the last complete round; fresh: start over; off: write no checkpoint
CHECKPOINT_MODES = ("auto", "fresh", "off")


@dataclass
class RunSettings(ConfigSection):
    """Keys every run has, whatever its method."""

    method: str = "lora-fedavg"
    num_server_rounds: int = 5
    scenario: str = "digits-shift"
    seed: int = 0
    alpha: float = 0.5
    # ---- a scenario built from a model and data of your own (`hf`: fedge run --model ... --data ...) ----
    model: str = ""  # Hugging Face model: a local directory (or a hub id where the hub is reachable)
    task: str = ""  # causal-lm or classification
    data: str = ""  # a json/jsonl/csv/parquet/txt file, or a folder of them
    text_column: str = "text"
    label_column: str = "label"
    partition: str = "iid"  # iid, dirichlet[:ALPHA] (over label-column; default ALPHA: alpha), natural:COLUMN
    max_length: int = 128  # tokens per sequence (text scenarios)
    load_in_4bit: bool = False  # QLoRA: the base model in 4-bit NF4 (bitsandbytes; CUDA only)
    lora_targets: str = ""  # comma-separated module names LoRA goes into; empty: the scenario's own
    num_clients: int = 4
    clients_per_round: int = 0  # 0: all clients every round
    local_epochs: int = 3
    batch_size: int = 16
    lr: float = 0.0  # 0: the method's default
    lora_rank: int = 16
    lora_alpha: int = 32
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 autocast on a CUDA device that has bf16, else fp32; fp32; bf16
    client_threads: int = 1
    round_timeout: float = 600.0
    # ---- real fleets: dropouts and checkpoints ----
    min_replies: float = 0.5  # below 1: fraction of the nodes sent to; 1 or more: a node count
    round_retries: int = 2  # a round with too few replies is sent again, at most this often
    node_wait: float = 300.0  # seconds to wait for num-clients nodes to connect before starting
    checkpoint: str = "auto"  # auto: resume from the last complete round; fresh: start over; off
    checkpoint_dir: str = ""  # default: <out-dir>/checkpoints
    #: the largest envelope a receiver opens (server: uploads; client: compressed downloads)
    max_update_bytes: int = 64 << 20
    #: what the server sends each round: "auto" (the method's own codec where it has one, else dense), "dense"
    #: (the whole model as Flower's ArrayRecord), or a codec name (the round's change, coded; see methods/downlink.py)
    downlink_codec: str = "auto"
    #: clients evaluated after each round (0: all when there are at most 50, else 50); the last round evaluates all
    eval_clients: int = 0
    #: fault drill: comma-separated partition ids whose uploads are deliberately damaged
    fault_partitions: str = ""
    fault_kind: str = "corrupt"
    out_dir: str = "fedge-out"

    def eval_count(self) -> int:
        """Clients evaluated after each round: `eval-clients`, else all of a small fleet, else DEFAULT_EVAL_CLIENTS."""
        return self.eval_clients or min(self.num_clients, DEFAULT_EVAL_CLIENTS)

    def validate(self) -> None:
        """Refuse values no run can start with (checked with the keys, before anything trains)."""
        rules = [
            (self.num_server_rounds >= 1, "num-server-rounds must be at least 1"),
            (self.num_clients >= 1, "num-clients must be at least 1"),
            (0 <= self.clients_per_round <= self.num_clients, "clients-per-round must be 0 (all) up to num-clients"),
            (self.local_epochs >= 1, "local-epochs must be at least 1"),
            (self.batch_size >= 1, "batch-size must be at least 1"),
            (self.lora_rank >= 1 and self.lora_alpha >= 1, "lora-rank and lora-alpha must be at least 1"),
            (self.alpha > 0, "alpha (the Dirichlet concentration) must be positive"),
            (self.lr >= 0, "lr must be 0 (the method's default) or positive"),
            (self.min_replies > 0 and self.round_retries >= 0, "min-replies must be positive, round-retries >= 0"),
            (self.min_replies < 1 or self.min_replies <= self.num_clients, "min-replies (a count) exceeds num-clients"),
            (self.round_timeout > 0 and self.node_wait >= 0, "round-timeout must be positive, node-wait >= 0"),
            (self.checkpoint in CHECKPOINT_MODES, f"checkpoint must be one of {', '.join(CHECKPOINT_MODES)}"),
            (self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}"),
        ]
        broken = [message for ok, message in rules if not ok]
        if broken:
            raise ValueError(f"run config: {'; '.join(broken)} (got {self.to_config()})")

    def scenario_options(self) -> dict[str, Any]:
        """Every option a scenario may take; `fedge.scenario.scenario_options` passes a scenario those it accepts."""
        return {"seed": self.seed, "alpha": self.alpha, "model": self.model, "task": self.task, "data": self.data,
                "text_column": self.text_column, "label_column": self.label_column, "partition": self.partition,
                "max_length": self.max_length, "load_in_4bit": self.load_in_4bit}

    def targets(self) -> list[str]:
        """The LoRA targets this run names (`lora-targets`), or none (the scenario's own)."""
        return [t.strip() for t in self.lora_targets.split(",") if t.strip()]
