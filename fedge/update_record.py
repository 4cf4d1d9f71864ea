"""An update envelope inside a Flower record: one opaque `Array` with fedge's stype.

Flower carries (and chunks) the bytes like any array, so nothing is decoded on
the way; only the receiver's strategy opens the envelope.
"""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, RecordDict

ENVELOPE_STYPE = "fedge.envelope/v1"
ENVELOPE_KEY = "envelope"
#: the record of a client's reply that holds its compressed update
UPDATE_RECORD = "update"


def envelope_record(envelope: bytes) -> ArrayRecord:
    return ArrayRecord({ENVELOPE_KEY: Array(dtype="bytes", shape=(len(envelope),), stype=ENVELOPE_STYPE, data=envelope)})


def envelope_bytes(content: RecordDict, record: str) -> bytes:
    """The envelope held in `content[record]`; a ValueError says what is wrong with the record."""
    if record not in content.array_records:
        raise ValueError(f"message has no {record!r} record")
    arrays = content.array_records[record]
    if ENVELOPE_KEY not in arrays:
        raise ValueError(f"record {record!r} holds no envelope")
    array = arrays[ENVELOPE_KEY]
    if array.stype != ENVELOPE_STYPE:
        raise ValueError(f"record {record!r} holds stype {array.stype!r}, expected {ENVELOPE_STYPE!r}")
    return bytes(array.data)
