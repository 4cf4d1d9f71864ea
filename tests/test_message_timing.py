"""A reply's timing: the node stamps it, the server takes the stamps out, and what is left is what was sent."""

from __future__ import annotations

import json
import os
from pathlib import Path

from flwr.app import Error, Message, MetricRecord, RecordDict

from fedge.message_timing import (
    TIMING_RECORD,
    MessageTiming,
    ProcessClock,
    append_rows,
    stamp_reply,
    summarise,
    take_timing,
)
from fedge.messages import METRICS_RECORD, message_wire_bytes


def _reply(run_identity: None) -> Message:
    instruction = Message(RecordDict(), dst_node_id=7, message_type="train")
    return Message(RecordDict({METRICS_RECORD: MetricRecord({"num-examples": 10})}), reply_to=instruction)


def test_stamps_travel_and_are_taken_out_before_anything_counts_the_reply(run_identity: None) -> None:
    reply = _reply(run_identity)
    bare = message_wire_bytes(reply)
    clock = ProcessClock(started=100.0)
    stamp_reply(reply, clock, work_started=103.0, work_ended=105.5, server_round=4)
    assert TIMING_RECORD in reply.content.config_records and message_wire_bytes(reply) > bare
    timing = take_timing(reply, pushed_at=101.0, replied_at=106.0)
    assert timing is not None
    assert TIMING_RECORD not in reply.content.config_records and message_wire_bytes(reply) == bare
    assert (timing.push_to_work_s, timing.work_s, timing.work_to_reply_s) == (2.0, 2.5, 0.5)
    assert timing.overhead_s == 2.5 and timing.process_age_s == 3.0
    assert (timing.server_round, timing.kind, timing.process_id, timing.process_messages) == (4, "train", os.getpid(), 1)


def test_a_process_counts_the_messages_it_served(run_identity: None) -> None:
    clock = ProcessClock.here()
    assert 0 < clock.started <= __import__("time").time()
    for n in (1, 2, 3):
        reply = stamp_reply(_reply(run_identity), clock, 1.0, 2.0, 0)
        timing = take_timing(reply, 0.0, 3.0)
        assert timing is not None and timing.process_messages == n


def test_error_replies_and_unstamped_replies_have_no_timing(run_identity: None) -> None:
    instruction = Message(RecordDict(), dst_node_id=7, message_type="evaluate")
    failed = stamp_reply(Message(Error(code=0, reason="boom"), reply_to=instruction), ProcessClock(0.0), 1.0, 2.0, 1)
    assert take_timing(failed, 0.0, 3.0) is None
    assert take_timing(_reply(run_identity), 0.0, 3.0) is None


def test_summary_and_the_per_message_log(tmp_path: Path) -> None:
    timings = [MessageTiming(node=1, kind="train", server_round=1, push_to_work_s=p, work_s=1.0, work_to_reply_s=0.5,
                             process_age_s=30.0, process_id=pid, process_messages=n)
               for p, pid, n in ((0.5, 11, 1), (1.5, 11, 2), (4.0, 12, 1))]
    summary = summarise(timings)
    assert (summary["median"], summary["max"], summary["count"]) == (2.0, 4.5, 3)
    assert summary["push_to_work"]["median"] == 1.5 and summary["work_to_reply"]["max"] == 0.5
    assert summary["clientapp_processes"] == 2 and summary["most_messages_per_process"] == 2
    assert summarise([])["count"] == 0
    log = tmp_path / "out" / "messages-x.jsonl"
    append_rows(log, timings[:2])
    append_rows(log, timings[2:])
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["overhead_s"] for r in rows] == [1.0, 2.0, 4.5] and rows[2]["process_id"] == 12
