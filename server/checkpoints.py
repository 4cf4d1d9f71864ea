"""Server checkpoints: the federation's state after its last complete round, written atomically, and resuming.

A checkpoint lives in its own folder, keyed by method and a hash of the run
config (`<checkpoint-dir or out-dir/checkpoints>/<method>-<hash>/`), so two runs
of different configs never resume each other. Each commit writes the arrays
first (`round-NNNN.safetensors`: the global state under `global/`, a strategy's
array state under `strategy/`), then `checkpoint.json` naming that file; the
JSON is the commit point, so a crash at any moment leaves either the previous
round or the new one, never a mix.

The run config decides: `checkpoint = "auto"` resumes from the last complete
round when a checkpoint of the same method and config exists, `"fresh"` starts
over (the old checkpoint is replaced at the end of round 1), `"off"` writes none.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from flwr.serverapp.strategy import Strategy

from fedge.atomic_file import atomic_write
from fedge.results import FleetAccuracy
from fedge.settings import CHECKPOINT_MODES, RunSettings

log = logging.getLogger("fedge.server")


FORMAT_VERSION = 1
MANIFEST = "checkpoint.json"
GLOBAL_PREFIX = "global/"
STRATEGY_PREFIX = "strategy/"

#: run-config keys that do not change what a round computes; a resumed run may change them
#: (a longer `num-server-rounds` extends a finished run instead of starting over)
NEUTRAL_KEYS = frozenset({
    "num-server-rounds", "out-dir", "checkpoint", "checkpoint-dir", "round-timeout", "min-replies",
    "round-retries", "node-wait", "device", "client-threads", "server-round", "eval-clients",
})


@runtime_checkable
class Stateful(Protocol):
    """A strategy with state beyond the global arrays (a server optimizer's moments, a step count).

    `state_dict` returns nested dicts, lists and tuples of numpy arrays, torch
    tensors and JSON scalars (a torch optimizer's own `state_dict()` qualifies, int
    keys included); `load_state_dict` takes back an equal structure.
    """

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class Checkpoint:
    method: str
    config_hash: str
    server_round: int
    arrays: OrderedDict[str, np.ndarray]
    rows: list[dict[str, Any]] = field(default_factory=list)
    totals: dict[str, int] = field(default_factory=dict)
    #: fleet accuracy of the base model (round 0) and after the last complete round
    base: dict[str, Any] = field(default_factory=dict)
    fleet: dict[str, Any] = field(default_factory=dict)
    strategy_state: dict[str, Any] | None = None
    #: the run config that produced it (what rebuilds the model: `fedge export --checkpoint`)
    config: dict[str, Any] = field(default_factory=dict)


def config_hash(config: Mapping[str, Any]) -> str:
    """Stable short hash of the config keys that shape the federation's trajectory."""
    relevant = {k.replace("_", "-"): v for k, v in config.items() if k.replace("_", "-") not in NEUTRAL_KEYS}
    blob = json.dumps(relevant, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def checkpoint_dir(root: str | Path, method: str, digest: str) -> Path:
    return Path(root) / f"{method}-{digest}"


def _encode(obj: Any, path: str, arrays: dict[str, np.ndarray]) -> Any:
    """JSON skeleton of a nested state; arrays and tensors go to `arrays` under their path."""
    if isinstance(obj, np.ndarray):
        arrays[path] = np.array(obj, order="C")
        return {"__ndarray__": path}
    if type(obj).__module__.startswith("torch") and hasattr(obj, "detach"):
        arrays[path] = np.array(obj.detach().cpu().numpy(), order="C")
        return {"__tensor__": path}
    if isinstance(obj, dict):
        return {"__dict__": [[k, _encode(v, f"{path}.{k}", arrays)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        items = [_encode(v, f"{path}.{i}", arrays) for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"strategy state at {path!r}: cannot checkpoint a {type(obj).__name__}")


def _decode(node: Any, arrays: dict[str, np.ndarray]) -> Any:
    if isinstance(node, list):
        return [_decode(v, arrays) for v in node]
    if not isinstance(node, dict):
        return node
    if "__ndarray__" in node:
        return arrays[node["__ndarray__"]]
    if "__tensor__" in node:
        import torch

        return torch.from_numpy(arrays[node["__tensor__"]].copy())
    if "__tuple__" in node:
        return tuple(_decode(v, arrays) for v in node["__tuple__"])
    return {k: _decode(v, arrays) for k, v in node["__dict__"]}


def save_checkpoint(folder: str | Path, ckpt: Checkpoint) -> Path:
    """Commit one round: arrays file, then the manifest that names it; older array files are removed after."""
    from safetensors.numpy import save

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, np.ndarray] = {GLOBAL_PREFIX + k: np.array(v, order="C") for k, v in ckpt.arrays.items()}
    strategy_skeleton: Any = None
    if ckpt.strategy_state is not None:
        strategy_arrays: dict[str, np.ndarray] = {}
        strategy_skeleton = _encode(ckpt.strategy_state, "state", strategy_arrays)
        tensors.update({STRATEGY_PREFIX + k: v for k, v in strategy_arrays.items()})
    arrays_name = f"round-{ckpt.server_round:04d}.safetensors"
    atomic_write(folder / arrays_name, save(tensors))
    manifest = {
        "format": FORMAT_VERSION,
        "method": ckpt.method,
        "config_hash": ckpt.config_hash,
        "server_round": ckpt.server_round,
        "arrays_file": arrays_name,
        "global_keys": list(ckpt.arrays),
        "strategy": strategy_skeleton,
        "rows": ckpt.rows,
        "totals": ckpt.totals,
        "base": ckpt.base,
        "fleet": ckpt.fleet,
        "config": ckpt.config,
    }
    atomic_write(folder / MANIFEST, json.dumps(manifest, indent=1).encode())
    for old in folder.glob("round-*.safetensors"):
        if old.name != arrays_name:
            old.unlink(missing_ok=True)
    return folder / MANIFEST


def load_checkpoint(folder: str | Path) -> Checkpoint | None:
    """The last committed round in `folder`, or None when there is none."""
    from safetensors.numpy import load_file

    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not manifest_path.exists():
        return None
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != FORMAT_VERSION:
        raise ValueError(f"{manifest_path}: checkpoint format {manifest.get('format')} is not {FORMAT_VERSION}")
    tensors = load_file(str(folder / manifest["arrays_file"]))
    arrays = OrderedDict((k, tensors[GLOBAL_PREFIX + k]) for k in manifest["global_keys"])
    strategy_state: dict[str, Any] | None = None
    if manifest.get("strategy") is not None:
        strategy_arrays = {k[len(STRATEGY_PREFIX):]: v for k, v in tensors.items() if k.startswith(STRATEGY_PREFIX)}
        strategy_state = _decode(manifest["strategy"], strategy_arrays)
    return Checkpoint(
        method=manifest["method"],
        config_hash=manifest["config_hash"],
        server_round=int(manifest["server_round"]),
        arrays=arrays,
        rows=list(manifest.get("rows", [])),
        totals=dict(manifest.get("totals", {})),
        base=dict(manifest.get("base", {})),
        fleet=dict(manifest.get("fleet", {})),
        strategy_state=strategy_state,
        config=dict(manifest.get("config", {})),
    )


class RunCheckpoints:
    """One run's checkpoint folder: `<checkpoint-dir or out-dir/checkpoints>/<method>-<config hash>`."""

    def __init__(self, settings: RunSettings, run_config: Mapping[str, Any] | None = None) -> None:
        """`run_config`: the whole config of the run, method section included (its hash names the folder)."""
        if settings.checkpoint not in CHECKPOINT_MODES:
            raise ValueError(f"checkpoint={settings.checkpoint!r}; expected one of {CHECKPOINT_MODES}")
        self.mode = settings.checkpoint
        self.method = settings.method
        self.config = dict(settings.to_config() if run_config is None else run_config)
        self.digest = config_hash(self.config)
        root = settings.checkpoint_dir or str(Path(settings.out_dir) / "checkpoints")
        self.folder = checkpoint_dir(root, settings.method, self.digest)

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    def resume(self, strategy: Strategy) -> Checkpoint | None:
        """The last complete round (with the strategy's state restored into `strategy`), or None to start fresh."""
        if self.mode != "auto":
            return None
        ckpt = load_checkpoint(self.folder)
        if ckpt is None:
            return None
        if ckpt.strategy_state is not None:
            if not isinstance(strategy, Stateful):
                raise ValueError(f"{self.folder} holds strategy state but {type(strategy).__name__} cannot load it")
            strategy.load_state_dict(ckpt.strategy_state)
        log.info("%s: resuming after round %d from %s", self.method, ckpt.server_round, self.folder)
        return ckpt

    def commit(self, server_round: int, arrays: dict[str, np.ndarray], strategy: Strategy,
               rows: list[dict[str, Any]], totals: dict[str, int], base: FleetAccuracy, fleet: FleetAccuracy) -> None:
        if not self.enabled:
            return
        state = strategy.state_dict() if isinstance(strategy, Stateful) else None
        save_checkpoint(self.folder, Checkpoint(
            method=self.method, config_hash=self.digest, server_round=server_round, arrays=arrays,  # type: ignore[arg-type]
            rows=rows, totals=totals, base=asdict(base), fleet=asdict(fleet), strategy_state=state, config=self.config,
        ))

    def describe(self, resumed_from: int) -> dict[str, Any]:
        return {"dir": str(self.folder), "mode": self.mode, "resumed_from_round": resumed_from}
