"""Pick and load the fastest runtime a device has: TensorRT, ONNX Runtime on TensorRT/CUDA, or ONNX Runtime CPU.

The agent reports the chosen name (e.g. "onnxruntime-cpu") in its profile and
telemetry, so the fleet's state says what each device actually runs. Free of
torch: the agent imports it, and the export checks its graphs with the same
ONNX Runtime session setup (`ort_session`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Protocol

import numpy as np
import onnxruntime as ort

from fedge.edge.scoring import feeds

RUNTIMES = ("tensorrt", "onnxruntime-tensorrt", "onnxruntime-cuda", "onnxruntime-cpu")
_ORT_PROVIDERS = {
    "onnxruntime-tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
    "onnxruntime-cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "onnxruntime-cpu": ["CPUExecutionProvider"],
}


class Model(Protocol):
    """A loaded, servable model: a batch in (features, or a token batch: `fedge.edge.scoring`), float32 logits out."""

    runtime: str

    def predict(self, x: np.ndarray) -> np.ndarray: ...


def tensorrt_usable() -> bool:
    """TensorRT's real bindings (not only its type stubs) and a CUDA GPU."""
    from fedge.edge.tensorrt_engine import available

    return available()[0]


def choose_runtime(preferred: str | None = None) -> str:
    """The best runtime present here, or `preferred` if it is present (clear error if it is not)."""
    providers = set(ort.get_available_providers())
    present = ["tensorrt"] if tensorrt_usable() else []
    if "TensorrtExecutionProvider" in providers:
        present.append("onnxruntime-tensorrt")
    if "CUDAExecutionProvider" in providers:
        present.append("onnxruntime-cuda")
    present.append("onnxruntime-cpu")
    if preferred:
        if preferred not in RUNTIMES:
            raise ValueError(f"unknown runtime {preferred!r}; known: {RUNTIMES}")
        if preferred not in present:
            raise RuntimeError(f"runtime {preferred!r} is not available on this device; available: {present}")
        return preferred
    return present[0]


def ort_session(onnx_bytes: bytes, runtime: str = "onnxruntime-cpu", threads: int = 0) -> ort.InferenceSession:
    """An ONNX Runtime session on the runtime's providers (quiet; `threads` intra-op threads, 0: ONNX Runtime's choice)."""
    if runtime not in _ORT_PROVIDERS:
        raise ValueError(f"{runtime!r} is not an ONNX Runtime runtime")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(onnx_bytes, options, providers=_ORT_PROVIDERS[runtime])


class OnnxRuntimeModel:
    """An ONNX Runtime session; `run` is thread-safe, so the serving loop and canary may share it."""

    def __init__(self, onnx_bytes: bytes, runtime: str = "onnxruntime-cpu", threads: int = 0) -> None:
        self.runtime = runtime
        self.session = ort_session(onnx_bytes, runtime, threads)
        self.input_names = tuple(i.name for i in self.session.get_inputs())

    def predict(self, x: np.ndarray) -> np.ndarray:
        out = self.session.run(None, feeds(self.input_names, x))[0]
        return np.asarray(out, dtype=np.float32)


def load_model(data: bytes, runtime: str | None = None, threads: int = 0, precision: str = "fp32",
               kind: str = "onnx") -> Model:
    """A servable model on the chosen runtime from ONNX bytes (TensorRT builds an engine of `precision` from
    them here) or, with kind "tensorrt", from an engine plan built for this device class."""
    runtime = runtime or choose_runtime()
    if runtime == "tensorrt":
        from fedge.edge.tensorrt_engine import TensorRTModel

        return TensorRTModel.from_plan(data) if kind == "tensorrt" else TensorRTModel.from_onnx(data, precision)
    if kind == "tensorrt":
        raise ValueError(f"an engine plan needs the tensorrt runtime, not {runtime}")
    return OnnxRuntimeModel(data, runtime, threads)


def time_interleaved(calls: Mapping[str, Callable[[], object]], rounds: int, warmup: int = 3) -> dict[str, list[float]]:
    """Seconds of each call in each of `rounds` rounds, the calls taking turns within a round, so that a machine's
    load drifts over all of them alike (compare them round by round, or by medians)."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return times
