"""Which nodes a round may use, and how the server waits for their replies.

Flower's stock strategies block in `sample_nodes` until `min_available_nodes`
are online; with a node gone for good that is forever. The federation therefore
waits for the fleet once, with a bound, and hands each round's strategy call a
frozen view of the nodes connected at that moment, with the strategy's minimums
capped at that count, so a missing node costs at most one timeout.

Flower's `Grid.send_and_receive` sleeps 3 s between pulls, which a round pays
twice (training, evaluation). `PollingGrid` pulls every `REPLY_POLL` seconds
instead (and a reply's objects without Flower's 1 s first backoff,
`fedge.flower_pauses`), and notes when each reply arrived, with the node's
timestamps the reply carried (`fedge.message_timing`).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore.run import Run

from fedge.flower_pauses import PauseRefused, quicken_object_pulls
from fedge.message_timing import MessageTiming, take_timing

log = logging.getLogger("fedge.server")

MINIMUM_ATTRS = ("min_available_nodes", "min_train_nodes", "min_evaluate_nodes")
#: seconds between the server's pulls for replies (Flower's `send_and_receive` waits 3 s)
REPLY_POLL = 0.1


class RelayGrid(Grid):
    """A grid that hands every call to another one; subclasses change one thing."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid

    def set_run(self, run: Run) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Run:
        return self._grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self._grid.send_and_receive(messages, timeout=timeout)


class SnapshotGrid(RelayGrid):
    """The real grid, except that `get_node_ids` answers with a fixed list of nodes."""

    def __init__(self, grid: Grid, node_ids: Iterable[int]) -> None:
        super().__init__(grid)
        self._node_ids = list(node_ids)

    def get_node_ids(self) -> list[int]:
        return list(self._node_ids)


class PollingGrid(RelayGrid):
    """The real grid, whose `send_and_receive` pulls every `poll` seconds and takes each reply's timing.

    Same contract as Flower's: push, then pull until every reply is in or `timeout` (None: no limit) ran out.
    Each reply's timing record is removed as it arrives (strategies and byte counts never see it) and kept
    in `timings`.
    """

    def __init__(self, grid: Grid, poll: float = REPLY_POLL) -> None:
        super().__init__(grid)
        self.poll = poll
        self.timings: list[MessageTiming] = []
        if type(grid).__name__ == "HttpGrid":  # a deployed ServerApp: replies come from the SuperLink's object store
            try:
                quicken_object_pulls(sys.modules[type(grid).__module__], poll)
            except PauseRefused as err:
                log.warning("replies are pulled with Flower's own backoff: %s", err)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        pushed_at = time.time()
        waiting = set(self._grid.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while waiting:
            pulled = list(self._grid.pull_messages(waiting))
            arrived = time.time()
            for reply in pulled:
                waiting.discard(reply.metadata.reply_to_message_id)
                timing = take_timing(reply, pushed_at, arrived)
                if timing is not None:
                    self.timings.append(timing)
                    log.info("round %s %s node %s: push->work %.2fs, work %.2fs, work->reply %.2fs "
                             "(ClientApp process %d, its message %d)", timing.server_round, timing.kind,
                             timing.node, timing.push_to_work_s, timing.work_s, timing.work_to_reply_s,
                             timing.process_id, timing.process_messages)
            replies.extend(pulled)
            if not waiting or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(self.poll if deadline is None else max(0.0, min(self.poll, deadline - time.monotonic())))
        return replies


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
