"""Run config: every key is used or refused, and pyproject.toml lists exactly the defaults."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from flwr.common.config import flatten_dict

from fedge.methods import available_methods, get_method, resolve
from fedge.settings import RunSettings

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _app_config() -> dict:
    return flatten_dict(tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"])


def test_pyproject_lists_every_key_with_its_default() -> None:
    expected = RunSettings().to_config()
    for name in available_methods():
        expected.update({f"{name}.{k}": v for k, v in get_method(name).options().to_config().items()})
    assert _app_config() == expected


@pytest.mark.parametrize("method", ["lora-fedavg", "fedzip", "flasc", "pfedgate"])
def test_the_app_defaults_resolve_for_every_method(method: str) -> None:
    spec = resolve({**_app_config(), "method": method})
    assert spec.method.name == method
    assert resolve(spec.to_config()).options == spec.options  # what a server sends, a client reads back


def test_a_method_section_sets_that_methods_options_only() -> None:
    spec = resolve({"method": "flasc", "flasc.density-up": 0.125, "fedzip.top-z": 0.5})
    assert spec.options.density_up == 0.125
    assert "fedzip.top-z" not in spec.to_config()


@pytest.mark.parametrize(("key", "value"), [
    ("fraction-train", 1.0),  # a Flower FedAvg knob fedge does not read
    ("flasc.density", 0.1),  # a typo inside a section
    ("nosuchmethod.x", 1),  # a section no method has
])
def test_unknown_keys_are_refused_with_the_valid_ones(key: str, value: object) -> None:
    with pytest.raises(ValueError, match="valid keys: .*num-server-rounds"):
        resolve({"method": "flasc", key: value})


def test_bad_values_are_refused() -> None:
    with pytest.raises(ValueError, match="not an integer"):
        resolve({"method": "fedzip", "num-server-rounds": "many"})
    with pytest.raises(ValueError, match="not a boolean"):
        resolve({"method": "fedzip", "fedzip.error-feedback": "maybe"})
    with pytest.raises(ValueError, match="unknown method"):
        resolve({"method": "fedzap"})
