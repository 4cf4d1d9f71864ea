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


def method_results(*, scenario: dict[str, Any], base_accuracy: float, name: str, entry: dict[str, Any],
                   into: dict[str, Any] | None = None, base_metrics: dict[str, float] | None = None) -> dict[str, Any]:
    """results.json's content with one method's entry added (to `into`, one run's results so far, or a new one);
    `base_metrics` adds the base model's task metrics (a causal LM's perplexity) beside its accuracy."""
    results = into if into is not None else {"scenario": {}, "base": {}, "methods": {}}
    results["scenario"] = scenario
    results["base"] = {"accuracy": base_accuracy, **(base_metrics or {})}
    results.setdefault("methods", {})[name] = entry
    return results
    results["scenario"] = scenario
    results["base"] = {"accuracy": base_accuracy, **(base_metrics or {})}
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
    others = {k: mean_ci95([float(per_seed[s]["base"][k]) for s in seeds])["mean"]
              for k in first.get("base", {}) if k != "accuracy" and all(k in per_seed[s].get("base", {}) for s in seeds)}
    return {"scenario": first.get("scenario", {}),
            "base": {"accuracy": base_stats["mean"], "ci95": base_stats["ci95"], "seeds": base, **others},
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


def is_causal_lm(results: dict[str, Any]) -> bool:
    return results.get("scenario", {}).get("task") == "causal-lm"


def metric_series(results: dict[str, Any], metric: str = "accuracy") -> list[PlotSeries]:
    """Per method: `metric` after each round against the cumulative uplink (and uplink plus downlink) so far; a
    personalized method also gets its personalized value (where it differs from the global model's). Over
    several seeds the points are means and carry their 95% intervals. The base model, at zero bytes, is the
    plot's horizontal line rather than a point (zero has no place on a log axis). `PlotSeries.accuracy` holds
    the metric."""
    series = []
    for name, entry in results.get("methods", {}).items():
        rounds = entry.get("rounds", [])
        xs = [b / MB for b in itertools.accumulate(r["uplink_bytes"] for r in rounds)]
        totals = [b / MB for b in itertools.accumulate(r["uplink_bytes"] + r.get("downlink_bytes", 0) for r in rounds)]

        def errors(key: str, rounds: list[dict[str, Any]] = rounds) -> list[float] | None:
            if not rounds or rounds[0].get(f"{key}_ci95") is None:
                return None
            return [r[f"{key}_ci95"] or 0.0 for r in rounds]

        values = [r.get(metric, float("nan")) for r in rounds]
        series.append(PlotSeries(name, name, xs, values, errors=errors(metric), total_mb=totals))
        personal = [r.get(f"personalized_{metric}", r.get(metric, float("nan"))) for r in rounds]
        if any(p != v for p, v in zip(personal, values, strict=True)):
            series.append(PlotSeries(name, f"{name} (personalized)", xs, personal, personalized=True,
                                     errors=errors(f"personalized_{metric}"), total_mb=totals))
    return series


def accuracy_series(results: dict[str, Any]) -> list[PlotSeries]:
    """Per method: accuracy against cumulative bytes (see `metric_series`)."""
    return metric_series(results, "accuracy")


def plot_results(results: dict[str, Any], out_dir: str | Path) -> Path:
    """The run's plot: perplexity against bytes for a causal LM, else accuracy against bytes."""
    if is_causal_lm(results):
        return plot_metric_vs_uplink(results, Path(out_dir) / PERPLEXITY_PLOT_FILE, "perplexity")
    return plot_accuracy_vs_uplink(results, Path(out_dir) / PLOT_FILE)


def accuracy_figure(results: dict[str, Any], metric: str = "accuracy") -> Any:
    """The metric-vs-bytes figure (matplotlib): log byte axes whose limits hold every point; perplexity (lower is
    better) on a log scale too."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = metric_series(results, metric)
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
        base = results.get("base", {}).get(metric)
        if base is not None:
            ax.axhline(base, color="grey", linestyle="--", linewidth=1, label="base model (no bytes sent)")
        xs = [x for line in series for x in (line.total_mb if total and line.total_mb else line.uplink_mb) if x > 0]
        if xs:
            ax.set_xscale("log")
            ax.set_xlim(min(xs) / 1.5, max(xs) * 1.5)  # a margin on both sides: no marker is cut at the edge
        if metric == "perplexity":
            ax.set_yscale("log")
        ax.set_xlabel(f"cumulative {'uplink + downlink' if total else 'uplink'} (MB, wire bytes; log scale)")
        ax.grid(alpha=0.3, which="both")
    personalized_methods = any(line.personalized for line in series)
    if metric == "perplexity":
        axes[0].set_ylabel("held-out perplexity (target domain, lower is better)")
    else:
        axes[0].set_ylabel("accuracy (target domain)" if personalized_methods else "global accuracy (target domain)")
    over = f" (mean and 95% interval over {len(seeds)} seeds)" if len(seeds) > 1 else ""
    fig.suptitle(f"{results.get('scenario', {}).get('name', '')}: {metric} vs bytes{over}")
    axes[1].legend(fontsize="small")
    fig.tight_layout()
    return fig


def plot_accuracy_vs_uplink(results: dict[str, Any], path: str | Path) -> Path:
    return plot_metric_vs_uplink(results, path, "accuracy")


def plot_metric_vs_uplink(results: dict[str, Any], path: str | Path, metric: str) -> Path:
    import matplotlib.pyplot as plt

    fig = accuracy_figure(results, metric)
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


def _with_interval(stats: dict[str, Any] | None, scale: float = 1.0, digits: int = 4) -> str:
    if stats is None:
        return "-"
    text = f"{stats['mean'] * scale:.{digits}f}"
    return text if stats["ci95"] is None else f"{text} ± {stats['ci95'] * scale:.{digits}f}"


def round_line(name: str, row: dict[str, Any]) -> str:
    """One round's report line: the task's figures and the traffic of the round and so far, each way."""
    quality = (f"ppl {row['perplexity']:.2f} (pers. {row['personalized_perplexity']:.2f}), next-token acc "
               f"{row['accuracy']:.4f}" if "perplexity" in row else f"acc {row['accuracy']:.4f}")
    return (f"{name} round {row['round']}: {quality} | up {row['uplink_bytes'] / MB:.3f} MB "
            f"(cum. {row['cumulative_uplink_mb']:.3f}) | down {row['downlink_bytes'] / MB:.3f} MB "
            f"(cum. {row['cumulative_downlink_mb']:.3f})")


def final_table(results: dict[str, Any]) -> Table:
    """The final comparison: figures with their 95% interval over seeds, and each method against the first."""
    base = results["base"]["accuracy"]
    seeds = results.get("run", {}).get("seeds") or []
    over = f", mean ± 95% interval over {len(seeds)} seeds" if len(seeds) > 1 else ""
    comparison = compare_to_reference(results)
    reference = comparison.get("reference", "")
    lm = is_causal_lm(results)
    if lm:
        title = (f"final (base model perplexity {results['base']['perplexity']:.2f}, next-token accuracy "
                 f"{base:.4f}{over})")
    else:
        title = f"final (base model accuracy {base:.4f}{over})"
    table = Table(title=title, title_justify="left")
    quality = ("perplexity", "vs base", f"vs {reference}", "personalized ppl", "next-token acc") if lm else (
        "accuracy", "vs base", f"vs {reference}", "personalized", "bottom decile")
    for col in ("method", *quality, "uplink MB", "downlink MB", "total vs ref", "trainable", "seconds"):
        table.add_column(col, justify="right")
    for name, entry in results["methods"].items():
        f = entry["final"]
        versus = comparison.get("methods", {}).get(name, {})
        ratio = versus.get("total_bytes_ratio")
        if lm:
            ppl = versus.get("perplexity")
            cells = (_with_interval(figure(entry, "perplexity"), digits=2),
                     f"{100 * (f['perplexity'] / results['base']['perplexity'] - 1):+.1f}%",
                     "reference" if name == reference else (f"{ppl['difference']:+.2f} {ppl['verdict']}" if ppl else "-"),
                     _with_interval(figure(entry, "personalized_perplexity"), digits=2),
                     _with_interval(figure(entry, "accuracy")))
        else:
            acc = versus.get("accuracy")
            cells = (_with_interval(figure(entry, "accuracy")), f"{100 * (f['accuracy'] - base):+.1f} pt",
                     "reference" if name == reference else
                     (f"{100 * acc['difference']:+.1f} pt {acc['verdict']}" if acc else "-"),
                     _with_interval(figure(entry, "personalized_accuracy")),
                     _with_interval(figure(entry, "bottom_decile_accuracy")))
        table.add_row(name, *cells, f"{f['uplink_bytes'] / MB:.3f}", f"{f['downlink_bytes'] / MB:.3f}",
                      "" if name == reference or ratio is None else f"{ratio:.1f}x fewer" if ratio >= 1
                      else f"{1 / ratio:.1f}x more",
                      f"{round(f['trainable_params']):,} ({100 * f['trainable_params'] / f['total_params']:.1f}%)",
                      f"{f['seconds']:.1f}")
    return table
