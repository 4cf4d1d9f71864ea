"""How close a format's outputs are to fp32's on the same inputs, the thresholds a device holds them to,
and the reference set a version ships for devices that have no inputs of their own.

Quantization error depends on the inputs and on the CPU's kernels, so the
check runs on the device: a candidate format's logits are compared with the
fp32 model's on the device's own inputs (no labels needed), or on the
registry's reference set (inputs held out from calibration and the fp32
logits on them). Torch-free: the export, the benchmark and the agent share it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fedge.edge.scoring import scored

#: Inputs in a version's reference set (held out from INT8 calibration).
REFERENCE_SAMPLES = 64


class ReferenceError(ValueError):
    """A reference set that cannot be read or does not fit the model."""


@dataclass(frozen=True)
class Agreement:
    """A candidate against fp32 on the same inputs."""

    samples: int           # predictions compared (a language model's: next tokens)
    top1: float            # share of them where both pick the same class
    max_logit_diff: float  # max |candidate - fp32| over inputs and classes (logit units)
    logit_range: float     # fp32's typical logit range (median over inputs of max - min): the scale of the above

    @property
    def relative_diff(self) -> float:
        """`max_logit_diff` as a share of fp32's logit range (comparable across models)."""
        return self.max_logit_diff / self.logit_range if self.logit_range > 0 else float("inf")

    def summary(self) -> str:
        return (f"top-1 agreement {self.top1:.3f}, max |logit diff| {self.max_logit_diff:.3g} "
                f"({self.relative_diff:.1%} of fp32's logit range) on {self.samples} inputs")


def agreement(candidate: np.ndarray, reference: np.ndarray, inputs: np.ndarray | None = None) -> Agreement:
    """Compare two logit batches (same inputs, same order); a causal LM's on the next-token predictions of its
    `inputs` (a token batch), so padding never counts."""
    if candidate.shape != reference.shape or not len(reference):
        raise ValueError(f"logits of shape {candidate.shape} cannot be compared with {reference.shape}")
    if candidate.ndim == 3 and inputs is not None:
        candidate, reference = scored(inputs, candidate)[0], scored(inputs, reference)[0]
    if candidate.ndim != 2:
        raise ValueError(f"logits of shape {candidate.shape}: give the inputs to compare a language model's")
    diff = np.abs(candidate.astype(np.float64) - reference.astype(np.float64))
    spread = reference.max(axis=1) - reference.min(axis=1)
    return Agreement(samples=len(reference), top1=float((candidate.argmax(1) == reference.argmax(1)).mean()),
                     max_logit_diff=float(diff.max()), logit_range=float(np.median(spread)))


@dataclass(frozen=True)
class Thresholds:
    """What a device demands of a format other than the fp32 it is compared with.

    Measured on this project's models: a sound INT8 agrees with fp32 on 97.5-100% of
    inputs with a max difference of 1-12% of the logit range; the int16-saturated INT8 of
    an AVX2 CPU agreed on 48-76% with 70-73%. The defaults sit between, and leave room for
    the sampling noise of a small canary batch (64 inputs: one disagreement is 1.6%).
    """

    min_top1: float = 0.95
    max_relative_diff: float = 0.3

    def failures(self, result: Agreement) -> list[str]:
        """Why `result` falls short (empty: it passes)."""
        reasons = []
        if not result.top1 >= self.min_top1:
            reasons.append(f"top-1 agreement {result.top1:.3f} < {self.min_top1:.3f}")
        if not result.relative_diff <= self.max_relative_diff:
            reasons.append(f"max |logit diff| {result.max_logit_diff:.3g} is {result.relative_diff:.1%} of fp32's "
                           f"logit range (> {self.max_relative_diff:.0%})")
        return reasons


# ---- the reference set a version ships -------------------------------------------------------------------------


def reference_set(fp32: Callable[[np.ndarray], np.ndarray], inputs: np.ndarray) -> bytes:
    """Inputs and the fp32 model's logits on them, as safetensors bytes.

    Inputs are stored in float16 where that keeps them finite (half the bytes), and the
    logits are computed on exactly the stored values, so the pair stays consistent.
    """
    from safetensors.numpy import save

    x = np.ascontiguousarray(inputs, dtype=np.float32)
    with np.errstate(over="ignore"):  # out of float16's range becomes inf, checked below
        half = x.astype(np.float16)
    stored: np.ndarray = half if np.isfinite(half).all() else x  # out of float16's range: keep float32
    logits = np.ascontiguousarray(fp32(stored.astype(np.float32)), dtype=np.float32)
    return save({"inputs": stored, "logits": logits}, metadata={"samples": str(len(x))})


def read_reference_set(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(inputs as float32, fp32 logits); raises ReferenceError for anything malformed."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    try:
        tensors = load(data)
    except (SafetensorError, ValueError) as err:
        raise ReferenceError(f"unreadable reference set: {err}") from err
    if set(tensors) != {"inputs", "logits"}:
        raise ReferenceError(f"a reference set holds inputs and logits, not {sorted(tensors)}")
    x, logits = tensors["inputs"].astype(np.float32), tensors["logits"].astype(np.float32)
    if logits.ndim != 2 or len(x) != len(logits) or not len(x):
        raise ReferenceError(f"{len(x)} inputs for logits of shape {logits.shape}")
    if not (np.isfinite(x).all() and np.isfinite(logits).all()):
        raise ReferenceError("non-finite values in the reference set")
    return x, logits
