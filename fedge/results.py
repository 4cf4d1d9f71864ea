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


# ---- several seeds: per-seed finals, mean and 95% interval, the comparison with the reference method ---------------

#: final figures summarized over seeds (perplexity only where the scenario reports it)
SUMMARY_FIELDS = ("accuracy", "personalized_accuracy", "bottom_decile_accuracy", "perplexity", "uplink_bytes",
                  "downlink_bytes")
#: figures a comparison judges, and whether more is better
COMPARED = {"accuracy": True, "personalized_accuracy": True, "bottom_decile_accuracy": True, "perplexity": False}


def mean_ci95(values: Sequence[float]) -> dict[str, Any]:
    """Mean and the half-width of its 95% confidence interval: Student's t over the n values (none for one value)."""
    from scipy import stats

    n = len(values)
    mean = math.fsum(values) / n
    if n < 2:
        return {"mean": mean, "ci95": None, "std": None, "n": n}
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    return {"mean": mean, "ci95": float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n), "std": std, "n": n}


def summarize(finals: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Mean and 95% interval of each SUMMARY_FIELDS figure that every final has."""
    return {f: mean_ci95([float(x[f]) for x in finals]) for f in SUMMARY_FIELDS if finals and all(f in x for x in finals)}


def _mean_rows(runs: Sequence[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Round by round over seeds: the mean of each number, and the 95% interval of the accuracies."""
    rows = []
    for same_round in zip(*runs, strict=False):
        row: dict[str, Any] = {}
        for key, value in same_round[0].items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and all(key in r for r in same_round):
                stats = mean_ci95([float(r[key]) for r in same_round])
                row[key] = stats["mean"]
                if key in COMPARED:
                    row[f"{key}_ci95"] = stats["ci95"]
        row["round"] = same_round[0]["round"]
        rows.append(row)
    return rows


def combine_seeds(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """One results.json from several seeds' (each a whole single-seed results.json).

    `methods.NAME.seeds` holds each seed's final figures, `methods.NAME.summary` their mean and 95% interval,
    `final` and `rounds` the means (so readers of a single seed's shape still work), `description` what the
    method is; `base` the base model's accuracy over seeds.
    """
    seeds = list(per_seed)
    first = per_seed[seeds[0]]
    methods: dict[str, Any] = {}
    for name, entry in first.get("methods", {}).items():
        ran = [s for s in seeds if name in per_seed[s].get("methods", {})]
        finals = [per_seed[s]["methods"][name]["final"] for s in ran]
        numbers = [k for k, v in finals[0].items() if isinstance(v, (int, float)) and all(k in f for f in finals)]
        methods[name] = {
            "description": entry.get("summary", ""),
            "summary": summarize(finals),
            "seeds": {str(s): f for s, f in zip(ran, finals, strict=True)},
            "final": {k: mean_ci95([float(f[k]) for f in finals])["mean"] for k in numbers},
            "rounds": _mean_rows([per_seed[s]["methods"][name].get("rounds", []) for s in ran]),
        }
    base = {str(s): per_seed[s].get("base", {}).get("accuracy") for s in seeds}
    known = [v for v in base.values() if v is not None]
    base_stats = mean_ci95(known) if known else {"mean": None, "ci95": None}
    return {"scenario": first.get("scenario", {}),
            "base": {"accuracy": base_stats["mean"], "ci95": base_stats["ci95"], "seeds": base},
            "methods": methods}


def figure(entry: dict[str, Any], field: str) -> dict[str, Any] | None:
    """A method's final figure as mean and interval: its summary over seeds, else its one final value."""
    if isinstance(entry.get("summary"), dict) and field in entry["summary"]:
        return dict(entry["summary"][field])
    if field in entry.get("final", {}):
        return mean_ci95([float(entry["final"][field])])
    return None


def verdict(ours: dict[str, Any], reference: dict[str, Any], higher_is_better: bool = True) -> str:
    """`within noise` when the two 95% intervals overlap, else `better` or `worse`; without intervals, say so."""
    if ours["ci95"] is None or reference["ci95"] is None:
        return "no interval (one seed)"
    if abs(ours["mean"] - reference["mean"]) <= ours["ci95"] + reference["ci95"]:
        return "within noise"
    return "better" if (ours["mean"] > reference["mean"]) == higher_is_better else "worse"


def compare_to_reference(results: dict[str, Any]) -> dict[str, Any]:
    """Each method against the first one: differences of the compared figures with a verdict, and how many times
    fewer bytes (uplink plus downlink) it moved."""
    methods = results.get("methods", {})
    if not methods:
        return {}
    reference = next(iter(methods))
    ref = methods[reference]
    out: dict[str, Any] = {"reference": reference, "methods": {}}
    for name, entry in methods.items():
        if name == reference:
            continue
        row: dict[str, Any] = {}
        for field, higher in COMPARED.items():
            ours, theirs = figure(entry, field), figure(ref, field)
            if ours is not None and theirs is not None:
                row[field] = {"difference": ours["mean"] - theirs["mean"], "verdict": verdict(ours, theirs, higher)}
        ours_total = entry["final"]["uplink_bytes"] + entry["final"]["downlink_bytes"]
        ref_total = ref["final"]["uplink_bytes"] + ref["final"]["downlink_bytes"]
        row["total_bytes_ratio"] = ref_total / ours_total if ours_total else None
        out["methods"][name] = row
    return out


# ---- the plot ---------------------------------------------------------------------------------------------------


@dataclass
class PlotSeries:
    method: str
    label: str
    uplink_mb: list[float]
    accuracy: list[float]
    personalized: bool = False
    #: 95% interval half-widths over seeds (None: one seed)
    errors: list[float] | None = None
    #: cumulative uplink plus downlink
    total_mb: list[float] | None = None


def accuracy_series(results: dict[str, Any]) -> list[PlotSeries]:
    """Per method: accuracy after each round against the cumulative uplink (and uplink plus downlink) so far; a
    personalized method also gets its personalized accuracy (where it differs from the global model's). Over
    several seeds the points are means and carry their 95% intervals. The base model, at zero bytes, is the
    plot's horizontal line rather than a point (zero has no place on a log axis)."""
    series = []
    for name, entry in results.get("methods", {}).items():
        rounds = entry.get("rounds", [])
        xs = [b / 1e6 for b in itertools.accumulate(r["uplink_bytes"] for r in rounds)]
        totals = [b / 1e6 for b in itertools.accumulate(r["uplink_bytes"] + r.get("downlink_bytes", 0) for r in rounds)]

        def errors(key: str, rounds: list[dict[str, Any]] = rounds) -> list[float] | None:
            if not rounds or rounds[0].get(f"{key}_ci95") is None:
                return None
            return [r[f"{key}_ci95"] or 0.0 for r in rounds]

        series.append(PlotSeries(name, name, xs, [r["accuracy"] for r in rounds], errors=errors("accuracy"),
                                 total_mb=totals))
        personal = [r.get("personalized_accuracy", r["accuracy"]) for r in rounds]
        if any(p != r["accuracy"] for p, r in zip(personal, rounds, strict=True)):
            series.append(PlotSeries(name, f"{name} (personalized)", xs, personal, personalized=True,
                                     errors=errors("personalized_accuracy"), total_mb=totals))
    return series


def accuracy_figure(results: dict[str, Any]) -> Any:
    """The accuracy-vs-uplink figure (matplotlib): a log uplink axis whose limits hold every point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = accuracy_series(results)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
    seeds = results.get("run", {}).get("seeds") or []
    for ax, total in zip(axes, (False, True), strict=True):
        colors: dict[str, str] = {}
        for line in series:  # a personalized line takes its method's colour, dashed
            xs = line.total_mb if total and line.total_mb is not None else line.uplink_mb
            style = {"marker": "s", "linestyle": "--", "color": colors.get(line.method)} if line.personalized \
                else {"marker": "o"}
            if line.errors is None:
                (drawn,) = ax.plot(xs, line.accuracy, label=line.label, **style)
            else:
                drawn = ax.errorbar(xs, line.accuracy, yerr=line.errors, capsize=3, label=line.label, **style).lines[0]
            if not line.personalized:
                colors[line.method] = drawn.get_color()
        base = results.get("base", {}).get("accuracy")
        if base is not None:
            ax.axhline(base, color="grey", linestyle="--", linewidth=1, label="base model (no bytes sent)")
        xs = [x for line in series for x in (line.total_mb if total and line.total_mb else line.uplink_mb) if x > 0]
        if xs:
            ax.set_xscale("log")
            ax.set_xlim(min(xs) / 1.5, max(xs) * 1.5)  # a margin on both sides: no marker is cut at the edge
        ax.set_xlabel(f"cumulative {'uplink + downlink' if total else 'uplink'} (MB, wire bytes; log scale)")
        ax.grid(alpha=0.3, which="both")
    personalized_methods = any(line.personalized for line in series)
    axes[0].set_ylabel("accuracy (target domain)" if personalized_methods else "global accuracy (target domain)")
    over = f" (mean and 95% interval over {len(seeds)} seeds)" if len(seeds) > 1 else ""
    fig.suptitle(f"{results.get('scenario', {}).get('name', '')}: accuracy vs bytes{over}")
    axes[1].legend(fontsize="small")
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


def _with_interval(stats: dict[str, Any] | None, scale: float = 1.0, digits: int = 4) -> str:
    if stats is None:
        return "-"
    text = f"{stats['mean'] * scale:.{digits}f}"
    return text if stats["ci95"] is None else f"{text} ± {stats['ci95'] * scale:.{digits}f}"


def final_table(results: dict[str, Any]) -> Table:
    """The final comparison: figures with their 95% interval over seeds, and each method against the first."""
    base = results["base"]["accuracy"]
    seeds = results.get("run", {}).get("seeds") or []
    over = f", mean ± 95% interval over {len(seeds)} seeds" if len(seeds) > 1 else ""
    comparison = compare_to_reference(results)
    reference = comparison.get("reference", "")
    table = Table(title=f"final (base model accuracy {base:.4f}{over})", title_justify="left")
    for col in ("method", "accuracy", "vs base", f"vs {reference}", "personalized", "bottom decile", "uplink MB",
                "downlink MB", "total vs ref", "trainable", "seconds"):
        table.add_column(col, justify="right")
    for name, entry in results["methods"].items():
        f = entry["final"]
        versus = comparison.get("methods", {}).get(name, {})
        acc = versus.get("accuracy")
        ratio = versus.get("total_bytes_ratio")
        table.add_row(name, _with_interval(figure(entry, "accuracy")), f"{100 * (f['accuracy'] - base):+.1f} pt",
                      "reference" if name == reference else
                      (f"{100 * acc['difference']:+.1f} pt {acc['verdict']}" if acc else "-"),
                      _with_interval(figure(entry, "personalized_accuracy")),
                      _with_interval(figure(entry, "bottom_decile_accuracy")),
                      f"{f['uplink_bytes'] / 1e6:.3f}", f"{f['downlink_bytes'] / 1e6:.3f}",
                      "" if name == reference or ratio is None else f"{ratio:.1f}x fewer" if ratio >= 1
                      else f"{1 / ratio:.1f}x more",
                      f"{round(f['trainable_params']):,} ({100 * f['trainable_params'] / f['total_params']:.1f}%)",
                      f"{f['seconds']:.1f}")
    return table
