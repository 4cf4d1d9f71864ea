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
#: a causal-lm run's plot: perplexity (log scale) against uplink
PERPLEXITY_PLOT_FILE = "perplexity_vs_uplink.png"
MB = 1e6


@dataclass
class ClientEval:
    """One client's evaluation as counts: predictions (samples, or a causal LM's next tokens), correct ones, and
    the summed loss, for the global model and for the model the client serves (its personal one, if any)."""

    partition_id: int
    num_examples: int
    correct: int
    personal_correct: int
    loss_sum: float = math.nan
    personal_loss_sum: float = math.nan

    @property
    def personal_accuracy(self) -> float:
        return self.personal_correct / self.num_examples if self.num_examples else 0.0


@dataclass
class FleetAccuracy:
    accuracy: float
    personalized_accuracy: float
    bottom_decile_accuracy: float
    clients: int
    #: mean loss per prediction over the union of test splits (nan where clients report no loss)
    loss: float = math.nan
    personalized_loss: float = math.nan


def fleet_accuracy(evals: Sequence[ClientEval]) -> FleetAccuracy:
    """Global accuracy and loss on the union of test splits; personalized mean (sample-weighted) and bottom decile."""
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
        loss=sum(e.loss_sum for e in evals) / total,
        personalized_loss=sum(e.personal_loss_sum for e in evals) / total,
    )


def perplexity(mean_loss: float) -> float:
    """exp(total loss / total tokens); infinite where the loss overflows it."""
    return math.exp(mean_loss) if mean_loss < 700 else math.inf


def task_metrics(task: str, fleet: FleetAccuracy) -> dict[str, float]:
    """What a task reports beside accuracy: a causal LM's perplexity and personalized perplexity (lower is better;
    its accuracy is next-token accuracy)."""
    if task != "causal-lm":
        return {}
    return {"perplexity": perplexity(fleet.loss), "personalized_perplexity": perplexity(fleet.personalized_loss)}


def traffic(uplink: int, downlink: int, total_uplink: int, total_downlink: int) -> dict[str, float]:
    """A round's communication as federated fine-tuning reports it: MB (10^6 bytes) each way, and cumulative."""
    return {"uplink_mb": uplink / MB, "downlink_mb": downlink / MB,
            "cumulative_uplink_mb": total_uplink / MB, "cumulative_downlink_mb": total_downlink / MB}


def traffic_summary(uplink: int, downlink: int, rounds: int) -> dict[str, float]:
    """A run's communication: MB each way in all, and per round."""
    return {"uplink_mb": uplink / MB, "downlink_mb": downlink / MB,
            "uplink_mb_per_round": uplink / MB / max(rounds, 1), "downlink_mb_per_round": downlink / MB / max(rounds, 1)}


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
    out_dir: str | Path, *, scenario: dict[str, Any], base_accuracy: float, name: str, entry: dict[str, Any],
    base_metrics: dict[str, float] | None = None,
) -> Path:
    """Merge one method's outcome into results.json (other methods' entries are kept); `base_metrics` adds the
    base model's task metrics (a causal LM's perplexity) beside its accuracy."""
    results = load_results(out_dir)
    results["scenario"] = scenario
    results["base"] = {"accuracy": base_accuracy, **(base_metrics or {})}
    results.setdefault("methods", {})[name] = entry
    return write_results(out_dir, results)


@dataclass
class PlotSeries:
    method: str
    label: str
    uplink_mb: list[float]
    accuracy: list[float]
    personalized: bool = False


def is_causal_lm(results: dict[str, Any]) -> bool:
    return results.get("scenario", {}).get("task") == "causal-lm"


def metric_series(results: dict[str, Any], metric: str = "accuracy") -> list[PlotSeries]:
    """Per method: `metric` against cumulative uplink, from the base model on; a personalized method also gets its
    personalized value (where it differs from the global model's). `PlotSeries.accuracy` holds the metric."""
    start = results.get("base", {}).get(metric, float("nan"))
    series = []
    for name, entry in results.get("methods", {}).items():
        rounds = entry.get("rounds", [])
        xs = [0.0, *(b / MB for b in itertools.accumulate(r["uplink_bytes"] for r in rounds))]
        series.append(PlotSeries(name, name, xs, [start, *(r.get(metric, float("nan")) for r in rounds)]))
        personal = [r.get(f"personalized_{metric}", r.get(metric)) for r in rounds]
        if any(p != r.get(metric) for p, r in zip(personal, rounds, strict=True)):
            series.append(PlotSeries(name, f"{name} (personalized)", xs, [start, *personal], personalized=True))
    return series


def accuracy_series(results: dict[str, Any]) -> list[PlotSeries]:
    """Per method: accuracy against cumulative uplink (see `metric_series`)."""
    return metric_series(results, "accuracy")


def plot_results(results: dict[str, Any], out_dir: str | Path) -> Path:
    """The run's plot: perplexity against uplink for a causal LM, else accuracy against uplink."""
    if is_causal_lm(results):
        return plot_metric_vs_uplink(results, Path(out_dir) / PERPLEXITY_PLOT_FILE, "perplexity")
    return plot_accuracy_vs_uplink(results, Path(out_dir) / PLOT_FILE)


def plot_accuracy_vs_uplink(results: dict[str, Any], path: str | Path) -> Path:
    return plot_metric_vs_uplink(results, path, "accuracy")


def plot_metric_vs_uplink(results: dict[str, Any], path: str | Path, metric: str) -> Path:
    """One line per method (a personalized one dashed beside it), the base model as a grey line; perplexity on a
    log scale (lower is better)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = metric_series(results, metric)
    colors: dict[str, str] = {}
    for line in series:  # a personalized line takes its method's colour, dashed
        if line.personalized:
            ax.plot(line.uplink_mb, line.accuracy, marker="s", linestyle="--", color=colors.get(line.method),
                    label=line.label)
        else:
            (drawn,) = ax.plot(line.uplink_mb, line.accuracy, marker="o", label=line.label)
            colors[line.method] = drawn.get_color()
    personalized_methods = any(line.personalized for line in series)
    base = results.get("base", {}).get(metric)
    if base is not None:
        ax.axhline(base, color="grey", linestyle="--", linewidth=1, label="base model")
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xlim(left=0)
    ax.set_xlabel("cumulative uplink (MB, wire bytes)")
    if metric == "perplexity":
        ax.set_yscale("log")
        ax.set_ylabel("held-out perplexity (target domain, lower is better)")
    else:
        ax.set_ylabel("accuracy (target domain)" if personalized_methods else "global accuracy (target domain)")
    ax.set_title(f"{results.get('scenario', {}).get('name', '')}: {metric} vs uplink")
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
    lm = any("perplexity" in r for r in rows)
    columns = ["round", "accuracy", "personalized", *(("perplexity", "pers. ppl") if lm else ()),
               "uplink MB", "cum. up MB", "downlink MB", "cum. down MB", "clients"]
    for col in columns:
        table.add_column(col, justify="right")
    up = down = 0
    for r in rows:
        up, down = up + r["uplink_bytes"], down + r["downlink_bytes"]
        ppl = (f"{r['perplexity']:.2f}", f"{r['personalized_perplexity']:.2f}") if lm else ()
        table.add_row(str(r["round"]), f"{r['accuracy']:.4f}", f"{r['personalized_accuracy']:.4f}", *ppl,
                      f"{r['uplink_bytes'] / MB:.3f}", f"{up / MB:.3f}", f"{r['downlink_bytes'] / MB:.3f}",
                      f"{down / MB:.3f}", str(r["clients"]))
    return table


def round_line(name: str, row: dict[str, Any]) -> str:
    """One round's report line: the task's figures and the traffic of the round and so far, each way."""
    quality = (f"ppl {row['perplexity']:.2f} (pers. {row['personalized_perplexity']:.2f}), next-token acc "
               f"{row['accuracy']:.4f}" if "perplexity" in row else f"acc {row['accuracy']:.4f}")
    return (f"{name} round {row['round']}: {quality} | up {row['uplink_bytes'] / MB:.3f} MB "
            f"(cum. {row['cumulative_uplink_mb']:.3f}) | down {row['downlink_bytes'] / MB:.3f} MB "
            f"(cum. {row['cumulative_downlink_mb']:.3f})")


def final_table(results: dict[str, Any]) -> Table:
    base = results["base"]["accuracy"]
    lm = is_causal_lm(results)
    if lm:
        title = f"final (base model perplexity {results['base']['perplexity']:.2f}, next-token accuracy {base:.4f})"
    else:
        title = f"final (base model accuracy {base:.4f})"
    table = Table(title=title, title_justify="left")
    quality = ("perplexity", "vs base", "personalized ppl", "next-token acc") if lm else (
        "accuracy", "vs base", "personalized", "bottom decile")
    for col in ("method", *quality, "uplink MB", "downlink MB", "trainable", "seconds"):
        table.add_column(col, justify="right")
    for name, entry in results["methods"].items():
        f = entry["final"]
        if lm:
            change = f["perplexity"] / results["base"]["perplexity"] - 1
            cells = (f"{f['perplexity']:.2f}", f"{100 * change:+.1f}%", f"{f['personalized_perplexity']:.2f}",
                     f"{f['accuracy']:.4f}")
        else:
            cells = (f"{f['accuracy']:.4f}", f"{100 * (f['accuracy'] - base):+.1f} pt",
                     f"{f['personalized_accuracy']:.4f}", f"{f['bottom_decile_accuracy']:.4f}")
        table.add_row(name, *cells, f"{f['uplink_bytes'] / MB:.3f}", f"{f['downlink_bytes'] / MB:.3f}",
                      f"{f['trainable_params']:,} ({100 * f['trainable_params'] / f['total_params']:.1f}%)",
                      f"{f['seconds']:.1f}")
    return table
