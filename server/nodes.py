"""Which nodes a round may use: wait for the fleet, then sample only from nodes connected now.

Flower's stock strategies block in `sample_nodes` until `min_available_nodes`
are online; with a node gone for good that is forever. The federation therefore
waits for the fleet once, with a bound, and hands each round's strategy call a
frozen view of the nodes connected at that moment, with the strategy's minimums
capped at that count, so a missing node costs at most one timeout.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore.run import Run

log = logging.getLogger("fedge.server")

MINIMUM_ATTRS = ("min_available_nodes", "min_train_nodes", "min_evaluate_nodes")


class SnapshotGrid(Grid):
    """The real grid, except that `get_node_ids` answers with a fixed list of nodes."""

    def __init__(self, grid: Grid, node_ids: Iterable[int]) -> None:
        self._grid = grid
        self._node_ids = list(node_ids)

    def set_run(self, run: Run) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Run:
        return self._grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> list[int]:
        return list(self._node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self._grid.send_and_receive(messages, timeout=timeout)


def in_partition_order(replies: Iterable[Message]) -> list[Message]:
    """Replies sorted by the sender's partition (then node id), failures last.

    Replies arrive in whatever order clients finish; floating-point sums depend
    on order, and over rounds that difference grows into different models.
    Aggregating in a fixed order makes a run reproducible.
    """
    def key(reply: Message) -> tuple[int, int, int]:
        if reply.has_error() or "metrics" not in reply.content.metric_records:
            return (1, 0, reply.metadata.src_node_id)
        pid = reply.content.metric_records["metrics"].get("partition-id", -1)
        return (0, int(pid), reply.metadata.src_node_id)

    return sorted(replies, key=key)


def wait_for_nodes(grid: Grid, wanted: int, timeout: float, poll: float = 1.0) -> list[int]:
    """Connected node ids once `wanted` are online, or whatever is online when `timeout` runs out."""
    deadline = time.monotonic() + timeout
    nodes = list(grid.get_node_ids())
    while len(nodes) < wanted and time.monotonic() < deadline:
        log.info("waiting for nodes: %d of %d connected", len(nodes), wanted)
        time.sleep(poll)
        nodes = list(grid.get_node_ids())
    return nodes


def required_replies(min_replies: float, sent: int) -> int:
    """`min-replies` below 1 is a fraction of the messages sent, 1 or more a node count; never more than sent."""
    if sent <= 0:
        return 0
    need = math.ceil(min_replies * sent) if min_replies < 1 else math.ceil(min_replies)
    return max(1, min(need, sent))


@contextmanager
def connected_view(strategy: Strategy, grid: Grid, node_ids: list[int]) -> Iterator[Grid]:
    """A grid frozen to `node_ids`, with the strategy's node minimums capped at their number for the duration."""
    saved = {a: getattr(strategy, a) for a in MINIMUM_ATTRS if hasattr(strategy, a)}
    try:
        for attr, value in saved.items():
            setattr(strategy, attr, max(0, min(int(value), len(node_ids))))
        yield SnapshotGrid(grid, node_ids)
    finally:
        for attr, value in saved.items():
            setattr(strategy, attr, value)
