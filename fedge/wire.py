"""Bytes as they cross the wire.

Flower (>=1.20) ships a `Message` as a tree of content-addressed objects (the
message, its records, arrays and array chunks), each serialized on its own. The
wire size of a message is the sum of those serialized objects, which is what
the SuperLink stores and the SuperNode pulls.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Message
from flwr.supercore.inflatable.inflatable_object import InflatableObject, get_all_nested_objects


def message_wire_bytes(message: Message) -> int:
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())


def total_wire_bytes(messages: Iterable[Message]) -> int:
    return sum(message_wire_bytes(m) for m in messages)


def record_wire_bytes(record: InflatableObject) -> int:
    """Serialized size of one record (an ArrayRecord and its arrays) as it travels inside a message."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(record).values())
