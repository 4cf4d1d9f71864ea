"""Compressed uploads: train, take the update, add the error-feedback residual, encode, keep what was dropped."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
from flwr.app import Context, Message, MetricRecord, RecordDict

from fedge.client.faults import damage
from fedge.client.job import Job
from fedge.codecs.registry import build_codec
from fedge.envelope import encode_update
from fedge.federated_model import exchanged_state
from fedge.state import add, from_record, subtract, to_record
from fedge.training import train_epochs
from fedge.update_record import UPDATE_RECORD, envelope_record

RESIDUAL_KEY = "fedge.residual"


def _residual(context: Context, reference: dict[str, np.ndarray]) -> OrderedDict[str, np.ndarray] | None:
    if RESIDUAL_KEY not in context.state.array_records:
        return None
    residual = from_record(context.state.array_records[RESIDUAL_KEY])
    if {k: v.shape for k, v in residual.items()} != {k: v.shape for k, v in reference.items()}:
        return None  # a residual from another model/method is meaningless here
    return residual


def train_codec(job: Job, msg: Message, context: Context) -> Message:
    settings, method = job.settings, job.method
    stats = train_epochs(job.model, job.data.train, epochs=settings.local_epochs, lr=settings.lr or method.lr,
                         batch_size=settings.batch_size, device=job.device, seed=job.seed)
    update = subtract(exchanged_state(job.model.cpu(), method), job.global_state)
    feedback = method.error_feedback and settings.error_feedback
    residual = _residual(context, update) if feedback else None
    if residual is not None:
        update = add(update, residual)
    codec = build_codec(method.codec or "dense", **settings.codec_params(method.codec or "dense"))
    envelope, decoded = encode_update(update, codec)
    if feedback:
        context.state[RESIDUAL_KEY] = to_record(subtract(update, decoded))
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
