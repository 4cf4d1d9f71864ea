"""Fleet benchmark: a deployed round against a simulated round of the same configuration, in one run.

The same federation (method, clients, rounds, local epochs, seed) runs under
Flower's simulation runtime and on a local deployment (a SuperLink and one
SuperNode per client on loopback, `fedge.server.local_deployment`), one after
the other, as often as asked (alternating, so a change in the machine's load
hits both). Reported per mode: the median round (training plus evaluation, the
rows' `round_seconds`), its ratio to the simulated one, and the per-message
overhead (median and max; `fedge.message_timing`). The deployed modes are
`process` (a long-lived ClientApp process per SuperNode, fedge's default) and
`subprocess` (Flower's stock process per message, for comparison).
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

SIMULATION = "simulation"
MODES = (SIMULATION, "process", "subprocess")


def run_mode(mode: str, config: dict[str, Any], clients: int, workdir: Path) -> dict[str, Any]:
    """One federation in `mode`; the method's results entry (with `deployment` for a deployed mode)."""
    from fedge.results import load_results

    out = workdir / "out"
    config = {**config, "out-dir": str(out), "num-clients": clients, "checkpoint": "fresh"}
    if mode == SIMULATION:
        from fedge.sim.runner import simulate

        simulate(config)
        results = load_results(out)
    else:
        from fedge.server.local_deployment import run_local

        results = run_local(workdir / "deployment", clients, config, isolation=mode)
    entry = dict(results["methods"][config["method"]])
    entry["deployment"] = results.get("deployment", {})
    log = out / f"messages-{config['method']}.jsonl"
    entry["messages"] = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return entry


def summarise_mode(mode: str, entries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Median round and per-message overhead over every run of one mode."""
    rounds = [r["round_seconds"] for e in entries for r in e["rounds"]]
    messages = [m for e in entries for m in e["messages"]]
    if not messages:
        raise RuntimeError(f"{mode}: no message carried its timing")
    return {
        "mode": mode,
        "runs": len(entries),
        "round_s_median": statistics.median(rounds),
        "round_s": rounds,
        "messages": len(messages),
        "overhead_s_median": statistics.median(m["overhead_s"] for m in messages),
        "overhead_s_max": max(m["overhead_s"] for m in messages),
        "push_to_work_s_median": statistics.median(m["push_to_work_s"] for m in messages),
        "work_to_reply_s_median": statistics.median(m["work_to_reply_s"] for m in messages),
        "work_s_median": statistics.median(m["work_s"] for m in messages),
        "most_messages_per_process": max(m["process_messages"] for m in messages),
        "accuracy": [e["final"]["accuracy"] for e in entries],
    }


def bench_fleet(method: str = "fedzip", clients: int = 3, rounds: int = 3, local_epochs: int = 1,
                repeats: int = 1, modes: Sequence[str] = (SIMULATION, "process"), workdir: Path | None = None,
                on_step: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run each mode `repeats` times, alternating; per-mode summaries and each deployed mode's ratio to simulation."""
    unknown = [m for m in modes if m not in MODES]
    if unknown or SIMULATION not in modes:
        raise ValueError(f"modes must include {SIMULATION!r} and come from {MODES}; got {list(modes)}")
    workdir = Path(workdir or tempfile.mkdtemp(prefix="fedge-bench-fleet-"))
    config = {"method": method, "num-server-rounds": rounds, "local-epochs": local_epochs}
    load_before = os.getloadavg()
    started = time.perf_counter()
    entries: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    for repeat in range(repeats):
        for mode in modes:
            if on_step is not None:
                on_step(f"{mode} (run {repeat + 1} of {repeats})")
            entries[mode].append(run_mode(mode, config, clients, workdir / f"{mode}-{repeat}"))
    summaries = [summarise_mode(m, entries[m]) for m in modes]
    simulated = summaries[0]["round_s_median"]
    for s in summaries:
        s["round_ratio_vs_simulation"] = s["round_s_median"] / simulated
    return {
        "config": {**config, "clients": clients, "repeats": repeats},
        "modes": summaries,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "cpus": os.cpu_count(),
        "seconds": time.perf_counter() - started,
        "workdir": str(workdir),
    }


def print_fleet_bench(result: dict[str, Any], console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=140)
    c = result["config"]
    table = Table(title=f"{c['method']}, {c['clients']} clients, {c['num-server-rounds']} rounds, "
                        f"{c['local-epochs']} local epoch(s), {c['repeats']} run(s) per mode", title_justify="left")
    for col in ("mode", "round s (median)", "vs simulation", "overhead s median", "overhead s max", "push->work s",
                "work->reply s", "work s", "messages per process", "accuracy"):
        table.add_column(col, justify="right")
    for s in result["modes"]:
        table.add_row(s["mode"], f"{s['round_s_median']:.2f}", f"{s['round_ratio_vs_simulation']:.2f}x",
                      f"{s['overhead_s_median']:.2f}", f"{s['overhead_s_max']:.2f}", f"{s['push_to_work_s_median']:.2f}",
                      f"{s['work_to_reply_s_median']:.2f}", f"{s['work_s_median']:.2f}",
                      str(s["most_messages_per_process"]), " ".join(f"{a:.4f}" for a in s["accuracy"]))
    console.print(table)
    before, after = result["load_average_before"], result["load_average_after"]
    console.print(f"{result['cpus']} CPUs; load average {before[0]:.1f} before, {after[0]:.1f} after "
                  f"({result['seconds']:.0f} s in all; runs under {result['workdir']})")
