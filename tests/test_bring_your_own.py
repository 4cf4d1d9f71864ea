"""`fedge run --model ... --data ...` end to end: a tiny local transformers model and data set, a compressed method
through Flower's simulation runtime, and the adapter it writes loaded by stock peft."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _lm_support import corpus, save_tiny_llama, write_jsonl


@pytest.mark.slow
def test_a_local_model_and_data_federate_and_the_adapter_loads_in_stock_peft(tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from typer.testing import CliRunner

    from fedge.cli import app
    from fedge.federated_model import merged_copy
    from fedge.methods import resolve
    from fedge.scenario import scenario_for
    from fedge.server.checkpoints import load_checkpoint

    model_dir = save_tiny_llama(tmp_path / "model")
    data = write_jsonl(tmp_path / "data.jsonl", corpus(48))
    out = tmp_path / "out"
    args = ["run", "--model", str(model_dir), "--task", "causal-lm", "--data", str(data), "--methods", "fedzip",
            "--rounds", "2", "--clients", "2", "--local-epochs", "2", "--lr", "0.01", "--edge-devices", "0",
            "--run-config", "lora-rank=4 lora-alpha=8 batch-size=8", "--out", str(out)]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "fedzip round 2: ppl" in result.output and "cum." in result.output  # the per-round traffic report

    results = json.loads((out / "results.json").read_text())
    assert results["scenario"]["task"] == "causal-lm" and results["scenario"]["name"] == "hf"
    entry = results["methods"]["fedzip"]
    rounds, final = entry["rounds"], entry["final"]
    assert all({"perplexity", "personalized_perplexity", "uplink_mb", "cumulative_uplink_mb", "downlink_mb",
                "cumulative_downlink_mb"} <= set(r) for r in rounds)
    assert rounds[-1]["cumulative_uplink_mb"] == pytest.approx(final["uplink_bytes"] / 1e6)
    assert final["uplink_mb_per_round"] == pytest.approx(final["uplink_mb"] / 2)
    assert final["perplexity"] < results["base"]["perplexity"]  # two rounds on the clients' text already help
    assert (out / "perplexity_vs_uplink.png").stat().st_size > 0

    adapter = Path(entry["adapter"]["dir"])
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in adapter.iterdir()}
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(model_dir)

    # stock peft on the untouched base gives what fedge's merged global model gives
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(["def value ( self ) : return None", "for x in data : print ( x )"], return_tensors="pt",
                      padding=True)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(model_dir)), str(adapter)).eval()
    spec = resolve(_config(model_dir, data, out))  # the run's model: same base, targets, rank and seed
    checkpoint = load_checkpoint(entry["checkpoint"]["dir"])
    assert checkpoint is not None and checkpoint.server_round == 2
    federated = spec.method.build_model(scenario_for(spec.settings), spec.settings)
    spec.method.load_state(federated, checkpoint.arrays)
    with torch.no_grad():
        ours = merged_copy(federated)(**batch).logits
        theirs = peft_model(**batch).logits
    assert torch.allclose(ours, theirs, atol=1e-5), float((ours - theirs).abs().max())
    assert (theirs - AutoModelForCausalLM.from_pretrained(str(model_dir))(**batch).logits).abs().max() > 1e-4


def _config(model_dir: Path, data: Path, out: Path) -> dict[str, object]:
    return {"method": "fedzip", "scenario": "hf", "model": str(model_dir), "task": "causal-lm", "data": str(data),
            "num-clients": 2, "lora-rank": 4, "lora-alpha": 8, "out-dir": str(out)}
