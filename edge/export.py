"""Model -> one version's formats (ONNX fp32, INT8, FP16, the reference set, engine plans) with their checks.

`export_model` merges adapters, exports, checks the graph, compares ONNX
Runtime with PyTorch, derives INT8 and FP16 and measures their agreement with
fp32; `export` is `fedge export`: a scenario's model (optionally with trained
weights) to a publishable folder and a report. The server may import this
module to publish what it exports; the edge agent never does (torch).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from fedge.edge.agreement import REFERENCE_SAMPLES, agreement, reference_set
from fedge.edge.artifacts import REFERENCE, BundleFile, format_name, write_bundle
from fedge.edge.capabilities import detect
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
    return _accuracy(run_onnx(onnx_bytes, x), y)


# ---- INT8 ---------------------------------------------------------------------------


def quantize_int8_dynamic(onnx_bytes: bytes) -> bytes:
    """INT8 weights (7-bit, as `quantize_int8_qdq`'s, so x86 without VNNI sums its products exactly), activations
    quantized per batch at run time: needs no calibration data.

    Smallest accuracy risk, but on ONNX Runtime CPU its ConvInteger path is
    slower than fp32, and TensorRT cannot build it; prefer `quantize_int8_qdq`
    where representative inputs exist.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp, _quiet_loggers("root"):
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(onnx_bytes)
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=False, reduce_range=True)
        out = dst.read_bytes()
    onnx.checker.check_model(onnx.load_from_string(out))
    return out


def quantize_int8_qdq(onnx_bytes: bytes, calibration: np.ndarray, batch_size: int = 32) -> bytes:
    """Static INT8 in QDQ form: per-channel 7-bit weights, symmetric activations, min-max calibration on real inputs.

    QDQ with symmetric (zero-point 0) scales is what TensorRT's explicit
    quantization consumes, so the same INT8 artifact serves ONNX Runtime and a
    strongly typed TensorRT network; dynamic quantization's ConvInteger and
    DynamicQuantizeLinear would not build there.

    Weights use 7 of the 8 bits (`reduce_range`: every value in [-64, 64]). On
    x86 CPUs without VNNI, ONNX Runtime's u8s8 kernels (VPMADDUBSW) add pairs of
    uint8 x int8 products into int16, which saturates with full-range weights
    (an 8-point accuracy loss on an AVX2-only EPYC); with 7-bit weights no pair
    can saturate, so VNNI x86, AVX2 x86 and ARM give bit-identical outputs.
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
            str(src), str(dst), _Reader(), quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=True,
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
    """One version's formats (fp32, int8, fp16, the reference set, engine plans) and the checks made on them.

    `metadata` is the version's (flat, for reports); each format carries its own in `formats[name].metadata`.
    """

    formats: dict[str, BundleFile]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def fp32(self) -> bytes:
        return self.formats["fp32"].data

    @property
    def int8(self) -> bytes | None:
        return self.formats["int8"].data if "int8" in self.formats else None

    @property
    def fp16(self) -> bytes | None:
        return self.formats["fp16"].data if "fp16" in self.formats else None

    @property
    def reference(self) -> bytes | None:
        return self.formats[REFERENCE].data if REFERENCE in self.formats else None


def export_model(
    model: nn.Module,
    eval_x: torch.Tensor,
    eval_y: torch.Tensor | None = None,
    *,
    calibration_x: torch.Tensor | None = None,
    reference_x: torch.Tensor | None = None,
    int8: bool = True,
    int8_mode: str = "auto",
    fp16: bool = True,
    tensorrt_plans: bool = False,
    tolerance: float = 1e-4,
    architecture: str = "",
) -> ExportResult:
    """Merge, export, check, compare with PyTorch, then derive INT8 and FP16 formats and measure them against fp32.

    `eval_x`/`eval_y` are held out (never used for calibration); `calibration_x`
    defaults to `eval_x` only when nothing else is given. `int8_mode` is "qdq"
    (static, calibrated: faster than fp32 on ONNX Runtime CPU and what TensorRT
    builds), "dynamic" (no calibration, slower on CPU) or "auto" (qdq when
    `calibration_x` is given, else dynamic). `reference_x` (default: the first
    `REFERENCE_SAMPLES` of `eval_x`) becomes the version's reference set: those
    inputs and fp32's logits on them, for devices without inputs of their own.
    `tensorrt_plans` adds an engine plan per precision for this machine's
    device class where TensorRT and a GPU are present.
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
        "host": detect().as_dict(),  # the CPU the figures below were measured on
    }
    x_np = eval_x.float().numpy()
    y_np = eval_y.numpy() if eval_y is not None else None
    fp32_logits = run_onnx(fp32, x_np)
    fp32_meta: dict[str, Any] = {"max_abs_diff_vs_torch": diff}
    if y_np is not None:
        meta["fp32_accuracy"] = fp32_meta["accuracy"] = _accuracy(fp32_logits, y_np)
    formats = {"fp32": BundleFile(fp32, "onnx", "fp32", fp32_meta)}

    def measure(name: str, data: bytes, extra: dict[str, Any]) -> None:
        """A derived format: size, agreement with fp32 on the held-out inputs, accuracy where labelled."""
        logits = run_onnx(data, x_np)
        result = agreement(logits, fp32_logits)
        fmt_meta = {**extra, "bytes_ratio": len(data) / len(fp32), "agreement_vs_fp32": asdict(result)}
        meta.update({f"{name}_bytes": len(data), f"{name}_bytes_ratio": len(data) / len(fp32),
                     f"{name}_max_abs_diff_vs_fp32": result.max_logit_diff, f"{name}_agreement_vs_fp32": result.top1})
        if y_np is not None:
            fmt_meta["accuracy"] = meta[f"{name}_accuracy"] = _accuracy(logits, y_np)
            meta[f"{name}_accuracy_delta"] = meta[f"{name}_accuracy"] - meta["fp32_accuracy"]
        formats[name] = BundleFile(data, "onnx", name, fmt_meta)

    if int8:
        step(2)
        int8_meta: dict[str, Any] = {"mode": int8_mode}
        if int8_mode == "qdq":
            calib = (calibration_x if calibration_x is not None else eval_x).float().numpy()
            int8_bytes = quantize_int8_qdq(fp32, calib)
            int8_meta.update(calibration_samples=len(calib), weight_bits=7)
            meta["int8_calibration_samples"] = len(calib)
        else:
            int8_bytes = quantize_int8_dynamic(fp32)
        meta["int8_mode"] = int8_mode
        measure("int8", int8_bytes, int8_meta)
    if fp16:
        step(len(steps) - 1)
        measure("fp16", to_fp16(fp32), {})
    ref_x = (reference_x if reference_x is not None else eval_x[:REFERENCE_SAMPLES]).float().numpy()
    fp32_session = ort_session(fp32)
    formats[REFERENCE] = BundleFile(reference_set(lambda x: run_onnx(fp32_session, x), ref_x), "reference", "",
                                    {"samples": len(ref_x), "held_out_from_calibration": calibration_x is not None})
    meta["reference_samples"] = len(ref_x)
    if tensorrt_plans:
        formats.update(_tensorrt_plans(formats))
    meta["export_seconds"] = time.perf_counter() - start
    step(len(steps))
    return ExportResult(formats=formats, metadata=meta)


def _accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    return float((logits.argmax(1) == y).mean()) if len(y) else 0.0


def _tensorrt_plans(formats: dict[str, BundleFile]) -> dict[str, BundleFile]:
    """An engine plan per model format, for this machine's device class (none where TensorRT cannot build)."""
    from fedge.edge import tensorrt_engine

    usable, reason = tensorrt_engine.available()
    if not usable:
        logging.getLogger(__name__).info("no TensorRT engine plans: %s", reason)
        return {}
    device = tensorrt_engine.device_class()
    return {format_name(f.precision, "tensorrt", device):
            BundleFile(tensorrt_engine.build_engine(f.data, precision=f.precision), "tensorrt", f.precision,
                       {"device_class": device})
            for f in list(formats.values()) if f.kind == "onnx"}


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
        "host": detect().as_dict(),  # the CPU the figures below were measured on
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
    formats = {"fp32": BundleFile(fp32, "onnx", "fp32", {"perplexity": meta["fp32_perplexity"]})}
    if int8_bytes is not None:
        formats["int8"] = BundleFile(int8_bytes, "onnx", "int8", {"mode": "dynamic", "perplexity": meta["int8_perplexity"]})
    return ExportResult(formats=formats, metadata=meta)


# ---- `fedge export` ---------------------------------------------------------------------


def device_samples(x: torch.Tensor, y: torch.Tensor, task: str = "classification") -> dict[str, np.ndarray]:
    """Held-out data as an agent reads it (`fedge edge agent --data`): a classifier's `x` and `y`, or a causal LM's
    `input_ids` and `attention_mask` (its `x` and `y` here: token ids and mask)."""
    if task == "causal-lm":
        return {"input_ids": x.numpy().astype(np.int64), "attention_mask": y.numpy().astype(np.int64)}
    return {"x": x.float().numpy(), "y": y.numpy().astype(np.int64)}


def export_version(model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: str = "classification", *,
                   calibration_x: torch.Tensor | None = None, reference_x: torch.Tensor | None = None,
                   architecture: str = "") -> ExportResult:
    """One version of `model` for a fleet: a classifier's fp32/int8/fp16 formats and reference set
    (`export_model`), or a causal LM's fp32 and int8 (`export_causal_lm`; `x`, `y`: token ids and mask)."""
    if task == "causal-lm":
        return export_causal_lm(model, x, y, architecture=architecture)
    return export_model(model, x, y, calibration_x=calibration_x, reference_x=reference_x, architecture=architecture)


@dataclass
class ExportSource:
    """A model to export, the data that checks it, and what it is (recorded in export.json and the artifact)."""

    model: nn.Module
    eval_x: torch.Tensor  # held out: compared with PyTorch and scored, never calibrated on
    eval_y: torch.Tensor
    calibration_x: torch.Tensor  # INT8 calibration inputs (training splits)
    architecture: str
    origin: dict[str, Any] = field(default_factory=dict)
    #: classification (eval_y: labels) or causal-lm (eval_x: token ids, eval_y: their attention mask)
    task: str = "classification"


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
                    num_partitions: int = 4, adapter: str | Path | None = None) -> ExportSource:
    """The scenario's base model (or `weights` loaded into it, or a peft `adapter` folder such as a run's
    `OUT/adapters/METHOD` loaded onto it and merged at export), checked on the held-out target data of
    `num_partitions` partitions and calibrated on their training splits."""
    state = _read_weights(Path(weights)) if weights is not None else None  # checked before any training
    try:
        sc = load_scenario(scenario)
    except ValueError as err:
        raise UserError(f"--scenario: {err}", "pick a known scenario") from err
    model = sc.base_model()
    if state is not None:
        _load_weights(model, Path(str(weights)), state)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    parts = [sc.client_data(p, num_partitions) for p in range(num_partitions)]
    origin = {"scenario": scenario, "model": "adapter" if adapter else "weights" if weights else "base",
              "weights": str(weights) if weights else None, "adapter": str(adapter) if adapter else None}
    return ExportSource(model, torch.cat([p.test.tensors[0] for p in parts]), torch.cat([p.test.tensors[1] for p in parts]),
                        torch.cat([p.train.tensors[0] for p in parts])[:512], sc.architecture, origin, task=sc.task)


def export(out_dir: str | Path, source: ExportSource, int8_mode: str = "qdq", fp16: bool = True,
           tensorrt_plans: bool = False) -> dict[str, Any]:
    """Export `source`'s model as one publishable version folder (model.onnx, model.int8.onnx, model.fp16.onnx,
    reference.safetensors, engine plans where asked and possible, bundle.json), export.json and the held-out
    samples it was checked on (samples.npz: x, y; what an agent can serve); the report.

    A causal LM (`source.task`, its eval tensors token ids and attention mask) writes model.onnx and a dynamic
    model.int8.onnx with their held-out perplexity, and its held-out sequences as samples.
    """
    if source.task == "causal-lm":
        result = export_causal_lm(source.model, source.eval_x, source.eval_y, architecture=source.architecture)
    else:
        result = export_model(source.model, source.eval_x, source.eval_y, calibration_x=source.calibration_x,
                              int8_mode=int8_mode, fp16=fp16, tensorrt_plans=tensorrt_plans,
                              architecture=source.architecture)
    out = Path(out_dir)
    index = write_bundle(out, result.formats, {**source.origin, **result.metadata})  # the origin travels signed
    files = {name: str(out / f["file"]) for name, f in json.loads(index.read_text())["formats"].items()}
    # the held-out inputs (and labels) the export was checked on, in the agent's format (`fedge edge agent --data`)
    np.savez(out / SAMPLES_FILE, **device_samples(source.eval_x, source.eval_y, source.task))
    summary = {**source.origin, "fp32_bytes": len(result.fp32), "files": files, **result.metadata}
    (out / EXPORT_REPORT).write_text(json.dumps(summary, indent=2, sort_keys=True))
    return summary
