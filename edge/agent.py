"""The edge agent: serves a model, watches the registry, and swaps in verified, canary-checked versions.

    python -m fedge.edge.agent --registry HOST:PORT --device-id cam-0 --public-key registry.pub.pem \
        --workdir DIR [--data samples.npz]

Guarantees: it never serves an artifact whose manifest signature (pinned
registry key) or sha256 does not verify; a new version serves only after it
passes a canary batch; the swap is one reference assignment, so a request sees
either the old model or the new one; the last good model stays loaded for
rollback; downloads resume from the bytes already on disk after a crash.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from fedge.artifacts import (
    WEIGHTS_FORMAT,
    ArtifactError,
    Manifest,
    load_public_key,
    sha256_hex,
    verify_artifact,
    verify_manifest,
    verify_model,
)
from fedge.atomic_file import atomic_write
from fedge.edge.runtime import Model, choose_runtime, load_model
from fedge.grpc_tls import open_channel
from fedge.protos import edge_pb2, edge_pb2_grpc

log = logging.getLogger("fedge.edge.agent")


class DownloadIncomplete(Exception):
    """The link failed before the whole artifact arrived; the partial file stays for the next attempt."""


class CanaryError(Exception):
    """A verified artifact that nonetheless must not serve (non-finite, wrong shape, collapsed, worse)."""


@dataclass
class AgentConfig:
    registry: str
    device_id: str
    workdir: Path
    public_key: Path
    data: Path | None = None          # .npz with `x` (inputs) and optionally `y` (labels)
    tier: str = "mid"
    runtime: str | None = None        # default: best available (see fedge.edge.runtime)
    threads: int = 1                  # ONNX Runtime intra-op threads per agent
    chunk_size: int = 256 * 1024
    chunk_delay_s: float = 0.0        # throttle downloads (a slow link, for tests and demos)
    canary_size: int = 64
    min_canary_accuracy: float = 0.0  # absolute floor where labels exist
    max_accuracy_drop: float = 0.25   # allowed canary-accuracy drop against the serving model
    serve_batch: int = 1
    serve_passes: int = 0             # passes over the local data per version (0: forever)
    serve_interval_s: float = 0.005
    report_interval_s: float = 1.0
    max_fetch_attempts: int = 5
    root_certificates: Path | None = None  # the registry's CA (PEM): TLS; None: plaintext


@dataclass(frozen=True)
class Served:
    """One loaded version: swapped as a whole, never mutated."""

    version: int
    manifest: Manifest
    model: Model
    canary_accuracy: float | None


@dataclass
class _Window:
    """Serving statistics of the current version since it was swapped in."""

    version: int
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=2000))
    predictions: int = 0
    labelled: int = 0
    correct: int = 0
    entropy_sum: float = 0.0


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _entropy(logits: np.ndarray) -> np.ndarray:
    logp = _log_softmax(logits)
    return -(np.exp(logp) * logp).sum(axis=1)


class EdgeAgent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.workdir = Path(config.workdir)
        for sub in ("downloads", "models"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        self.public_key = load_public_key(Path(config.public_key))
        self.runtime = choose_runtime(config.runtime)
        self.x, self.y = self._load_data(config.data)
        self._served: Served | None = None
        self._last_good: Served | None = None
        self.rejected: dict[int, str] = {}  # last refusal reason per version (reported, and for operators)
        self._refused: set[str] = self._load_refused()  # notices never to retry, kept across restarts
        self._events: list[edge_pb2.DeploymentEvent] = []
        self._events_lock = threading.Lock()
        self._window = _Window(version=0)
        self._window_lock = threading.Lock()
        self._stop = threading.Event()
        self._report_now = threading.Event()
        self._watch_call: grpc.Call | None = None
        self.channel = open_channel(config.registry, config.root_certificates)
        self.stub = edge_pb2_grpc.EdgeRegistryStub(self.channel)
        self._restore()

    # ---- data and persisted state -------------------------------------------------------------

    @staticmethod
    def _load_data(path: Path | None) -> tuple[np.ndarray | None, np.ndarray | None]:
        if path is None:
            return None, None
        with np.load(path) as npz:
            x = np.asarray(npz["x"], dtype=np.float32)
            y = np.asarray(npz["y"], dtype=np.int64) if "y" in npz.files else None
        return x, y

    def _load_refused(self) -> set[str]:
        path = self.workdir / "refused.txt"
        return set(path.read_text().split()) if path.exists() else set()

    def _refuse(self, key: str) -> None:
        self._refused.add(key)
        atomic_write(self.workdir / "refused.txt", "".join(f"{k}\n" for k in sorted(self._refused)).encode())

    def _prune(self) -> None:
        """Keep only the serving and the last good model on disk."""
        keep = {self._model_dir(s.version).name for s in (self._served, self._last_good) if s is not None}
        for d in (self.workdir / "models").iterdir():
            if d.is_dir() and d.name not in keep and not d.name.endswith(".tmp"):
                for f in d.iterdir():
                    f.unlink()
                d.rmdir()

    def _model_dir(self, version: int) -> Path:
        return self.workdir / "models" / f"v{version:06d}"

    def _restore(self) -> None:
        """Serve the last model this device verified, after a restart, re-verifying it from disk."""
        pointer = self.workdir / "current"
        if not pointer.exists():
            return
        try:
            d = self._model_dir(int(pointer.read_text().strip()))
            manifest = verify_manifest((d / "manifest.json").read_bytes(), (d / "manifest.sig").read_bytes(), self.public_key)
            data = (d / "model.bin").read_bytes()
            verify_model(data, manifest)
            served = Served(manifest.version, manifest, load_model(data, self.runtime, self.config.threads), None)
        except (OSError, ValueError, ArtifactError) as err:
            log.warning("%s: stored model does not verify (%s); starting without one", self.config.device_id, err)
            return
        self._swap(served)
        log.info("%s: restored v%d from disk", self.config.device_id, served.version)

    def _persist(self, manifest: Manifest, canonical: bytes, signature: bytes, data: bytes) -> None:
        d = self._model_dir(manifest.version)
        tmp = d.with_name(d.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "model.bin").write_bytes(data)
        (tmp / "manifest.json").write_bytes(canonical)
        (tmp / "manifest.sig").write_bytes(signature)
        if d.exists():
            for f in d.iterdir():
                f.unlink()
            d.rmdir()
        os.replace(tmp, d)
        atomic_write(self.workdir / "current", f"{manifest.version}\n".encode())

    # ---- serving -----------------------------------------------------------------------------------

    @property
    def serving_version(self) -> int:
        served = self._served
        return served.version if served else 0

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, int]:
        """Logits and the version that produced them; raises if nothing verified is loaded yet."""
        served = self._served  # one read: a concurrent swap cannot mix two models in one request
        if served is None:
            raise RuntimeError("no verified model loaded yet")
        return served.model.predict(x), served.version

    def _swap(self, new: Served) -> None:
        old = self._served
        if old is not None:
            self._last_good = old
        self._served = new
        with self._window_lock:
            self._window = _Window(version=new.version)

    def rollback(self, reason: str) -> bool:
        """Return to the last good model (after a live failure of the new one)."""
        failed, good = self._served, self._last_good
        if good is None or failed is None:
            return False
        self._served, self._last_good = good, None
        with self._window_lock:
            self._window = _Window(version=good.version)
        atomic_write(self.workdir / "current", f"{good.version}\n".encode())
        self.rejected[failed.version] = reason
        self._refuse(_manifest_key(failed.manifest))
        self._event(failed.version, "rolled_back", reason)
        log.warning("%s: rolled back v%d -> v%d: %s", self.config.device_id, failed.version, good.version, reason)
        return True

    def serve_once(self, x: np.ndarray, y: np.ndarray | None = None) -> None:
        """One request through the serving path, recorded for telemetry; live failure triggers rollback."""
        if self._served is None:
            return
        start = time.perf_counter()
        try:
            logits, version = self.predict(x)
            if not np.isfinite(logits).all():
                raise FloatingPointError("non-finite outputs")
        except Exception as err:  # noqa: BLE001 - a live failure of any kind sends us back to the last good model
            self.rollback(f"serving failed: {type(err).__name__}: {err}")
            return
        latency_ms = (time.perf_counter() - start) * 1000.0
        with self._window_lock:
            w = self._window
            if w.version != version:
                return
            w.latencies_ms.append(latency_ms)
            w.predictions += len(x)
            w.entropy_sum += float(_entropy(logits).sum())
            if y is not None:
                w.labelled += len(y)
                w.correct += int((logits.argmax(1) == y).sum())

    def _serving_loop(self) -> None:
        """Replay the local data as a request stream, from its start for each new version.

        With `serve_passes` > 0 it stops after that many passes per version, so
        a version's telemetry covers each local sample exactly that often.
        """
        if self.x is None:
            return
        n, b = len(self.x), max(1, self.config.serve_batch)
        version, i, served = -1, 0, 0
        while not self._stop.is_set():
            if self.serving_version != version:
                version, i, served = self.serving_version, 0, 0
            if self.config.serve_passes and served >= self.config.serve_passes * n:
                self._stop.wait(0.05)
                continue
            sel = slice(i, min(i + b, n))
            self.serve_once(self.x[sel], None if self.y is None else self.y[sel])
            served += sel.stop - sel.start
            i = sel.stop % n
            self._stop.wait(self.config.serve_interval_s)

    # ---- deployments ---------------------------------------------------------------------------------

    def _event(self, version: int, status: str, reason: str = "") -> None:
        with self._events_lock:
            self._events.append(edge_pb2.DeploymentEvent(version=version, status=status, reason=reason))
        self._report_now.set()

    def handle_notice(self, notice: edge_pb2.DeploymentNotice) -> str:
        """Verify, download, check and swap one announced version.

        Returns "deployed", "refused", "skipped" (old or already refused) or
        "incomplete" (the download was cut; retry after reconnecting).
        A refusal is remembered by the notice's content, not its version
        number, so a forged notice cannot block the genuine version.
        """
        forged_key = "notice:" + sha256_hex(notice.manifest + notice.signature)
        if forged_key in self._refused:
            return "skipped"
        try:
            manifest = verify_manifest(notice.manifest, notice.signature, self.public_key)
            if manifest.version != notice.version:
                raise ArtifactError(f"notice says v{notice.version}, signed manifest says v{manifest.version}")
        except ArtifactError as err:
            self._refuse(forged_key)
            self._reject(notice.version, f"manifest refused: {err}")
            return "refused"
        key = _manifest_key(manifest)
        if manifest.version <= self.serving_version or key in self._refused:
            return "skipped"
        try:
            data = self.download(manifest)
            model: Model | None = None
            if manifest.format == WEIGHTS_FORMAT:
                data = self._apply_weight_update(manifest, data)
                refit = getattr(self._served.model, "with_weights", None) if self._served else None
                if callable(refit):
                    model = refit(data)  # TensorRT: refit a copy of the serving engine instead of rebuilding
            if model is None:
                model = load_model(data, self.runtime, self.config.threads)
            accuracy = self.canary(model)
        except DownloadIncomplete as err:
            log.warning("%s: v%d not complete yet: %s", self.config.device_id, manifest.version, err)
            return "incomplete"  # not a refusal: the next notice (after reconnecting) resumes it
        except Exception as err:  # noqa: BLE001 - whatever fails on an untrusted artifact is a refusal
            self._refuse(key)
            self._reject(manifest.version, _refusal(err))
            return "refused"
        self._persist(manifest, notice.manifest, notice.signature, data)
        self._swap(Served(manifest.version, manifest, model, accuracy))
        self._prune()
        self._event(manifest.version, "deployed")
        log.info("%s: serving v%d (%s)", self.config.device_id, manifest.version, self.runtime)
        return "deployed"

    def _apply_weight_update(self, manifest: Manifest, payload: bytes) -> bytes:
        """Rebuild the full model from the serving one plus changed weights; it must hash to the signed target."""
        from fedge.onnx_weights import apply_initializers, decode_weights

        served = self._served
        base_version = int(manifest.metadata["base_version"])
        if served is None or served.version != base_version:
            raise ArtifactError(f"update is against v{base_version}, this device serves v{self.serving_version}")
        if served.manifest.model_sha256 != manifest.metadata["base_sha256"]:
            raise ArtifactError("update's base sha256 differs from the serving model's")
        base = (self._model_dir(base_version) / "model.bin").read_bytes()
        verify_model(base, served.manifest)
        data = apply_initializers(base, decode_weights(payload))
        verify_model(data, manifest)
        return data

    def _reject(self, version: int, reason: str) -> None:
        self.rejected[version] = reason
        self._event(version, "rejected", reason)
        log.warning("%s: refused v%d, still serving v%d: %s", self.config.device_id, version, self.serving_version, reason)

    def canary(self, model: Model) -> float | None:
        """Run the candidate on the canary batch before it may serve; returns its accuracy (if labelled)."""
        if self.x is None:
            return None
        x = self.x[: self.config.canary_size]
        out = model.predict(x)
        if out.ndim != 2 or out.shape[0] != len(x):
            raise CanaryError(f"output shape {out.shape} for a batch of {len(x)}")
        current = self._served
        if current is not None:
            expected = current.model.predict(x[:1]).shape[1]
            if out.shape[1] != expected:
                raise CanaryError(f"{out.shape[1]} classes, serving model has {expected}")
        if not np.isfinite(out).all():
            raise CanaryError("non-finite outputs")
        pred = out.argmax(1)
        if self.y is None:
            return None
        y = self.y[: len(x)]
        if len(x) >= 10 and len(np.unique(pred)) == 1 and len(np.unique(y)) > 1:
            raise CanaryError(f"collapsed: predicts class {int(pred[0])} for all {len(x)} canary inputs")
        accuracy = float((pred == y).mean())
        if accuracy < self.config.min_canary_accuracy:
            raise CanaryError(f"accuracy {accuracy:.3f} below the floor {self.config.min_canary_accuracy:.3f}")
        if current is not None:
            baseline = current.canary_accuracy
            if baseline is None:
                baseline = float((current.model.predict(x).argmax(1) == y).mean())
            if accuracy < baseline - self.config.max_accuracy_drop:
                raise CanaryError(f"accuracy {accuracy:.3f} vs {baseline:.3f} for the serving model")
        return accuracy

    def download(self, manifest: Manifest) -> bytes:
        """Fetch in chunks into `<sha256>.partial`, resuming from its size; retry on a cut stream."""
        partial = self.workdir / "downloads" / f"{manifest.sha256}.partial"
        for attempt in range(1, self.config.max_fetch_attempts + 1):
            offset = partial.stat().st_size if partial.exists() else 0
            if offset > manifest.bytes:
                partial.unlink()
                offset = 0
            if offset == manifest.bytes:
                break
            request = edge_pb2.FetchRequest(device_id=self.config.device_id, version=manifest.version,
                                            offset=offset, chunk_size=self.config.chunk_size)
            try:
                with open(partial, "ab") as fh:
                    for chunk in self.stub.FetchArtifact(request, timeout=120):
                        if chunk.offset != offset:
                            raise ArtifactError(f"chunk at offset {chunk.offset}, expected {offset}")
                        fh.write(chunk.data)
                        fh.flush()
                        offset += len(chunk.data)
                        if self._stop.is_set():
                            raise ArtifactError("agent stopping")
                        if self.config.chunk_delay_s:
                            time.sleep(self.config.chunk_delay_s)
            except grpc.RpcError as err:
                log.warning("%s: fetch v%d cut at %d bytes (attempt %d): %s", self.config.device_id,
                            manifest.version, offset, attempt, err.code() if hasattr(err, "code") else err)
                time.sleep(min(0.2 * attempt, 2.0))
        held = partial.stat().st_size if partial.exists() else 0
        if held < manifest.bytes:
            raise DownloadIncomplete(f"{held} of {manifest.bytes} bytes after {self.config.max_fetch_attempts} attempts")
        data = partial.read_bytes()
        partial.unlink()  # verified or not, a complete partial has done its job; a bad one must not poison a retry
        verify_artifact(data, manifest)
        return data

    # ---- registry conversation ------------------------------------------------------------------------

    def register(self) -> None:
        profile = edge_pb2.DeviceProfile(device_id=self.config.device_id, tier=self.config.tier, runtime=self.runtime,
                                         capabilities=self._capabilities(), serving_version=self.serving_version)
        self.stub.Register(profile, timeout=10)

    def _capabilities(self) -> list[str]:
        caps = ["fp32", "int8"]
        if self.runtime != "onnxruntime-cpu":
            caps += ["fp16", "gpu"]
        return caps

    def upload_samples(self, x: np.ndarray, y: np.ndarray | None = None) -> int:
        """Send inputs with the serving model's probabilities and entropy up (for cloud-side adaptation)."""
        logits, version = self.predict(x)
        logp = _log_softmax(logits)
        probs = np.exp(logp)
        entropy = -(probs * logp).sum(axis=1)
        batch = edge_pb2.SampleBatch(device_id=self.config.device_id, serving_version=version)
        for i in range(len(x)):
            xi = np.ascontiguousarray(x[i], dtype=np.float32)
            sample = batch.samples.add(tensor=xi.tobytes(), shape=list(xi.shape), dtype=str(xi.dtype),
                                       entropy=float(entropy[i]), probabilities=probs[i].tolist())
            if y is not None:
                sample.label = int(y[i])
        return int(self.stub.UploadSamples(batch, timeout=30).stored)

    def telemetry(self) -> edge_pb2.Telemetry:
        with self._window_lock:
            w = self._window
            lat = np.asarray(w.latencies_ms, dtype=np.float64)
            msg = edge_pb2.Telemetry(
                device_id=self.config.device_id, serving_version=self.serving_version, runtime=self.runtime,
                latency_p50_ms=float(np.percentile(lat, 50)) if len(lat) else 0.0,
                latency_p95_ms=float(np.percentile(lat, 95)) if len(lat) else 0.0,
                mean_entropy=w.entropy_sum / w.predictions if w.predictions else 0.0,
                num_predictions=w.predictions, timestamp_unix=time.time())
            if w.labelled:
                msg.accuracy = w.correct / w.labelled
        return msg

    def report(self) -> None:
        msg = self.telemetry()
        with self._events_lock:
            events, self._events = self._events, []
        msg.events.extend(events)
        try:
            self.stub.ReportTelemetry(msg, timeout=5)
        except grpc.RpcError:
            with self._events_lock:  # keep the events for the next report
                self._events = events + self._events
            raise

    def _report_loop(self) -> None:
        while not self._stop.is_set():
            self._report_now.wait(self.config.report_interval_s)
            self._report_now.clear()
            try:
                self.report()
            except grpc.RpcError as err:
                log.debug("telemetry not delivered: %s", err)

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

    # ---- lifecycle -------------------------------------------------------------------------------------

    def start(self) -> list[threading.Thread]:
        threads = [threading.Thread(target=t, name=f"agent-{n}", daemon=True)
                   for n, t in (("watch", self._watch_loop), ("serve", self._serving_loop), ("report", self._report_loop))]
        for t in threads:
            t.start()
        self._threads = threads
        return threads

    def stop(self) -> None:
        self._stop.set()
        self._report_now.set()
        call = self._watch_call
        if call is not None:
            call.cancel()
        for t in getattr(self, "_threads", []):
            t.join(timeout=5)
        try:
            self.report()
        except grpc.RpcError:
            pass
        self.channel.close()


def _manifest_key(manifest: Manifest) -> str:
    return f"artifact:{manifest.version}:{manifest.sha256}"


def _refusal(err: Exception) -> str:
    """A refusal reason that says which check failed."""
    if isinstance(err, CanaryError):
        return f"canary failed: {err}"
    if isinstance(err, ArtifactError):
        return f"artifact refused: {err}"
    return f"could not load: {type(err).__name__}: {err}"


def main(
    registry_address: str,
    device_id: str,
    *,
    public_key: str | Path,
    workdir: str | Path,
    data: str | Path | None = None,
    tier: str = "mid",
    runtime: str | None = None,
    duration_s: float | None = None,
    root_certificates: str | Path | None = None,
    **options: float,
) -> int:
    """Run one edge agent until SIGINT/SIGTERM (or `duration_s`); `fedge edge agent --registry HOST:PORT`.

    `options` are further `AgentConfig` fields (chunk_size, chunk_delay_s, canary_size, ...).
    """
    config = AgentConfig(registry=registry_address, device_id=device_id, workdir=Path(workdir),
                         public_key=Path(public_key), data=Path(data) if data else None, tier=tier, runtime=runtime,
                         root_certificates=Path(root_certificates) if root_certificates else None,
                         **options)  # type: ignore[arg-type]
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s agent {device_id} %(message)s")  # no-op if set up
    agent = EdgeAgent(config)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    print(f"AGENT {device_id} runtime={agent.runtime} serving=v{agent.serving_version}", flush=True)
    agent.start()
    done.wait(duration_s)
    agent.stop()
    return 0


def _cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="fedge edge agent")
    parser.add_argument("--registry", required=True, help="HOST:PORT of the model registry")
    parser.add_argument("--device-id", required=True)
    parser.add_argument("--public-key", required=True, help="the registry's Ed25519 public key (PEM), pinned")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--data", default=None, help=".npz with x (and y) to serve and canary on")
    parser.add_argument("--tier", default="mid")
    parser.add_argument("--runtime", default=None)
    parser.add_argument("--duration", type=float, default=None, help="seconds to run (default: until signalled)")
    parser.add_argument("--chunk-size", type=int, default=256 * 1024)
    parser.add_argument("--chunk-delay", type=float, default=0.0, help="seconds to wait after each chunk")
    parser.add_argument("--canary-size", type=int, default=64)
    parser.add_argument("--min-canary-accuracy", type=float, default=0.0)
    parser.add_argument("--max-accuracy-drop", type=float, default=0.25)
    parser.add_argument("--report-interval", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--serve-batch", type=int, default=1)
    parser.add_argument("--serve-passes", type=int, default=0, help="passes over --data per version (0: forever)")
    parser.add_argument("--root-certificates", default=None, help="the registry's CA (PEM): connect over TLS")
    args = parser.parse_args(argv)
    return main(args.registry, args.device_id, public_key=args.public_key, workdir=args.workdir, data=args.data,
                tier=args.tier, runtime=args.runtime, duration_s=args.duration, chunk_size=args.chunk_size,
                chunk_delay_s=args.chunk_delay, canary_size=args.canary_size,
                min_canary_accuracy=args.min_canary_accuracy, max_accuracy_drop=args.max_accuracy_drop,
                report_interval_s=args.report_interval, threads=args.threads, serve_batch=args.serve_batch,
                serve_passes=args.serve_passes, root_certificates=args.root_certificates)


if __name__ == "__main__":
    raise SystemExit(_cli())
