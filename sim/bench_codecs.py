"""Codec benchmark: compression, distance to the entropy bound, and speed against memcpy.

Two updates: a real LoRA update (a client of a scenario trains its adapter
for an epoch; the update is new minus received adapter state) and a large
synthetic one (heavy-tailed, Student-t) that shows throughput at scale.
Speeds are MB/s of fp32 input, median of repeats, next to a memcpy of the
same buffer measured in the same run, so numbers from different machines
compare as ratios.

    fedge bench codecs --random-params 10000000 --repeats 5
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import numpy as np

from fedge.codecs import available_codecs, build_codec, entropy_report
from fedge.envelope import decode_update, encode_update, expected_specs
from fedge.methods import available_methods, get_method

Update = OrderedDict[str, np.ndarray]


def lora_update(scenario: str = "digits-shift", *, partition: int = 0, num_partitions: int = 4, epochs: int = 1,
                rank: int = 16, lr: float = 3e-3, batch_size: int = 32, seed: int = 0) -> Update:
    """One client's LoRA update on a scenario: adapter state after local training minus before."""
    import torch

    from fedge.adapters import adapter_state, inject_lora
    from fedge.scenario import load_scenario
    from fedge.state import subtract
    from fedge.training import train_epochs

    sc = load_scenario(scenario)
    model = inject_lora(sc.base_model(), list(sc.lora_targets), rank=rank, seed=seed)
    before = adapter_state(model)
    data = sc.client_data(partition, num_partitions)
    train_epochs(model, data.train, epochs=epochs, lr=lr, batch_size=batch_size, device=torch.device("cpu"),
                 seed=seed, task=sc.task)
    return subtract(adapter_state(model), before)


def run_defaults(codec: str) -> dict[str, Any]:
    """The parameters a `fedge run` gives `codec`: the default options of the method of that name, if any."""
    if codec not in available_methods():
        return {}
    options = get_method(codec).options()
    params = getattr(options, "codec_params", None)
    return dict(params()) if callable(params) else {}


def random_update(num_params: int = 10_000_000, *, tensors: int = 40, df: float = 3.0, scale: float = 1e-3,
                  seed: int = 0) -> Update:
    """A heavy-tailed synthetic update (Student-t, `df` degrees of freedom): `num_params` entries in
    `tensors` 2-D tensors of nearly equal size."""
    rng = np.random.default_rng(seed)
    tensors = max(1, min(tensors, num_params))
    out: Update = OrderedDict()
    for i in range(tensors):
        size = num_params // tensors + (1 if i < num_params % tensors else 0)
        cols = next(c for c in range(min(256, size), 0, -1) if size % c == 0)
        out[f"layer{i}.weight"] = (rng.standard_t(df, (size // cols, cols)) * scale).astype(np.float32)
    return out


def _seconds_per_call(fn: Callable[[], object], repeats: int, min_batch_s: float = 0.02) -> float:
    """Median seconds per call; each sample runs enough calls to last `min_batch_s` (small inputs)."""
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-7)
    calls = max(1, int(min_batch_s / once))
    samples = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls)
    return float(np.median(samples))


def _flat(update: Mapping[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(a, np.float32).reshape(-1) for a in update.values()])


def bench_update(label: str, update: Update, codecs: Sequence[str], *, repeats: int = 5,
                 codec_params: Mapping[str, Mapping[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Rows for one update: one per codec."""
    flat = _flat(update)
    raw = flat.nbytes
    scratch = np.empty_like(flat)
    memcpy_s = _seconds_per_call(lambda: np.copyto(scratch, flat), repeats)
    memcpy_mbps = raw / 1e6 / memcpy_s
    norm = float(np.linalg.norm(flat.astype(np.float64)))
    expected = expected_specs(update)
    rows = []
    for name in codecs:
        params = dict((codec_params or {}).get(name, {}))
        codec = build_codec(name, **params)
        encoded = codec.encode(update)
        decoded = codec.decode(encoded.payload, encoded.specs)
        envelope, _ = encode_update(update, codec)
        received = decode_update(envelope, expected, max_bytes=len(envelope))
        report = entropy_report(encoded)
        enc_s = _seconds_per_call(partial(codec.encode, update), repeats)
        dec_s = _seconds_per_call(partial(codec.decode, encoded.payload, encoded.specs), repeats)
        err = float(np.linalg.norm((flat - _flat(decoded)).astype(np.float64)))
        ec_bound = report["entropy_coded_bound_bytes"]
        rows.append({
            "update": label,
            "codec": name,
            "params": codec.params(),
            "num_params": int(flat.size),
            "raw_bytes": raw,
            "coded_bytes": encoded.nbytes,
            "envelope_bytes": len(envelope),
            "size_account_exact": encoded.accounted_bytes() == encoded.nbytes,
            "receiver_matches_sender": all(np.array_equal(received[k], decoded[k]) for k in decoded),
            "ratio": raw / encoded.nbytes,
            "envelope_ratio": raw / len(envelope),
            "bound_bytes": report["bound_bytes"],
            "coded_over_bound": report["coded_over_bound"],
            "entropy_coded_bytes": report["entropy_coded_bytes"],
            "entropy_coded_over_bound": report["entropy_coded_bytes"] / ec_bound if ec_bound else None,
            "sections": report["sections"],
            "rel_l2_error": err / norm if norm else 0.0,
            "encode_mbps": raw / 1e6 / enc_s,
            "decode_mbps": raw / 1e6 / dec_s,
            "memcpy_mbps": memcpy_mbps,
            "encode_vs_memcpy": memcpy_s / enc_s,
            "decode_vs_memcpy": memcpy_s / dec_s,
        })
    return rows


def run_codec_bench(
    codecs: Sequence[str] | None = None,
    *,
    random_params: int = 10_000_000,
    lora: bool = True,
    scenario: str = "digits-shift",
    lora_epochs: int = 1,
    repeats: int = 5,
    threads: int | None = 1,
    seed: int = 0,
    codec_params: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Benchmark every codec (default: all registered) on a LoRA update and a random one.

    `random_params=0` or `lora=False` skips that update. `threads` caps the
    BLAS/OpenMP pools during timing (1 = one core, None = leave as is). Codecs run
    with the run defaults' parameters unless `codec_params` names others.
    """
    from threadpoolctl import threadpool_limits

    names = list(codecs) if codecs else available_codecs()
    if codec_params is None:  # the settings a `fedge run` would use
        codec_params = {name: run_defaults(name) for name in names}
    updates: list[tuple[str, Update]] = []
    if lora:
        updates.append((f"lora:{scenario}", lora_update(scenario, epochs=lora_epochs, seed=seed)))
    if random_params > 0:
        updates.append((f"random-t3:{random_params}", random_update(random_params, seed=seed)))
    rows: list[dict[str, Any]] = []
    for label, update in updates:
        if threads is None:
            rows += bench_update(label, update, names, repeats=repeats, codec_params=codec_params)
        else:
            with threadpool_limits(limits=threads):
                rows += bench_update(label, update, names, repeats=repeats, codec_params=codec_params)
    return rows


def print_codec_bench(rows: Sequence[Mapping[str, Any]], console: Any = None) -> None:
    """Two rich tables, one row per (update, codec) in each: sizes and errors, then speeds (each fits a
    140-column terminal whole; one table of all columns was cut there)."""
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:  # piped to a file or a log: do not squeeze the tables to 80 columns
            console = Console(width=200)
    sizes = Table(title="fedge codecs: size (ratio: dense fp32 bytes / coded bytes; bound: the entropy bound)",
                  title_justify="left")
    for col, justify in [("update", "left"), ("codec", "left"), ("params", "left"), ("bytes", "right"),
                         ("ratio", "right"), ("coded/bound", "right"), ("ec/bound", "right"), ("rel L2 err", "right")]:
        sizes.add_column(col, justify=justify, overflow="fold")  # type: ignore[arg-type]
    speeds = Table(title="fedge codecs: speed (MB/s of fp32 input; x memcpy: codec speed / memcpy speed)",
                   title_justify="left")
    for col in ("update", "codec", "enc MB/s", "dec MB/s", "enc x memcpy", "dec x memcpy", "memcpy MB/s"):
        speeds.add_column(col, justify="left" if col in ("update", "codec") else "right", overflow="fold")
    for r in rows:
        ec = r["entropy_coded_over_bound"]
        sizes.add_row(
            r["update"], r["codec"], " ".join(f"{k}={v}" for k, v in r["params"].items()), f"{r['coded_bytes']:,}",
            f"{r['ratio']:.1f}x", f"{r['coded_over_bound']:.3f}", "-" if ec is None else f"{ec:.3f}",
            f"{r['rel_l2_error']:.3f}",
        )
        speeds.add_row(
            r["update"], r["codec"], f"{r['encode_mbps']:.0f}", f"{r['decode_mbps']:.0f}",
            f"{r['encode_vs_memcpy']:.3f}", f"{r['decode_vs_memcpy']:.3f}", f"{r['memcpy_mbps']:.0f}",
        )
    console.print(sizes)
    console.print(speeds)
