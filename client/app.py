"""The fedge ClientApp: local adapter training and evaluation on the client's own shard.

Everything method-specific comes from the server's ConfigRecord (the server is
the single source of truth for a run); the client's partition comes from its
node config (`partition-id`, `num-partitions`). Each method family (`Method.client`)
has its own train and evaluate functions, registered below.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedge.client.codec import train_codec
from fedge.client.job import Job, prepare_job
from fedge.client.pfedgate import evaluate_pfedgate, train_pfedgate
from fedge.client.profile import profile_reply
from fedge.federated_model import exchanged_state
from fedge.state import to_record
from fedge.training import evaluate, train_epochs

app = ClientApp()

Handler = Callable[[Job, Message, Context], Message]


def train_plain(job: Job, msg: Message, context: Context) -> Message:
    """Train the exchanged parameters and send them back whole (fp32, Flower's ArrayRecord)."""
    stats = train_epochs(job.model, job.data.train, epochs=job.settings.local_epochs,
                         lr=job.settings.lr or job.method.lr, batch_size=job.settings.batch_size,
                         device=job.device, seed=job.seed)
    metrics = MetricRecord({"num-examples": stats.num_examples, "train-loss": stats.loss, "partition-id": job.partition_id})
    return Message(RecordDict({"arrays": to_record(exchanged_state(job.model.cpu(), job.method)), "metrics": metrics}),
                   reply_to=msg)


def evaluate_plain(job: Job, msg: Message, context: Context) -> Message:
    """Global model on the client's own test split; without a personal model, it is also what the client serves."""
    result = evaluate(job.model, job.data.test, device=job.device)
    metrics = MetricRecord({
        "num-examples": result.num_examples,
        "correct": result.correct,
        "accuracy": result.accuracy,
        "personal-correct": result.correct,
        "mean-entropy": result.mean_entropy,
        "partition-id": job.partition_id,
    })
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


TRAINERS: dict[str, Handler] = {"plain": train_plain, "codec": train_codec, "pfedgate": train_pfedgate}
EVALUATORS: dict[str, Handler] = {"plain": evaluate_plain, "codec": evaluate_plain, "pfedgate": evaluate_pfedgate}


@app.train()
def train(msg: Message, context: Context) -> Message:
    job = prepare_job(msg, context)
    return TRAINERS[job.method.client](job, msg, context)


@app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    job = prepare_job(msg, context)
    return EVALUATORS[job.method.client](job, msg, context)


@app.query("profile")
def query_profile(msg: Message, context: Context) -> Message:
    """The node's partition and device profile, for strategies that treat tiers differently."""
    return profile_reply(msg, context)
