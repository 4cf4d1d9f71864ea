"""Model -> verified ONNX bytes (fp32, INT8, FP16) with the checks that go into the artifact's metadata.

`export_model` merges adapters, exports, checks the graph and compares ONNX
Runtime with PyTorch; `export` is `fedge export`: a scenario's model
(optionally with trained weights) to files and a report. The server may import
this module to publish what it exports; the edge agent never does (torch).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from fedge.edge.runtime import ort_session
from fedge.errors import UserError
from fedge.federated_model import merged_copy
from fedge.progress import report
from fedge.scenario import load_scenario

#: what `export` writes beside the models: origin, checks and accuracy (`fedge registry publish` sends it along)
EXPORT_REPORT = "export.json"
EXPORT_TASK = "export to ONNX"
SAMPLES_FILE = "samples.npz"
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
MAX_BATCH = 4096


class ExportError(RuntimeError):
    """The exported graph is invalid or does not reproduce the PyTorch model."""


def to_onnx(model: nn.Module, example: torch.Tensor, *, max_batch: int = MAX_BATCH, opset: int | None = None) -> bytes:
    """Export with torch's dynamo exporter; dim 0 of the input is a symbolic batch dimension."""
    model = merged_copy(model)
    example = example.float().cpu()
    if example.shape[0] < 2:  # a batch of 1 lets the tracer specialise the dim away
        example = example.repeat(2, *([1] * (example.dim() - 1)))
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    with warnings.catch_warnings(), _quiet_loggers("torch.onnx", "torch.export", "torch._dynamo"):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model, (example,), dynamo=True, dynamic_shapes=({0: batch},), input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME], opset_version=opset, verbose=False,
        )
    if program is None:
        raise ExportError("torch.onnx.export returned no program")
    proto = program.model_proto
    onnx.checker.check_model(proto, full_check=True)
    return proto.SerializeToString()


def run_onnx(onnx_bytes: bytes | ort.InferenceSession, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    sess = onnx_bytes if isinstance(onnx_bytes, ort.InferenceSession) else ort_session(onnx_bytes)
    name = sess.get_inputs()[0].name
    outs = [sess.run(None, {name: x[i : i + batch_size].astype(np.float32, copy=False)})[0] for i in range(0, len(x), batch_size)]
    return np.concatenate(outs).astype(np.float32, copy=False)


def max_abs_diff_vs_torch(onnx_bytes: bytes, model: nn.Module, x: torch.Tensor) -> float:
    """Max |ONNX Runtime - PyTorch| on a held-out batch: the export's correctness in one number."""
    reference = merged_copy(model)
    with torch.no_grad():
        expected = reference(x.float()).numpy()
    return float(np.abs(run_onnx(onnx_bytes, x.numpy()) - expected).max())


def accuracy(onnx_bytes: bytes, x: np.ndarray, y: np.ndarray) -> float:
    return float((run_onnx(onnx_bytes, x).argmax(1) == y).mean()) if len(y) else 0.0


# ---- INT8 ---------------------------------------------------------------------------


def quantize_int8_dynamic(onnx_bytes: bytes) -> bytes:
    """INT8 weights, activations quantized per batch at run time: needs no calibration data.

    Smallest accuracy risk, but on ONNX Runtime CPU its ConvInteger path is
    slower than fp32, and TensorRT cannot build it; prefer `quantize_int8_qdq`
    where representative inputs exist.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp, _quiet_loggers("root"):
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(onnx_bytes)
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=False)
        out = dst.read_bytes()
    onnx.checker.check_model(onnx.load_from_string(out))
    return out


def quantize_int8_qdq(onnx_bytes: bytes, calibration: np.ndarray, batch_size: int = 32) -> bytes:
    """Static INT8 in QDQ form: per-channel weights, symmetric activations, min-max calibration on real inputs.

    QDQ with symmetric (zero-point 0) scales is what TensorRT's explicit
    quantization consumes, so the same INT8 artifact serves ONNX Runtime and a
    strongly typed TensorRT network; dynamic quantization's ConvInteger and
    DynamicQuantizeLinear would not build there.
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    if len(calibration) == 0:
        raise ValueError("INT8 calibration needs at least one input sample")

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches: Iterator[dict[str, np.ndarray]] = iter(
                {INPUT_NAME: calibration[i : i + batch_size].astype(np.float32)} for i in range(0, len(calibration), batch_size)
            )

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._batches, None)

    with tempfile.TemporaryDirectory() as tmp, _quiet_loggers("root"):
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(onnx_bytes)
        quantize_static(
            str(src), str(dst), _Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
            weight_type=QuantType.QInt8, activation_type=QuantType.QInt8,
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
        )
        out = dst.read_bytes()
    onnx.checker.check_model(onnx.load_from_string(out))
    return out


# ---- FP16 ---------------------------------------------------------------------------


def to_fp16(onnx_bytes: bytes) -> bytes:
    """FP16 weights and compute with fp32 inputs/outputs, so callers need not change dtypes."""
    from onnxruntime.transformers import float16

    model = onnx.load_from_string(onnx_bytes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = float16.convert_float_to_float16(model, keep_io_types=True)
    _topological_sort(converted.graph)  # the converter appends its I/O casts after their consumers
    onnx.checker.check_model(converted)
    return converted.SerializeToString()


def _topological_sort(graph: onnx.GraphProto) -> None:
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise ExportError("graph has a cycle or an undefined input")
        for node in ready:
            ordered.append(node)
            available.update(node.output)
        pending = [n for n in pending if n not in ready]
    del graph.node[:]
    graph.node.extend(ordered)


# ---- the whole export ---------------------------------------------------------------------


@dataclass
class ExportResult:
    """fp32/INT8/FP16 bytes and the checks that go into the artifact's signed metadata."""

    fp32: bytes
    int8: bytes | None
    fp16: bytes | None
    metadata: dict[str, Any] = field(default_factory=dict)


def export_model(
    model: nn.Module,
    eval_x: torch.Tensor,
    eval_y: torch.Tensor | None = None,
    *,
    calibration_x: torch.Tensor | None = None,
    int8: bool = True,
    int8_mode: str = "auto",
    fp16: bool = True,
    tolerance: float = 1e-4,
    architecture: str = "",
) -> ExportResult:
    """Merge, export, check, compare with PyTorch, then derive INT8 and FP16 variants with their accuracy.

    `eval_x`/`eval_y` are held out (never used for calibration); `calibration_x`
    defaults to `eval_x` only when nothing else is given. `int8_mode` is "qdq"
    (static, calibrated: faster than fp32 on ONNX Runtime CPU and what TensorRT
    builds), "dynamic" (no calibration, slower on CPU) or "auto" (qdq when
    `calibration_x` is given, else dynamic).
    """
    if int8_mode == "auto":
        int8_mode = "qdq" if calibration_x is not None else "dynamic"
    if int8_mode not in ("dynamic", "qdq"):
        raise ValueError(f"int8_mode must be 'auto', 'dynamic' or 'qdq', not {int8_mode!r}")
    start = time.perf_counter()
    steps = ["ONNX", "ONNX Runtime vs PyTorch", *(["INT8 " + int8_mode] if int8 else []), *(["FP16"] if fp16 else [])]

    def step(done: int) -> None:
        report(EXPORT_TASK, done, len(steps), steps[done] if done < len(steps) else "done")

    step(0)
    fp32 = to_onnx(model, eval_x[:2])
    step(1)
    diff = max_abs_diff_vs_torch(fp32, model, eval_x)
    if not diff <= tolerance:
        raise ExportError(f"ONNX Runtime output differs from PyTorch by {diff:.3g} (> {tolerance:g})")
    meta: dict[str, Any] = {
        "architecture": architecture,
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "input_shape": ["batch", *map(int, eval_x.shape[1:])],
        "max_abs_diff_vs_torch": diff,
        "eval_samples": len(eval_x),
        "torch_version": torch.__version__,
        "onnx_opset": next((o.version for o in onnx.load_from_string(fp32).opset_import if o.domain in ("", "ai.onnx")), 0),
    }
    x_np = eval_x.float().numpy()
    y_np = eval_y.numpy() if eval_y is not None else None
    if y_np is not None:
        meta["fp32_accuracy"] = accuracy(fp32, x_np, y_np)
    int8_bytes = fp16_bytes = None
    if int8:
        step(2)
        if int8_mode == "qdq":
            calib = (calibration_x if calibration_x is not None else eval_x).float().numpy()
            int8_bytes = quantize_int8_qdq(fp32, calib)
            meta["int8_calibration_samples"] = len(calib)
        else:
            int8_bytes = quantize_int8_dynamic(fp32)
        meta["int8_mode"] = int8_mode
        meta["int8_bytes"] = len(int8_bytes)
        meta["int8_bytes_ratio"] = len(int8_bytes) / len(fp32)
        meta["int8_max_abs_diff_vs_fp32"] = float(np.abs(run_onnx(int8_bytes, x_np) - run_onnx(fp32, x_np)).max())
        if y_np is not None:
            meta["int8_accuracy"] = accuracy(int8_bytes, x_np, y_np)
            meta["int8_accuracy_delta"] = meta["int8_accuracy"] - meta["fp32_accuracy"]
    if fp16:
        step(len(steps) - 1)
        fp16_bytes = to_fp16(fp32)
        meta["fp16_bytes"] = len(fp16_bytes)
        meta["fp16_max_abs_diff_vs_fp32"] = float(np.abs(run_onnx(fp16_bytes, x_np) - run_onnx(fp32, x_np)).max())
        if y_np is not None:
            meta["fp16_accuracy"] = accuracy(fp16_bytes, x_np, y_np)
    meta["export_seconds"] = time.perf_counter() - start
    step(len(steps))
    return ExportResult(fp32=fp32, int8=int8_bytes, fp16=fp16_bytes, metadata=meta)


class _quiet_loggers:
    """Silence chatty library loggers (the exporter and quantizer warn on every call) for one block."""

    def __init__(self, *names: str) -> None:
        self._loggers = [logging.getLogger(n) for n in names]
        self._levels: list[int] = []

    def __enter__(self) -> None:
        self._levels = [lg.level for lg in self._loggers]
        for lg in self._loggers:
            lg.setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        for lg, level in zip(self._loggers, self._levels):
            lg.setLevel(level)


# ---- `fedge export` ---------------------------------------------------------------------


@dataclass
class ExportSource:
    """A model to export, the data that checks it, and what it is (recorded in export.json and the artifact)."""

    model: nn.Module
    eval_x: torch.Tensor  # held out: compared with PyTorch and scored, never calibrated on
    eval_y: torch.Tensor
    calibration_x: torch.Tensor  # INT8 calibration inputs (training splits)
    architecture: str
    origin: dict[str, Any] = field(default_factory=dict)


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A plain state dict (safetensors or torch) from `path`; a run's checkpoint is refused with the way to it."""
    if not path.is_file():
        raise UserError(f"--weights {path}: no such file", "give a state dict file (.safetensors or torch)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: dict[str, torch.Tensor] = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if any(k.startswith("global/") for k in state):
        raise UserError(f"--weights {path} is a run's checkpoint, not a model's state dict",
                        f"export a run's model with --from OUT or --checkpoint {path.parent}")
    return state


def _load_weights(model: nn.Module, path: Path, state: dict[str, torch.Tensor]) -> None:
    """Load `state` into the architecture, refusing partial matches."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"--weights {path} does not fit the model: missing {list(missing)[:3]}, "
                        f"unexpected {list(unexpected)[:3]}", "give a state dict of the scenario's base model")


def scenario_source(scenario: str = "digits-shift", weights: str | Path | None = None,
                    num_partitions: int = 4) -> ExportSource:
    """The scenario's base model (or `weights` loaded into it), checked on the held-out target data of
    `num_partitions` partitions and calibrated on their training splits."""
    state = _read_weights(Path(weights)) if weights is not None else None  # checked before any training
    try:
        sc = load_scenario(scenario)
    except ValueError as err:
        raise UserError(f"--scenario: {err}", "pick a known scenario") from err
    model = sc.base_model()
    if state is not None:
        _load_weights(model, Path(str(weights)), state)
    parts = [sc.client_data(p, num_partitions) for p in range(num_partitions)]
    origin = {"scenario": scenario, "model": "weights" if weights else "base", "weights": str(weights) if weights else None}
    return ExportSource(model, torch.cat([p.test.tensors[0] for p in parts]), torch.cat([p.test.tensors[1] for p in parts]),
                        torch.cat([p.train.tensors[0] for p in parts])[:512], sc.architecture, origin)


def export(out_dir: str | Path, source: ExportSource, int8_mode: str = "qdq", fp16: bool = True) -> dict[str, Any]:
    """Export `source`'s model; write model.onnx, model.int8.onnx, model.fp16.onnx, export.json and the held-out
    samples it was checked on (samples.npz: x, y; what an agent can serve); the report."""
    result = export_model(source.model, source.eval_x, source.eval_y, calibration_x=source.calibration_x,
                          int8_mode=int8_mode, fp16=fp16, architecture=source.architecture)
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
    # the held-out inputs and labels the export was checked on, in the agent's format (`fedge edge agent --data`)
    np.savez(out / SAMPLES_FILE, x=source.eval_x.float().numpy(), y=source.eval_y.numpy().astype(np.int64))
    summary = {**source.origin, "fp32_bytes": len(result.fp32), "files": {k: str(v) for k, v in files.items()},
               **result.metadata}
    (out / EXPORT_REPORT).write_text(json.dumps(summary, indent=2, sort_keys=True))
    return summary
