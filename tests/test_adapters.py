import numpy as np
import pytest
import torch

from fedge.federated_model import count_params
from fedge.methods import get_method
from fedge.settings import RunSettings


def _model(digits, method_name: str):
    method = get_method(method_name)
    return method, method.build_model(digits, RunSettings())


def test_lora_state_round_trip_changes_the_model(digits):
    method, model = _model(digits, "lora-fedavg")
    state = method.exchanged_state(model)
    assert any("lora_A" in k for k in state) and any("lora_B" in k for k in state)
    x = torch.rand(4, 1, 32, 32)
    before = model(x).detach()
    rng = np.random.default_rng(0)
    new = {k: rng.normal(size=v.shape).astype(np.float32) * 0.1 for k, v in state.items()}
    method.load_state(model, new)
    after = method.exchanged_state(model)
    assert all(np.array_equal(after[k], new[k]) for k in new)
    assert not torch.allclose(model(x), before)


def test_lora_is_seeded_identically_on_both_sides(digits):
    method, a_model = _model(digits, "lora-fedavg")
    _, b_model = _model(digits, "lora-fedavg")
    a, b = method.exchanged_state(a_model), method.exchanged_state(b_model)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_adapter_budget_is_small_but_substantial(digits):
    _, model = _model(digits, "lora-fedavg")
    trainable, total = count_params(model, trainable_only=True), count_params(model)
    assert trainable >= 50_000
    assert trainable / total <= 0.10


def test_lora_goes_into_the_scenarios_own_targets(digits):
    _, model = _model(digits, "lora-fedavg")
    adapted = {name.split(".lora_A")[0].removeprefix("base_model.model.") for name, _ in model.named_parameters()
               if ".lora_A" in name}
    assert adapted == set(digits.lora_targets)


def test_ffa_lora_exchanges_b_only_and_freezes_a(digits):
    method, model = _model(digits, "ffa-lora")
    state = method.exchanged_state(model)
    assert state and all("lora_B" in k for k in state)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_A" in n)


def test_mismatched_state_is_refused(digits):
    method, model = _model(digits, "lora-fedavg")
    state = method.exchanged_state(model)
    name = next(iter(state))
    with pytest.raises(ValueError, match="shape"):
        method.load_state(model, {**state, name: np.zeros((1, 1), np.float32)})
    with pytest.raises(ValueError, match="missing"):
        method.load_state(model, dict(list(state.items())[1:]))
