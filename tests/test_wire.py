import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from fedge.messages import message_wire_bytes
from fedge.state import to_record


@pytest.fixture(autouse=True)
def _run_identity(run_identity):
    """Every test here builds Flower messages."""


def _message(n: int) -> Message:
    arrays = to_record({"lora_A": np.zeros(n, np.float32), "lora_B": np.ones(7, np.float32)})
    return Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"method": "x"})}), dst_node_id=1, message_type="train")


def test_wire_bytes_cover_the_payload_with_small_overhead():
    n = 80_000
    size = message_wire_bytes(_message(n))
    payload = (n + 7) * 4
    assert payload < size < payload * 1.01


def test_wire_bytes_grow_exactly_with_the_array():
    assert message_wire_bytes(_message(20_000)) - message_wire_bytes(_message(10_000)) == pytest.approx(40_000, abs=64)
