import numpy as np
import torch

from fedge.federated_model import build_federated_model, exchanged_state, load_exchanged_state
from fedge.methods import get_method
from fedge.models import count_params
from fedge.runconfig import RunSettings


def test_lora_state_round_trip_changes_the_model(digits):
    method = get_method("lora-fedavg")
    model = build_federated_model(digits, method, RunSettings())
    state = exchanged_state(model, method)
    assert any("lora_A" in k for k in state) and any("lora_B" in k for k in state)
    x = torch.rand(4, 1, 32, 32)
    before = model(x).detach()
    rng = np.random.default_rng(0)
    new = {k: rng.normal(size=v.shape).astype(np.float32) * 0.1 for k, v in state.items()}
    load_exchanged_state(model, method, new)
    after = exchanged_state(model, method)
    assert all(np.array_equal(after[k], new[k]) for k in new)
    assert not torch.allclose(model(x), before)


def test_lora_is_seeded_identically_on_both_sides(digits):
    method = get_method("lora-fedavg")
    a = exchanged_state(build_federated_model(digits, method, RunSettings()), method)
    b = exchanged_state(build_federated_model(digits, method, RunSettings()), method)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_adapter_budget_is_small_but_substantial(digits):
    model = build_federated_model(digits, get_method("lora-fedavg"), RunSettings())
    trainable, total = count_params(model, trainable_only=True), count_params(model)
    assert trainable >= 50_000
    assert trainable / total <= 0.10


def test_ffa_lora_exchanges_b_only_and_freezes_a(digits):
    method = get_method("ffa-lora")
    model = build_federated_model(digits, method, RunSettings())
    state = exchanged_state(model, method)
    assert state and all("lora_B" in k for k in state)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_A" in n)


def test_mismatched_state_is_refused(digits):
    import pytest

    method = get_method("lora-fedavg")
    model = build_federated_model(digits, method, RunSettings())
    state = exchanged_state(model, method)
    name = next(iter(state))
    with pytest.raises(ValueError, match="shape"):
        load_exchanged_state(model, method, {**state, name: np.zeros((1, 1), np.float32)})
    with pytest.raises(ValueError, match="missing"):
        load_exchanged_state(model, method, dict(list(state.items())[1:]))
