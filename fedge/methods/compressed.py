"""Compressed uploads: FedZip, ComPEFT ternary, and block-wise q8/q4, each a codec over the LoRA update.

Client: train, take the update (new - received), add the error-feedback
residual, encode it as one envelope, keep what the codec dropped. The node
also keeps the residual its last round started from: when the server sends
that round again (it discarded the round for too few replies, or restarted
from a checkpoint taken before it), the node starts over from there, so what
a discarded reply carried is not lost from the residual.

Server: open the envelopes one at a time as they are read (a running weighted
sum, never all decoded updates at once), refuse any that does not validate
(that client loses its round, the round goes on), and add the mean update to
the global adapter.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy

from fedge.aggregation import StreamingMean
from fedge.codecs import Codec, build_codec
from fedge.envelope import EnvelopeError, encode_update
from fedge.messages import METRICS_RECORD, UPDATE_RECORD, envelope_bytes, envelope_record, scalar
from fedge.methods.base import Job, Method, RunSpec, register_method, sampling
from fedge.methods.downlink import CodedDownloads, Downlink, make_downlink
from fedge.settings import ConfigSection
from fedge.state import add, from_record, subtract, to_record

log = logging.getLogger("fedge.server")

RESIDUAL_KEY = "fedge.residual"
#: the residual the last trained round started from, and that round's number
RESIDUAL_BEFORE_KEY = "fedge.residual-before"
RESIDUAL_ROUND_KEY = "fedge.residual-round"


# ---- options: each method's codec knobs (papers' defaults) ----------------------------------------


@dataclass
class FedZipOptions(ConfigSection):
    top_z: float = 0.2  # fraction of each tensor's update kept (by magnitude)
    clusters: int = 3  # 1-D k-means clusters the kept values are quantized to
    error_feedback: bool = True

    def codec_params(self) -> dict[str, Any]:
        return {"z": self.top_z, "clusters": self.clusters}


@dataclass
class TernaryOptions(ConfigSection):
    top_k: float = 0.2  # fraction of each tensor's update kept, sent as signs and one scale
    error_feedback: bool = True

    def codec_params(self) -> dict[str, Any]:
        return {"k": self.top_k}


@dataclass
class QuantOptions(ConfigSection):
    block: int = 64  # values per quantization block (one scale each)
    error_feedback: bool = False

    def codec_params(self) -> dict[str, Any]:
        return {"block": self.block}


# ---- client ---------------------------------------------------------------------------------------


def _stored(context: Context, key: str, reference: Mapping[str, np.ndarray]) -> OrderedDict[str, np.ndarray] | None:
    if key not in context.state.array_records:
        return None
    residual = from_record(context.state.array_records[key])
    if {k: v.shape for k, v in residual.items()} != {k: v.shape for k, v in reference.items()}:
        return None  # a residual from another model/method is meaningless here
    return residual


def residual_for_round(context: Context, reference: Mapping[str, np.ndarray],
                       server_round: int) -> OrderedDict[str, np.ndarray] | None:
    """The residual to add this round: the one the same round started from if this is a resend."""
    rounds = context.state.config_records.get(RESIDUAL_ROUND_KEY)
    resend = server_round > 0 and rounds is not None and rounds.get("round") == server_round
    return _stored(context, RESIDUAL_BEFORE_KEY if resend else RESIDUAL_KEY, reference)


def keep_residual(context: Context, server_round: int, started_from: Mapping[str, np.ndarray] | None,
                  residual: Mapping[str, np.ndarray]) -> None:
    state = context.state
    if started_from is None:
        state.array_records.pop(RESIDUAL_BEFORE_KEY, None)
    else:
        state[RESIDUAL_BEFORE_KEY] = to_record(dict(started_from))
    state[RESIDUAL_KEY] = to_record(dict(residual))
    state[RESIDUAL_ROUND_KEY] = ConfigRecord({"round": server_round})


def upload_codec(options: Any, codec: str) -> Codec:
    return build_codec(codec, **options.codec_params())


def train_compressed(job: Job, msg: Message, context: Context, *, codec: str) -> Message:
    """Train; send update + residual as one envelope of `codec`; keep what the codec dropped."""
    options = job.options
    stats = job.train_local()
    update = subtract(job.method.exchanged_state(job.model.cpu()), job.global_state)
    residual = residual_for_round(context, update, job.server_round) if options.error_feedback else None
    if residual is not None:
        update = add(update, residual)
    envelope, decoded = encode_update(update, upload_codec(options, codec))
    if options.error_feedback:
        keep_residual(context, job.server_round, residual, subtract(update, decoded))
    metrics = MetricRecord({
        "num-examples": stats.num_examples,
        "train-loss": stats.loss,
        "partition-id": job.partition_id,
        "envelope-bytes": len(envelope),
    })
    return Message(RecordDict({UPDATE_RECORD: envelope_record(envelope), METRICS_RECORD: metrics}), reply_to=msg)


# ---- server ---------------------------------------------------------------------------------------


class CompressedFedAvg(CodedDownloads, FedAvg):
    """FedAvg of decoded updates, streamed: each envelope is validated and folded into a running sum
    (`fedge.aggregation.StreamingMean`); downloads coded when the run says so (`fedge.methods.downlink`)."""

    def __init__(self, *, max_update_bytes: int, downlink: Downlink | None = None, **sampling_args: float) -> None:
        super().__init__(downlink=downlink, **sampling_args)
        self.max_update_bytes = max_update_bytes
        #: the model this round steps from (the mean update is added to it): the global model sent, or with
        #: coded downloads the global model whose reference the clients trained from (FLASC: its sparse download)
        self.round_start: OrderedDict[str, np.ndarray] | None = None
        self.rejected: list[dict[str, object]] = []

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.round_start = from_record(arrays)
        return super().configure_train(server_round, arrays, config, grid)

    def _weight(self, reply: Message) -> float:
        return scalar(reply.content.metric_records[METRICS_RECORD]["num-examples"])

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self.round_start is None:
            raise RuntimeError("aggregate_train before configure_train")
        running = StreamingMean(self.round_start, self.max_update_bytes)
        rejected = 0
        for reply in self.tracked(replies):
            if reply.has_error():
                continue
            node = reply.metadata.src_node_id
            try:
                running.add(envelope_bytes(reply.content, UPDATE_RECORD), self._weight(reply))
            except (EnvelopeError, ValueError, KeyError, TypeError) as err:
                rejected += 1
                reason = getattr(err, "reason", type(err).__name__)
                self.rejected.append({"round": server_round, "node": node, "reason": reason, "detail": str(err)})
                log.warning("round %d: refused the update from node %s (%s): %s", server_round, node, reason, err)
        metrics = MetricRecord({"accepted": running.accepted, "rejected": rejected,
                                "envelope-bytes": running.envelope_bytes})
        mean = running.mean()
        if mean is None:
            return None, metrics
        return to_record(self.apply(self.round_start, mean)), metrics

    def apply(self, current: OrderedDict[str, np.ndarray],
              mean_update: OrderedDict[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
        """FedAvg: the new global is the old one plus the mean update (server SGD with lr 1)."""
        return add(current, mean_update)


def _compressed_fedavg(spec: RunSpec, initial: OrderedDict[str, np.ndarray]) -> Strategy:
    return CompressedFedAvg(max_update_bytes=spec.settings.max_update_bytes, downlink=make_downlink(spec, initial),
                            **sampling(spec.settings))


def compressed_method(name: str, codec: str, options: type[ConfigSection], summary: str) -> Method:
    """A LoRA method that uploads its update through `codec` and is averaged by `CompressedFedAvg`."""
    train: Callable[[Job, Message, Context], Message] = lambda job, msg, context: train_compressed(
        job, msg, context, codec=codec)
    return Method(name, summary, payload="lora", train=train, strategy=_compressed_fedavg, options=options,
                  downlink=codec, coded_downlink=True)


register_method(compressed_method(
    "fedzip", "fedzip", FedZipOptions,
    "FedZip: per-layer top-z (20%) of the LoRA update, 3-cluster k-means values, entropy-coded ids and positions."))
register_method(compressed_method(
    "ternary", "ternary", TernaryOptions, "ComPEFT: top-20% of the LoRA update as signs plus one scale per tensor."))
register_method(compressed_method(
    "q8", "q8", QuantOptions,
    "Block-wise 8-bit quantization of the dense LoRA update (NVIDIA FLARE's filter as the peer baseline)."))
register_method(compressed_method(
    "q4", "q4", QuantOptions,
    "Block-wise 4-bit quantization of the dense LoRA update (NVIDIA FLARE's filter as the peer baseline)."))
