"""From a federation's final state to what the edge serves: the merged model and the fleet's data, for a run
in progress (`fedge run --edge-devices`) or a finished one found from its output folder or checkpoint
(`fedge export --from`, `fedge edge deploy --from`).

The methods rebuild a run's model (a method decides its architecture and how its state loads), so this
lives in the simulation layer, which may import them; the edge imports no method.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fedge.edge.export import ExportSource
from fedge.errors import UserError
from fedge.federated_model import merged_copy
from fedge.methods import resolve
from fedge.outputs import CHECKPOINTS
from fedge.results import RESULTS_FILE, load_results
from fedge.scenario import fleet_test_data, scenario_for
from fedge.server.checkpoints import MANIFEST, load_checkpoint


def adapted_model(config: Mapping[str, Any], state: Mapping[str, np.ndarray] | None = None) -> nn.Module:
    """A run's model as its method builds it (a LoRA method's: the base with peft adapters, unmerged), holding
    `state` (its exchanged arrays) or, without, the start every node of the run began from."""
    spec = resolve(config)
    scenario = scenario_for(spec.settings)
    model = spec.method.build_model(scenario, spec.settings)
    if state is not None:
        spec.method.load_state(model, state)
    return model.eval()


def final_model(config: Mapping[str, Any], state: Mapping[str, np.ndarray]) -> nn.Module:
    """The global model of a finished run (`state`: its exchanged arrays), adapters merged into an fp32 copy."""
    return merged_copy(adapted_model(config, state))


def fleet_data(config: Mapping[str, Any]) -> TensorDataset:
    """The union of the run's clients' target-domain test splits."""
    spec = resolve(config)
    scenario = scenario_for(spec.settings)
    return fleet_test_data(scenario, spec.settings.num_clients)


def run_checkpoint(out: Path, method: str | None = None) -> Path:
    """The checkpoint folder holding `method`'s final state (default: the run's first method) in a run's --out."""
    if not out.is_dir():
        raise UserError(f"--from {out}: no such folder", "give the --out folder of a `fedge run` or `fedge deploy-local`")
    if not (out / RESULTS_FILE).is_file():
        found = [m.parent for m in sorted((out / CHECKPOINTS).glob(f"{method or ''}*/{MANIFEST}"))]
        if len(found) == 1:
            return found[0]
        if not found:
            raise UserError(f"--from {out}: no results.json and no checkpoint there",
                            "give the --out folder of a finished run, or --checkpoint FOLDER")
        raise UserError(f"--from {out}: {len(found)} checkpoints and no results.json to choose by",
                        f"pass --checkpoint with one of: {', '.join(str(f) for f in found)}")
    results = load_results(out)
    methods = list(results.get("methods", {}))
    name = method or next(iter(results.get("run", {}).get("methods") or methods), None)
    if name is None:
        raise UserError(f"--from {out}: its results.json holds no method", "give the --out folder of a finished run")
    if name not in methods:
        raise UserError(f"--method {name}: not in the run at {out}", f"it ran {', '.join(methods)}")
    recorded = results["methods"][name].get("checkpoint", {}).get("dir")
    if not recorded:
        raise UserError(f"{name} in {out} ran with checkpoint=off, so its final model was not kept",
                        "run it again with checkpoints on")
    folder = Path(recorded)
    if not (folder / MANIFEST).is_file():  # a relative path from another folder, or a run that was moved
        folder = out / CHECKPOINTS / folder.name
    return folder


def checkpoint_source(folder: Path) -> ExportSource:
    """The model a checkpoint holds (merged), checked on its run's clients' test splits, calibrated on their
    training splits."""
    try:
        ckpt = load_checkpoint(folder)
    except (OSError, ValueError) as err:
        raise UserError(f"checkpoint {folder} cannot be read: {err}", "give another checkpoint folder") from err
    if ckpt is None:
        raise UserError(f"checkpoint {folder}: no {MANIFEST} there", "give a folder under OUT/checkpoints")
    if not ckpt.config:
        raise UserError(f"checkpoint {folder} does not record its run config (written by an older fedge)",
                        "run the federation again to export it")
    spec = resolve(ckpt.config)
    settings = spec.settings
    scenario = scenario_for(settings)
    test = fleet_test_data(scenario, settings.num_clients)
    calibration = torch.cat([scenario.client_data(p, settings.num_clients).train.tensors[0]
                             for p in range(settings.num_clients)])[:512]
    origin = {"scenario": settings.scenario, "model": "federated", "method": ckpt.method, "round": ckpt.server_round,
              "checkpoint": str(folder), "federated_accuracy": ckpt.fleet.get("accuracy")}
    return ExportSource(final_model(ckpt.config, ckpt.arrays), test.tensors[0], test.tensors[1], calibration,
                        scenario.architecture, origin, task=scenario.task)


def run_source(out: Path | None = None, method: str | None = None, checkpoint: Path | None = None) -> ExportSource:
    """A finished run's final model: from `checkpoint`, or from the run in `out` (`method`, default its first)."""
    return checkpoint_source(checkpoint if checkpoint is not None else run_checkpoint(Path(out or "fedge-out"), method))
