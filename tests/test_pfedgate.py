"""pFedGate: knapsack, straight-through gate gradients, budgeted block uploads, block averaging, gate privacy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from torch import nn
from torch.utils.data import TensorDataset

from fedge.messages import ARRAYS_RECORD, CONFIG_RECORD, METRICS_RECORD, message_wire_bytes
from fedge.methods import Job, RunSpec, get_method, resolve
from fedge.methods.pfedgate.blocks import (
    BLOCK_MASK,
    BLOCK_VALUES,
    NOVEL_PHASE,
    PHASE_KEY,
    UPLOAD_RECORD,
    BlockLayout,
    BlockUpload,
    block_average,
)
from fedge.methods.pfedgate.client import GATE_STATE, assert_gate_absent, evaluate_pfedgate, train_pfedgate
from fedge.methods.pfedgate.gate import BlockGate, GatedModel, gate_state, knapsack, ste_factors
from fedge.methods.pfedgate.strategy import BlockAvgStrategy
from fedge.scenario import ClientData
from fedge.state import from_record, to_record
from fedge.tiers import TIERS, sparsity_budget


@pytest.fixture(autouse=True)
def _run_identity(run_identity):
    """Every test here builds Flower messages."""


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 128), nn.ReLU(),
                         nn.Linear(128, 10))


def _data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))


def _state() -> dict[str, np.ndarray]:
    return get_method("pfedgate").exchanged_state(_tiny_model())


# ---- knapsack ------------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [0.3, 0.5, 0.8, 1.0])
def test_knapsack_respects_capacity_and_keeps_first_blocks(budget: float) -> None:
    layout = BlockLayout.of_state(_state(), splits=4)
    rng = np.random.default_rng(1)
    for _ in range(20):
        scores = rng.random(len(layout))
        keep = knapsack(scores, layout.sizes, budget * layout.total, layout.first)
        assert keep[layout.first].all()
        assert layout.sizes[keep].sum() <= budget * layout.total
    assert knapsack(np.ones(len(layout)), layout.sizes, layout.total, layout.first).all()


def test_knapsack_prefers_score_per_element() -> None:
    sizes = np.array([10, 10, 10, 10])
    keep = knapsack(np.array([0.1, 0.9, 0.2, 0.8]), sizes, 30, np.array([True, False, False, False]))
    assert keep.tolist() == [True, True, False, True]


# ---- straight-through estimator ------------------------------------------------------------
def test_ste_passes_gradient_to_dropped_blocks() -> None:
    scores = torch.tensor([0.4, 0.6, 0.7], requires_grad=True)
    mask = torch.tensor([True, False, True])
    factors = ste_factors(scores, mask)
    assert torch.allclose(factors.detach(), torch.tensor([0.8, 0.0, 1.4]))
    (factors * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert scores.grad is not None and (scores.grad != 0).all()


def test_gate_gets_gradient_through_the_gated_model() -> None:
    model = _tiny_model()
    layout = BlockLayout.of_state(_state(), splits=4)
    gated = GatedModel(model, BlockGate((1, 8, 8), len(layout)), layout, budget=0.3)
    x, y = _data(16, 0).tensors
    nn.functional.cross_entropy(gated(x), y).backward()
    assert gated.gate.linear.weight.grad is not None and gated.gate.linear.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters())


def test_untrained_gate_leaves_kept_blocks_unchanged() -> None:
    model = _tiny_model()
    layout = BlockLayout.of_state(_state(), splits=4)
    gated = GatedModel(model, BlockGate((1, 8, 8), len(layout)), layout, budget=1.0)
    gated.fixed = torch.ones(len(layout))
    x = _data(4, 0).tensors[0]
    assert torch.allclose(gated(x), model(x))


# ---- uploads scale with the budget -----------------------------------------------------------
def test_block_upload_size_scales_with_budget() -> None:
    state = _state()
    layout = BlockLayout.of_state(state, splits=8)
    sizes = {}
    for budget in (1.0, 0.5, 0.3):
        gated = GatedModel(_tiny_model(), BlockGate((1, 8, 8), len(layout)), layout, budget)
        keep = gated.freeze(_data(32, 1), torch.device("cpu"))
        values, bits = layout.pack(state, keep)
        assert values.size <= budget * layout.total
        assert bits.nbytes == (len(layout) + 7) // 8
        record = ArrayRecord({BLOCK_VALUES: Array(values), BLOCK_MASK: Array(bits)})
        msg = Message(RecordDict({UPLOAD_RECORD: record}), dst_node_id=1, message_type="train")
        sizes[budget] = message_wire_bytes(msg)
    dense = message_wire_bytes(Message(RecordDict({"arrays": to_record(state)}), dst_node_id=1, message_type="train"))
    assert sizes[0.3] < sizes[0.5] < sizes[1.0]
    assert sizes[0.3] <= 0.3 * dense and sizes[0.5] <= 0.5 * dense


def test_pack_unpack_roundtrip_and_size_check() -> None:
    state = _state()
    layout = BlockLayout.of_state(state, splits=3)
    keep = np.arange(len(layout)) % 2 == 0
    values, bits = layout.pack(state, keep)
    mask, blocks = layout.unpack(values, bits)
    assert (mask == keep).all()
    for block_id, block in zip(np.flatnonzero(mask), blocks):
        b = layout.blocks[block_id]
        assert np.array_equal(block, state[b.tensor].reshape(-1)[b.start:b.stop])
    with pytest.raises(ValueError):
        layout.unpack(values[:-1], bits)


# ---- server block averaging -------------------------------------------------------------------
def test_block_average_over_the_senders_of_each_block() -> None:
    previous = {"w": np.zeros(8, np.float32), "b": np.full(2, 5.0, np.float32)}
    layout = BlockLayout.of_state(previous, splits=2)  # w: [0:4], [4:8]; b: [0:1], [1:2]
    a = {"w": np.ones(8, np.float32), "b": np.ones(2, np.float32)}
    c = {"w": np.full(8, 4.0, np.float32), "b": np.full(2, 4.0, np.float32)}
    mask_a = np.array([True, True, True, False])
    mask_c = np.array([True, False, False, False])
    ups = [BlockUpload(*layout.unpack(*layout.pack(a, mask_a)), weight=1.0),
           BlockUpload(*layout.unpack(*layout.pack(c, mask_c)), weight=3.0)]
    out = block_average(layout, previous, ups)
    assert np.allclose(out["w"][:4], (1 * 1 + 3 * 4) / 4)  # both sent it: sample-weighted
    assert np.allclose(out["w"][4:], 1.0)  # only a sent it
    assert np.allclose(out["b"], [1.0, 5.0])  # second block: nobody sent it, previous kept


def test_strategy_aggregates_blocks_from_replies() -> None:
    previous = {"w": np.zeros(8, np.float32), "b": np.full(2, 5.0, np.float32)}
    strategy = BlockAvgStrategy(initial=previous, splits=2, novel_clients=0, timeout=10)
    strategy._previous = previous
    layout = strategy.layout
    replies = []
    for value, mask, n in ((2.0, [True, True, False, False], 10), (6.0, [True, False, False, True], 30)):
        values, bits = layout.pack({"w": np.full(8, value, np.float32), "b": np.full(2, value, np.float32)}, np.array(mask))
        content = RecordDict({UPLOAD_RECORD: ArrayRecord({BLOCK_VALUES: Array(values), BLOCK_MASK: Array(bits)}),
                              "metrics": MetricRecord({"num-examples": n, "train-loss": 1.0, "sparsity-budget": 0.5,
                                                       "kept-fraction": 0.5})})
        replies.append(Message(content, reply_to=Message(RecordDict(), dst_node_id=1, message_type="train")))
    arrays, metrics = strategy.aggregate_train(1, replies)
    out = from_record(arrays)
    assert np.allclose(out["w"][:4], (10 * 2 + 30 * 6) / 40)
    assert np.allclose(out["w"][4:], 2.0)
    assert np.allclose(out["b"], [5.0, 6.0])
    assert metrics["budget-uplink-bytes"] == pytest.approx(0.5 * metrics["dense-uplink-bytes"])


# ---- the gate stays on the client ----------------------------------------------------------------
def _job(spec: RunSpec) -> Job:
    model = _tiny_model()
    data = ClientData(train=_data(48, 2), test=_data(16, 3), tier=TIERS["weak"])
    return Job(spec, 2, data, None, model, spec.method.exchanged_state(model), 1, torch.device("cpu"))  # type: ignore[arg-type]


def _request(spec: RunSpec, **extra: str) -> Message:
    config = ConfigRecord({**spec.to_config(), **extra})
    return Message(RecordDict({ARRAYS_RECORD: to_record(_state()), CONFIG_RECORD: config}), dst_node_id=1,
                   message_type="train")


def test_gate_stays_in_context_and_never_in_a_reply() -> None:
    settings = resolve({"method": "pfedgate", "local-epochs": 1, "batch-size": 16, "pfedgate.gate-splits": 4})
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    reply = train_pfedgate(_job(settings), _request(settings), context)
    gate = from_record(context.state.array_records[GATE_STATE])
    assert gate and set(reply.content.array_records) == {UPLOAD_RECORD}
    assert_gate_absent(reply, gate)
    layout = BlockLayout.of_state(_state(), settings.options.gate_splits)
    values = reply.content.array_records[UPLOAD_RECORD][BLOCK_VALUES].numpy()
    assert values.size <= sparsity_budget(TIERS["weak"]) * layout.total

    evaluation = evaluate_pfedgate(_job(settings), _request(settings), context)
    assert not evaluation.content.array_records
    assert evaluation.content.metric_records[METRICS_RECORD]["has-gate"] == 1

    novel = train_pfedgate(_job(settings), _request(settings, **{PHASE_KEY: NOVEL_PHASE}), context)
    assert not novel.content.array_records
    assert {"accuracy-before", "accuracy-after"} <= set(novel.content.metric_records[METRICS_RECORD])


def test_assert_gate_absent_catches_a_leak() -> None:
    gate = gate_state(BlockGate((1, 8, 8), 5))
    leak = Message(RecordDict({"blocks": to_record({"x": gate["linear.weight"]})}), dst_node_id=1, message_type="train")
    with pytest.raises(AssertionError):
        assert_gate_absent(leak, gate)
    named = Message(RecordDict({"my-gate": to_record({"x": np.zeros(3, np.float32)})}), dst_node_id=1, message_type="train")
    with pytest.raises(AssertionError):
        assert_gate_absent(named, gate)


def test_budgets_override_per_tier() -> None:
    assert sparsity_budget(TIERS["mid"]) == 0.5
    assert sparsity_budget(TIERS["mid"], "0.9,0.6,0.2") == 0.6
    with pytest.raises(ValueError):
        sparsity_budget(TIERS["mid"], "0.9,0.6")


def test_blocks_hold_whole_rows_so_classifier_rows_are_per_class() -> None:
    layout = BlockLayout.of({"head.weight": (10, 256), "head.bias": (10,), "conv.weight": (16, 4, 3, 3)}, splits=16)
    head = [layout.blocks[i] for i in layout.blocks_of("head.weight")]
    assert [(b.start, b.stop) for b in head] == [(256 * r, 256 * (r + 1)) for r in range(10)]
    assert len(layout.blocks_of("head.bias")) == 10
    conv = [layout.blocks[i] for i in layout.blocks_of("conv.weight")]
    assert len(conv) == 16 and all(b.size == 4 * 3 * 3 for b in conv)
