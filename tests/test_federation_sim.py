"""A real federation through Flower's simulation runtime (Ray backend)."""

import json

import pytest

from fedge.sim.runner import simulate

ROUND_KEYS = {"round", "accuracy", "uplink_bytes", "downlink_bytes"}
FINAL_KEYS = {"accuracy", "personalized_accuracy", "bottom_decile_accuracy", "uplink_bytes", "downlink_bytes",
              "trainable_params", "total_params", "seconds"}


@pytest.mark.slow
def test_two_round_lora_federation_beats_base_and_writes_the_contract(tmp_path):
    rows = []
    outcome = simulate({"method": "lora-fedavg", "num-server-rounds": 2, "num-clients": 4, "local-epochs": 2,
                        "out-dir": str(tmp_path)}, on_round=lambda _, row: rows.append(row))
    assert [r["round"] for r in rows] == [1, 2]
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) >= {"scenario", "base", "methods"}
    base = results["base"]["accuracy"]
    entry = results["methods"]["lora-fedavg"]
    assert FINAL_KEYS <= set(entry["final"])
    assert all(ROUND_KEYS <= set(r) for r in entry["rounds"])
    final = entry["final"]
    assert final["accuracy"] > base + 0.05, (base, final["accuracy"])
    # Four clients upload ~83k fp32 LoRA parameters each per round, measured on the serialized messages.
    per_round_payload = 4 * final["trainable_params"] * 4
    assert per_round_payload < entry["rounds"][0]["uplink_bytes"] < per_round_payload * 1.02
    assert final["uplink_bytes"] == sum(r["uplink_bytes"] for r in entry["rounds"])
    assert final["trainable_params"] < 0.1 * final["total_params"]
    assert len(results["scenario"]["clients"]) == 4
    assert outcome.base.accuracy == base
