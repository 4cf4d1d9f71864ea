"""A real node's own data: the node config names a file; bad files are refused with the reason."""

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedge.client.app import query_node
from fedge.client.job import node_data
from fedge.client.node_data import NodeDataError, save_node_data
from fedge.messages import CONFIG_RECORD, NODE_QUERY, NODE_RECORD
from fedge.settings import RunSettings


@pytest.fixture(autouse=True)
def _run_identity(run_identity):
    yield


def _context(path: Path, **extra: str) -> Context:
    node_config = {"partition-id": 1, "num-partitions": 3, "data-path": str(path), **extra}
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})


def test_a_node_trains_on_its_own_file_with_its_own_tier(tmp_path: Path, digits) -> None:
    shard = digits.client_data(2, 5)
    path = tmp_path / "node.npz"
    save_node_data(path, shard)
    settings = RunSettings()
    data = node_data(_context(path, tier="weak"), settings)
    for mine, theirs in ((data.train, shard.train), (data.test, shard.test)):
        assert all(torch.equal(a, b) for a, b in zip(mine.tensors, theirs.tensors, strict=True))
    assert data.tier.tier == "weak"
    query = Message(RecordDict({CONFIG_RECORD: ConfigRecord(settings.to_config())}), dst_node_id=1,
                    message_type=NODE_QUERY)
    node = query_node(query, _context(path, tier="weak")).content.config_records[NODE_RECORD]
    assert node["tier"] == "weak" and node["partition-id"] == 1 and node["num-partitions"] == 3


def _write(path: Path, **arrays: np.ndarray) -> Path:
    good = {"x_train": np.zeros((4, 1, 32, 32), np.float32), "y_train": np.arange(4) % 10,
            "x_test": np.zeros((2, 1, 32, 32), np.float32), "y_test": np.arange(2)}
    good.update(arrays)
    np.savez(path, **{k: v for k, v in good.items() if v is not None})
    return path


@pytest.mark.parametrize(("arrays", "reason"), [
    ({"y_test": None}, "lacks y_test"),
    ({"x_train": np.zeros((4, 3, 32, 32), np.float32)}, "samples are"),
    ({"y_train": np.array([0, 1, 2, 10])}, "integer labels"),
    ({"y_train": np.arange(3)}, "one label per sample"),
    ({"x_test": np.full((2, 1, 32, 32), np.nan, np.float32)}, "non-finite"),
])
def test_a_bad_file_is_refused_with_its_reason(tmp_path: Path, arrays: dict, reason: str) -> None:
    path = _write(tmp_path / "bad.npz", **arrays)
    with pytest.raises(NodeDataError, match=reason):
        node_data(_context(path), RunSettings())


def test_missing_file_and_unknown_tier_are_refused(tmp_path: Path) -> None:
    with pytest.raises(NodeDataError, match="node data"):
        node_data(_context(tmp_path / "absent.npz"), RunSettings())
    path = _write(tmp_path / "ok.npz")
    with pytest.raises(NodeDataError, match="tier"):
        node_data(_context(path, tier="huge"), RunSettings())
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(NodeDataError, match="readable"):
        node_data(_context(tmp_path / "junk.npz"), RunSettings())
