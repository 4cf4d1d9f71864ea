import numpy as np
import pytest

from fedge.methods.plain import product_gap
from fedge.results import ClientEval, fleet_accuracy


def _lora(rng, a_scale=1.0):
    return {"m.lora_A.weight": rng.normal(size=(4, 12)).astype(np.float32) * a_scale,
            "m.lora_B.weight": rng.normal(size=(6, 4)).astype(np.float32)}


def test_product_gap_is_zero_when_a_is_shared():
    rng = np.random.default_rng(0)
    prev = _lora(rng)
    clients = [{**prev, "m.lora_B.weight": rng.normal(size=(6, 4)).astype(np.float32)} for _ in range(3)]
    assert product_gap(prev, clients, [1, 2, 3]) == pytest.approx(0.0, abs=1e-6)


def test_product_gap_is_positive_when_a_and_b_both_move():
    rng = np.random.default_rng(1)
    prev = _lora(rng)
    clients = [_lora(rng) for _ in range(3)]
    assert product_gap(prev, clients, [1, 1, 1]) > 0.05


def test_fleet_accuracy_arithmetic():
    evals = [ClientEval(i, n, c, p) for i, (n, c, p) in enumerate(
        [(10, 5, 9), (30, 30, 30), (20, 10, 4), (40, 20, 20), (10, 1, 1), (10, 9, 9), (10, 9, 9), (10, 9, 9),
         (10, 9, 9), (10, 9, 9), (10, 9, 9)])]
    fleet = fleet_accuracy(evals)
    n = sum(e.num_examples for e in evals)
    assert fleet.accuracy == pytest.approx(sum(e.correct for e in evals) / n)
    assert fleet.personalized_accuracy == pytest.approx(sum(e.personal_correct for e in evals) / n)
    # 11 clients -> the worst ceil(1.1) = 2: 0.1 and 0.2
    assert fleet.bottom_decile_accuracy == pytest.approx((0.1 + 0.2) / 2)


def test_fedavg_weighted_mean_matches_flower():
    """The stock strategy the baselines use averages by num-examples; check its arithmetic on our records."""
    from flwr.app import MetricRecord, RecordDict
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    from fedge.state import from_record, to_record

    a = {"w": np.full(3, 1.0, np.float32)}
    b = {"w": np.full(3, 4.0, np.float32)}
    records = [RecordDict({"arrays": to_record(s), "metrics": MetricRecord({"num-examples": n})}) for s, n in ((a, 1), (b, 2))]
    agg = from_record(aggregate_arrayrecords(records, "num-examples"))
    np.testing.assert_allclose(agg["w"], np.full(3, 3.0))


def test_plot_series_add_personalized_accuracy_only_where_it_differs(tmp_path):
    from fedge.results import accuracy_series, plot_accuracy_vs_uplink

    rounds = lambda accs, pers: [{"uplink_bytes": 2_000_000, "accuracy": a, "personalized_accuracy": p}
                                 for a, p in zip(accs, pers)]
    results = {"base": {"accuracy": 0.3}, "methods": {
        "lora-fedavg": {"rounds": rounds([0.5, 0.7], [0.5, 0.7])},
        "pfedgate": {"rounds": rounds([0.4, 0.6], [0.8, 0.9])},
    }}
    series = accuracy_series(results)
    assert [s.label for s in series] == ["lora-fedavg", "pfedgate", "pfedgate (personalized)"]
    assert series[2].uplink_mb == [2.0, 4.0] and series[2].accuracy == [0.8, 0.9]
    assert plot_accuracy_vs_uplink(results, tmp_path / "plot.png").stat().st_size > 0
