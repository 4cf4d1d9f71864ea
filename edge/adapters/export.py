"""The base exported once with its LoRA adapters kept unmerged: A and B as overridable initializers.

Each LoRA layer of a peft model is exported in one of two forms, whichever costs
fewer multiply-adds for one input: "weight" adds the low-rank product to the base
weight inside the graph (W + s·B·A, cheap for a convolution whose LoRA branch would
run at every pixel), "branch" runs the LoRA branch beside the base layer
(x·W + s·(x·A)·B, cheap for a linear layer whose weight is large). Either way A and
B are graph inputs with initializers, named as peft names them
(`base_model.model.fc1.lora_A.weight`), so ONNX Runtime's LoRA adapter API can
override them per run and an adapter update carries the federation's own tensors.
They are exported as inputs, not parameters, so the exporter cannot fold them into
the base weights. The result is checked against the merged PyTorch model.

The server side of the edge (torch); the device side lives in `fedge.edge.adapters`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

from fedge.edge.adapters.delta import ADAPTER_META, adapter_tensors
from fedge.edge.artifacts import BundleFile
from fedge.edge.export import INPUT_NAME, MAX_BATCH, OUTPUT_NAME, ExportError, _quiet_loggers, run_onnx
from fedge.federated_model import LORA_A, LORA_B, PEFT_PREFIX, merged_copy

FORMS = ("weight", "branch")


@dataclass(frozen=True)
class LoraLayer:
    """One adapted layer as exported: where it is, its tensors' names, its scale and the form it runs in."""

    path: str
    a_name: str
    b_name: str
    scale: float
    form: str


class _Unmerged(nn.Module):
    """A LoRA layer whose A and B come from the graph's inputs (through `feed`), in its chosen form."""

    def __init__(self, peft_layer: Any, layer: LoraLayer, feed: dict[str, torch.Tensor]) -> None:
        super().__init__()
        adapter = peft_layer.active_adapters[0]
        self.base_layer: nn.Linear | nn.Conv2d = peft_layer.base_layer
        self.lora_a: Any = peft_layer.lora_A[adapter]  # its stride, padding and dilation (peft's branch), not its weight
        self.layer = layer
        self.feed = feed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.feed[self.layer.a_name], self.feed[self.layer.b_name]
        base, scale = self.base_layer, self.layer.scale
        if self.layer.form == "weight":
            weight = base.weight + scale * (b.flatten(1) @ a.flatten(1)).reshape(base.weight.shape)
            if isinstance(base, nn.Conv2d):
                return base._conv_forward(x, weight, base.bias)
            return F.linear(x, weight, base.bias)
        if isinstance(base, nn.Conv2d):
            lora_a = self.lora_a
            branch = F.conv2d(F.conv2d(x, a, None, lora_a.stride, lora_a.padding, lora_a.dilation), b)
        else:
            branch = F.linear(F.linear(x, a), b)
        return base(x) + scale * branch


class _WithAdapterInputs(nn.Module):
    """The model, taking the adapter's tensors as a second input (a dict by name)."""

    def __init__(self, model: nn.Module, feed: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self.feed = feed

    def forward(self, x: torch.Tensor, adapter: dict[str, torch.Tensor]) -> torch.Tensor:
        self.feed.update(adapter)
        return self.model(x)


def lora_layers(peft_model: Any, example: torch.Tensor) -> list[LoraLayer]:
    """The model's LoRA layers, each with the form that costs fewer multiply-adds for one input of `example`'s shape.

    Raises ValueError for what an adapter update cannot carry (other layer types, heads trained whole, several
    adapters), so the caller pushes whole models instead.
    """
    inner = peft_model.base_model.model
    found: list[tuple[str, Any]] = [(path, m) for path, m in inner.named_modules()
                                    if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
    if not found:
        raise ValueError("the model has no LoRA layers")
    positions: dict[str, int] = {}
    hooks = [m.register_forward_hook(lambda module, _, out, path=path: positions.__setitem__(path, _positions(module, out)))
             for path, m in found]
    try:
        with torch.no_grad():
            peft_model.eval()(example[:1].float())
    finally:
        for hook in hooks:
            hook.remove()
    layers = []
    for path, m in found:
        if len(m.lora_A) != 1 or getattr(m, "use_dora", {}).get(m.active_adapters[0], False):
            raise ValueError(f"{path}: adapter updates carry one plain LoRA adapter per layer")
        base = m.base_layer
        if type(base) not in (nn.Linear, nn.Conv2d) or getattr(base, "groups", 1) != 1:
            raise ValueError(f"{path}: adapter updates carry LoRA on Linear and ungrouped Conv2d layers, "
                             f"not {type(base).__name__}")
        adapter = m.active_adapters[0]
        rank, out_f, in_f = m.lora_A[adapter].weight.shape[0], base.weight.shape[0], math.prod(base.weight.shape[1:])
        weight_cost = rank * out_f * in_f  # B·A once per run
        branch_cost = positions.get(path, 1) * rank * (in_f + out_f)  # the branch at every position of one input
        same_taps = not isinstance(base, nn.Conv2d) or (m.lora_A[adapter].kernel_size == base.kernel_size and
                                                          m.lora_A[adapter].dilation == base.dilation and
                                                          m.lora_A[adapter].stride == base.stride and
                                                          m.lora_A[adapter].padding == base.padding)
        form = "weight" if same_taps and weight_cost <= branch_cost else "branch"
        layers.append(LoraLayer(path, f"{PEFT_PREFIX}{path}{LORA_A}", f"{PEFT_PREFIX}{path}{LORA_B}",
                                float(m.scaling[adapter]), form))
    return layers


def _positions(layer: nn.Module, out: torch.Tensor) -> int:
    """Where one input's output is computed: pixels of a convolution, tokens of a linear layer (1 for a vector)."""
    return math.prod(out.shape[2:]) if isinstance(layer.base_layer, nn.Conv2d) else math.prod(out.shape[1:-1])


def peft_adapter(peft_model: Any, layers: list[LoraLayer]) -> dict[str, np.ndarray]:
    """The adapter's tensors by the names the graph gives them (peft's state-dict names)."""
    inner = peft_model.base_model.model
    tensors = {}
    for layer in layers:
        m: Any = inner.get_submodule(layer.path)
        adapter = m.active_adapters[0]
        tensors[layer.a_name] = m.lora_A[adapter].weight.detach().float().cpu().numpy()
        tensors[layer.b_name] = m.lora_B[adapter].weight.detach().float().cpu().numpy()
    return tensors


def to_onnx_unmerged(peft_model: nn.Module, example: torch.Tensor, *, max_batch: int = MAX_BATCH) -> tuple[bytes, list[LoraLayer]]:
    """The base graph with the adapter as overridable initializers (their defaults: `peft_model`'s adapter)."""
    import copy

    model: Any = copy.deepcopy(peft_model).float().eval().cpu()
    layers = lora_layers(model, example)
    tensors = peft_adapter(model, layers)
    inner: nn.Module = model.base_model.model
    feed: dict[str, torch.Tensor] = {}
    for layer in layers:
        parent, _, child = layer.path.rpartition(".")
        owner = inner.get_submodule(parent) if parent else inner
        setattr(owner, child, _Unmerged(inner.get_submodule(layer.path), layer, feed))
    wrapped = _WithAdapterInputs(inner, feed).eval()
    x = example.float().cpu()
    if x.shape[0] < 2:  # a batch of 1 lets the tracer specialise the dim away
        x = x.repeat(2, *([1] * (x.dim() - 1)))
    adapter = {name: torch.from_numpy(value) for name, value in tensors.items()}
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    with warnings.catch_warnings(), _quiet_loggers("torch.onnx", "torch.export", "torch._dynamo"), torch.no_grad():
        warnings.simplefilter("ignore")
        # the trailing {} is the (empty) keyword arguments, so the adapter dict stays a positional input
        program = torch.onnx.export(wrapped, (x[:2], adapter, {}), dynamo=True,
                                    dynamic_shapes=({0: batch}, {name: None for name in adapter}),
                                    input_names=[INPUT_NAME, *adapter], output_names=[OUTPUT_NAME], verbose=False)
    if program is None:
        raise ExportError("torch.onnx.export returned no program")
    proto = program.model_proto
    inputs = {i.name for i in proto.graph.input}
    if not set(tensors) <= inputs:
        raise ExportError(f"the exporter dropped adapter inputs {sorted(set(tensors) - inputs)[:3]}")
    # an input with an initializer of the same name is overridable: its initializer is the default
    proto.graph.initializer.extend(numpy_helper.from_array(np.ascontiguousarray(v), name) for name, v in tensors.items())
    onnx.checker.check_model(proto, full_check=True)
    return proto.SerializeToString(), layers


def max_abs_diff_vs_merged(onnx_bytes: bytes, peft_model: nn.Module, x: torch.Tensor) -> float:
    """Max |ONNX Runtime (unmerged, its default adapter) - PyTorch (adapter merged into the weights)|."""
    with torch.no_grad():
        expected = merged_copy(peft_model)(x.float()).numpy()
    return float(np.abs(run_onnx(onnx_bytes, x.float().numpy()) - expected).max())


def describe(layers: list[LoraLayer], tensors: dict[str, np.ndarray]) -> dict[str, Any]:
    """What a format's signed metadata says of its adapter."""
    return {"tensors": len(tensors), "parameters": int(sum(v.size for v in tensors.values())),
            "forms": {layer.path: layer.form for layer in layers}}


def unmerged_format(peft_model: nn.Module, eval_x: torch.Tensor, tolerance: float = 1e-4) -> BundleFile:
    """The fp32 unmerged format of a version: exported, checked against the merged model (fails above `tolerance`)."""
    data, layers = to_onnx_unmerged(peft_model, eval_x[:2])
    return checked_unmerged(data, describe(layers, adapter_tensors(data)), peft_model, eval_x, tolerance)


def checked_unmerged(data: bytes, adapter: dict[str, Any], peft_model: nn.Module, eval_x: torch.Tensor,
                     tolerance: float = 1e-4) -> BundleFile:
    """`data` (an unmerged graph holding `peft_model`'s adapter, described by `adapter`) as a format, once its outputs
    are the merged model's (raises ExportError above `tolerance`)."""
    diff = max_abs_diff_vs_merged(data, peft_model, eval_x)
    if not diff <= tolerance:
        raise ExportError(f"the unmerged graph differs from the merged model by {diff:.3g} (> {tolerance:g})")
    return BundleFile(data, "onnx", "fp32", {ADAPTER_META: {**adapter, "max_abs_diff_vs_merged": diff},
                                             "max_abs_diff_vs_torch": diff})
