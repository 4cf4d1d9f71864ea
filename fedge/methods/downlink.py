"""Compressed downloads: each round the server sends the model's change, coded, instead of the whole model.

The server keeps the *reference*, the model its nodes rebuild, at a version
that counts the changes sent. Each round it codes (global - reference) with the
run's downlink codec (`downlink-codec`) and adds the decoded change to the
reference; the round's clients train from that reference. The server keeps
stepping the dense global model (global + the clients' mean update), so what a
coded download left out stays in (global - reference) and goes out with a later
round's change: error feedback on the server, nothing is lost for good (the
scheme of Sattler et al.'s STC and of DoubleSqueeze). Stepping from the
reference instead (as FLASC's strategy must: its download is a top-k of the
whole adapter, whose left-out half would be counted twice) drops what each
download left out; on the default scenario that cost fedzip 2.8 points of
accuracy over two seeds, where error feedback matched the dense download
(docs/scale.md).

A node keeps the last reference it rebuilt, and its version, in its Flower
`context.state`. The server knows which version each node holds (a node it
never sent to holds version 0, the seeded initial model both sides can build)
and sends it the changes it lacks, one envelope per version, with the version
it must hold before and the sha256 of the model it must hold after; a node
that cannot rebuild that model refuses the round, and the server sends it the
whole model next time. A node too far behind (its changes would cost more than
the model, or are no longer kept) gets the whole model; so does every node in
the first round after a server restart.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedge.codecs import Codec, build_codec
from fedge.envelope import decode_update, encode_update, expected_specs
from fedge.messages import (
    ARRAYS_RECORD,
    CATCH_UP_RECORD,
    CONFIG_RECORD,
    DOWNLINK_RECORD,
    array_envelope,
    envelope_array,
)
from fedge.methods.base import DENSE, OWN, Method, RunSpec, downlink_codec_name
from fedge.state import add, digest, from_record, subtract, to_record

log = logging.getLogger("fedge.server")

#: the `base` of a whole-model download
WHOLE = -1

STATE_KEY = "fedge.downlink-state"
VERSION_KEY = "fedge.downlink-version"


class DownloadError(ValueError):
    """A node cannot rebuild the model a coded download describes (it lost its state, or its model differs)."""


def downlink_codec(spec: RunSpec) -> Codec | None:
    """The codec of a run's coded downloads, or None when it downloads densely or in its own way.

    The method's own codec comes with the method's options (fedzip's `top-z`, ...); another one with its defaults.
    """
    name = downlink_codec_name(spec)
    if name in (DENSE, OWN):
        return None
    own_params = getattr(spec.options, "codec_params", None)
    if name == spec.method.downlink and callable(own_params):
        return build_codec(name, **own_params())
    return build_codec(name)


# ---- server ---------------------------------------------------------------------------------------


class Downlink:
    """The server's side: the reference its nodes rebuild, its version, the changes kept for catching up, and
    the version each node holds."""

    def __init__(self, codec: Codec, initial: Mapping[str, np.ndarray]) -> None:
        self.codec = codec
        self.reference = OrderedDict((k, np.array(v, dtype=np.float32)) for k, v in initial.items())
        self.version = 0
        self.digest = digest(self.reference)
        self.whole_bytes = 4 * sum(v.size for v in self.reference.values())
        #: (version, envelope) of the latest consecutive changes, ending at `version`
        self.changes: list[tuple[int, bytes]] = []
        #: node id -> the version it rebuilt (WHOLE: unknown, send the whole model)
        self.held: dict[int, int] = {}
        #: what a node the server never sent to holds: version 0, unless the server restarted
        self.unseen: int = 0
        #: what the reference still lacks of the global model (later rounds send it)
        self.pending: OrderedDict[str, np.ndarray] = OrderedDict((k, np.zeros_like(v)) for k, v in self.reference.items())
        self._round: int | None = None

    def advance(self, server_round: int, global_state: Mapping[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
        """Code the change from the reference to `global_state` once per round (a resent round reuses it);
        returns the new reference, which the round trains and steps from."""
        if self._round == server_round:
            return self.reference
        envelope, decoded = encode_update(subtract(dict(global_state), self.reference), self.codec)
        self.reference = add(self.reference, decoded)
        self.pending = subtract(dict(global_state), self.reference)
        self.version += 1
        self.digest = digest(self.reference)
        self.changes.append((self.version, envelope))
        while sum(len(e) for _, e in self.changes) > self.whole_bytes:  # older nodes: the whole model is cheaper
            self.changes.pop(0)
        self._round = server_round
        return self.reference

    def oldest(self) -> int:
        """The oldest version a node can catch up from with the changes kept."""
        return self.changes[0][0] - 1 if self.changes else self.version

    def content(self, node_id: int, config: ConfigRecord, cache: dict[int, RecordDict] | None = None) -> RecordDict:
        """What `node_id` is sent: the changes since the version it holds, or the whole reference."""
        held = self.held.get(node_id, self.unseen)
        base = held if self.oldest() <= held <= self.version else WHOLE
        if cache is not None and base in cache:
            return cache[base]
        info = ConfigRecord({"base": base, "version": self.version, "sha256": self.digest})
        if base == WHOLE:
            body = to_record(self.reference)
            content = RecordDict({ARRAYS_RECORD: body, DOWNLINK_RECORD: info, CONFIG_RECORD: config})
        else:
            lacking = ArrayRecord({str(v): envelope_array(e) for v, e in self.changes if v > base})
            content = RecordDict({CATCH_UP_RECORD: lacking, DOWNLINK_RECORD: info, CONFIG_RECORD: config})
        if cache is not None:
            cache[base] = content
        return content

    def track(self, replies: Iterable[Message]) -> Iterator[Message]:
        """Pass replies through, noting each sender's version: the current one, or unknown after a failure."""
        for reply in replies:
            self.held[reply.metadata.src_node_id] = WHOLE if reply.has_error() else self.version
            yield reply

    # ---- checkpoints: the reference and its version; after a restart every node gets the whole model once ----
    def state_dict(self) -> dict[str, Any]:
        return {"reference": dict(self.reference), "version": self.version}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reference = OrderedDict((k, np.asarray(state["reference"][k], np.float32)) for k in self.reference)
        self.version = int(state["version"])
        self.digest = digest(self.reference)
        self.changes, self.held, self.unseen, self._round = [], {}, WHOLE, None


class CodedDownloads:
    """Strategy mixin: the round's training messages carry a coded download when the strategy has a `Downlink`.

    A strategy that averages the clients' *states* (Flower's FedAvg) gets their mean, which is the reference
    plus their mean update; the mixin adds what the reference still lacks, so the global model steps from
    itself. A strategy that averages *updates* (`CompressedFedAvg`) adds them to the global model it sent from
    and only needs `tracked`. `starts_from` tells a strategy the state its clients rebuilt. Without a
    `Downlink` (dense downloads) nothing changes.
    """

    def __init__(self, *, downlink: Downlink | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.downlink = downlink

    def starts_from(self, reference: OrderedDict[str, np.ndarray]) -> None:
        """The state this round's clients rebuild; strategies that compute from it override this."""

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))  # type: ignore[misc]
        if self.downlink is None or not messages:
            return messages
        reference = self.downlink.advance(server_round, from_record(arrays))
        cache: dict[int, RecordDict] = {}
        for msg in messages:
            msg.content = self.downlink.content(msg.metadata.dst_node_id, msg.content.config_records[CONFIG_RECORD],
                                                cache)
        self.starts_from(reference)
        return messages

    def tracked(self, replies: Iterable[Message]) -> Iterable[Message]:
        """The replies, each sender's version noted as they are read (a strategy's own aggregate_train reads these)."""
        return replies if self.downlink is None else self.downlink.track(replies)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The clients' mean state, plus what the reference they trained from still lacked of the global model."""
        arrays, metrics = super().aggregate_train(server_round, self.tracked(replies))  # type: ignore[misc]
        if self.downlink is not None and arrays is not None:
            arrays = to_record(add(from_record(arrays), self.downlink.pending))
        return arrays, metrics

    def state_dict(self) -> dict[str, Any]:
        return {} if self.downlink is None else {"downlink": self.downlink.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.downlink is not None and "downlink" in state:
            self.downlink.load_state_dict(state["downlink"])


def make_downlink(spec: RunSpec, initial: Mapping[str, np.ndarray]) -> Downlink | None:
    codec = downlink_codec(spec)
    return None if codec is None else Downlink(codec, initial)


# ---- client ---------------------------------------------------------------------------------------


def held_state(context: Context) -> tuple[int, OrderedDict[str, np.ndarray]] | None:
    """The version and reference this node rebuilt last, if it holds one."""
    if STATE_KEY not in context.state.array_records or VERSION_KEY not in context.state.config_records:
        return None
    version = int(context.state.config_records[VERSION_KEY]["version"])  # type: ignore[arg-type]
    return version, from_record(context.state.array_records[STATE_KEY])


def rebuild(msg: Message, context: Context, initial: OrderedDict[str, np.ndarray],
            max_bytes: int) -> OrderedDict[str, np.ndarray]:
    """The reference a coded download describes, rebuilt from what this node holds; kept for the next round."""
    info = msg.content.config_records[DOWNLINK_RECORD]
    base, version, want = int(info["base"]), int(info["version"]), str(info["sha256"])  # type: ignore[arg-type]
    shapes = {k: v.shape for k, v in initial.items()}
    if base == WHOLE:
        state = from_record(msg.content.array_records[ARRAYS_RECORD])
        if {k: v.shape for k, v in state.items()} != shapes:
            raise DownloadError("the whole-model download does not match this node's model")
    else:
        held = held_state(context)
        if held is not None and base <= held[0] <= version and {k: v.shape for k, v in held[1].items()} == shapes:
            at, state = held
        elif base == 0:
            at, state = 0, initial
        else:
            raise DownloadError(f"the download starts from version {base}; this node holds "
                                f"{'none' if held is None else held[0]}")
        expected = expected_specs(initial)
        changes = msg.content.array_records[CATCH_UP_RECORD]
        for key in sorted((k for k in changes if int(k) > at), key=int):
            change = decode_update(array_envelope(changes[key], f"change {key}"), expected, max_bytes)
            state = add(state, change)
    if digest(state) != want:
        raise DownloadError(f"the rebuilt model of version {version} does not match the server's (sha256)")
    context.state[STATE_KEY] = to_record(state)
    context.state[VERSION_KEY] = ConfigRecord({"version": version})
    return state


def receive_global(msg: Message, context: Context, method: Method, spec: RunSpec,
                   initial: OrderedDict[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
    """The global state a message carries: rebuilt from a coded download, else as the method receives it."""
    if DOWNLINK_RECORD in msg.content.config_records:
        return rebuild(msg, context, initial, spec.settings.max_update_bytes)
    return method.receive(msg, initial, spec)
