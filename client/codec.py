"""Compressed uploads: train, take the update, add the error-feedback residual, encode, keep what was dropped.

The node also keeps the residual its last round started from. When the server
sends that round again (it discarded the round for too few replies, or it
restarted from a checkpoint taken before it), the node starts over from there:
what its discarded reply carried is not lost from the residual.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedge.client.faults import damage
from fedge.client.job import Job
from fedge.codecs.registry import build_codec
from fedge.envelope import encode_update
from fedge.federated_model import exchanged_state
from fedge.state import add, from_record, subtract, to_record
from fedge.training import train_epochs
from fedge.update_record import UPDATE_RECORD, envelope_record

RESIDUAL_KEY = "fedge.residual"
#: the residual the last trained round started from, and that round's number
RESIDUAL_BEFORE_KEY = "fedge.residual-before"
RESIDUAL_ROUND_KEY = "fedge.residual-round"


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


def train_codec(job: Job, msg: Message, context: Context) -> Message:
    settings, method = job.settings, job.method
    stats = train_epochs(job.model, job.data.train, epochs=settings.local_epochs, lr=settings.lr or method.lr,
                         batch_size=settings.batch_size, device=job.device, seed=job.seed)
    update = subtract(exchanged_state(job.model.cpu(), method), job.global_state)
    feedback = method.error_feedback and settings.error_feedback
    residual = residual_for_round(context, update, job.server_round) if feedback else None
    if residual is not None:
        update = add(update, residual)
    codec = build_codec(method.codec or "dense", **settings.codec_params(method.codec or "dense"))
    envelope, decoded = encode_update(update, codec)
    if feedback:
        keep_residual(context, job.server_round, residual, subtract(update, decoded))
    faulty = {int(p) for p in settings.fault_partitions.split(",") if p.strip()}
    if job.partition_id in faulty:
        envelope = damage(envelope, settings.fault_kind, update)
    metrics = MetricRecord({
        "num-examples": stats.num_examples,
        "train-loss": stats.loss,
        "partition-id": job.partition_id,
        "envelope-bytes": len(envelope),
    })
    return Message(RecordDict({UPDATE_RECORD: envelope_record(envelope), "metrics": metrics}), reply_to=msg)
