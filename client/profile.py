"""The node-profile query: a node tells the server its partition and device profile, nothing else.

Strategies that treat nodes differently by tier or hold a partition out of
training (pFedGate's novel client) ask once with a `query.profile` message.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedge.client.job import _partition, node_data
from fedge.profiles import sparsity_budget
from fedge.runconfig import RunSettings


def profile_reply(msg: Message, context: Context) -> Message:
    settings = RunSettings.from_config(dict(msg.content.config_records.get("config", ConfigRecord())))
    pid, num = _partition(context)
    profile = node_data(context, settings).profile
    record = ConfigRecord({"partition-id": pid, "num-partitions": num, "tier": profile.tier,
                           "sparsity-budget": sparsity_budget(profile, settings.budgets)})
    return Message(RecordDict({"profile": record}), reply_to=msg)
