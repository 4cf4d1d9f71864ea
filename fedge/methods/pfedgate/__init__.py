"""pFedGate (Chen et al., ICML 2023): personalized sparse adaptation under each device's budget.

Each client has a small gate (input, pooling, BatchNorm, linear to one score per
block, sigmoid, averaged over the batch) that scores blocks of whole rows of
every shared tensor. A knapsack under the client's sparsity budget (its tier's,
or the run's `pfedgate.budgets`) keeps blocks, kept blocks are scaled by their
gate, dropped ones are zero, and a straight-through estimator lets the gradient
reach the gate. Only kept blocks go up; the server averages each block over
the clients that sent it. The gate never leaves the client.

- `gate.py`: the gate, the knapsack, the gated model and its training loop
- `blocks.py`: the block layout, the wire form of a block upload, per-block averaging
- `client.py`: the train and evaluate handlers (gate kept in the node's context)
- `strategy.py`: the server strategy (node profiles, novel clients joining at the end)
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from flwr.serverapp.strategy import Strategy

from fedge.methods.base import Method, RunSpec, register_method, sampling
from fedge.methods.pfedgate.blocks import PHASE_KEY
from fedge.methods.pfedgate.client import evaluate_pfedgate, train_pfedgate
from fedge.methods.pfedgate.strategy import BlockAvgStrategy
from fedge.scenario import Scenario
from fedge.settings import ConfigSection


@dataclass
class PFedGateOptions(ConfigSection):
    gate_splits: int = 16  # blocks of whole rows per shared tensor
    gate_lr: float = 0.05
    gate_prior: float = 2.0  # initial gate logits fall from 0 to -gate_prior along each tensor's blocks (nested sparse models)
    budgets: str = ""  # per-tier sparsity budgets "strong,mid,weak", e.g. "1.0,0.5,0.3"; empty: the tiers' own
    novel_clients: int = 0  # last partitions held out of training; they join at the end and train only their gate
    novel_epochs: int = 10  # the novel clients' gate-only epochs (cheap: no shared-model gradients)
    gate_tune_epochs: int = 3  # gate-only epochs on each new shared model before a client evaluates its personal model


def _strategy(spec: RunSpec, initial: OrderedDict[str, np.ndarray]) -> Strategy:
    o: PFedGateOptions = spec.options
    return BlockAvgStrategy(initial=initial, splits=o.gate_splits, novel_clients=o.novel_clients,
                            timeout=spec.settings.round_timeout, seed=spec.settings.seed, **sampling(spec.settings))


def unsupported(scenario: Scenario) -> str:
    """pFedGate's gate scores blocks from the inputs themselves (pooled, batch-normalised features); token ids, what
    text scenarios (a causal LM's, or a text classifier's) feed their models, are not features."""
    if scenario.task == "classification" and not callable(getattr(scenario, "tokenizer", None)):
        return ""
    return ("its gate scores the model's blocks from each input's features (pooled, through BatchNorm), and this "
            "scenario's inputs are token ids; use lora-fedavg, ffa-lora, fedzip, flasc, ternary, q8 or q4")


register_method(Method(
    "pfedgate", "pFedGate: a personal gate per client scores blocks of the shared model; a knapsack under the "
                "device's sparsity budget keeps and scales blocks; only kept blocks go up, averaged per block.",
    payload="full", train=train_pfedgate, evaluate=evaluate_pfedgate, strategy=_strategy, options=PFedGateOptions,
    lr=2e-3, protocol_keys=(PHASE_KEY,), unsupported=unsupported,
))
