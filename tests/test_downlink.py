"""Coded downloads: nodes rebuild exactly the server's reference, catch up after missed rounds, and fall back to the
whole model when they are too far behind or lost their state."""

from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict

from fedge.codecs import build_codec
from fedge.messages import ARRAYS_RECORD, CATCH_UP_RECORD, DOWNLINK_RECORD, message_wire_bytes
from fedge.methods import resolve
from fedge.methods.downlink import WHOLE, Downlink, DownloadError, downlink_codec, rebuild
from fedge.state import add, digest, to_record

MAX = 1 << 20


@pytest.fixture(autouse=True)
def _run_identity(run_identity):
    yield


def _initial() -> OrderedDict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return OrderedDict([("m.lora_A.weight", rng.normal(size=(8, 64)).astype(np.float32)),
                        ("m.lora_B.weight", np.zeros((32, 8), np.float32))])


class Server:
    """The server's side of a few rounds: a global model that moves, and the downlink that codes it."""

    def __init__(self, codec: str = "fedzip") -> None:
        self.initial = _initial()
        self.downlink = Downlink(build_codec(codec), self.initial)
        self.global_state = OrderedDict((k, v.copy()) for k, v in self.initial.items())
        self.rng = np.random.default_rng(1)
        self.round = 0

    def next_round(self) -> None:
        """A round: the clients' mean update moves the global model, then the download is coded."""
        self.round += 1
        step = OrderedDict((k, self.rng.normal(scale=0.1, size=v.shape).astype(np.float32))
                           for k, v in self.initial.items())
        self.global_state = add(self.global_state, step)  # the server steps the dense global model
        self.downlink.advance(self.round, self.global_state)

    def send(self, node: int) -> Message:
        return Message(self.downlink.content(node, ConfigRecord({})), dst_node_id=node, message_type="train")

    def replied(self, msg: Message, ok: bool = True) -> None:
        reply = Message(RecordDict(), reply_to=msg) if ok else Message(Error(code=1, reason="failed"), reply_to=msg)
        list(self.downlink.track([reply]))


def _context(node: int) -> Context:
    return Context(run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config={})


def _receive(server: Server, node: int, context: Context) -> OrderedDict[str, np.ndarray]:
    msg = server.send(node)
    state = rebuild(msg, context, _initial(), MAX)
    server.replied(msg)
    return state


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return list(a) == list(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_a_node_in_every_round_rebuilds_the_reference_bit_for_bit_from_one_change_each() -> None:
    server, context = Server(), _context(7)
    for _ in range(4):
        server.next_round()
        msg = server.send(7)
        assert len(msg.content.array_records[CATCH_UP_RECORD]) == 1
        state = rebuild(msg, context, _initial(), MAX)
        server.replied(msg)
        assert _same(state, server.downlink.reference)
        assert digest(state) == server.downlink.digest
    whole = Message(RecordDict({ARRAYS_RECORD: to_record(state)}), dst_node_id=7, message_type="train")
    assert message_wire_bytes(msg) < message_wire_bytes(whole) / 3  # a coded change costs far less than the model


def test_a_node_that_missed_rounds_gets_the_changes_it_lacks_and_catches_up() -> None:
    server, context = Server(), _context(3)
    server.next_round()
    _receive(server, 3, context)
    for _ in range(3):  # node 3 is not sampled for three rounds
        server.next_round()
    msg = server.send(3)
    info = msg.content.config_records[DOWNLINK_RECORD]
    assert info["base"] == 1 and info["version"] == 4
    assert sorted(map(int, msg.content.array_records[CATCH_UP_RECORD])) == [2, 3, 4]
    assert _same(rebuild(msg, context, _initial(), MAX), server.downlink.reference)


def test_a_node_never_sent_to_starts_from_the_seeded_initial_model() -> None:
    server = Server()
    for _ in range(3):
        server.next_round()
    assert _same(_receive(server, 11, _context(11)), server.downlink.reference)


def test_a_node_too_far_behind_gets_the_whole_model() -> None:
    server, context = Server("q8"), _context(5)  # q8 changes: four of them cost more than the model
    for _ in range(4):
        server.next_round()
    msg = server.send(5)
    assert msg.content.config_records[DOWNLINK_RECORD]["base"] == WHOLE
    assert ARRAYS_RECORD in msg.content.array_records
    assert _same(rebuild(msg, context, _initial(), MAX), server.downlink.reference)
    server.replied(msg)
    server.next_round()
    assert server.send(5).content.config_records[DOWNLINK_RECORD]["base"] == 4  # one change again


def test_a_node_that_lost_its_state_refuses_once_then_gets_the_whole_model() -> None:
    server = Server()
    server.next_round()
    _receive(server, 9, _context(9))
    server.next_round()
    msg = server.send(9)
    with pytest.raises(DownloadError, match="holds none"):
        rebuild(msg, _context(9), _initial(), MAX)  # the node restarted: a fresh context
    server.replied(msg, ok=False)
    msg = server.send(9)
    assert msg.content.config_records[DOWNLINK_RECORD]["base"] == WHOLE
    assert _same(rebuild(msg, _context(9), _initial(), MAX), server.downlink.reference)


def test_a_node_whose_model_differs_refuses_the_round() -> None:
    server, context = Server(), _context(2)
    server.next_round()
    _receive(server, 2, context)
    server.next_round()
    other = _initial()
    other["m.lora_A.weight"] += 1.0  # a node built a different initial model
    with pytest.raises(DownloadError, match="does not match"):
        rebuild(server.send(4), _context(4), other, MAX)


def test_what_a_download_leaves_out_is_sent_in_later_rounds() -> None:
    """Server-side error feedback: with the global model standing still, the reference nodes hold converges to it."""
    server = Server()
    server.next_round()
    gaps = []
    for r in range(2, 12):
        server.downlink.advance(r, server.global_state)
        gaps.append(sum(float(np.linalg.norm(v)) for v in server.downlink.pending.values()))
    assert gaps[0] > 0
    assert gaps[-1] < 0.05 * gaps[0], gaps


def test_a_resent_round_reuses_its_version() -> None:
    server = Server()
    server.next_round()
    reference, version = server.downlink.reference, server.downlink.version
    server.downlink.advance(server.round, add(reference, reference))  # the same round configured again
    assert server.downlink.version == version and _same(server.downlink.reference, reference)


def test_after_a_restart_every_node_gets_the_whole_model_once() -> None:
    server = Server()
    for _ in range(2):
        server.next_round()
    restarted = Downlink(build_codec("fedzip"), _initial())
    restarted.load_state_dict(json.loads(json.dumps(server.downlink.state_dict(), default=lambda a: a.tolist())))
    assert restarted.version == 2 and _same(restarted.reference, server.downlink.reference)
    assert restarted.content(1, ConfigRecord({})).config_records[DOWNLINK_RECORD]["base"] == WHOLE


def test_the_downlink_codec_follows_the_method_and_refuses_what_it_cannot_send() -> None:
    fedzip = downlink_codec(resolve({"method": "fedzip", "fedzip.top-z": 0.1}))
    assert fedzip is not None and fedzip.name == "fedzip" and fedzip.z == 0.1  # the method's own codec and options
    assert downlink_codec(resolve({"method": "fedzip", "downlink-codec": "dense"})) is None
    assert downlink_codec(resolve({"method": "lora-fedavg"})) is None  # no codec of its own: dense
    assert downlink_codec(resolve({"method": "lora-fedavg", "downlink-codec": "q8"})).name == "q8"
    assert downlink_codec(resolve({"method": "flasc"})) is None  # FLASC sends its own sparse download
    with pytest.raises(ValueError, match="own download"):
        resolve({"method": "flasc", "downlink-codec": "dense"})
    with pytest.raises(ValueError, match="dense downloads only"):
        resolve({"method": "pfedgate", "downlink-codec": "fedzip"})
    with pytest.raises(ValueError, match="not a codec"):
        resolve({"method": "fedzip", "downlink-codec": "gzip"})


@pytest.mark.slow
def test_a_sampled_federation_with_coded_downloads_catches_nodes_up(tmp_path) -> None:
    """Flower's simulation runtime, two of four clients a round: nodes miss rounds and catch up; no round fails."""
    from fedge.sim.runner import simulate

    outcome = simulate({"method": "fedzip", "num-server-rounds": 3, "num-clients": 4, "clients-per-round": 2,
                        "local-epochs": 1, "eval-clients": 2, "out-dir": str(tmp_path)})
    entry = json.loads((tmp_path / "results.json").read_text())["methods"]["fedzip"]
    rows = entry["rounds"]
    assert all(r["clients"] == r["sent"] == 2 and r["attempts"] == 1 for r in rows)
    assert [r["eval_clients"] for r in rows] == [2, 2, 4]  # the panel, then everyone after the last round
    dense_model = 4 * entry["final"]["trainable_params"]
    assert all(r["downlink_bytes"] < 2 * dense_model / 3 for r in rows)
    assert outcome.final["accuracy"] > outcome.base.accuracy


def test_a_state_averaging_strategy_steps_the_global_model_not_the_reference() -> None:
    """Flower's FedAvg averages the clients' states (reference + update); the global model keeps what the
    reference still lacked, and every sender is noted as holding the current version."""
    from flwr.app import MetricRecord

    from fedge.messages import METRICS_RECORD
    from fedge.methods.plain import CodedFedAvg
    from fedge.state import from_record

    server = Server()
    server.next_round()
    strategy = CodedFedAvg(downlink=server.downlink)
    reference = server.downlink.reference
    states = [OrderedDict((k, v + i) for k, v in reference.items()) for i in (1.0, 3.0)]
    replies = [Message(RecordDict({ARRAYS_RECORD: to_record(s), METRICS_RECORD: MetricRecord({"num-examples": 5})}),
                       reply_to=server.send(node)) for node, s in ((21, states[0]), (22, states[1]))]
    arrays, _ = strategy.aggregate_train(1, replies)
    new = from_record(arrays)
    for k, v in server.global_state.items():
        np.testing.assert_allclose(new[k], v + 2.0, rtol=1e-6, atol=1e-6)
    assert server.downlink.held == {21: 1, 22: 1}
