"""Extending fedge from outside the package: a codec, a method and a scenario registered by a plug-in module."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedge.registry import PLUGINS_ENV, Registry

PLUGINS = Path(__file__).parent / "plugins"


def test_a_registry_names_what_it_knows_when_a_name_is_missing() -> None:
    things: Registry[int] = Registry("thing", "fedge.no-such-group")
    things.register("one", 1)
    things.register("lazy", "math:pi")
    assert things.get("lazy") == pytest.approx(3.14159, abs=1e-4)
    with pytest.raises(ValueError, match="unknown thing 'two'; known: lazy, one"):
        things.get("two")
    with pytest.raises(ValueError, match="already registered"):
        things.register("one", 2)


@pytest.fixture
def registries():
    """The plug-in's registrations end with the test (the registries are per process)."""
    from fedge.codecs import CODECS
    from fedge.methods import METHODS
    from fedge.scenario import SCENARIOS

    saved = [(r, dict(r._items)) for r in (CODECS, METHODS, SCENARIOS)]
    yield
    for registry, items in saved:
        registry._items = items


@pytest.mark.slow
def test_a_plugin_codec_method_and_scenario_run_a_federation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              registries: None) -> None:
    monkeypatch.syspath_prepend(str(PLUGINS))
    monkeypatch.setenv("PYTHONPATH", f"{PLUGINS}:{__import__('os').environ.get('PYTHONPATH', '')}")
    monkeypatch.setenv(PLUGINS_ENV, "fedge_toy_plugin")  # Flower's simulation workers inherit both
    from fedge.codecs import available_codecs
    from fedge.methods import available_methods
    from fedge.scenario import available
    from fedge.sim.runner import simulate

    assert "toy-half" in available_codecs() and "toy-half" in available_methods() and "toy-blobs" in available()
    outcome = simulate({"method": "toy-half", "scenario": "toy-blobs", "num-server-rounds": 2, "num-clients": 3,
                        "local-epochs": 2, "out-dir": str(tmp_path)})
    entry = json.loads((tmp_path / "results.json").read_text())["methods"]["toy-half"]
    trainable = entry["final"]["trainable_params"]
    assert [r["accepted"] for r in entry["rounds"]] == [3, 3]
    # float16 envelopes: 2 bytes a parameter per client, plus framing
    assert all(3 * 2 * trainable < r["envelope_bytes"] < 3 * 2 * trainable + 3 * 2048 for r in entry["rounds"])
    assert outcome.final["accuracy"] > outcome.base.accuracy
