"""results.json, the contract runs are compared by, its tables and its plot."""

from __future__ import annotations

import itertools
import json
import math
import time
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


def method_results(*, scenario: dict[str, Any], base_accuracy: float, name: str, entry: dict[str, Any],
                   into: dict[str, Any] | None = None) -> dict[str, Any]:
    """results.json's content with one method's entry added (to `into`, one run's results so far, or a new one)."""
    results = into if into is not None else {"scenario": {}, "base": {}, "methods": {}}
    results["scenario"] = scenario
    results["base"] = {"accuracy": base_accuracy}
    results.setdefault("methods", {})[name] = entry
    return results


def set_aside(out_dir: str | Path) -> Path | None:
    """Move an earlier run's results.json out of the way (`results.<its time>.json`), so no run merges into it."""
    path = Path(out_dir) / RESULTS_FILE
    if not path.exists():
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))
    kept = path.with_name(f"results.{stamp}.json")
    n = 1
    while kept.exists():
        kept, n = path.with_name(f"results.{stamp}-{n}.json"), n + 1
    path.rename(kept)
    return kept


@dataclass
class PlotSeries:
    method: str
    label: str
    uplink_mb: list[float]
    accuracy: list[float]
    personalized: bool = False


def accuracy_series(results: dict[str, Any]) -> list[PlotSeries]:
    """Per method: accuracy after each round against the cumulative uplink so far; a personalized method
    also gets its personalized accuracy (where it differs from the global model's). The base model, at
    zero uplink, is the plot's horizontal line rather than a point (zero has no place on a log axis)."""
    series = []
    for name, entry in results.get("methods", {}).items():
        rounds = entry.get("rounds", [])
        xs = [b / 1e6 for b in itertools.accumulate(r["uplink_bytes"] for r in rounds)]
        series.append(PlotSeries(name, name, xs, [r["accuracy"] for r in rounds]))
        personal = [r.get("personalized_accuracy", r["accuracy"]) for r in rounds]
        if any(p != r["accuracy"] for p, r in zip(personal, rounds, strict=True)):
            series.append(PlotSeries(name, f"{name} (personalized)", xs, personal, personalized=True))
    return series


def accuracy_figure(results: dict[str, Any]) -> Any:
    """The accuracy-vs-uplink figure (matplotlib): a log uplink axis whose limits hold every point."""
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
        ax.axhline(base, color="grey", linestyle="--", linewidth=1, label="base model (no uplink)")
    xs = [x for line in series for x in line.uplink_mb if x > 0]
    if xs:
        ax.set_xscale("log")
        ax.set_xlim(min(xs) / 1.5, max(xs) * 1.5)  # a margin on both sides: no marker is cut at the edge
    ax.set_xlabel("cumulative uplink (MB, wire bytes; log scale)")
    ax.set_ylabel("accuracy (target domain)" if personalized_methods else "global accuracy (target domain)")
    ax.set_title(f"{results.get('scenario', {}).get('name', '')}: accuracy vs uplink")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    return fig


def plot_accuracy_vs_uplink(results: dict[str, Any], path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    fig = accuracy_figure(results)
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
