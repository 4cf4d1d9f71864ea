"""What a device tells the registry: telemetry of the serving window, deployment events, and uploaded samples.

Reports go out every `interval_s`, and at once when a deployment event
(deployed, rejected, rolled_back) happens; events that could not be delivered
are kept for the next report.
"""

from __future__ import annotations

import logging
import threading
import time

import grpc
import numpy as np

from fedge.edge.agent.serving import Serving, log_softmax
from fedge.edge.agreement import Agreement
from fedge.protos import edge_pb2, edge_pb2_grpc

log = logging.getLogger(__name__)


class Reporter:
    """Builds and sends one device's Telemetry; `loop` runs until `stop` is set."""

    def __init__(self, stub: edge_pb2_grpc.EdgeRegistryStub, device_id: str, runtime: str, serving: Serving, *,
                 interval_s: float, stop: threading.Event) -> None:
        self.stub = stub
        self.device_id = device_id
        self.runtime = runtime
        self.serving = serving
        self.interval_s = interval_s
        self._stop = stop
        self._events: list[edge_pb2.DeploymentEvent] = []
        self._events_lock = threading.Lock()
        self._report_now = threading.Event()

    def event(self, version: int, status: str, reason: str = "", fmt: str = "", agreement: Agreement | None = None,
              reference: str = "", *, bytes_fetched: int = 0, adapter_mode: str = "", unmerged_cost: float = 0.0) -> None:
        """Record a deployment event (about one format, with its agreement with fp32 where measured; the bytes the
        device downloaded of the version; how it serves an unmerged graph) and report it without waiting for the
        next interval."""
        message = edge_pb2.DeploymentEvent(version=version, status=status, reason=reason, format=fmt,
                                           bytes_fetched=bytes_fetched, adapter_mode=adapter_mode,
                                           unmerged_cost=unmerged_cost)
        if agreement is not None:
            message.agreement.CopyFrom(edge_pb2.Agreement(
                samples=agreement.samples, top1=agreement.top1, max_logit_diff=agreement.max_logit_diff,
                logit_range=agreement.logit_range, reference=reference))
        with self._events_lock:
            self._events.append(message)
        self._report_now.set()

    def telemetry(self) -> edge_pb2.Telemetry:
        w = self.serving.window()
        served = self.serving.served
        lat = np.asarray(w.latencies_ms, dtype=np.float64)
        msg = edge_pb2.Telemetry(
            device_id=self.device_id, serving_version=served.version if served else 0, runtime=self.runtime,
            format=served.format if served else "", num_failures=w.failures,
            latency_p50_ms=float(np.percentile(lat, 50)) if len(lat) else 0.0,
            latency_p95_ms=float(np.percentile(lat, 95)) if len(lat) else 0.0,
            mean_entropy=w.entropy_sum / w.scored if w.scored else 0.0,
            num_predictions=w.predictions, timestamp_unix=time.time())
        if w.labelled:
            msg.accuracy = w.correct / w.labelled
        return msg

    def report(self) -> None:
        """Send telemetry with the pending events; raises grpc.RpcError (the events stay pending)."""
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

    def loop(self) -> None:
        while not self._stop.is_set():
            self._report_now.wait(self.interval_s)
            self._report_now.clear()
            try:
                self.report()
            except grpc.RpcError as err:
                log.debug("telemetry not delivered: %s", err)

    def wake(self) -> None:
        """End the current wait (on stop, so the loop sees it at once)."""
        self._report_now.set()


def sample_batch(device_id: str, version: int, x: np.ndarray, logits: np.ndarray,
                 y: np.ndarray | None = None) -> edge_pb2.SampleBatch:
    """Inputs with the serving model's probabilities and entropy (for cloud-side adaptation)."""
    logp = log_softmax(logits)
    probs = np.exp(logp)
    entropy = -(probs * logp).sum(axis=1)
    batch = edge_pb2.SampleBatch(device_id=device_id, serving_version=version)
    for i in range(len(x)):
        xi = np.ascontiguousarray(x[i], dtype=np.float32)
        sample = batch.samples.add(tensor=xi.tobytes(), shape=list(xi.shape), dtype=str(xi.dtype),
                                   entropy=float(entropy[i]), probabilities=probs[i].tolist())
        if y is not None:
            sample.label = int(y[i])
    return batch
