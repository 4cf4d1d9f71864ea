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
from fedge.federated_model import merged_copy
from fedge.scenario import load_scenario

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
    fp32 = to_onnx(model, eval_x[:2])
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
        fp16_bytes = to_fp16(fp32)
        meta["fp16_bytes"] = len(fp16_bytes)
        meta["fp16_max_abs_diff_vs_fp32"] = float(np.abs(run_onnx(fp16_bytes, x_np) - run_onnx(fp32, x_np)).max())
        if y_np is not None:
            meta["fp16_accuracy"] = accuracy(fp16_bytes, x_np, y_np)
    meta["export_seconds"] = time.perf_counter() - start
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


# ---- causal language models ---------------------------------------------------------------------

LM_INPUT_NAMES = ("input_ids", "attention_mask")


class CausalLMLogits(nn.Module):
    """A causal LM as a plain graph: token ids and attention mask in, next-token logits out (no KV cache)."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def causal_lm_to_onnx(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                      max_batch: int = MAX_BATCH, max_sequence: int | None = None, opset: int | None = None) -> bytes:
    """Merge adapters and export with torch's dynamo exporter; batch and sequence are symbolic dimensions."""
    merged = CausalLMLogits(merged_copy(model)).eval()
    limit = max_sequence or int(getattr(getattr(merged.lm, "config", None), "max_position_embeddings", 0) or 4096)
    ids, mask = input_ids[:2].cpu(), attention_mask[:2].cpu()
    if ids.shape[0] < 2:  # a batch of 1 lets the tracer specialise the dim away
        ids, mask = ids.repeat(2, 1), mask.repeat(2, 1)
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    sequence = torch.export.Dim("sequence", min=1, max=limit)
    shapes = ({0: batch, 1: sequence}, {0: batch, 1: sequence})
    with warnings.catch_warnings(), _quiet_loggers("torch.onnx", "torch.export", "torch._dynamo"), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(merged, (ids, mask), dynamo=True, dynamic_shapes=shapes,
                                    input_names=list(LM_INPUT_NAMES), output_names=[OUTPUT_NAME], opset_version=opset,
                                    verbose=False)
    if program is None:
        raise ExportError("torch.onnx.export returned no program")
    proto = program.model_proto
    onnx.checker.check_model(proto, full_check=True)
    return proto.SerializeToString()


def run_causal_lm_onnx(onnx_model: bytes | ort.InferenceSession, input_ids: np.ndarray, attention_mask: np.ndarray,
                       batch_size: int = 16) -> np.ndarray:
    """Logits (batch, sequence, vocabulary) from ONNX Runtime, in batches."""
    sess = onnx_model if isinstance(onnx_model, ort.InferenceSession) else ort_session(onnx_model)
    outs = [sess.run(None, {LM_INPUT_NAMES[0]: input_ids[i:i + batch_size].astype(np.int64),
                            LM_INPUT_NAMES[1]: attention_mask[i:i + batch_size].astype(np.int64)})[0]
            for i in range(0, len(input_ids), batch_size)]
    return np.concatenate(outs).astype(np.float32, copy=False)


def next_token_scores(logits: np.ndarray, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, float]:
    """Perplexity and next-token accuracy of `logits` on the real tokens (the same arithmetic as training's)."""
    from fedge.training import next_token_targets, task_loss

    scores = torch.from_numpy(logits)
    loss_sum, count = task_loss("causal-lm", scores, [input_ids, attention_mask], reduction="sum")
    targets, valid = next_token_targets(input_ids, attention_mask)
    correct = int((scores[:, :-1][valid].argmax(-1) == targets[valid]).sum())
    return {"perplexity": float(np.exp(float(loss_sum) / max(count, 1))), "next_token_accuracy": correct / max(count, 1)}


def export_causal_lm(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, int8: bool = True,
                     tolerance: float = 1e-3, architecture: str = "") -> ExportResult:
    """Merge, export, check against PyTorch on held-out text (max |logit difference| on real tokens), and derive an
    INT8 variant (dynamic: int8 weights, activations quantized per batch, what ONNX Runtime offers transformers).

    Both variants' held-out perplexity and next-token accuracy go into the metadata.
    """
    start = time.perf_counter()
    fp32 = causal_lm_to_onnx(model, input_ids, attention_mask)
    with torch.no_grad():
        reference = CausalLMLogits(merged_copy(model)).eval()
        expected = torch.cat([reference(input_ids[i:i + 16], attention_mask[i:i + 16])
                              for i in range(0, len(input_ids), 16)]).numpy()
    ids_np, mask_np = input_ids.numpy(), attention_mask.numpy()
    logits = run_causal_lm_onnx(fp32, ids_np, mask_np)
    real = mask_np.astype(bool)
    diff = float(np.abs(logits - expected)[real].max())
    if not diff <= tolerance:
        raise ExportError(f"ONNX Runtime logits differ from PyTorch by {diff:.3g} (> {tolerance:g})")
    fp32_scores = next_token_scores(logits, input_ids, attention_mask)
    meta: dict[str, Any] = {
        "architecture": architecture,
        "task": "causal-lm",
        "input_names": list(LM_INPUT_NAMES),
        "output_name": OUTPUT_NAME,
        "input_shape": ["batch", "sequence"],
        "max_abs_diff_vs_torch": diff,
        "eval_sequences": len(input_ids),
        "eval_tokens": int(attention_mask[:, 1:].sum()),
        "torch_perplexity": next_token_scores(expected, input_ids, attention_mask)["perplexity"],
        "fp32_perplexity": fp32_scores["perplexity"],
        "fp32_next_token_accuracy": fp32_scores["next_token_accuracy"],
        "torch_version": torch.__version__,
        "onnx_opset": next((o.version for o in onnx.load_from_string(fp32).opset_import if o.domain in ("", "ai.onnx")), 0),
    }
    int8_bytes = None
    if int8:
        int8_bytes = quantize_int8_dynamic(fp32)
        int8_logits = run_causal_lm_onnx(int8_bytes, ids_np, mask_np)
        int8_scores = next_token_scores(int8_logits, input_ids, attention_mask)
        meta.update({"int8_mode": "dynamic", "int8_bytes": len(int8_bytes), "int8_bytes_ratio": len(int8_bytes) / len(fp32),
                     "int8_max_abs_diff_vs_fp32": float(np.abs(int8_logits - logits)[real].max()),
                     "int8_perplexity": int8_scores["perplexity"],
                     "int8_next_token_accuracy": int8_scores["next_token_accuracy"]})
    meta["export_seconds"] = time.perf_counter() - start
    return ExportResult(fp32=fp32, int8=int8_bytes, fp16=None, metadata=meta)


# ---- `fedge export` ---------------------------------------------------------------------


def _load_weights(model: nn.Module, path: Path) -> None:
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
    adapter: str | Path | None = None,
) -> dict[str, Any]:
    """Export the scenario's model; check it against PyTorch on the held-out target data of every partition.

    `adapter`: a peft adapter folder (e.g. a run's `OUT/adapters/METHOD`) loaded onto the base and merged.
    Calibration (for `int8_mode="qdq"`) uses the partitions' training splits, never the evaluation data.
    A causal LM writes model.onnx and model.int8.onnx (dynamic INT8) with its held-out perplexity.
    Writes model.onnx, model.int8.onnx, model.fp16.onnx and export.json; returns the report.
    """
    sc = load_scenario(scenario)
    model = sc.base_model()
    if weights is not None:
        _load_weights(model, Path(weights))
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    parts = [sc.client_data(p, num_partitions) for p in range(num_partitions)]
    if sc.task == "causal-lm":
        ids, mask = (torch.cat([p.test.tensors[i] for p in parts]) for i in (0, 1))
        result = export_causal_lm(model, ids, mask, architecture=sc.architecture)
    else:
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
    report = {"scenario": scenario, "weights": str(weights) if weights else None,
              "adapter": str(adapter) if adapter else None, "fp32_bytes": len(result.fp32),
              "files": {k: str(v) for k, v in files.items()}, **result.metadata}
    (out / "export.json").write_text(json.dumps(report, indent=2, sort_keys=True))
    return report
