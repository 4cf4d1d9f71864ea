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


def _trained_state(method, model, seed: int = 0) -> dict[str, np.ndarray]:
    """The exchanged state with B moved away from zero, as after local training."""
    rng = np.random.default_rng(seed)
    return {k: (rng.normal(size=v.shape) * 0.05).astype(np.float32) if "lora_B" in k else v
            for k, v in method.exchanged_state(model).items()}


def test_folding_lora_in_plain_torch_matches_peft(digits):
    from fedge.federated_model import fold_lora, merged_copy

    method, model = _model(digits, "fedzip")
    state = _trained_state(method, model)
    method.load_state(model, state)
    settings = RunSettings()
    folded = fold_lora(digits.base_model(), state, rank=settings.lora_rank, alpha=settings.lora_alpha)
    assert folded is not None and not any("lora" in n for n, _ in folded.named_parameters())
    merged = merged_copy(model).state_dict()
    assert all(torch.allclose(folded.state_dict()[k], merged[k], atol=1e-6) for k in merged)
    x = torch.rand(8, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(folded.eval()(x), model.eval()(x), atol=1e-5)


def test_folding_refuses_what_it_cannot_stand_for(digits):
    from fedge.federated_model import fold_lora

    method, model = _model(digits, "lora-fedavg")
    state = method.exchanged_state(model)
    b_only = {k: v for k, v in state.items() if "lora_B" in k}
    assert fold_lora(digits.base_model(), b_only, rank=16, alpha=32) is None  # FFA-LoRA: A is not exchanged
    assert fold_lora(digits.base_model(), state, rank=8, alpha=32) is None  # another rank
    grouped = digits.base_model()
    grouped.conv2 = torch.nn.Conv2d(16, 32, 3, padding=1, groups=2)
    assert fold_lora(grouped, state, rank=16, alpha=32) is None  # a layer plain torch does not fold here


def test_evaluation_builds_the_plain_model_only_where_the_method_allows(digits, run_identity):
    from flwr.app import ConfigRecord, Message, RecordDict

    from fedge.messages import ARRAYS_RECORD, CONFIG_RECORD
    from fedge.state import to_record

    settings = RunSettings()
    for name, plain in (("fedzip", True), ("lora-fedavg", True), ("ffa-lora", False), ("full-fedavg", False),
                        ("pfedgate", False)):
        method, model = _model(digits, name)
        msg = Message(RecordDict({ARRAYS_RECORD: to_record(method.exchanged_state(model)), CONFIG_RECORD: ConfigRecord()}),
                      dst_node_id=1, message_type="evaluate")
        built = method.evaluation_model(digits, settings, msg)
        assert (built is not None) == plain, name
