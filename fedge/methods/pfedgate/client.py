"""pFedGate on the client: a personal gate over the shared model, trained jointly with it.

The gate lives in the node's `context.state` between rounds and is never put
in a reply (`assert_gate_absent` checks every outgoing message). A training
reply carries only the blocks the client's knapsack kept, so its size follows
the client's sparsity budget. A node the server holds out of the federation
(config `pfedgate-phase` = `novel`) joins at the end: it trains its gate alone
on the final shared model and reports its accuracy before and after.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedge.messages import CONFIG_RECORD, METRICS_RECORD
from fedge.methods.base import Job
from fedge.methods.pfedgate.blocks import BLOCK_MASK, BLOCK_VALUES, NOVEL_PHASE, PHASE_KEY, UPLOAD_RECORD, BlockLayout
from fedge.methods.pfedgate.gate import BlockGate, GatedModel, gate_state, load_gate_state, ordered_prior, train_gated
from fedge.state import from_record
from fedge.tiers import sparsity_budget
from fedge.training import evaluate

GATE_STATE = "pfedgate-gate"


def gated_model(job: Job, context: Context) -> tuple[GatedModel, bool]:
    """The job's model behind this node's gate (restored from its state, else freshly seeded) and whether it was restored."""
    layout = BlockLayout.of_state(job.global_state, job.options.gate_splits)
    sample_shape = tuple(job.data.train.tensors[0].shape[1:])
    with torch.random.fork_rng():
        torch.manual_seed(job.settings.seed * 7_919 + job.partition_id)
        gate = BlockGate(sample_shape, len(layout), ordered_prior(layout, job.options.gate_prior))
    restored = GATE_STATE in context.state.array_records
    if restored:
        load_gate_state(gate, from_record(context.state.array_records[GATE_STATE]))
    budget = sparsity_budget(job.data.tier, job.options.budgets)
    return GatedModel(job.model, gate, layout, budget), restored


def keep_gate(context: Context, gated: GatedModel) -> None:
    context.state.array_records[GATE_STATE] = ArrayRecord({k: Array(v) for k, v in gate_state(gated.gate).items()})


def assert_gate_absent(reply: Message, gate: Mapping[str, np.ndarray]) -> None:
    """Refuse to send a message that holds the gate: by record name or by any array equal to a gate tensor."""
    for name, record in reply.content.array_records.items():
        assert "gate" not in name, f"array record {name!r} would send the gate"
        for key, array in record.items():
            value = array.numpy()
            for gate_key, gate_value in gate.items():
                same = value.shape == gate_value.shape and value.dtype == gate_value.dtype and np.array_equal(value, gate_value)
                assert not same, f"array {name}/{key} equals gate tensor {gate_key}"


def _metrics(job: Job, gated: GatedModel, keep: np.ndarray | None = None) -> dict[str, float | int]:
    out: dict[str, float | int] = {"partition-id": job.partition_id, "sparsity-budget": gated.budget}
    if keep is not None:
        out["kept-fraction"] = float(gated.layout.sizes[keep].sum() / gated.layout.total)
    return out


def train_pfedgate(job: Job, msg: Message, context: Context) -> Message:
    """Train shared blocks and gate jointly; reply with the kept blocks only (the novel phase: gate only, no upload)."""
    config = msg.content.config_records.get(CONFIG_RECORD, ConfigRecord())
    gated, _ = gated_model(job, context)
    s, o, lr = job.settings, job.options, job.lr
    novel = config.get(PHASE_KEY, "") == NOVEL_PHASE
    if novel:  # "before": the untrained gate within budget; the dense global model is reported beside it
        dense = evaluate(job.model, job.data.test, device=job.device)
        gated.freeze(job.data.train, job.device)
        before = evaluate(gated, job.data.test, device=job.device)
        stats = train_gated(gated, job.data.train, epochs=o.novel_epochs, lr=lr, gate_lr=o.gate_lr,
                            batch_size=s.batch_size, device=job.device, seed=job.seed, train_shared=False)
        keep = gated.freeze(job.data.train, job.device)
        after = evaluate(gated, job.data.test, device=job.device)
        keep_gate(context, gated)
        metrics = MetricRecord({**_metrics(job, gated, keep), "num-examples": stats.num_examples,
                                "train-loss": stats.loss, "test-examples": after.num_examples,
                                "accuracy-global": dense.accuracy, "accuracy-before": before.accuracy,
                                "accuracy-after": after.accuracy})
        reply = Message(RecordDict({METRICS_RECORD: metrics}), reply_to=msg)
    else:
        stats = train_gated(gated, job.data.train, epochs=s.local_epochs, lr=lr, gate_lr=o.gate_lr,
                            batch_size=s.batch_size, device=job.device, seed=job.seed)
        keep = gated.freeze(job.data.train, job.device)
        keep_gate(context, gated)
        values, bits = gated.layout.pack(job.method.exchanged_state(job.model.cpu()), keep)
        metrics = MetricRecord({**_metrics(job, gated, keep), "num-examples": stats.num_examples, "train-loss": stats.loss})
        blocks = ArrayRecord({BLOCK_VALUES: Array(values), BLOCK_MASK: Array(bits)})
        reply = Message(RecordDict({UPLOAD_RECORD: blocks, METRICS_RECORD: metrics}), reply_to=msg)
    assert_gate_absent(reply, gate_state(gated.gate))
    return reply


def evaluate_pfedgate(job: Job, msg: Message, context: Context) -> Message:
    """`correct`: the global model; `personal-correct`: global shared model behind this node's gate.

    The gate is first tuned alone on the new shared model (`gate-tune-epochs`, on the train split) and kept.
    A node that has no gate yet (it has not joined the federation) serves the global model.
    """
    global_result = evaluate(job.model, job.data.test, device=job.device)
    gated, restored = gated_model(job, context)
    metrics = _metrics(job, gated)
    personal = global_result
    if restored:
        if job.options.gate_tune_epochs > 0:  # the gate follows the shared model it will be applied to
            o = job.options
            train_gated(gated, job.data.train, epochs=o.gate_tune_epochs, lr=job.lr, gate_lr=o.gate_lr,
                        batch_size=job.settings.batch_size, device=job.device, seed=job.seed + 1, train_shared=False)
            keep_gate(context, gated)
        metrics = _metrics(job, gated, gated.freeze(job.data.train, job.device))
        personal = evaluate(gated, job.data.test, device=job.device)
    reply = Message(RecordDict({METRICS_RECORD: MetricRecord({
        **metrics,
        "num-examples": global_result.num_examples,
        "correct": global_result.correct,
        "accuracy": global_result.accuracy,
        "loss-sum": global_result.loss_sum,
        "personal-correct": personal.correct,
        "personal-loss-sum": personal.loss_sum,
        "personal-accuracy": personal.accuracy,
        "has-gate": int(restored),
        "mean-entropy": global_result.mean_entropy,
    })}), reply_to=msg)
    assert_gate_absent(reply, gate_state(gated.gate))
    return reply
