"""Results over seeds: mean and 95% interval, per-seed finals, the comparison with the reference, table and plot."""

from __future__ import annotations

import math

import pytest
from scipy import stats

from fedge.results import combine_seeds, compare_to_reference, final_table, mean_ci95, plot_accuracy_vs_uplink


def test_the_interval_is_students_t_over_the_seeds():
    values = [0.81, 0.84, 0.79, 0.83]
    got = mean_ci95(values)
    low, high = stats.t.interval(0.95, len(values) - 1, loc=sum(values) / 4, scale=stats.sem(values))
    assert got["mean"] == pytest.approx((low + high) / 2)
    assert got["ci95"] == pytest.approx((high - low) / 2)
    assert mean_ci95([0.5]) == {"mean": 0.5, "ci95": None, "std": None, "n": 1}


def _seed_results(seed: int, accuracy: dict[str, float], uplink: dict[str, int]) -> dict:
    def entry(name: str) -> dict:
        final = {"accuracy": accuracy[name], "personalized_accuracy": accuracy[name],
                 "bottom_decile_accuracy": accuracy[name] - 0.1, "uplink_bytes": uplink[name],
                 "downlink_bytes": uplink[name], "trainable_params": 10, "total_params": 100, "seconds": 1.0}
        rounds = [{"round": r, "accuracy": accuracy[name] * r / 2, "personalized_accuracy": accuracy[name] * r / 2,
                   "uplink_bytes": uplink[name] / 2, "downlink_bytes": uplink[name] / 2, "clients": 4}
                  for r in (1, 2)]
        return {"summary": f"{name} does things", "rounds": rounds, "final": final}

    return {"scenario": {"name": "toy"}, "base": {"accuracy": 0.2 + seed / 100},
            "methods": {name: entry(name) for name in accuracy}}


def _three_seeds() -> dict:
    per_seed = {
        0: _seed_results(0, {"ref": 0.80, "close": 0.81, "far": 0.60}, {"ref": 1000, "close": 40, "far": 10}),
        1: _seed_results(1, {"ref": 0.82, "close": 0.80, "far": 0.62}, {"ref": 1000, "close": 40, "far": 10}),
        2: _seed_results(2, {"ref": 0.78, "close": 0.79, "far": 0.61}, {"ref": 1000, "close": 40, "far": 10}),
    }
    combined = combine_seeds(per_seed)
    combined["run"] = {"seeds": [0, 1, 2]}
    return combined


def test_several_seeds_give_per_seed_finals_a_summary_and_mean_rows():
    results = _three_seeds()
    ref = results["methods"]["ref"]
    assert set(ref["seeds"]) == {"0", "1", "2"} and ref["seeds"]["1"]["accuracy"] == 0.82
    assert ref["summary"]["accuracy"]["mean"] == pytest.approx(0.80)
    assert ref["summary"]["accuracy"]["ci95"] > 0
    assert set(ref["summary"]) == {"accuracy", "personalized_accuracy", "bottom_decile_accuracy", "uplink_bytes",
                                   "downlink_bytes"}  # no perplexity where the runs report none
    assert ref["final"]["accuracy"] == pytest.approx(0.80)  # readers of the one-seed shape still find `final`
    assert [r["round"] for r in ref["rounds"]] == [1, 2] and ref["rounds"][1]["accuracy_ci95"] > 0
    assert ref["description"] == "ref does things"
    assert results["base"]["accuracy"] == pytest.approx(0.21) and set(results["base"]["seeds"]) == {"0", "1", "2"}


def test_a_difference_is_within_noise_when_the_intervals_overlap():
    comparison = compare_to_reference(_three_seeds())
    assert comparison["reference"] == "ref"
    assert comparison["methods"]["close"]["accuracy"]["verdict"] == "within noise"
    assert comparison["methods"]["far"]["accuracy"]["verdict"] == "worse"
    assert comparison["methods"]["far"]["accuracy"]["difference"] == pytest.approx(-0.19)
    assert comparison["methods"]["close"]["total_bytes_ratio"] == pytest.approx(25.0)


def test_one_seed_keeps_its_shape_and_claims_no_verdict():
    one = _seed_results(0, {"ref": 0.8, "other": 0.9}, {"ref": 100, "other": 10})
    assert compare_to_reference(one)["methods"]["other"]["accuracy"]["verdict"] == "no interval (one seed)"


def test_the_table_and_the_plot_show_the_intervals(tmp_path):
    from rich.console import Console

    results = _three_seeds()
    console = Console(width=250, record=True)
    console.print(final_table(results))
    text = console.export_text()
    assert "±" in text and "within noise" in text and "worse" in text and "25.0x fewer" in text
    assert "3 seeds" in text
    path = plot_accuracy_vs_uplink(results, tmp_path / "plot.png")
    assert path.stat().st_size > 10_000
    assert not math.isnan(results["methods"]["ref"]["rounds"][0]["accuracy_ci95"])
