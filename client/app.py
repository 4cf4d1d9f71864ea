"""The fedge ClientApp: each message goes to the handler of the run's method.

Everything about the run comes from the server's ConfigRecord (the server is
the single source of truth for a run); the node's partition, and optionally its
own data file and tier, come from its node config. Each reply carries the
node's timestamps (`fedge.message_timing`): when the method's work started and
ended, and the ClientApp process's start and message count.
"""

from __future__ import annotations

import time

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedge.client.faults import damage_reply
from fedge.client.job import node_data, partition, prepare_job, run_spec
from fedge.message_timing import ProcessClock, stamp_reply
from fedge.messages import NODE_QUERY_ACTION, NODE_RECORD

app = ClientApp()
#: this process: a fresh one per message under Flower's stock isolation, one for many in a long-lived one
process_clock = ProcessClock.here()


@app.train()
def train(msg: Message, context: Context) -> Message:
    job = prepare_job(msg, context)
    started = time.time()
    reply = damage_reply(job.method.train(job, msg, context), job.settings, job.partition_id)
    return stamp_reply(reply, process_clock, started, time.time(), job.server_round)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    job = prepare_job(msg, context, training=False)
    started = time.time()
    reply = job.method.evaluate(job, msg, context)
    return stamp_reply(reply, process_clock, started, time.time(), job.server_round)


@app.query(NODE_QUERY_ACTION)
def query_node(msg: Message, context: Context) -> Message:
    """The node's partition and device tier, nothing else (strategies that treat tiers differently ask once)."""
    pid, num = partition(context)
    tier = node_data(context, run_spec(msg).settings).tier
    record = ConfigRecord({"partition-id": pid, "num-partitions": num, "tier": tier.tier})
    return Message(RecordDict({NODE_RECORD: record}), reply_to=msg)
