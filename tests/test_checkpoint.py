"""Checkpoint format, resume keys and the reply quorum rule (no processes)."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from fedge.server.checkpoints import Checkpoint, RunCheckpoints, config_hash, load_checkpoint, save_checkpoint
from fedge.server.nodes import required_replies
from fedge.settings import RunSettings


def _ckpt(server_round: int, value: float, state: dict | None = None) -> Checkpoint:
    arrays = OrderedDict(w=np.full((2, 3), value, np.float32), b=np.arange(3, dtype=np.float32))
    rows = [{"round": r, "accuracy": 0.1 * r} for r in range(1, server_round + 1)]
    return Checkpoint("lora-fedavg", "abc", server_round, arrays, rows=rows,
                      totals={"uplink_bytes": 10 * server_round, "downlink_bytes": 20 * server_round},
                      base={"accuracy": 0.2}, fleet={"accuracy": 0.5}, strategy_state=state)


def test_round_trip_keeps_only_the_last_round(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, _ckpt(1, 1.0))
    save_checkpoint(tmp_path, _ckpt(2, 2.0))
    ckpt = load_checkpoint(tmp_path)
    assert ckpt is not None and ckpt.server_round == 2
    assert list(ckpt.arrays) == ["w", "b"] and np.all(ckpt.arrays["w"] == 2.0)
    assert [r["round"] for r in ckpt.rows] == [1, 2] and ckpt.totals["uplink_bytes"] == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.json", "round-0002.safetensors"]


def test_manifest_is_the_commit_point(tmp_path: Path) -> None:
    """An arrays file written without its manifest (a crash in between) is ignored: the last commit wins."""
    save_checkpoint(tmp_path, _ckpt(1, 1.0))
    (tmp_path / "round-0002.safetensors").write_bytes(b"partial")
    ckpt = load_checkpoint(tmp_path)
    assert ckpt is not None and ckpt.server_round == 1 and np.all(ckpt.arrays["w"] == 1.0)
    assert load_checkpoint(tmp_path / "none") is None


def test_torch_optimizer_state_survives(tmp_path: Path) -> None:
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    opt = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    save_checkpoint(tmp_path, _ckpt(1, 1.0, state=opt.state_dict()))
    ckpt = load_checkpoint(tmp_path)
    assert ckpt is not None and ckpt.strategy_state is not None
    fresh = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3, 2)), torch.nn.Parameter(torch.zeros(4))], lr=1e-2)
    fresh.load_state_dict(ckpt.strategy_state)
    a, b = opt.state_dict(), fresh.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for i in (0, 1):
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(a["state"][i][key], b["state"][i][key])


def test_config_hash_ignores_operational_keys() -> None:
    base = RunSettings(method="fedzip", num_clients=3).to_config()
    assert config_hash(base) == config_hash({**base, "num-server-rounds": 99, "out-dir": "/x", "round-timeout": 5})
    assert config_hash(base) != config_hash({**base, "seed": 1})
    assert config_hash(base) != config_hash({**base, "num-clients": 4})


def test_run_checkpoints_modes(tmp_path: Path) -> None:
    settings = RunSettings(out_dir=str(tmp_path), checkpoint="auto")
    store = RunCheckpoints(settings)
    assert store.folder.parent == tmp_path / "checkpoints" and store.folder.name.startswith("lora-fedavg-")
    save_checkpoint(store.folder, _ckpt(1, 1.0))
    assert store.resume(strategy=object()) is not None  # type: ignore[arg-type]
    assert RunCheckpoints(RunSettings(out_dir=str(tmp_path), checkpoint="fresh")).resume(object()) is None  # type: ignore[arg-type]
    assert not RunCheckpoints(RunSettings(out_dir=str(tmp_path), checkpoint="off")).enabled
    with pytest.raises(ValueError):
        RunCheckpoints(RunSettings(checkpoint="sometimes"))
    assert json.loads((store.folder / "checkpoint.json").read_text())["format"] == 1


@pytest.mark.parametrize(("min_replies", "sent", "need"), [
    (0.5, 3, 2), (0.5, 4, 2), (1.0, 3, 1), (2, 3, 2), (5, 3, 3), (0.99, 3, 3), (0.1, 3, 1), (0.5, 0, 0),
])
def test_required_replies(min_replies: float, sent: int, need: int) -> None:
    assert required_replies(min_replies, sent) == need
