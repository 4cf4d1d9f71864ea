"""results.json, the contract runs are compared by, its tables and its plot."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.table import Table

from fedge.atomic_file import atomic_write

RESULTS_FILE = "results.json"
PLOT_FILE = "accuracy_vs_uplink.png"


@dataclass
class ClientEval:
    partition_id: int
    num_examples: int
    correct: int
    personal_correct: int

    @property
    def personal_accuracy(self) -> float:
        return self.personal_correct / self.num_examples if self.num_examples else 0.0


@dataclass
class FleetAccuracy:
    accuracy: float
    personalized_accuracy: float
    bottom_decile_accuracy: float
    clients: int


def fleet_accuracy(evals: Sequence[ClientEval]) -> FleetAccuracy:
    """Global accuracy on the union of test splits; personalized mean (sample-weighted) and bottom decile."""
    total = sum(e.num_examples for e in evals)
    if not total:
        return FleetAccuracy(0.0, 0.0, 0.0, 0)
    per_client = sorted(e.personal_accuracy for e in evals)
    worst = per_client[: max(1, math.ceil(0.1 * len(per_client)))]
    return FleetAccuracy(
        accuracy=sum(e.correct for e in evals) / total,
        personalized_accuracy=sum(e.personal_correct for e in evals) / total,
        bottom_decile_accuracy=sum(worst) / len(worst),
        clients=len(evals),
    )


def load_results(out_dir: str | Path) -> dict[str, Any]:
    path = Path(out_dir) / RESULTS_FILE
    if path.exists():
        return json.loads(path.read_text())
    return {"scenario": {}, "base": {}, "methods": {}}


def write_results(out_dir: str | Path, results: dict[str, Any]) -> Path:
    path = Path(out_dir) / RESULTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(results, indent=2).encode())
    return path


def record_method(
    out_dir: str | Path, *, scenario: dict[str, Any], base_accuracy: float, name: str, entry: dict[str, Any]
) -> Path:
    """Merge one method's outcome into results.json (other methods' entries are kept)."""
    results = load_results(out_dir)
    results["scenario"] = scenario
    results["base"] = {"accuracy": base_accuracy}
    results.setdefault("methods", {})[name] = entry
    return write_results(out_dir, results)


@dataclass
class PlotSeries:
    method: str
    label: str
    uplink_mb: list[float]
    accuracy: list[float]
    personalized: bool = False


def accuracy_series(results: dict[str, Any]) -> list[PlotSeries]:
    """Per method: accuracy against cumulative uplink, from the base model on; a personalized method also
    gets its personalized accuracy (where it differs from the global model's)."""
    start = results.get("base", {}).get("accuracy", float("nan"))
    series = []
    for name, entry in results.get("methods", {}).items():
        rounds = entry.get("rounds", [])
        xs = [0.0, *(b / 1e6 for b in itertools.accumulate(r["uplink_bytes"] for r in rounds))]
        series.append(PlotSeries(name, name, xs, [start, *(r["accuracy"] for r in rounds)]))
        personal = [r.get("personalized_accuracy", r["accuracy"]) for r in rounds]
        if any(p != r["accuracy"] for p, r in zip(personal, rounds, strict=True)):
            series.append(PlotSeries(name, f"{name} (personalized)", xs, [start, *personal], personalized=True))
    return series


def plot_accuracy_vs_uplink(results: dict[str, Any], path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = accuracy_series(results)
    colors: dict[str, str] = {}
    for line in series:  # a personalized line takes its method's colour, dashed
        if line.personalized:
            ax.plot(line.uplink_mb, line.accuracy, marker="s", linestyle="--", color=colors.get(line.method),
                    label=line.label)
        else:
            (drawn,) = ax.plot(line.uplink_mb, line.accuracy, marker="o", label=line.label)
            colors[line.method] = drawn.get_color()
    personalized_methods = any(line.personalized for line in series)
    base = results.get("base", {}).get("accuracy")
    if base is not None:
        ax.axhline(base, color="grey", linestyle="--", linewidth=1, label="base model")
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xlim(left=0)
    ax.set_xlabel("cumulative uplink (MB, wire bytes)")
    ax.set_ylabel("accuracy (target domain)" if personalized_methods else "global accuracy (target domain)")
    ax.set_title(f"{results.get('scenario', {}).get('name', '')}: accuracy vs uplink")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


# ---- tables ---------------------------------------------------------------------------------


def round_table(name: str, rows: list[dict[str, Any]]) -> Table:
    table = Table(title=f"{name}: per round", title_justify="left")
    for col in ("round", "accuracy", "personalized", "uplink KB", "downlink KB", "clients"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["round"]), f"{r['accuracy']:.4f}", f"{r['personalized_accuracy']:.4f}",
                      f"{r['uplink_bytes'] / 1e3:.1f}", f"{r['downlink_bytes'] / 1e3:.1f}", str(r["clients"]))
    return table


def final_table(results: dict[str, Any]) -> Table:
    base = results["base"]["accuracy"]
    table = Table(title=f"final (base model accuracy {base:.4f})", title_justify="left")
    for col in ("method", "accuracy", "vs base", "personalized", "bottom decile", "uplink MB", "downlink MB",
                "trainable", "seconds"):
        table.add_column(col, justify="right")
    for name, entry in results["methods"].items():
        f = entry["final"]
        table.add_row(name, f"{f['accuracy']:.4f}", f"{100 * (f['accuracy'] - base):+.1f} pt",
                      f"{f['personalized_accuracy']:.4f}", f"{f['bottom_decile_accuracy']:.4f}",
                      f"{f['uplink_bytes'] / 1e6:.3f}", f"{f['downlink_bytes'] / 1e6:.3f}",
                      f"{f['trainable_params']:,} ({100 * f['trainable_params'] / f['total_params']:.1f}%)",
                      f"{f['seconds']:.1f}")
    return table
