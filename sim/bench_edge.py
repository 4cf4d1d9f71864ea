"""Edge benchmark, measured side by side in one run, on a CPU it describes.

0. The CPU: instruction-set facts (numpy's CPUID detection) and the int8 kernel
   ONNX Runtime uses there, since INT8 accuracy and speed depend on them.
1. Formats: size, accuracy and agreement with fp32 (top-1, max logit difference)
   of INT8 (QDQ and dynamic) and FP16 on held-out data, computed here.
2. Latency: PyTorch eager vs ONNX Runtime CPU fp32, INT8 and FP16, batch 1 and 32 (median of repeats),
   and where this machine has them ONNX Runtime CUDA (fp32, fp16) and TensorRT engines (fp32, fp16,
   INT8 from the Q/DQ model); the table says which were not measured and why.
3. Push: a full artifact vs a weight-only update (only the changed initializers),
   through a real registry process over gRPC on loopback: bytes on the wire and
   seconds from publish to a loaded, servable model on the receiving side.
4. Adapter updates: a LoRA adapter trained on target-domain data as the
   next version after the base: bytes of that version as a full model, as a
   weight-only update of the merged model, and as an adapter update (dense and
   through each codec, with the coded model's agreement with the uncoded one);
   seconds to apply it on a device; and the latency of unmerged adapters (ONNX
   Runtime's adapter API), of the adapter merged on the device and of the merged
   export, at batch 1 and 32, in interleaved rounds (medians and the median of
   the per-round ratios).

Weight-only pays off when few tensors change (a head or normalisation update,
as in cloud-edge adaptation); LoRA merged into every layer changes every
weight, and the benchmark shows that too rather than hiding it: an adapter
update sends the adapter's change instead.
"""

from __future__ import annotations

import copy
import secrets
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import torch
from torch.utils.data import TensorDataset

from fedge.adapters import adapter_state, inject_lora, load_adapter_state
from fedge.codecs import Codec, build_codec
from fedge.edge.adapters.delta import adapter_tensors, adapter_update, apply_adapter_update, default_codec
from fedge.edge.adapters.export import unmerged_format
from fedge.edge.adapters.serving import AdapterModel
from fedge.edge.agreement import agreement
from fedge.edge.artifacts import BundleFile, sha256_hex
from fedge.edge.capabilities import INT8_KERNELS, detect
from fedge.edge.export import quantize_int8_dynamic, quantize_int8_qdq, run_onnx, to_fp16, to_onnx
from fedge.edge.fleet import start_registry
from fedge.edge.publish import publish, publish_weight_update, weight_update
from fedge.edge.runtime import OnnxRuntimeModel, ort_session, time_interleaved
from fedge.edge.weights import apply_initializers, decode_weights
from fedge.federated_model import merged_copy
from fedge.protos import edge_pb2, edge_pb2_grpc
from fedge.scenario import load_scenario
from fedge.settings import RunSettings
from fedge.tiers import TIERS
from fedge.training import train_epochs


def _median_ms(fn: Callable[[], object], repeats: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def accelerated_engines(variants: dict[str, bytes]) -> tuple[dict[str, Callable[[np.ndarray], object]], list[str]]:
    """The GPU engines this machine has for the formats (ONNX Runtime CUDA fp32/fp16; TensorRT fp32/fp16/int8
    built from the same ONNX), and why each missing one is missing."""
    from fedge.edge import tensorrt_engine
    from fedge.edge.runtime import OnnxRuntimeModel

    engines: dict[str, Callable[[np.ndarray], object]] = {}
    missing = []
    if "CUDAExecutionProvider" in ort.get_available_providers():
        for name in ("fp32", "fp16"):
            engines[f"onnxruntime-cuda {name}"] = OnnxRuntimeModel(variants[name], "onnxruntime-cuda").predict
    else:
        missing.append("onnxruntime-cuda: ONNX Runtime has no CUDA provider here")
    usable, reason = tensorrt_engine.available()
    if usable:
        for name in ("fp32", "fp16", "int8 qdq"):
            engines[f"tensorrt {name}"] = tensorrt_engine.TensorRTModel.from_onnx(variants[name]).predict
    else:
        missing.append(f"tensorrt: {reason}")
    return engines, missing


def latency(model: torch.nn.Module, variants: dict[str, bytes], x: np.ndarray, repeats: int, threads: int,
            accelerated: dict[str, Callable[[np.ndarray], object]] | None = None) -> list[dict[str, Any]]:
    """Median latency per engine and batch size, and each one's speed-up over PyTorch eager."""
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        engines: dict[str, Callable[[np.ndarray], object]] = {
            f"onnxruntime {name}": partial(_run, ort_session(data, threads=threads)) for name, data in variants.items()}
        engines.update(accelerated or {})
        rows = []
        for batch in (1, 32):
            xb = np.ascontiguousarray(np.resize(x, (batch, *x.shape[1:])), dtype=np.float32)
            xt = torch.from_numpy(xb)
            with torch.inference_mode():
                eager = _median_ms(partial(model, xt), repeats)
            rows.append({"engine": "pytorch eager", "batch": batch, "median_ms": eager, "speedup_vs_torch": 1.0})
            for name, run in engines.items():
                ms = _median_ms(partial(run, xb), repeats)
                rows.append({"engine": name, "batch": batch, "median_ms": ms, "speedup_vs_torch": eager / ms})
    finally:
        torch.set_num_threads(torch_threads)
    return rows


def _run(session: ort.InferenceSession, x: np.ndarray) -> object:
    return session.run(None, {"input": x})


def _fetch(address: str, version: int) -> bytes:
    with grpc.insecure_channel(address) as channel:
        stub = edge_pb2_grpc.EdgeRegistryStub(channel)
        chunks = stub.FetchArtifact(edge_pb2.FetchRequest(device_id="bench", version=version, offset=0, format="fp32"),
                                    timeout=60)
        return b"".join(c.data for c in chunks)


def push(base: bytes, updates: dict[str, bytes], workdir: Path) -> list[dict[str, Any]]:
    """Full artifact vs weight-only update for each new model, each timed from publish to a ready session."""
    token = secrets.token_hex(16)
    registry, address, _ = start_registry(workdir / "registry", token)
    rows = []
    try:
        base_version = publish(address, token, {"fp32": BundleFile(base)}).version
        for name, new in updates.items():
            start = time.perf_counter()
            reply = publish(address, token, {"fp32": BundleFile(new)})
            ort_session(_fetch(address, reply.version))
            full_s = time.perf_counter() - start

            start = time.perf_counter()
            reply_w = publish_weight_update(address, token, base, base_version, new)
            payload = _fetch(address, reply_w.version)
            rebuilt = apply_initializers(base, decode_weights(payload))
            ort_session(rebuilt)
            weights_s = time.perf_counter() - start
            if rebuilt != new:
                raise AssertionError("weight-only update did not rebuild the new model exactly")
            link = TIERS["weak"].downlink_mbps * 1e6 / 8  # bytes/s of a weak device's downlink
            rows.append({"update": name, "full_bytes": reply.bytes, "weights_bytes": reply_w.bytes,
                         "bytes_ratio": reply_w.bytes / reply.bytes, "full_s": full_s, "weights_s": weights_s,
                         "full_s_weak_link": full_s + reply.bytes / link,
                         "weights_s_weak_link": weights_s + reply_w.bytes / link})
    finally:
        registry.stop()
    return rows


def _codecs() -> dict[str, Codec]:
    return {"dense": build_codec("dense"), "fedzip z=1 k=64 (default)": default_codec(), "q8": build_codec("q8"),
            "q4": build_codec("q4"), "fedzip z=0.2 k=3 (a round's)": build_codec("fedzip")}


def adapter_updates(model: torch.nn.Module, targets: list[str], train: TensorDataset, x: torch.Tensor, y: np.ndarray,
                    threads: int, rounds: int) -> dict[str, Any]:
    """The base with peft's initial adapter as v1 (unmerged), an adapter trained on target-domain data (`train`) as
    v2: bytes of v2 by every route, seconds to apply it on a device, and serving latency unmerged vs merged."""
    settings = RunSettings()
    start = inject_lora(copy.deepcopy(model), targets, rank=settings.lora_rank, alpha=settings.lora_alpha, seed=0).eval()
    trained = copy.deepcopy(start)  # as a LoRA method trains: its default rate, a few epochs
    train_epochs(trained, train, epochs=3, lr=3e-3, batch_size=32, device=torch.device("cpu"), seed=0)
    trained.eval()
    with torch.no_grad():
        uncoded = merged_copy(trained)(x).numpy()
    base = unmerged_format(start, x)
    new = adapter_state(trained)
    codecs = []
    for name, codec in _codecs().items():
        update, target = adapter_update(base.data, 1, new, codec)
        logits = AdapterModel(target, "merged", threads=threads).predict(x.numpy())
        codecs.append({"codec": name, "bytes": len(update.data), "agreement_vs_uncoded": agreement(logits, uncoded).top1,
                       "accuracy": float((logits.argmax(1) == y).mean())})
    update, target = adapter_update(base.data, 1, new, default_codec())
    version = copy.deepcopy(start)
    load_adapter_state(version, adapter_tensors(target))
    merged_v1, merged_v2 = to_onnx(start, x[:2]), to_onnx(version, x[:2])
    sizes = {"full fp32 (merged)": len(merged_v2), "full fp32 (unmerged)": len(target),
             "weight-only update of the merged model": len(weight_update(merged_v1, 1, merged_v2).data),
             "adapter update, dense": update.metadata["dense_bytes"], "adapter update, coded (default)": len(update.data)}

    unmerged_v1 = AdapterModel(base.data, "unmerged", threads=threads)

    def apply(mode: str) -> object:  # what a device does: decode, add, rebuild, verify against the signed target, load
        data = apply_adapter_update(base.data, update.data)
        if sha256_hex(data) != update.metadata["target_sha256"]:
            raise AssertionError("the adapter update did not rebuild its signed target")
        if mode == "unmerged":
            return unmerged_v1.with_adapter(adapter_tensors(data))
        return AdapterModel(data, "merged", threads=threads)

    routes: dict[str, tuple[int, Callable[[], object]]] = {"full fp32: load a session": (len(merged_v2), partial(OnnxRuntimeModel, merged_v2, "onnxruntime-cpu", threads)),
              "adapter update, unmerged: apply, verify, activate": (len(update.data), partial(apply, "unmerged")),
              "adapter update, merged on the device: apply, verify, load": (len(update.data), partial(apply, "merged"))}
    times = time_interleaved({name: call for name, (_, call) in routes.items()}, 10, warmup=1)
    link = TIERS["weak"].downlink_mbps * 1e6 / 8  # bytes/s of a weak device's downlink
    apply_rows = [{"route": name, "bytes": n, "apply_s": statistics.median(times[name]),
                   "weak_link_s": n / link + statistics.median(times[name])} for name, (n, _) in routes.items()]

    engines = {"merged export": OnnxRuntimeModel(merged_v2, threads=threads).predict,
               "unmerged (adapter API)": unmerged_v1.with_adapter(adapter_tensors(target)).predict,
               "merged on the device": AdapterModel(target, "merged", threads=threads).predict}
    latency_rows = []
    for batch in (1, 32):
        xb = np.ascontiguousarray(np.resize(x.numpy(), (batch, *x.shape[1:])), dtype=np.float32)
        times = time_interleaved({name: partial(run, xb) for name, run in engines.items()}, rounds)
        base_times = np.asarray(times["merged export"])
        for name, t in times.items():
            ratios = np.asarray(t) / base_times
            latency_rows.append({"engine": name, "batch": batch, "median_ms": 1e3 * statistics.median(t),
                                 "ratio_vs_merged": float(np.median(ratios)),
                                 "ratio_iqr": [float(np.percentile(ratios, 25)), float(np.percentile(ratios, 75))]})
    return {"parameters": update.metadata["parameters"], "forms": base.metadata["adapter"]["forms"],
            "uncoded_accuracy": float((uncoded.argmax(1) == y).mean()), "sizes": sizes, "codecs": codecs,
            "apply": apply_rows, "latency": latency_rows, "rounds": rounds}


def bench_edge(scenario: str = "digits-shift", repeats: int = 50, threads: int = 1,
               workdir: str | Path | None = None) -> dict[str, Any]:
    """Run the comparisons on the scenario's base model; returns rows for `latency`, `push` and `adapters`."""
    sc = load_scenario(scenario)
    model = sc.base_model().eval()
    parts = [sc.client_data(p, 4) for p in range(4)]
    x = torch.cat([p.test.tensors[0] for p in parts])
    y = torch.cat([p.test.tensors[1] for p in parts]).numpy()
    calibration = torch.cat([p.train.tensors[0] for p in parts])[:512].numpy()
    fp32 = to_onnx(model, x[:2])
    variants = {"fp32": fp32, "int8 qdq": quantize_int8_qdq(fp32, calibration),
                "int8 dynamic": quantize_int8_dynamic(fp32), "fp16": to_fp16(fp32)}
    logits = {name: run_onnx(data, x.numpy()) for name, data in variants.items()}
    quality = {}
    for name, data in variants.items():
        versus = agreement(logits[name], logits["fp32"])
        quality[name] = {"bytes": len(data), "accuracy": float((logits[name].argmax(1) == y).mean()),
                         "agreement_vs_fp32": versus.top1, "max_logit_diff_vs_fp32": versus.max_logit_diff,
                         "relative_diff_vs_fp32": versus.relative_diff}

    head = copy.deepcopy(model)  # a head-only update: what forward-only cloud-edge adaptation sends down
    lora_all = copy.deepcopy(model)  # LoRA merged into every target layer changes every weight matrix
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        fc2_weight = dict(head.named_parameters())["fc2.weight"]
        fc2_weight.add_(0.01 * torch.randn(fc2_weight.shape, generator=g))
        for name, p in lora_all.named_parameters():
            if name.endswith("weight"):
                out_f = p.shape[0]
                in_f = int(np.prod(p.shape[1:]))
                b, a = 0.01 * torch.randn(out_f, 8, generator=g), torch.randn(8, in_f, generator=g)
                p.add_((b @ a).reshape(p.shape))
    updates = {"head only (fc2)": to_onnx(head, x[:2]), "LoRA merged, all layers": to_onnx(lora_all, x[:2])}
    with tempfile.TemporaryDirectory() as tmp:
        rows_push = push(fp32, updates, Path(workdir) if workdir else Path(tmp))
    accelerated, not_measured = accelerated_engines(variants)
    train = TensorDataset(*(torch.cat([p.train.tensors[i] for p in parts]) for i in range(2)))
    adapters = adapter_updates(model, list(sc.lora_targets), train, x, y, threads, rounds=repeats)
    return {
        "adapters": adapters,
        "cpu": detect().as_dict(),
        "latency": latency(model, variants, x.numpy(), repeats, threads, accelerated),
        "not_measured": not_measured,
        "push": rows_push,
        "variants": quality,
        "eval_samples": len(y),
        "threads": threads,
    }


def print_tables(result: dict[str, Any], console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=140)
    cpu = result["cpu"]
    facts = Table(title="CPU (numpy's CPUID detection; under an emulator, the emulated CPU)", title_justify="left")
    for col in ("machine", "cpu", "instruction sets", "int8 kernel", "onnxruntime", "providers"):
        facts.add_column(col)
    facts.add_row(cpu["machine"], cpu["cpu"], " ".join(cpu["isa"]) or "-",
                  f"{cpu['int8_kernel']}: {INT8_KERNELS[cpu['int8_kernel']]}", cpu["onnxruntime"],
                  ", ".join(cpu["providers"]))
    console.print(facts)
    lat = Table(title=f"edge latency (median, {result['threads']} thread(s))", title_justify="left")
    for col in ("engine", "batch", "median ms", "speed-up vs PyTorch"):
        lat.add_column(col, justify="right")
    for r in result["latency"]:
        lat.add_row(r["engine"], str(r["batch"]), f"{r['median_ms']:.3f}", f"{r['speedup_vs_torch']:.2f}x")
    console.print(lat)
    for reason in result.get("not_measured", []):
        console.print(f"not measured: {reason}")
    push_t = Table(title="push: full artifact vs weight-only update (registry over gRPC, to a loaded session)",
                   title_justify="left")
    weak = TIERS["weak"].downlink_mbps
    for col in ("update", "full KB", "weights KB", "bytes ratio", "full s", "weights s", f"full s @{weak:g} Mbit/s",
                f"weights s @{weak:g} Mbit/s"):
        push_t.add_column(col, justify="right")
    for r in result["push"]:
        push_t.add_row(r["update"], f"{r['full_bytes'] / 1e3:.1f}", f"{r['weights_bytes'] / 1e3:.1f}",
                       f"{r['bytes_ratio']:.4f}", f"{r['full_s']:.3f}", f"{r['weights_s']:.3f}",
                       f"{r['full_s_weak_link']:.2f}", f"{r['weights_s_weak_link']:.2f}")
    console.print(push_t)
    console.print("measured on loopback (publish, fetch, apply, load a session); the @ columns add the transfer "
                  "time of the same bytes on a weak device's downlink (modelled, fedge.profiles)")
    variants = Table(title=f"formats on this CPU ({result['eval_samples']} held-out target samples; agreement and "
                           "logit difference against fp32 on the same inputs)", title_justify="left")
    for col in ("format", "KB", "of fp32", "accuracy", "vs fp32", "top-1 agreement", "max |logit diff|", "of range"):
        variants.add_column(col, justify="right")
    fp32 = result["variants"]["fp32"]
    for name, v in result["variants"].items():
        variants.add_row(name, f"{v['bytes'] / 1e3:.1f}", f"{v['bytes'] / fp32['bytes']:.1%}", f"{v['accuracy']:.4f}",
                         f"{100 * (v['accuracy'] - fp32['accuracy']):+.2f} pt", f"{v['agreement_vs_fp32']:.4f}",
                         f"{v['max_logit_diff_vs_fp32']:.3g}", f"{v['relative_diff_vs_fp32']:.1%}")
    console.print(variants)
    print_adapter_tables(result["adapters"], console)


def print_adapter_tables(result: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    full = result["sizes"]["full fp32 (merged)"]
    sizes = Table(title=f"a new version as an adapter update: LoRA ({result['parameters']:,} parameters) trained on "
                        "target-domain data, after the base", title_justify="left")
    for col in ("bytes of the new version", "KB", "of the full fp32"):
        sizes.add_column(col, justify="right")
    for name, n in result["sizes"].items():
        sizes.add_row(name, f"{n / 1e3:.1f}", f"{n / full:.2%}")
    console.print(sizes)
    codecs = Table(title=f"adapter update by codec (the coded adapter against the uncoded one; uncoded accuracy "
                         f"{result['uncoded_accuracy']:.4f})", title_justify="left")
    for col in ("codec", "KB", "of the full fp32", "top-1 agreement", "accuracy"):
        codecs.add_column(col, justify="right")
    for r in result["codecs"]:
        codecs.add_row(r["codec"], f"{r['bytes'] / 1e3:.1f}", f"{r['bytes'] / full:.2%}",
                       f"{r['agreement_vs_uncoded']:.4f}", f"{r['accuracy']:.4f}")
    console.print(codecs)
    weak = TIERS["weak"].downlink_mbps
    apply_t = Table(title="applying the new version on a device (median of 10 interleaved rounds)", title_justify="left")
    for col in ("route", "KB", "apply ms", f"s with the transfer @{weak:g} Mbit/s"):
        apply_t.add_column(col, justify="right")
    for r in result["apply"]:
        apply_t.add_row(r["route"], f"{r['bytes'] / 1e3:.1f}", f"{1e3 * r['apply_s']:.1f}", f"{r['weak_link_s']:.2f}")
    console.print(apply_t)
    lat = Table(title=f"serving the adapter: {result['rounds']} interleaved rounds (forms: " + ", ".join(
        f"{k} {v}" for k, v in result["forms"].items()) + ")", title_justify="left")
    for col in ("engine", "batch", "median ms", "vs merged export (median ratio)", "ratio IQR"):
        lat.add_column(col, justify="right")
    for r in result["latency"]:
        lat.add_row(r["engine"], str(r["batch"]), f"{r['median_ms']:.3f}", f"{r['ratio_vs_merged']:.3f}",
                    f"{r['ratio_iqr'][0]:.2f}-{r['ratio_iqr'][1]:.2f}")
    console.print(lat)


if __name__ == "__main__":
    print_tables(bench_edge())
