"""Which format of a version this device serves: the smallest it takes that behaves like fp32 here.

Candidates are the version's formats whose precision the device takes, in its
order (smallest first); within a precision an engine plan built for this device
class comes first, then an update (weight-only or adapter) against the model it
serves, then the ONNX. A device that takes adapter updates puts the formats they
apply to first, whatever their precision: an adapter update against what it
serves, then the unmerged graph (`fedge.edge.adapters`), so later versions cost
it a coded adapter change instead of a whole model. Each candidate is
downloaded, loaded on the device's runtime and run on the canary inputs: it must pass the canary (`canary.Canary`) and agree with
fp32 (`fedge.edge.agreement.Thresholds`). The fp32 reference is this version's
fp32 model run here by ONNX Runtime on the CPU on the device's own inputs
(labels not needed; quantization error depends on the inputs and on this CPU's
kernels), or, for a device without inputs of its own or without this
version's fp32, the reference set the registry signs beside the version. The
first candidate that passes serves; each refused one is reported with its
reason and figures; when none passes, the version is refused and the device
keeps serving what it had.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fedge.edge.adapters.delta import ADAPTER_META
from fedge.edge.agent.canary import Canary, CanaryError
from fedge.edge.agent.fetch import DownloadIncomplete
from fedge.edge.agent.serving import Served
from fedge.edge.agreement import Agreement, Thresholds, agreement, read_reference_set
from fedge.edge.artifacts import ADAPTER_KIND, REFERENCE, UPDATE_KINDS, ArtifactError, ArtifactFile, Manifest
from fedge.edge.runtime import Model

DEVICE_INPUTS, REFERENCE_SET, IS_REFERENCE = "device inputs", "reference set", "is the reference"
#: Within one precision: a plan needs no build, an update is a small download, the ONNX comes last.
_KIND_ORDER = {"tensorrt": 0, **{kind: 1 for kind in UPDATE_KINDS}, "onnx": 2}


def takes_adapters(entry: ArtifactFile) -> bool:
    """An unmerged graph (adapter updates apply to it) or an adapter update."""
    return entry.kind == ADAPTER_KIND or ADAPTER_META in entry.metadata

#: A format's verified bytes (for a weight-only update: the whole model after applying it).
Obtain = Callable[[Manifest, str], bytes]
#: A format's model on the device's serving runtime.
Load = Callable[[Manifest, str, bytes], Model]
#: An fp32 ONNX model on ONNX Runtime's CPU provider (the reference).
LoadReference = Callable[[bytes], Model]


class AgreementError(Exception):
    """A format whose outputs on this device differ too much from fp32's."""

    def __init__(self, reason: str, result: Agreement | None = None) -> None:
        super().__init__(reason)
        self.agreement = result


@dataclass(frozen=True)
class FormatCheck:
    """One candidate format on this device: passed or why not, and its agreement with fp32 where measured."""

    format: str
    passed: bool
    reason: str = ""
    agreement: Agreement | None = None
    reference: str = ""  # DEVICE_INPUTS, REFERENCE_SET, IS_REFERENCE, or "" (no fp32 to compare with)


@dataclass(frozen=True)
class Accepted:
    """The format a device will serve: loaded, with the whole model bytes to store."""

    format: str
    model: Model
    data: bytes
    canary_accuracy: float | None
    checks: tuple[FormatCheck, ...]  # every format tried, in order; the accepted one last


class NoFormatAccepted(Exception):
    """No format of the version passed on this device; `checks` says why for each."""

    def __init__(self, reason: str, checks: tuple[FormatCheck, ...]) -> None:
        super().__init__(reason)
        self.checks = checks


@dataclass(frozen=True)
class _Reference:
    inputs: np.ndarray
    logits: np.ndarray
    source: str
    fp32_format: str = ""          # with DEVICE_INPUTS: the fp32 format it came from
    fp32_data: bytes = b""
    fp32_model: Model | None = None


class Acceptance:
    """Chooses, loads and checks the format of each new version for one device."""

    def __init__(self, precisions: tuple[str, ...], canary: Canary, thresholds: Thresholds, *, obtain: Obtain,
                 load: Load, load_reference: LoadReference, runtime: str, device_class: str = "",
                 adapter_updates: bool = True) -> None:
        self.precisions = precisions
        self.adapter_updates = adapter_updates
        self.canary = canary
        self.thresholds = thresholds
        self._obtain, self._load, self._load_reference = obtain, load, load_reference
        self.runtime = runtime
        self.device_class = device_class

    def candidates(self, manifest: Manifest, served: Served | None) -> list[str]:
        """The version's formats this device may serve, in the order it tries them."""
        usable = [(*self._order(f), name) for name, f in manifest.models().items()
                  if f.precision in self.precisions and self._can_serve(f, served)]
        return [name for *_, name in sorted(usable)]

    def _order(self, entry: ArtifactFile) -> tuple[int, int, int]:
        adapters_first = 0 if self.adapter_updates and takes_adapters(entry) else 1
        precision = self.precisions.index(entry.precision) if entry.precision in self.precisions else len(self.precisions)
        return adapters_first, precision, _KIND_ORDER[entry.kind]

    def _can_serve(self, entry: ArtifactFile, served: Served | None) -> bool:
        if entry.kind == "tensorrt":
            return self.runtime == "tensorrt" and entry.metadata.get("device_class") == self.device_class
        if entry.is_update:  # only against the very model this device serves
            return served is not None and int(entry.metadata["base_version"]) == served.version and \
                entry.metadata["base_sha256"] == served.manifest.formats[served.format].model_sha256
        return True

    def choose(self, manifest: Manifest, served: Served | None) -> Accepted:
        """The first candidate that passes; raises NoFormatAccepted (with every check) when none does.

        DownloadIncomplete propagates: the choice restarts (resuming downloads) on the next notice.
        """
        names = self.candidates(manifest, served)
        if not names:
            raise NoFormatAccepted(f"it has {', '.join(sorted(manifest.models()))}; this device takes "
                                   f"{', '.join(self.precisions)} (updates apply only to what it serves)", ())
        checks: list[FormatCheck] = []
        reference = _LazyReference(self, manifest, served)
        for name in names:
            try:
                accepted = self._check(manifest, name, served, reference)
            except DownloadIncomplete:
                raise
            except Exception as err:  # noqa: BLE001 - whatever fails on an untrusted artifact refuses that format
                checks.append(FormatCheck(name, False, refusal_reason(err), getattr(err, "agreement", None),
                                          reference.source))
                continue
            return Accepted(accepted.format, accepted.model, accepted.data, accepted.canary_accuracy,
                            (*checks, *accepted.checks))
        raise NoFormatAccepted("; ".join(f"{c.format}: {c.reason}" for c in checks), tuple(checks))

    def _check(self, manifest: Manifest, name: str, served: Served | None, reference: _LazyReference) -> Accepted:
        ref = reference.get(name)
        own = ref is not None and ref.fp32_format == name  # this candidate is the fp32 the reference came from
        if own and ref is not None and ref.fp32_model is not None and self.runtime == "onnxruntime-cpu" and \
                not takes_adapters(manifest.formats[name]):  # the reference model is what this device would serve
            accuracy = self.canary.check(ref.fp32_model, served, ref.logits)
            return Accepted(name, ref.fp32_model, ref.fp32_data, accuracy, (FormatCheck(name, True, "", None,
                                                                                          IS_REFERENCE),))
        # an unmerged graph serves through its adapter path (unmerged or merged here): checked against the plain graph
        data = ref.fp32_data if own and ref is not None else self._obtain(manifest, name)
        model = self._load(manifest, name, data)
        inputs = self.canary.inputs
        out = model.predict(inputs) if inputs is not None else None
        accuracy = self.canary.check(model, served, out)
        if ref is None:
            if manifest.formats[name].precision != "fp32":
                raise AgreementError("no fp32 reference to compare with: this version has neither an fp32 model "
                                     "this device can run nor a reference set")
            return Accepted(name, model, data, accuracy, (FormatCheck(name, True),))
        logits = out if ref.source == DEVICE_INPUTS and out is not None else model.predict(ref.inputs)
        result = agreement(logits, ref.logits, ref.inputs)
        failures = self.thresholds.failures(result)
        if failures:
            raise AgreementError(f"disagrees with fp32 on {result.samples} inputs ({ref.source}): "
                                 f"{'; '.join(failures)}", result)
        return Accepted(name, model, data, accuracy, (FormatCheck(name, True, "", result, ref.source),))

    def fp32_source(self, manifest: Manifest, served: Served | None) -> str:
        """This version's fp32 ONNX (or fp32 update) this device can run as the reference ("" if none); of several, the
        one it would serve first."""
        usable = sorted((*self._order(f), name) for name, f in manifest.models().items()
                        if f.precision == "fp32" and f.kind != "tensorrt" and self._can_serve(f, served))
        return usable[0][-1] if usable else ""

    def reference(self, manifest: Manifest, served: Served | None) -> _Reference | None:
        """fp32 on the device's own inputs, else the registry's reference set, else None."""
        inputs = self.canary.inputs
        fp32 = self.fp32_source(manifest, served)
        if inputs is not None and fp32:
            data = self._obtain(manifest, fp32)
            model = self._load_reference(data)
            return _Reference(inputs, model.predict(inputs), DEVICE_INPUTS, fp32, data, model)
        if REFERENCE in manifest.formats:
            x, logits = read_reference_set(self._obtain(manifest, REFERENCE))
            return _Reference(x, logits, REFERENCE_SET)
        return None


class _LazyReference:
    """The reference of one choice, computed when the first candidate needs it, errors included."""

    def __init__(self, acceptance: Acceptance, manifest: Manifest, served: Served | None) -> None:
        self._args = (acceptance, manifest, served)
        self._fp32 = acceptance.fp32_source(manifest, served)
        self._done = False
        self._value: _Reference | None = None
        self._error: Exception | None = None

    @property
    def source(self) -> str:
        return self._value.source if self._value is not None else ""

    def get(self, candidate: str) -> _Reference | None:
        """The reference; raises what went wrong computing it (as is for the fp32 format it came from)."""
        if not self._done:
            acceptance, manifest, served = self._args
            try:
                self._value = acceptance.reference(manifest, served)
            except DownloadIncomplete:
                raise
            except Exception as err:  # noqa: BLE001 - kept, so every candidate reports the same cause
                self._error = err
            self._done = True
        if self._error is not None:
            if candidate == self._fp32:
                raise self._error
            raise AgreementError(f"no fp32 reference: {refusal_reason(self._error)}") from self._error
        return self._value


def refusal_reason(err: Exception) -> str:
    """A refusal reason that says which check failed."""
    if isinstance(err, CanaryError):
        return f"canary failed: {err}"
    if isinstance(err, AgreementError):
        return str(err)
    if isinstance(err, ArtifactError):
        return f"artifact refused: {err}"
    return f"could not load: {type(err).__name__}: {err}"
