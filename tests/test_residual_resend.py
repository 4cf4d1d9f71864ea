"""Error feedback across a resent round: the node starts over from the residual the round began with."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from torch import nn
from torch.utils.data import TensorDataset

from fedge.adapters import inject_lora
from fedge.messages import ARRAYS_RECORD, CONFIG_RECORD, UPDATE_RECORD, envelope_bytes
from fedge.methods import Job, resolve
from fedge.methods.compressed import RESIDUAL_KEY
from fedge.scenario import ClientData
from fedge.state import from_record, to_record
from fedge.tiers import TIERS


@pytest.fixture(autouse=True)
def _run_identity(run_identity):
    yield


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


def _data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))


def _job(server_round: int) -> Job:
    torch.manual_seed(0)
    model = inject_lora(_Tiny(), ["fc1", "fc2"], rank=4, alpha=8, seed=0)
    spec = resolve({"method": "flasc", "local-epochs": 1, "batch-size": 8, "flasc.density-up": 0.1})
    data = ClientData(train=_data(32, 1), test=_data(8, 2), tier=TIERS["strong"])
    scenario = SimpleNamespace(task="classification")  # the job reads only the scenario's task
    return Job(spec, 0, data, scenario, model, spec.method.exchanged_state(model), server_round,  # type: ignore[arg-type]
               torch.device("cpu"))


def _train(context: Context, server_round: int) -> bytes:
    job = _job(server_round)
    request = Message(RecordDict({ARRAYS_RECORD: to_record(job.global_state), CONFIG_RECORD: ConfigRecord({})}),
                      dst_node_id=1, message_type="train")
    reply = job.method.train(job, request, context)
    return envelope_bytes(reply.content, UPDATE_RECORD)


def test_a_resent_round_is_answered_as_the_first_time() -> None:
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    _train(context, 1)
    first = _train(context, 2)
    after_first = from_record(context.state.array_records[RESIDUAL_KEY])
    again = _train(context, 2)  # the server discarded round 2 and sent it again
    assert again == first
    after_again = from_record(context.state.array_records[RESIDUAL_KEY])
    assert all(np.array_equal(after_first[k], after_again[k]) for k in after_first)
    third = _train(context, 3)
    assert third != first
