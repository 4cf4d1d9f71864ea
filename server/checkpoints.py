"""Where a run's checkpoints go and how a run resumes from one (strategy state included).

The run config decides: `checkpoint = "auto"` resumes from the last complete
round when a checkpoint of the same method and config exists, `"fresh"` starts
over (the old checkpoint is replaced at the end of round 1), `"off"` writes none.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from flwr.serverapp.strategy import Strategy

from fedge.checkpoint import Checkpoint, Stateful, checkpoint_dir, config_hash, load_checkpoint, save_checkpoint
from fedge.results import FleetAccuracy
from fedge.runconfig import RunSettings

log = logging.getLogger("fedge.server")

MODES = ("auto", "fresh", "off")


class RunCheckpoints:
    """One run's checkpoint folder: `<checkpoint-dir or out-dir/checkpoints>/<method>-<config hash>`."""

    def __init__(self, settings: RunSettings) -> None:
        if settings.checkpoint not in MODES:
            raise ValueError(f"checkpoint={settings.checkpoint!r}; expected one of {MODES}")
        self.mode = settings.checkpoint
        self.method = settings.method
        self.digest = config_hash(settings.to_config())
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
            rows=rows, totals=totals, base=asdict(base), fleet=asdict(fleet), strategy_state=state,
        ))

    def describe(self, resumed_from: int) -> dict[str, Any]:
        return {"dir": str(self.folder), "mode": self.mode, "resumed_from_round": resumed_from}
