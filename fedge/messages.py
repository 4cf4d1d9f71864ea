"""The message contract between fedge's ServerApp and ClientApp, on top of Flower's `Message`.

Record names, the opaque envelope `Array` that carries a compressed update,
the node-information query, reading numbers out of MetricRecords, and the
bytes a message costs on the wire. Flower (>=1.20) ships a `Message` as a tree
of content-addressed objects (the message, its records, arrays and array
chunks), each serialized on its own; the wire size of a message is the sum of
those serialized objects, which is what the SuperLink stores and the SuperNode
pulls.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.app.typing import MetricRecordValues
from flwr.supercore.inflatable.inflatable_object import InflatableObject, get_all_nested_objects

#: records of a round's messages
ARRAYS_RECORD = "arrays"  # dense state (Flower's ArrayRecord, fp32)
CONFIG_RECORD = "config"  # the run config, from the server
METRICS_RECORD = "metrics"  # a reply's numbers
UPDATE_RECORD = "update"  # a client's compressed update: one envelope
DOWNLOAD_RECORD = "download"  # the server's compressed model for the round: one envelope
DOWNLINK_RECORD = "downlink"  # a coded download's versions: the one the node must hold, the one it rebuilds, its hash
CATCH_UP_RECORD = "catch-up"  # a coded download's changes: one envelope per version the node lacks

#: config keys the server adds to a round's run config (not run-config keys themselves)
SERVER_ROUND_KEY = "server-round"

#: the query a strategy sends to learn each node's partition and tier: the ClientApp's query action, the
#: message type on the wire, and the record of the reply
NODE_QUERY_ACTION = "profile"
NODE_QUERY = f"query.{NODE_QUERY_ACTION}"
NODE_RECORD = "profile"

ENVELOPE_STYPE = "fedge.envelope/v1"
ENVELOPE_KEY = "envelope"


def envelope_array(envelope: bytes) -> Array:
    """An envelope as one opaque Array: Flower carries (and chunks) the bytes, nothing decodes them on the way."""
    return Array(dtype="bytes", shape=(len(envelope),), stype=ENVELOPE_STYPE, data=envelope)


def envelope_record(envelope: bytes) -> ArrayRecord:
    return ArrayRecord({ENVELOPE_KEY: envelope_array(envelope)})


def array_envelope(array: Array, where: str) -> bytes:
    """The envelope an Array carries; a ValueError names `where` when it carries something else."""
    if array.stype != ENVELOPE_STYPE:
        raise ValueError(f"{where} holds stype {array.stype!r}, expected {ENVELOPE_STYPE!r}")
    return bytes(array.data)


def envelope_bytes(content: RecordDict, record: str) -> bytes:
    """The envelope held in `content[record]`; a ValueError says what is wrong with the record."""
    if record not in content.array_records:
        raise ValueError(f"message has no {record!r} record")
    arrays = content.array_records[record]
    if ENVELOPE_KEY not in arrays:
        raise ValueError(f"record {record!r} holds no envelope")
    return array_envelope(arrays[ENVELOPE_KEY], f"record {record!r}")


def scalar(value: MetricRecordValues) -> float:
    """A metric that must be one number (MetricRecord values may also be lists)."""
    if isinstance(value, list):
        raise TypeError(f"expected a number, got a list of {len(value)}")
    return float(value)


def message_wire_bytes(message: Message) -> int:
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())


def total_wire_bytes(messages: Iterable[Message]) -> int:
    return sum(message_wire_bytes(m) for m in messages)


def record_wire_bytes(record: InflatableObject) -> int:
    """Serialized size of one record (an ArrayRecord and its arrays) as it travels inside a message."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(record).values())
