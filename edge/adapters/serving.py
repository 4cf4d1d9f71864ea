"""Serving an unmerged graph, and swapping its adapter without a new download of the base.

Two ways on ONNX Runtime, and the device measures which to use ("auto"):

- "unmerged": one session of the graph; each adapter is an `onnxruntime.LoraAdapter`
  activated per run (`RunOptions.add_active_adapter`), so a new adapter needs no new
  session. Its cost is the adapter's arithmetic at every run, and on the CPU more:
  a convolution whose weight is an input loses ONNX Runtime's packed-weight kernels.
- "merged": the adapter baked in as constants (`delta.bake`); ONNX Runtime folds
  W + s·B·A into one weight when the session loads, so it runs as fast as the merged
  export. Each adapter costs one session build from the base bytes the device holds.

"auto" times both at batch 1, interleaved, on the device itself, and serves unmerged
only when it costs at most `MAX_UNMERGED_COST` times the merged time. On TensorRT the
engine is built from the unmerged graph and an adapter is refitted into a copy of it
(`TensorRTModel.with_adapter`), never rebuilt.
"""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Mapping
from functools import partial
from pathlib import Path

import numpy as np
import onnxruntime as ort

from fedge.edge.adapters.delta import bake, with_adapter
from fedge.edge.runtime import Model, OnnxRuntimeModel, time_interleaved
from fedge.edge.scoring import feeds

MODES = ("auto", "unmerged", "merged")
#: unmerged adapters serve when they cost at most this much more time than the merged model at batch 1
MAX_UNMERGED_COST = 1.15
_PROBE_ROUNDS = 30


def ort_adapter(tensors: Mapping[str, np.ndarray], folder: Path) -> ort.LoraAdapter:
    """An ONNX Runtime LoRA adapter holding `tensors` (written in its file format under `folder`, which it maps)."""
    adapter_format = ort.AdapterFormat()
    adapter_format.set_parameters({name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value))
                                   for name, value in tensors.items()})
    path = folder / "adapter.onnx_adapter"
    adapter_format.export_adapter(str(path))
    adapter = ort.LoraAdapter()
    adapter.Load(str(path))
    return adapter


class AdapterModel:
    """An unmerged graph on ONNX Runtime serving one adapter, unmerged or merged (see the module's docstring)."""

    def __init__(self, onnx_bytes: bytes, mode: str, runtime: str = "onnxruntime-cpu", threads: int = 0,
                 unmerged_cost: float | None = None, *, session: OnnxRuntimeModel | None = None,
                 adapter: Mapping[str, np.ndarray] | None = None) -> None:
        """`onnx_bytes` with the adapter it holds; unmerged, `session` (a session of the same graph) and `adapter`
        (tensors to activate per run instead of the graph's defaults) let adapters share one loaded session."""
        if mode not in MODES[1:]:
            raise ValueError(f"mode must be one of {MODES[1:]}, not {mode!r}")
        self.runtime = runtime
        self.adapter_mode = mode
        self.unmerged_cost = unmerged_cost  # measured unmerged/merged time at batch 1, where measured
        self._threads = threads
        self._graph = onnx_bytes
        if mode == "merged":
            self._model = OnnxRuntimeModel(bake(onnx_bytes), runtime, threads)
        else:
            self._model = session or OnnxRuntimeModel(onnx_bytes, runtime, threads)
        self._options: ort.RunOptions | None = None  # unmerged: the run options that activate `adapter`
        # the run options hold the adapter by pointer, and the adapter maps its file: both live as long as the model
        self._adapter: ort.LoraAdapter | None = None
        self._folder: tempfile.TemporaryDirectory[str] | None = None
        if adapter is not None and mode == "unmerged":
            self._folder = tempfile.TemporaryDirectory(prefix="fedge-adapter-", ignore_cleanup_errors=True)
            self._adapter = ort_adapter(adapter, Path(self._folder.name))
            self._options = ort.RunOptions()
            self._options.add_active_adapter(self._adapter)

    @classmethod
    def load(cls, onnx_bytes: bytes, mode: str = "auto", runtime: str = "onnxruntime-cpu", threads: int = 0) -> AdapterModel:
        """Serve `onnx_bytes` with the adapter it holds; "auto" measures which mode to use here."""
        if mode != "auto":
            return cls(onnx_bytes, mode, runtime, threads)
        cost = unmerged_cost(onnx_bytes, runtime, threads)
        return cls(onnx_bytes, "unmerged" if cost <= MAX_UNMERGED_COST else "merged", runtime, threads, cost)

    def with_adapter(self, tensors: Mapping[str, np.ndarray]) -> AdapterModel:
        """This base serving `tensors` instead: unmerged shares the loaded session and activates a new adapter;
        merged loads a session of the graph with `tensors` baked in. `self` is untouched (it may keep serving)."""
        if self.adapter_mode == "merged":
            return AdapterModel(with_adapter(self._graph, tensors), "merged", self.runtime, self._threads,
                                self.unmerged_cost)
        return AdapterModel(self._graph, "unmerged", self.runtime, self._threads, self.unmerged_cost,
                            session=self._model, adapter=tensors)

    def predict(self, x: np.ndarray) -> np.ndarray:
        model = self._model
        out = model.session.run(None, feeds(model.input_names, x), self._options)[0]
        return np.asarray(out, dtype=np.float32)


def unmerged_cost(onnx_bytes: bytes, runtime: str = "onnxruntime-cpu", threads: int = 0) -> float:
    """Median time of the unmerged graph over the merged (baked) one at batch 1, timed in interleaved rounds."""
    unmerged = OnnxRuntimeModel(onnx_bytes, runtime, threads)
    merged = OnnxRuntimeModel(bake(onnx_bytes), runtime, threads)
    shape = unmerged.session.get_inputs()[0].shape
    x = np.zeros([1, *(d if isinstance(d, int) else 1 for d in shape[1:])], np.float32)
    times = time_interleaved({"unmerged": partial(unmerged.predict, x), "merged": partial(merged.predict, x)},
                             _PROBE_ROUNDS)
    return statistics.median(times["unmerged"]) / statistics.median(times["merged"])


def load_adapter_model(onnx_bytes: bytes, runtime: str, threads: int = 0, mode: str = "auto") -> Model:
    """An unmerged graph on the device's runtime: TensorRT builds an engine from it (adapters refit it), ONNX Runtime
    serves it unmerged or merged (`AdapterModel.load`)."""
    if runtime == "tensorrt":
        from fedge.edge.tensorrt_engine import TensorRTModel

        return TensorRTModel.from_onnx(onnx_bytes, "fp32")
    return AdapterModel.load(onnx_bytes, mode, runtime, threads)
