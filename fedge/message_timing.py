"""What a message costs beyond its work: from the server's push to the start of the work on the node, and
from the end of the work to the reply reaching the server.

Where each timestamp comes from (Unix seconds):

- push and reply: the server, when it pushed the message and when its poll first saw the reply;
- work start and end: the ClientApp, around the method's handler (train or evaluate, after the job is
  prepared: data, model, received state), together with its process's start time, its process id and how
  many messages that process has served.

Flower 1.39 does not tell a ClientApp when its SuperNode received the message (it clears the SuperLink's
`delivered_at` on the way), so the first span starts at the server's push: it holds the SuperNode's wait
before it asks for the message, the transfer, and the node's start-up (process, imports, app bundle,
data, model). The second holds the reply's way back. The ClientApp sends its stamps in a ConfigRecord of
the reply (`TIMING_RECORD`); the server takes the record out before anything else reads the reply, so
strategies never see it and it is not counted as uplink. Node and server clocks meet in both spans, in
opposite directions, so an offset between them cancels in the total (`overhead_s`); each span alone is as
good as the clocks' agreement (exact on one machine).
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Message

TIMING_RECORD = "fedge.timing"


@dataclass
class ProcessClock:
    """The ClientApp process's start time and the messages it has served (one, when each message has its own)."""

    started: float
    served: int = 0

    @classmethod
    def here(cls) -> ProcessClock:
        import psutil

        return cls(started=psutil.Process(os.getpid()).create_time())


def stamp_reply(reply: Message, clock: ProcessClock, work_started: float, work_ended: float,
                server_round: int) -> Message:
    """Add the node's stamps to `reply` (a reply that carries an error has no content to add them to)."""
    clock.served += 1
    if not reply.has_error():
        reply.content[TIMING_RECORD] = ConfigRecord({
            "server-round": server_round,
            "work-started": work_started,
            "work-ended": work_ended,
            "process-started": clock.started,
            "process-id": os.getpid(),
            "process-messages": clock.served,
        })
    return reply


@dataclass
class MessageTiming:
    """One message's timeline, in seconds; `overhead_s` is what the node and the transport added to the work."""

    node: int
    kind: str
    server_round: int
    push_to_work_s: float
    work_s: float
    work_to_reply_s: float
    #: seconds from the ClientApp process's start to the work's start: its whole start-up when it is fresh
    process_age_s: float
    process_id: int
    #: this was the process's n-th message (1 for every message under Flower's process-per-message isolation)
    process_messages: int

    @property
    def overhead_s(self) -> float:
        return self.push_to_work_s + self.work_to_reply_s


def take_timing(reply: Message, pushed_at: float, replied_at: float) -> MessageTiming | None:
    """Remove the node's stamps from `reply` and read its timeline; None when the reply carries none."""
    if reply.has_error() or TIMING_RECORD not in reply.content.config_records:
        return None
    stamps = reply.content.config_records[TIMING_RECORD]
    del reply.content[TIMING_RECORD]
    try:
        started, ended = float(stamps["work-started"]), float(stamps["work-ended"])  # type: ignore[arg-type]
        return MessageTiming(
            node=reply.metadata.src_node_id,
            kind=reply.metadata.message_type,
            server_round=int(stamps["server-round"]),  # type: ignore[arg-type]
            push_to_work_s=started - pushed_at,
            work_s=ended - started,
            work_to_reply_s=replied_at - ended,
            process_age_s=started - float(stamps["process-started"]),  # type: ignore[arg-type]
            process_id=int(stamps["process-id"]),  # type: ignore[arg-type]
            process_messages=int(stamps["process-messages"]),  # type: ignore[arg-type]
        )
    except (KeyError, TypeError, ValueError):
        return None  # stamps of another fedge version: the reply still counts, its timing does not


def spread(values: Iterable[float]) -> dict[str, float]:
    """Median and max (and how many): the figures reported for each span."""
    values = list(values)
    if not values:
        return {"median": 0.0, "max": 0.0, "count": 0}
    return {"median": statistics.median(values), "max": max(values), "count": len(values)}


def summarise(timings: Iterable[MessageTiming]) -> dict[str, Any]:
    """results.json's `per_message_overhead_s`: the total and its two spans, the work, and how warm processes were."""
    timings = list(timings)
    processes = {t.process_id: t.process_messages for t in timings}
    return {
        **spread(t.overhead_s for t in timings),
        "push_to_work": spread(t.push_to_work_s for t in timings),
        "work_to_reply": spread(t.work_to_reply_s for t in timings),
        "work": spread(t.work_s for t in timings),
        "clientapp_processes": len(processes),
        "most_messages_per_process": max(processes.values(), default=0),
    }


def append_rows(path: Path, timings: Iterable[MessageTiming]) -> None:
    """Add one JSON line per message to `path` (the per-message log beside results.json)."""
    lines = [json.dumps({**asdict(t), "overhead_s": t.overhead_s}) + "\n" for t in timings]
    if lines:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as sink:
            sink.writelines(lines)
