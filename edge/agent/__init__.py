"""The edge agent: serves a model, watches the registry, and swaps in verified, checked versions.

Guarantees: it never serves an artifact whose manifest signature (pinned
registry key) or sha256 does not verify, and checks the signature before
downloading anything; of each version it serves the smallest format its
capabilities allow that passes the canary and agrees with fp32 on this device
(`acceptance`), falling back in order, and refuses the version when none does;
a device serving an unmerged graph takes the next version as an adapter update
(`fedge.edge.adapters`: the coded change of the adapter, applied without a new
download of the base, and checked against the signed whole result);
the swap is one reference assignment, so a request sees either the old model
or the new one; the last good model stays loaded for rollback; downloads resume
from the bytes already on disk after a crash; after a restart it serves the
last model it verified, re-verified from disk.

`EdgeAgent` composes the pieces: `store` (disk), `fetch` (download),
`canary`, `acceptance` (format choice), `serving` and `telemetry`. `fedge edge
agent` runs one (`run_agent`). What runs on a device imports neither torch nor peft.
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from fedge.edge.adapters.delta import adapter_tensors, apply_adapter_update
from fedge.edge.adapters.serving import MODES, load_adapter_model
from fedge.edge.agent.acceptance import Acceptance, FormatCheck, NoFormatAccepted, refusal_reason, takes_adapters
from fedge.edge.agent.canary import Canary
from fedge.edge.agent.fetch import DownloadIncomplete, Fetcher
from fedge.edge.agent.serving import Served, Serving
from fedge.edge.agent.store import AgentStore, artifact_key, notice_key
from fedge.edge.agent.telemetry import Reporter, sample_batch
from fedge.edge.agreement import Thresholds
from fedge.edge.artifacts import (
    ADAPTER_KIND,
    PRECISIONS,
    WEIGHTS_KIND,
    ArtifactError,
    Manifest,
    load_public_key,
    verify_manifest,
    verify_model,
)
from fedge.edge.capabilities import Capabilities, describe, detect, preferred_precisions
from fedge.edge.runtime import Model, OnnxRuntimeModel, choose_runtime, load_model
from fedge.edge.scoring import TOKEN_INPUTS, pack_tokens
from fedge.edge.tls import open_channel
from fedge.errors import UserError
from fedge.protos import edge_pb2, edge_pb2_grpc

log = logging.getLogger(__name__)


@dataclass
class AgentConfig:
    registry: str
    device_id: str
    workdir: Path
    public_key: Path
    data: Path | None = None          # .npz: `x` (inputs) and optionally `y` (labels), or an LM's token ids and mask
    tier: str = "mid"
    runtime: str | None = None        # default: best available (see fedge.edge.runtime)
    precisions: tuple[str, ...] | None = None  # declared: what it takes, in order (default: what its capabilities allow)
    threads: int = 1                  # ONNX Runtime intra-op threads per agent
    chunk_size: int = 256 * 1024
    chunk_delay_s: float = 0.0        # throttle downloads (a slow link, for tests and demos)
    canary_size: int = 128            # local inputs every candidate runs on (and fp32's reference outputs)
    min_canary_accuracy: float = 0.0  # absolute floor where labels exist
    max_accuracy_drop: float = 0.25   # allowed canary-accuracy drop against the serving model
    min_agreement: float = Thresholds.min_top1          # a format's top-1 agreement with fp32, at least
    max_logit_diff: float = Thresholds.max_relative_diff  # its max |logit diff|, as a share of fp32's logit range
    serve_batch: int = 1
    serve_passes: int = 0             # passes over the local data per version (0: forever)
    serve_interval_s: float = 0.005
    report_interval_s: float = 1.0
    max_fetch_attempts: int = 5
    root_certificates: Path | None = None  # the registry's CA (PEM): TLS; None: plaintext
    adapter_updates: bool = True      # serve unmerged graphs first, so later versions arrive as adapter updates
    adapter_mode: str = "auto"        # an unmerged graph on ONNX Runtime: auto (measured here), unmerged or merged


class EdgeAgent:
    """One device: restores its last verified model, then watches, fetches, checks, swaps, serves and reports."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.workdir = Path(config.workdir)
        self.store = AgentStore(self.workdir, load_public_key(Path(config.public_key)))
        self.runtime = choose_runtime(config.runtime)
        self.capabilities = _capabilities(self.runtime)
        self.precisions = _precisions(config.precisions, self.runtime, self.capabilities)
        if config.adapter_mode not in MODES:
            raise ValueError(f"adapter_mode must be one of {MODES}, not {config.adapter_mode!r}")
        self.x, self.y = _load_data(config.data)
        self.rejected: dict[int, str] = {}  # last refusal reason per version (reported, and for operators)
        self.checks: dict[int, tuple[FormatCheck, ...]] = {}  # each version's format checks on this device
        self._stop = threading.Event()
        self.serving = Serving(on_failure=self.rollback)
        self.canary = Canary(self.x, self.y, config.canary_size, config.min_canary_accuracy, config.max_accuracy_drop)
        self.acceptance = Acceptance(
            self.precisions, self.canary, Thresholds(config.min_agreement, config.max_logit_diff),
            obtain=self._obtain, load=self._load, load_reference=self._load_reference, runtime=self.runtime,
            device_class=self.capabilities.gpu, adapter_updates=config.adapter_updates)
        self.channel = open_channel(config.registry, config.root_certificates)
        self.stub = edge_pb2_grpc.EdgeRegistryStub(self.channel)
        self.fetcher = Fetcher(self.stub, config.device_id, self.workdir / "downloads", chunk_size=config.chunk_size,
                               chunk_delay_s=config.chunk_delay_s, max_attempts=config.max_fetch_attempts, stop=self._stop)
        self.reporter = Reporter(self.stub, config.device_id, self.runtime, self.serving,
                                 interval_s=config.report_interval_s, stop=self._stop)
        self._watch_call: grpc.Call | None = None
        self._threads: list[threading.Thread] = []
        self._restore()

    @property
    def serving_version(self) -> int:
        return self.serving.version

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, int]:
        """Logits and the version that produced them; raises if nothing verified is loaded yet."""
        return self.serving.predict(x)

    def _restore(self) -> None:
        """Serve the last model this device verified, after a restart, re-verifying it from disk."""
        try:
            stored = self.store.current()
            if stored is None:
                return
            manifest, fmt, data = stored
            served = Served(manifest.version, manifest, fmt, self._load(manifest, fmt, data), None)
        except (OSError, ValueError, ArtifactError) as err:
            log.warning("%s: stored model does not verify (%s); starting without one", self.config.device_id, err)
            return
        self.serving.swap(served)
        log.info("%s: restored v%d (%s) from disk", self.config.device_id, served.version, served.format)

    def rollback(self, reason: str) -> bool:
        """Return to the last good model (after a live failure of the new one)."""
        pair = self.serving.rollback()
        if pair is None:
            return False
        failed, good = pair
        self.store.set_current(good.version, good.format)
        self.rejected[failed.version] = reason
        self.store.refuse(artifact_key(failed.manifest))
        self.reporter.event(failed.version, "rolled_back", reason)
        log.warning("%s: rolled back v%d -> v%d: %s", self.config.device_id, failed.version, good.version, reason)
        return True

    # ---- deployments ---------------------------------------------------------------------------------

    def handle_notice(self, notice: edge_pb2.DeploymentNotice) -> str:
        """Verify one announced version, choose and check its format for this device, and swap it in.

        Returns "deployed", "refused", "skipped" (old or already refused) or
        "incomplete" (the download was cut; retry after reconnecting).
        A refusal is remembered by the notice's content, not its version
        number, so a forged notice cannot block the genuine version.
        """
        forged_key = notice_key(notice.manifest, notice.signature)
        if self.store.is_refused(forged_key):
            return "skipped"
        try:
            manifest = verify_manifest(notice.manifest, notice.signature, self.store.public_key)
            if manifest.version != notice.version:
                raise ArtifactError(f"notice says v{notice.version}, signed manifest says v{manifest.version}")
        except ArtifactError as err:
            self.store.refuse(forged_key)
            self._reject(notice.version, f"manifest refused: {err}")
            return "refused"
        key = artifact_key(manifest)
        if manifest.version <= self.serving_version or self.store.is_refused(key):
            return "skipped"
        try:
            accepted = self.acceptance.choose(manifest, self.serving.served)
        except DownloadIncomplete as err:
            log.warning("%s: v%d not complete yet: %s", self.config.device_id, manifest.version, err)
            return "incomplete"  # not a refusal: the next notice (after reconnecting) resumes it
        except NoFormatAccepted as err:
            self._report_checks(manifest.version, err.checks)
            self.store.refuse(key)
            self._reject(manifest.version, f"no format passed: {err}")
            return "refused"
        except Exception as err:  # noqa: BLE001 - whatever fails on an untrusted artifact is a refusal
            self.store.refuse(key)
            self._reject(manifest.version, refusal_reason(err))
            return "refused"
        self._report_checks(manifest.version, accepted.checks)
        self.store.save(manifest, notice.manifest, notice.signature, accepted.format, accepted.data)
        self.serving.swap(Served(manifest.version, manifest, accepted.format, accepted.model, accepted.canary_accuracy))
        self.store.prune(self.serving.kept_versions())
        chosen = accepted.checks[-1]
        mode, cost = getattr(accepted.model, "adapter_mode", ""), getattr(accepted.model, "unmerged_cost", None)
        self.reporter.event(manifest.version, "deployed", "", chosen.format, chosen.agreement, chosen.reference,
                            bytes_fetched=self.fetcher.fetched.get(manifest.version, 0), adapter_mode=mode,
                            unmerged_cost=cost or 0.0)
        log.info("%s: serving v%d %s (%s%s)", self.config.device_id, manifest.version, accepted.format, self.runtime,
                 f", adapter {mode}" + (f": unmerged costs {cost:.2f}x merged here" if cost else "") if mode else "")
        return "deployed"

    def _report_checks(self, version: int, checks: tuple[FormatCheck, ...]) -> None:
        """Keep a version's checks; each format that fell short is an event with its reason (and figures), so the
        fleet sees the fallbacks."""
        self.checks[version] = checks
        for check in checks:
            if not check.passed:
                self.reporter.event(version, "format_refused", check.reason, check.format, check.agreement,
                                    check.reference)
                log.warning("%s: v%d %s refused: %s", self.config.device_id, version, check.format, check.reason)

    def _obtain(self, manifest: Manifest, fmt: str) -> bytes:
        """A format's verified bytes; for an update, the whole model after applying it."""
        data = self.fetcher.download(manifest, fmt)
        if manifest.formats[fmt].is_update:
            data = self._apply_update(manifest, fmt, data)
        return data

    def _load(self, manifest: Manifest, fmt: str, data: bytes) -> Model:
        """A format on this device's runtime. A weight update on TensorRT refits a copy of the serving engine; an
        adapter update gives the serving base its new adapter (no new download, and unmerged no new session)."""
        entry = manifest.formats[fmt]
        served = self.serving.served
        update = {WEIGHTS_KIND: "with_weights", ADAPTER_KIND: "with_adapter"}.get(entry.kind, "")
        apply = getattr(served.model, update, None) if served and update else None
        if callable(apply):
            model: Model = apply(adapter_tensors(data) if entry.kind == ADAPTER_KIND else data)
            return model
        if takes_adapters(entry):  # an unmerged graph, or one an adapter update built (after a restart)
            return load_adapter_model(data, self.runtime, self.config.threads, self.config.adapter_mode)
        kind = "tensorrt" if entry.kind == "tensorrt" else "onnx"
        return load_model(data, self.runtime, self.config.threads, entry.precision, kind)

    def _load_reference(self, data: bytes) -> Model:
        """fp32 ONNX on ONNX Runtime's CPU provider: the reference every format here is compared with."""
        return OnnxRuntimeModel(data, "onnxruntime-cpu", self.config.threads)

    def _apply_update(self, manifest: Manifest, fmt: str, payload: bytes) -> bytes:
        """Rebuild the whole model from the serving one plus the update (changed weights, or the coded change of the
        adapter); it must hash to the signed target."""
        from fedge.edge.weights import apply_initializers, decode_weights

        served = self.serving.served
        entry = manifest.formats[fmt]
        base_version = int(entry.metadata["base_version"])
        if served is None or served.version != base_version:
            raise ArtifactError(f"update is against v{base_version}, this device serves v{self.serving_version}")
        if served.manifest.formats[served.format].model_sha256 != entry.metadata["base_sha256"]:
            raise ArtifactError(f"update's base sha256 differs from the served {served.format} model's")
        base = self.store.model_bytes(served.manifest, served.format)
        if entry.kind == ADAPTER_KIND:
            try:
                data = apply_adapter_update(base, payload)
            except ValueError as err:  # the envelope's refusal (EnvelopeError, with its reason), or another adapter
                raise ArtifactError(f"adapter update does not apply: {err}") from err
        else:
            data = apply_initializers(base, decode_weights(payload))
        verify_model(data, manifest, fmt)
        return data

    def _reject(self, version: int, reason: str) -> None:
        self.rejected[version] = reason
        self.reporter.event(version, "rejected", reason, bytes_fetched=self.fetcher.fetched.get(version, 0))
        log.warning("%s: refused v%d, still serving v%d: %s", self.config.device_id, version, self.serving_version, reason)

    # ---- registry conversation ------------------------------------------------------------------------

    def register(self) -> None:
        profile = edge_pb2.DeviceProfile(device_id=self.config.device_id, tier=self.config.tier, runtime=self.runtime,
                                         precisions=self.precisions, serving_version=self.serving_version,
                                         capabilities=edge_pb2.Capabilities(**self.capabilities.as_dict()))
        self.stub.Register(profile, timeout=10)

    def upload_samples(self, x: np.ndarray, y: np.ndarray | None = None) -> int:
        """Send inputs with the serving model's probabilities and entropy up (for cloud-side adaptation)."""
        logits, version = self.predict(x)
        return int(self.stub.UploadSamples(sample_batch(self.config.device_id, version, x, logits, y), timeout=30).stored)

    def _watch_loop(self) -> None:
        backoff = 0.2
        while not self._stop.is_set():
            try:
                self.register()
                call = self.stub.WatchDeployments(
                    edge_pb2.WatchRequest(device_id=self.config.device_id, known_version=self.serving_version))
                self._watch_call = call
                backoff = 0.2
                for notice in call:
                    if self._stop.is_set():
                        break
                    if self.handle_notice(notice) == "incomplete":
                        break  # an interrupted download: reconnect, get the notice again, resume
            except grpc.RpcError as err:
                if self._stop.is_set():
                    break
                log.info("%s: registry unavailable (%s); retrying", self.config.device_id,
                         err.code() if hasattr(err, "code") else err)
            self._stop.wait(backoff)
            backoff = min(backoff * 2, 5.0)

    def _serving_loop(self) -> None:
        if self.x is not None:
            self.serving.replay(self.x, self.y, batch=self.config.serve_batch, passes=self.config.serve_passes,
                                interval_s=self.config.serve_interval_s, stop=self._stop)

    # ---- lifecycle -------------------------------------------------------------------------------------

    def start(self) -> list[threading.Thread]:
        self._threads = [threading.Thread(target=t, name=f"agent-{n}", daemon=True) for n, t in
                         (("watch", self._watch_loop), ("serve", self._serving_loop), ("report", self.reporter.loop))]
        for t in self._threads:
            t.start()
        return self._threads

    def stop(self) -> None:
        self._stop.set()
        self.reporter.wake()
        call = self._watch_call
        if call is not None:
            call.cancel()
        for t in self._threads:
            t.join(timeout=5)
        try:
            self.reporter.report()
        except grpc.RpcError:
            pass
        self.channel.close()


def _load_data(path: Path | None) -> tuple[np.ndarray | None, np.ndarray | None]:
    """A classifier's inputs `x` (and labels `y` where given), or a causal LM's `input_ids` and `attention_mask`
    (as one token batch: `fedge.edge.scoring`; their labels are the next tokens)."""
    if path is None:
        return None, None
    with np.load(path) as npz:
        if set(TOKEN_INPUTS) <= set(npz.files):
            return pack_tokens(npz["input_ids"], npz["attention_mask"]), None
        if "x" not in npz.files:
            raise UserError(f"--data {path} has no array named x (it has {', '.join(npz.files) or 'none'})",
                            "give an .npz with x (inputs) and optionally y (labels), or input_ids and attention_mask "
                            "for a language model, e.g. `fedge export`'s samples.npz")
        x = np.asarray(npz["x"], dtype=np.float32)
        y = np.asarray(npz["y"], dtype=np.int64) if "y" in npz.files else None
    return x, y


def _capabilities(runtime: str) -> Capabilities:
    """This device's facts; on TensorRT, with the device class engine plans must be built for."""
    if runtime == "tensorrt":
        from fedge.edge.tensorrt_engine import device_class

        return detect(gpu=device_class())
    return detect()


def _precisions(declared: tuple[str, ...] | None, runtime: str, capabilities: Capabilities) -> tuple[str, ...]:
    if not declared:
        return preferred_precisions(runtime, capabilities)
    unknown = [p for p in declared if p not in PRECISIONS]
    if unknown or len(set(declared)) != len(declared):
        raise ValueError(f"precisions must be distinct values of {PRECISIONS}, not {declared}")
    return tuple(declared)


def run_agent(
    registry_address: str,
    device_id: str,
    *,
    public_key: str | Path,
    workdir: str | Path,
    data: str | Path | None = None,
    tier: str = "mid",
    runtime: str | None = None,
    precisions: tuple[str, ...] | None = None,
    duration_s: float | None = None,
    root_certificates: str | Path | None = None,
    **options: float,
) -> None:
    """Run one edge agent until SIGINT/SIGTERM (or `duration_s`); `fedge edge agent --registry HOST:PORT`.

    `options` are further `AgentConfig` fields (chunk_size, chunk_delay_s, canary_size, ...).
    """
    config = AgentConfig(registry=registry_address, device_id=device_id, workdir=Path(workdir),
                         public_key=Path(public_key), data=Path(data) if data else None, tier=tier, runtime=runtime,
                         precisions=precisions, root_certificates=Path(root_certificates) if root_certificates else None,
                         **options)  # type: ignore[arg-type]
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s agent {device_id} %(message)s")  # no-op if set up
    agent = EdgeAgent(config)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    print(f"AGENT {device_id} runtime={agent.runtime} takes={','.join(agent.precisions)} "
          f"cpu=[{describe(agent.capabilities)}] serving=v{agent.serving_version}", flush=True)
    agent.start()
    done.wait(duration_s)
    agent.stop()
