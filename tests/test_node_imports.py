"""What a node's message imports: a fresh process that only evaluates loads neither peft, transformers, SciPy
nor scikit-learn (node-local caches hold the data; LoRA is folded into the base in plain torch)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from fedge.methods import get_method
from fedge.settings import RunSettings

EVALUATE_IN_A_FRESH_PROCESS = """
import json, sys
import numpy as np
from flwr.supercore.task_identity import TaskIdentity
TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
from flwr.app import ConfigRecord, Context, Message, RecordDict
from fedge.client.app import evaluate
from fedge.messages import ARRAYS_RECORD, CONFIG_RECORD, METRICS_RECORD
from fedge.methods import resolve
from fedge.state import to_record

state = dict(np.load(sys.argv[1]))
config = ConfigRecord({**resolve({"method": "fedzip", "num-clients": 3}).to_config(), "server-round": 1})
msg = Message(RecordDict({ARRAYS_RECORD: to_record(state), CONFIG_RECORD: config}), dst_node_id=1, message_type="evaluate")
context = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 3}, state=RecordDict(),
                  run_config={})
reply = evaluate(msg, context)
loaded = sorted(m for m in ("peft", "transformers", "sklearn", "scipy") if m in sys.modules)
print(json.dumps({"accuracy": reply.content.metric_records[METRICS_RECORD]["accuracy"], "loaded": loaded}))
"""


def test_a_node_that_only_evaluates_imports_no_training_stack(digits, tmp_path: Path) -> None:
    method = get_method("fedzip")
    model = method.build_model(digits, RunSettings(num_clients=3))
    rng = np.random.default_rng(1)  # B away from zero, as after training, so that folding changes the answers
    state = {k: (rng.normal(size=v.shape) * 0.05).astype(np.float32) if "lora_B" in k else v
             for k, v in method.exchanged_state(model).items()}
    method.load_state(model, state)
    np.savez(tmp_path / "state.npz", **state)
    digits.client_data(0, 3)  # the node-local cache a node fills on its first message
    done = subprocess.run([sys.executable, "-c", EVALUATE_IN_A_FRESH_PROCESS, str(tmp_path / "state.npz")],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["loaded"] == []
    from fedge.training import evaluate

    expected = evaluate(model, digits.client_data(0, 3).test, device=__import__("torch").device("cpu"))
    assert abs(out["accuracy"] - expected.accuracy) < 1e-9  # the folded model answers as the peft model does
