"""TensorRT engines built on the device from the registry's ONNX, refitted in place when only weights change.

Engines are specific to a GPU and a TensorRT version (`device_class`), so
devices build their own from the format they chose (fp32, fp16, or the INT8
Q/DQ model: explicit quantization, no calibrator), or load a plan the registry
built for their device class; an engine built from an unmerged graph takes each new
adapter as a refit of its named LoRA weights (`TensorRTModel.with_adapter`). TensorRT 10 and 11 differ in one place,
`_network_flags_and_precision`: 10 builds a weakly typed network and takes
precision from builder flags (FP16/INT8; TF32 off for fp32, so fp32 means
fp32); 11 only builds strongly typed networks, whose precision comes from the
ONNX itself (fp16 tensors, Q/DQ nodes), so it gets no precision flags.

`tensorrt` (and `torch` with CUDA, for device buffers) are imported lazily: the
module imports without them, and `available()` says whether it can run.
"""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import tensorrt as trt

PRECISIONS = ("fp32", "fp16", "int8")


class TensorRTError(RuntimeError):
    """Parsing, building, refitting or running an engine failed; the message carries TensorRT's errors."""


def available() -> tuple[bool, str]:
    """(usable, reason): the real TensorRT bindings (the type stubs also import as `tensorrt`) and a CUDA GPU."""
    if importlib.util.find_spec("tensorrt") is None:
        return False, "TensorRT is not installed"
    import tensorrt

    if not hasattr(tensorrt, "Builder"):
        return False, "only TensorRT type stubs are installed, not the TensorRT runtime"
    try:
        import torch
    except ImportError:
        return False, "torch is needed for CUDA device buffers"
    if not torch.cuda.is_available():
        return False, "no CUDA GPU"
    return True, f"TensorRT {tensorrt.__version__}"


def _require() -> None:
    ok, reason = available()
    if not ok:
        raise TensorRTError(f"TensorRT cannot run here: {reason}")


def major_version() -> int:
    import tensorrt as trt

    return int(str(trt.__version__).split(".")[0])


def device_class() -> str:
    """What a plan is specific to: the GPU model, its compute capability and the TensorRT version."""
    _require()
    import tensorrt as trt
    import torch

    major, minor = torch.cuda.get_device_capability()
    return f"{torch.cuda.get_device_name()} sm{major}{minor} trt{trt.__version__}"


def onnx_precision(onnx_bytes: bytes) -> str:
    """The precision an ONNX model carries: int8 (Q/DQ nodes), fp16 (fp16 weights) or fp32."""
    import onnx

    graph = onnx.load_from_string(onnx_bytes).graph
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in graph.node):
        return "int8"
    if any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.initializer):
        return "fp16"
    return "fp32"


@dataclass(frozen=True)
class BatchProfile:
    """The dynamic batch range the engine serves (an optimization profile's min/opt/max)."""

    min: int = 1
    opt: int = 32
    max: int = 256


def _network_flags_and_precision(precision: str, major: int) -> tuple[int, list[trt.BuilderFlag], list[trt.BuilderFlag]]:
    """The only TensorRT-version-specific code: (network creation flags, builder flags to set, to clear)."""
    import tensorrt as trt

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    if major >= 11:
        # Strongly typed only; the flag may be implicit (and removed) in later releases.
        strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        flags = (1 << int(strongly_typed)) if strongly_typed is not None else 0
        return flags, [], []  # precision is whatever the ONNX's tensor types and Q/DQ nodes say
    # TensorRT 10, weakly typed: INT8 with Q/DQ nodes is explicit quantization (their scales, no calibrator);
    # FP16 beside it lets the layers between Q/DQ pairs run in fp16. TF32 is on by default: off for fp32.
    set_flags = {"fp32": [], "fp16": [trt.BuilderFlag.FP16],
                 "int8": [trt.BuilderFlag.INT8, trt.BuilderFlag.FP16]}[precision]
    clear_flags = [trt.BuilderFlag.TF32] if precision == "fp32" else []
    return 0, set_flags, clear_flags


def _dims(dims: trt.Dims) -> list[int]:
    return [int(dims[i]) for i in range(len(dims))]


def _parser_errors(parser: trt.OnnxParser | trt.OnnxParserRefitter) -> str:
    return "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)) or "no detail"


def build_engine(
    onnx_bytes: bytes,
    *,
    precision: str | None = None,
    batch: BatchProfile = BatchProfile(),
    workspace_bytes: int = 1 << 30,
    refittable: bool = True,
) -> bytes:
    """Parse ONNX and build a serialized engine with a dynamic-batch profile (refittable by default).

    `precision` defaults to the ONNX's own (`onnx_precision`); an int8 engine is built only from a Q/DQ model.
    """
    carried = onnx_precision(onnx_bytes)
    precision = precision or carried
    if precision == "int8" and carried != "int8":
        raise TensorRTError("int8 engines are built from a Q/DQ model (explicit quantization); this ONNX has no "
                            "Q/DQ nodes: publish the int8 format of the version")
    _require()
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network_flags, precision_flags, cleared_flags = _network_flags_and_precision(precision, major_version())
    network = builder.create_network(network_flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        raise TensorRTError(f"ONNX parse failed: {_parser_errors(parser)}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    for flag in precision_flags:
        config.set_flag(flag)
    for flag in cleared_flags:
        config.clear_flag(flag)
    if refittable:
        config.set_flag(trt.BuilderFlag.REFIT)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        rest = _dims(tensor.shape)[1:]
        if any(d < 0 for d in rest):
            raise TensorRTError(f"input {tensor.name!r} has dynamic non-batch dims {tensor.shape}; only the batch may vary")
        profile.set_shape(tensor.name, trt.Dims([batch.min, *rest]), trt.Dims([batch.opt, *rest]), trt.Dims([batch.max, *rest]))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TensorRTError("TensorRT engine build failed (see the TensorRT log above)")
    return bytes(serialized)


def deserialize(engine_bytes: bytes) -> trt.ICudaEngine:
    _require()
    import tensorrt as trt

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(engine_bytes)
    if engine is None:
        raise TensorRTError("could not deserialize the engine (built for another GPU or TensorRT version?)")
    return engine


def refit_from_onnx(engine: trt.ICudaEngine, onnx_bytes: bytes) -> None:
    """Load new weights from an ONNX with the same graph into a refittable engine, without a rebuild."""
    _require()
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    refitter = trt.Refitter(engine, logger)
    parser_refitter = trt.OnnxParserRefitter(refitter, logger)
    if not parser_refitter.refit_from_bytes(onnx_bytes):
        raise TensorRTError(f"ONNX refit failed: {_parser_errors(parser_refitter)}")
    if not refitter.refit_cuda_engine():
        raise TensorRTError("refit_cuda_engine failed: the new weights do not match the engine's graph")


def refit_named(engine: trt.ICudaEngine, weights: Mapping[str, np.ndarray]) -> None:
    """Replace named weights of a refittable engine (an unmerged graph's adapter: its initializers' names) in place.

    Weights the builder combined with others (a folded W + s·B·A) must be given together; TensorRT names them
    (`get_missing_weights`), and the refit is refused rather than left half done.
    """
    _require()
    import tensorrt as trt

    refitter = trt.Refitter(engine, trt.Logger(trt.Logger.WARNING))
    refittable = set(refitter.get_all_weights())
    unknown = sorted(set(weights) - refittable)
    if unknown:
        raise TensorRTError(f"the engine has no refittable weights named {unknown[:3]}")
    arrays = {name: np.ascontiguousarray(value, dtype=np.float32) for name, value in weights.items()}  # alive until done
    for name, value in arrays.items():
        if not refitter.set_named_weights(name, trt.Weights(value)):
            raise TensorRTError(f"TensorRT refused the weights {name!r} {value.shape}")
    missing = refitter.get_missing_weights()
    if missing:
        raise TensorRTError(f"the engine combined these adapter weights with others it was not given: {missing[:3]}")
    if not refitter.refit_cuda_engine():
        raise TensorRTError("refit_cuda_engine failed: the adapter does not fit the engine")


class TensorRTModel:
    """Inference on one engine with torch CUDA buffers; `predict` is float32 in, float32 out, like ONNX Runtime."""

    runtime = "tensorrt"

    def __init__(self, engine: trt.ICudaEngine, plan: bytes | None = None) -> None:
        _require()
        import tensorrt as trt
        import torch

        self._torch = torch
        self._lock = threading.Lock()  # one execution context: one request at a time
        self.engine = engine
        self.plan = plan
        self.context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(self.inputs) != 1 or len(self.outputs) != 1:
            raise TensorRTError(f"expected one input and one output, got {self.inputs} -> {self.outputs}")
        self._dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
        self.stream = torch.cuda.Stream()

    @classmethod
    def from_onnx(cls, onnx_bytes: bytes, precision: str | None = None,
                  batch: BatchProfile = BatchProfile()) -> TensorRTModel:
        """Build an engine of `precision` (default: the ONNX's own) here, and serve it."""
        plan = build_engine(onnx_bytes, precision=precision, batch=batch)
        return cls(deserialize(plan), plan)

    @classmethod
    def from_plan(cls, plan: bytes) -> TensorRTModel:
        """Serve a plan built elsewhere for this device class (refused by TensorRT if it was built for another)."""
        return cls(deserialize(plan), plan)

    def with_weights(self, onnx_bytes: bytes) -> TensorRTModel:
        """A second engine from the same plan, refitted with the new ONNX's weights (no rebuild).

        The serving engine is never refitted in place, so requests keep using
        it until the caller swaps in the returned model.
        """
        if self.plan is None:
            raise TensorRTError("this model keeps no serialized plan to refit a copy of")
        engine = deserialize(self.plan)
        refit_from_onnx(engine, onnx_bytes)
        return TensorRTModel(engine, self.plan)

    def with_adapter(self, tensors: Mapping[str, np.ndarray]) -> TensorRTModel:
        """A second engine from the same plan (built from an unmerged graph), refitted with a new adapter (no rebuild)."""
        if self.plan is None:
            raise TensorRTError("this model keeps no serialized plan to refit a copy of")
        engine = deserialize(self.plan)
        refit_named(engine, tensors)
        return TensorRTModel(engine, self.plan)

    def predict(self, x: np.ndarray) -> np.ndarray:
        with self._lock:
            return self._predict(x)

    def _predict(self, x: np.ndarray) -> np.ndarray:
        torch = self._torch
        name_in, name_out = self.inputs[0], self.outputs[0]
        x = np.ascontiguousarray(x, dtype=self._dtypes[name_in])
        if not self.context.set_input_shape(name_in, tuple(x.shape)):
            raise TensorRTError(f"input shape {x.shape} is outside the engine's optimization profile")
        out_shape = tuple(_dims(self.context.get_tensor_shape(name_out)))
        with torch.cuda.stream(self.stream):
            device_in = torch.from_numpy(x).cuda(non_blocking=True)
            device_out = torch.empty(out_shape, dtype=torch.from_numpy(np.empty(0, self._dtypes[name_out])).dtype, device="cuda")
            self.context.set_tensor_address(name_in, int(device_in.data_ptr()))
            self.context.set_tensor_address(name_out, int(device_out.data_ptr()))
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise TensorRTError("execute_async_v3 failed")
            result = device_out.float().cpu().numpy()
        self.stream.synchronize()
        return result
