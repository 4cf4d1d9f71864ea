"""Local training and evaluation loops shared by clients, the base-model trainers and the edge, and where they run.

Two tasks share the loops. `classification`: a batch is `(*inputs, labels)`, one
prediction per sample. `causal-lm`: a batch is `(input_ids, attention_mask)`,
each position predicts the next token; the loss covers the shifted targets the
attention mask marks as real. Evaluation returns sums (loss, predictions,
correct ones) so that the server can pool clients exactly: accuracy is
correct / predictions (next-token accuracy for a language model) and
perplexity is exp(summed loss / predicted tokens).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedge.errors import UserError
from fedge.settings import PRECISIONS

Task = Literal["classification", "causal-lm"]
TASKS: tuple[Task, ...] = ("classification", "causal-lm")


def resolve_device(spec: str = "auto") -> torch.device:
    """`auto` means CUDA when present, else the CPU; an explicit CUDA device without CUDA is an error."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {spec!r}: CUDA is not available on this machine", "use --device cpu (or auto)")
    return device


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype training runs under: bf16 on a CUDA device that has it (`auto`), else none (fp32)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return torch.bfloat16 if cuda_bf16 else None


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass
class TrainStats:
    num_examples: int
    loss: float
    steps: int


@dataclass
class EvalStats:
    num_examples: int
    correct: int
    loss: float
    mean_entropy: float
    #: scored predictions: one per sample (classification) or one per real next token (causal LM)
    predictions: int = 0
    loss_sum: float = 0.0

    @property
    def accuracy(self) -> float:
        return self.correct / self.predictions if self.predictions else 0.0

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.predictions else math.inf


def forward_logits(model: nn.Module, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """The model's logits for one batch's inputs: token ids (and their attention mask) go in by keyword, as
    Hugging Face models take them; anything else positionally. A model output with `.logits` is unwrapped."""
    if inputs[0].dtype in (torch.int64, torch.int32):
        mask = inputs[1] if len(inputs) > 1 else None
        out = model(input_ids=inputs[0], attention_mask=mask)
    else:
        out = model(*inputs)
    return getattr(out, "logits", out)


def split_batch(task: Task, batch: Sequence[torch.Tensor]) -> tuple[Sequence[torch.Tensor], torch.Tensor]:
    """(model inputs, what is predicted): the labels for classification; the token ids themselves for a causal LM."""
    if task == "causal-lm":
        return batch, batch[0]
    return batch[:-1], batch[-1]


def next_token_targets(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets of positions 0..T-2 (the tokens 1..T-1) and where they are real (not padding)."""
    targets = input_ids[:, 1:]
    valid = torch.ones_like(targets, dtype=torch.bool) if attention_mask is None else attention_mask[:, 1:].bool()
    return targets, valid


def task_loss(task: Task, logits: torch.Tensor, batch: Sequence[torch.Tensor],
              reduction: str = "mean") -> tuple[torch.Tensor, int]:
    """The task's cross-entropy and the number of predictions it covers (samples, or real next tokens)."""
    if task == "causal-lm":
        targets, valid = next_token_targets(batch[0], batch[1] if len(batch) > 1 else None)
        scores = logits[:, :-1][valid]
        count = int(valid.sum())
        return F.cross_entropy(scores.float(), targets[valid], reduction=reduction), count
    labels = batch[-1]
    return F.cross_entropy(logits.float(), labels, reduction=reduction), len(labels)


def train_epochs(
    model: nn.Module,
    data: TensorDataset,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    device: torch.device,
    seed: int,
    params: Iterable[nn.Parameter] | None = None,
    weight_decay: float = 0.0,
    extra_loss: Callable[[], torch.Tensor] | None = None,
    param_groups: list[dict[str, Any]] | None = None,
    drop_last: bool = False,
    task: Task = "classification",
    autocast: torch.dtype | None = None,
    on_epoch: Callable[[int], None] | None = None,
) -> TrainStats:
    """Adam on the given parameters (default: those with requires_grad), seeded shuffling.

    `param_groups` (Adam's own groups, each with its lr) replaces `params` where parts
    of a model learn at different rates; `drop_last` keeps BatchNorm away from batches of one;
    `autocast` (e.g. bf16 on CUDA, from `autocast_dtype`) runs forward passes in that dtype;
    `on_epoch(epochs done)` follows long training (a progress bar).
    """
    if param_groups is None:
        trainable = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
        param_groups = [{"params": trainable}]
    optimizer = torch.optim.Adam(param_groups, lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, generator=generator, drop_last=drop_last)
    model.to(device).train()
    total_loss, total_seen, steps = 0.0, 0, 0
    for epoch in range(epochs):
        for batch in loader:
            batch = [t.to(device) for t in batch]
            inputs, _ = split_batch(task, batch)
            optimizer.zero_grad(set_to_none=True)
            with _autocast(device, autocast):
                loss, count = task_loss(task, forward_logits(model, inputs), batch)
            if count == 0:  # a batch of padding only (texts of one token) predicts nothing
                continue
            if extra_loss is not None:
                loss = loss + extra_loss()
            loss.backward()
            optimizer.step()
            total_loss += float(loss.detach()) * count
            total_seen += count
            steps += 1
        if on_epoch is not None:
            on_epoch(epoch + 1)
    return TrainStats(num_examples=len(data), loss=total_loss / max(total_seen, 1), steps=steps)


#: evaluation batch per task: a language model's logits are (batch, sequence, vocabulary)
EVAL_BATCH = {"classification": 256, "causal-lm": 16}


@torch.no_grad()
def evaluate(model: nn.Module, data: TensorDataset, *, device: torch.device, batch_size: int | None = None,
             task: Task = "classification") -> EvalStats:
    """Summed loss, predictions and correct ones (next tokens for a causal LM), and the mean predictive entropy."""
    model.to(device).eval()
    loader = DataLoader(data, batch_size=batch_size or EVAL_BATCH[task])
    correct, predictions, loss_sum, entropy_sum = 0, 0, 0.0, 0.0
    for batch in loader:
        batch = [t.to(device) for t in batch]
        inputs, _ = split_batch(task, batch)
        logits = forward_logits(model, inputs).float()
        loss, count = task_loss(task, logits, batch, reduction="sum")
        if task == "causal-lm":
            targets, valid = next_token_targets(batch[0], batch[1] if len(batch) > 1 else None)
            scores, targets = logits[:, :-1][valid], targets[valid]
        else:
            scores, targets = logits, batch[-1]
        loss_sum += float(loss)
        correct += int((scores.argmax(-1) == targets).sum())
        predictions += count
        logp = torch.log_softmax(scores, dim=-1)
        entropy_sum += float(-(logp.exp() * logp).sum())
    return EvalStats(num_examples=len(data), correct=correct, loss=loss_sum / max(predictions, 1),
                     mean_entropy=entropy_sum / max(predictions, 1), predictions=predictions, loss_sum=loss_sum)
