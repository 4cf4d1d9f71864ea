"""Aggregation benchmark: the server's decode-and-aggregate path against Flower's stock FedAvg, on one core.

Each codec's envelopes go through `CompressedFedAvg.aggregate_train`, the code
the compressed strategies run (it folds every envelope into
`fedge.aggregation.StreamingMean`); Flower's `FedAvg.aggregate_train` gets the
same updates as dense fp32 `ArrayRecord`s. Replies arrive as a stream, one
`Message` built from fresh wire bytes as it is read, as they would come off
the network; Flower's FedAvg collects the stream into a list before it
averages, fedge folds each reply in and drops it.

Every (path, client count) runs in its own process pinned to one CPU core with
one numeric thread. Times are the median over rounds, wall clock and CPU (the
CPU time is what to compare on a machine shared with other work). Peak memory
is measured in one more, untimed round under `tracemalloc` (Python objects and
numpy buffers): the most allocated at once while aggregating, beyond what was
allocated before. `stream CPU s` is the time to build the replies alone, part of
every path's time. The updates are `distinct`
random heavy-tailed updates (Student-t) encoded once and sent again and again:
decoding costs the same whether or not two clients sent the same bytes.

    fedge bench aggregate --clients 1000 --params 1000000 --codecs dense,fedzip,flasc,q8
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Iterator, Sequence
from typing import Any

FLOWER = "flower-fedavg"
#: the baseline of the ratio column
FLOWER_LABEL = "Flower FedAvg (dense ArrayRecord)"


def _fresh(data: bytes) -> bytes:
    """A new copy of `data`, as a reply read off the wire holds (`bytes(b)` would hand back `b` itself)."""
    return bytes(memoryview(data))


def _replies(path: str, clients: int, payloads: Sequence[Any], weight_of: Sequence[float]) -> Iterator[Any]:
    """One reply Message per client, built from a fresh copy of its bytes when it is read."""
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

    from fedge.messages import ARRAYS_RECORD, METRICS_RECORD, UPDATE_RECORD, envelope_record

    for i in range(clients):
        payload = payloads[i % len(payloads)]
        metrics = MetricRecord({"num-examples": weight_of[i % len(weight_of)], "partition-id": i})
        if path == FLOWER:
            arrays = ArrayRecord({k: Array(dtype=a.dtype, shape=a.shape, stype=a.stype, data=_fresh(a.data))
                                  for k, a in payload.items()})
            content = RecordDict({ARRAYS_RECORD: arrays, METRICS_RECORD: metrics})
        else:
            content = RecordDict({UPDATE_RECORD: envelope_record(_fresh(payload)), METRICS_RECORD: metrics})
        request = Message(RecordDict(), dst_node_id=i + 1, message_type="train")
        yield Message(content, reply_to=request)


def measure(path: str, clients: int, params: int, *, rounds: int, distinct: int, seed: int = 0) -> dict[str, Any]:
    """One path at one client count, in this process: seconds per round (median), stream time, peak memory."""
    import numpy as np
    from flwr.serverapp.strategy import FedAvg
    from flwr.supercore.task_identity import TaskIdentity

    from fedge.codecs import build_codec
    from fedge.envelope import encode_update
    from fedge.methods.compressed import CompressedFedAvg
    from fedge.sim.bench_codecs import random_update, run_defaults
    from fedge.state import to_record

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0  # a ServerApp's identity, as Flower sets
    updates = [random_update(params, seed=seed + i) for i in range(distinct)]
    weights = [float(20 + 7 * i) for i in range(distinct)]
    if path == FLOWER:
        payloads: list[Any] = [to_record(u) for u in updates]
        strategy: Any = FedAvg()
    else:
        codec = build_codec(path, **run_defaults(path))
        payloads = [encode_update(u, codec)[0] for u in updates]
        strategy = CompressedFedAvg(max_update_bytes=1 << 31)
        strategy.round_start = {k: np.zeros_like(v) for k, v in updates[0].items()}
    envelope_bytes = len(payloads[0]) if path != FLOWER else sum(len(a.data) for a in payloads[0].values())
    del updates
    gc.collect()
    wall, cpu = [], []
    for _ in range(rounds):
        start, start_cpu = time.perf_counter(), time.process_time()
        arrays, _ = strategy.aggregate_train(1, _replies(path, clients, payloads, weights))
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
        assert arrays is not None
        del arrays
        gc.collect()
    start = time.process_time()
    for _ in _replies(path, clients, payloads, weights):
        pass
    stream_s = time.process_time() - start
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    strategy.aggregate_train(1, _replies(path, clients, payloads, weights))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"path": path, "clients": clients, "params": params, "rounds": rounds, "reply_bytes": envelope_bytes,
            "seconds": float(np.median(wall)), "cpu_seconds": float(np.median(cpu)), "stream_cpu_seconds": stream_s,
            "peak_extra_bytes": peak - before}


def _pin_one_core() -> dict[str, str]:
    """Environment of a child that uses one numeric thread (it also pins itself to one core)."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
        env[var] = "1"
    return env


def run_aggregate_bench(paths: Sequence[str], client_counts: Sequence[int], params: int, *, rounds: int = 3,
                        distinct: int = 8, on_result: Any = None) -> list[dict[str, Any]]:
    """Every path at every client count, each in its own process on one core; the rows, in that order."""
    rows = []
    for clients in client_counts:
        for path in paths:
            cmd = [sys.executable, "-m", "fedge.sim.bench_aggregate", json.dumps(
                {"path": path, "clients": clients, "params": params, "rounds": rounds, "distinct": distinct})]
            done = subprocess.run(cmd, env=_pin_one_core(), capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"aggregation bench of {path} x {clients} failed:\n{done.stderr[-3000:]}")
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(row)
            if on_result is not None:
                on_result(row)
    return rows


def with_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each row's time against Flower's FedAvg at the same client count (above 1: faster than Flower)."""
    flower = {r["clients"]: r for r in rows if r["path"] == FLOWER}
    for r in rows:
        base = flower.get(r["clients"])
        r["vs_flower"] = base["seconds"] / r["seconds"] if base and r["seconds"] > 0 else None
        r["vs_flower_cpu"] = base["cpu_seconds"] / r["cpu_seconds"] if base and r["cpu_seconds"] > 0 else None
    return rows


def print_aggregate_bench(rows: list[dict[str, Any]], console: Any) -> None:
    from rich.table import Table

    params = rows[0]["params"] if rows else 0
    table = Table(title=f"decode and aggregate one round of {params:,}-parameter updates, one core (median of "
                        "rounds; ratio: Flower's time / this path's, above 1 is faster)", title_justify="left")
    for col in ("path", "clients", "reply KB", "s / round", "CPU s / round", "stream CPU s", "vs Flower (CPU)",
                "vs Flower (wall)", "peak extra MB"):
        table.add_column(col, justify="right")

    def ratio(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}x"

    for r in rows:
        table.add_row(FLOWER_LABEL if r["path"] == FLOWER else f"fedge {r['path']}", str(r["clients"]),
                      f"{r['reply_bytes'] / 1e3:.1f}", f"{r['seconds']:.2f}", f"{r['cpu_seconds']:.2f}",
                      f"{r['stream_cpu_seconds']:.2f}", ratio(r.get("vs_flower_cpu")), ratio(r.get("vs_flower")),
                      f"{r['peak_extra_bytes'] / 1e6:.1f}")
    console.print(table)
    counts = sorted({r["clients"] for r in rows})
    if len(counts) > 1:
        low, high = counts[0], counts[-1]
        for path in dict.fromkeys(r["path"] for r in rows):
            a = next(r for r in rows if r["path"] == path and r["clients"] == low)
            b = next(r for r in rows if r["path"] == path and r["clients"] == high)
            growth = b["peak_extra_bytes"] / max(a["peak_extra_bytes"], 1)
            console.print(f"{path}: {low} -> {high} clients ({high / low:.0f}x): CPU time "
                          f"x{b['cpu_seconds'] / a['cpu_seconds']:.1f}, "
                          f"peak extra memory {a['peak_extra_bytes'] / 1e6:.1f} -> {b['peak_extra_bytes'] / 1e6:.1f} MB "
                          f"(x{growth:.1f})")


def main() -> None:
    """Child process: one measurement, printed as one JSON line."""
    job = json.loads(sys.argv[1])
    try:
        os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
    except (AttributeError, OSError):
        pass  # not Linux: the thread caps still hold
    print(json.dumps(measure(job["path"], job["clients"], job["params"], rounds=job["rounds"],
                             distinct=job["distinct"])))


if __name__ == "__main__":
    main()
