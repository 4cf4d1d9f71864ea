"""`fedge export`: a scenario's model (optionally with trained weights) to verified fp32, INT8 and FP16 ONNX files.

The export itself lives in the core (`fedge.onnx_export`) because the registry
and the deployment orchestrator need it too; this module picks the model and
data, and writes the files and their report.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from fedge.scenario import load_scenario


def _load_weights(model: torch.nn.Module, path: Path) -> None:
    """Load a plain state dict (safetensors or torch) into the architecture, refusing partial matches."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} does not fit the model: missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]}")


def export(
    out_dir: str | Path = "fedge-out/export",
    scenario: str = "digits-shift",
    weights: str | Path | None = None,
    num_partitions: int = 4,
    int8_mode: str = "qdq",
    fp16: bool = True,
) -> dict[str, Any]:
    """Export the scenario's model; check it against PyTorch on the held-out target data of every partition.

    Calibration (for `int8_mode="qdq"`) uses the partitions' training splits, never the evaluation data.
    Writes model.onnx, model.int8.onnx, model.fp16.onnx and export.json; returns the report.
    """
    from fedge.onnx_export import export_model

    sc = load_scenario(scenario)
    model = sc.base_model()
    if weights is not None:
        _load_weights(model, Path(weights))
    parts = [sc.client_data(p, num_partitions) for p in range(num_partitions)]
    eval_x = torch.cat([p.test.tensors[0] for p in parts])
    eval_y = torch.cat([p.test.tensors[1] for p in parts])
    calib_x = torch.cat([p.train.tensors[0] for p in parts])[:512]
    result = export_model(model, eval_x, eval_y, calibration_x=calib_x, int8_mode=int8_mode, fp16=fp16,
                          architecture=sc.architecture)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"fp32": out / "model.onnx"}
    files["fp32"].write_bytes(result.fp32)
    if result.int8 is not None:
        files["int8"] = out / "model.int8.onnx"
        files["int8"].write_bytes(result.int8)
    if result.fp16 is not None:
        files["fp16"] = out / "model.fp16.onnx"
        files["fp16"].write_bytes(result.fp16)
    report = {"scenario": scenario, "weights": str(weights) if weights else None, "fp32_bytes": len(result.fp32),
              "files": {k: str(v) for k, v in files.items()}, **result.metadata}
    (out / "export.json").write_text(json.dumps(report, indent=2, sort_keys=True))
    return report
