"""Causal LMs and text models: the loss and its pooling, the scenarios built from options, methods on transformers,
refusals that come before anything trains, and the LM's ONNX export."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from _lm_support import corpus, save_tiny_llama, write_jsonl
from flwr.app import ConfigRecord, Context, Message, RecordDict
from torch.utils.data import TensorDataset

from fedge.results import ClientEval, fleet_accuracy, task_metrics
from fedge.settings import RunSettings
from fedge.training import evaluate, task_loss


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-lm")
    return {"model": save_tiny_llama(root / "model"), "data": write_jsonl(root / "data.jsonl", corpus(60))}


def _settings(tiny: dict[str, Path], **overrides: object) -> RunSettings:
    values = {"scenario": "hf", "model": str(tiny["model"]), "task": "causal-lm", "data": str(tiny["data"]),
              "num_clients": 3, "lora_rank": 4, "lora_alpha": 8, "local_epochs": 1, "batch_size": 8}
    return RunSettings(**{**values, **overrides})  # type: ignore[arg-type]


# ---- the loss, evaluation and pooling -------------------------------------------------------------------------


def test_causal_lm_loss_is_transformers_own_over_real_tokens(tiny: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny["model"])).eval()
    ids = torch.randint(0, model.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding
    mask[2, 3:] = 0
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        hf = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
    ours, count = task_loss("causal-lm", logits, [ids, mask])
    assert count == 11 + 6 + 2
    assert float(ours) == pytest.approx(float(hf), rel=1e-5)

    stats = evaluate(model, TensorDataset(ids, mask), device=torch.device("cpu"), task="causal-lm", batch_size=2)
    assert stats.predictions == count and stats.num_examples == 3
    assert stats.loss_sum == pytest.approx(float(hf) * count, rel=1e-5)
    assert stats.perplexity == pytest.approx(math.exp(float(hf)), rel=1e-5)
    targets = ids[:, 1:][mask[:, 1:].bool()]
    predicted = logits[:, :-1][mask[:, 1:].bool()].argmax(-1)
    assert stats.correct == int((predicted == targets).sum())


def test_perplexity_pools_clients_by_tokens_not_by_client() -> None:
    evals = [ClientEval(0, 100, 40, 50, loss_sum=100 * 2.0, personal_loss_sum=100 * 1.5),
             ClientEval(1, 300, 60, 60, loss_sum=300 * 3.0, personal_loss_sum=300 * 3.0)]
    fleet = fleet_accuracy(evals)
    metrics = task_metrics("causal-lm", fleet)
    assert metrics["perplexity"] == pytest.approx(math.exp((200 + 900) / 400))
    assert metrics["personalized_perplexity"] == pytest.approx(math.exp((150 + 900) / 400))
    assert fleet.accuracy == pytest.approx(100 / 400)
    assert task_metrics("classification", fleet) == {}


# ---- scenarios built from options ----------------------------------------------------------------------------


@pytest.mark.parametrize("partition", ["iid", "dirichlet:0.3", "natural:source"])
def test_flwr_datasets_partitions_give_every_client_disjoint_rows(tiny: dict[str, Path], partition: str) -> None:
    from fedge.scenario import scenario_for

    scenario = scenario_for(_settings(tiny, partition=partition))
    texts = []
    for p in range(3):
        data = scenario.client_data(p, 3)
        assert len(data.train) > 0 and len(data.test) > 0
        texts += [tuple(t.tolist()) for split in (data.train, data.test) for t in split.tensors[0]]
    assert len(texts) == 60  # every row lands in exactly one client's train or test split
    assert scenario.task == "causal-lm" and scenario.lora_targets == ["q_proj", "v_proj"]  # peft's Llama defaults


def test_bad_options_are_refused_with_the_reason(tiny: dict[str, Path]) -> None:
    from fedge.scenario import scenario_for

    with pytest.raises(ValueError, match="no column 'body'.*its columns: text, label, source"):
        scenario_for(_settings(tiny, text_column="body")).client_data(0, 3)
    with pytest.raises(ValueError, match="natural:source makes 3 clients.*not 2"):
        scenario_for(_settings(tiny, partition="natural:source", num_clients=2)).client_data(0, 2)
    with pytest.raises(ValueError, match="partition 'zipf'"):
        scenario_for(_settings(tiny, partition="zipf"))
    with pytest.raises(ValueError, match="neither an existing directory nor a hub id"):
        scenario_for(_settings(tiny, model="./no/such/model")).base_model()
    with pytest.raises(ValueError, match="task must be one of"):
        scenario_for(_settings(tiny, task="translation"))
    # a scenario refuses the options it would not use, and says what a model of your own needs
    with pytest.raises(ValueError, match="'digits-shift' does not use model=.*scenario 'hf'"):
        scenario_for(RunSettings(model=str(tiny["model"])))
    with pytest.raises(ValueError, match="'stdlib-code' does not use alpha=0.3"):
        scenario_for(RunSettings(scenario="stdlib-code", alpha=0.3))


def test_a_text_classifier_gets_a_seeded_head_trained_whole_beside_lora(tiny: dict[str, Path]) -> None:
    from fedge.methods import get_method
    from fedge.scenario import scenario_for

    settings = _settings(tiny, task="classification")
    scenario = scenario_for(settings)
    assert scenario.labels == ["even", "odd"] and scenario.modules_to_save == ["score"]
    heads = [scenario.base_model().score.weight for _ in range(2)]
    assert torch.equal(heads[0], heads[1])  # the new head is the same wherever it is built
    state = get_method("ffa-lora").exchanged_state(get_method("ffa-lora").build_model(scenario, settings))
    assert any("score" in k for k in state) and not any("lora_A" in k for k in state)


# ---- every method on a transformer, and the refusals ---------------------------------------------------------------


@pytest.mark.parametrize("method", ["lora-fedavg", "ffa-lora", "fedzip", "flasc", "ternary", "q8", "q4"])
@pytest.mark.parametrize("task", ["causal-lm", "classification"])
def test_every_lora_method_trains_and_uploads_on_a_transformer(tiny: dict[str, Path], method: str, task: str,
                                                                  run_identity: None) -> None:
    from fedge.envelope import decode_update, expected_specs
    from fedge.messages import ARRAYS_RECORD, CONFIG_RECORD, METRICS_RECORD, UPDATE_RECORD, envelope_bytes
    from fedge.methods import Job, resolve
    from fedge.scenario import scenario_for
    from fedge.state import from_record, to_record

    config = {**_settings(tiny, task=task, method=method).to_config(), "flasc.density-up": 0.25}
    spec = resolve(config)
    scenario = scenario_for(spec.settings)
    model = spec.method.build_model(scenario, spec.settings)
    state = spec.method.exchanged_state(model)
    before = evaluate(model, scenario.client_data(0, 3).train, device=torch.device("cpu"), task=scenario.task).loss
    job = Job(spec, 0, scenario.client_data(0, 3), scenario, model, state, 1, torch.device("cpu"))
    request = Message(RecordDict({ARRAYS_RECORD: to_record(state), CONFIG_RECORD: ConfigRecord(config)}),
                      dst_node_id=1, message_type="train")
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    reply = spec.method.train(job, request, context)
    assert reply.content.metric_records[METRICS_RECORD]["num-examples"] == len(job.data.train)
    if UPDATE_RECORD in reply.content.array_records:
        update = decode_update(envelope_bytes(reply.content, UPDATE_RECORD), expected_specs(state), 1 << 26)
    else:
        new = from_record(reply.content.array_records[ARRAYS_RECORD])
        update = {k: new[k] - state[k] for k in state}
    assert set(update) == set(state)
    assert all(np.isfinite(v).all() for v in update.values()) and any(np.abs(v).max() > 0 for v in update.values())
    after = evaluate(job.model, job.data.train, device=torch.device("cpu"), task=scenario.task).loss
    assert after < before  # local training fits the client's text


def test_pfedgate_refuses_text_scenarios_before_training(tiny: dict[str, Path]) -> None:
    from fedge.methods import get_method
    from fedge.scenario import scenario_for

    for task in ("causal-lm", "classification"):
        with pytest.raises(ValueError, match="pfedgate cannot run on scenario 'hf'.*inputs are token ids"):
            get_method("pfedgate").check_scenario(scenario_for(_settings(tiny, task=task)))


def test_load_in_4bit_is_refused_on_a_cpu() -> None:
    from fedge.pretrained import check_4bit

    with pytest.raises(ValueError, match="needs a CUDA GPU.*drop --load-in-4bit"):
        check_4bit(torch.device("cpu"))


@pytest.mark.parametrize(("args", "message"), [
    (["--scenario", "stdlib-code", "--methods", "pfedgate"], "pfedgate cannot run on scenario 'stdlib-code'"),
    (["--scenario", "stdlib-code", "--load-in-4bit"], "needs a CUDA GPU"),
    (["--model", "x", "--scenario", "digits-shift"], "--model builds scenario hf"),
])
def test_fedge_run_refuses_what_it_cannot_do_before_anything_runs(tmp_path: Path, args: list[str], message: str) -> None:
    from typer.testing import CliRunner

    from fedge.cli import app

    result = CliRunner().invoke(app, ["run", *args, "--out", str(tmp_path)], env={"COLUMNS": "400"})
    assert result.exit_code == 2
    assert message in " ".join(result.output.replace("│", " ").split())
    assert not (tmp_path / "results.json").exists()


def test_a_text_classifier_is_not_sent_to_edge_agents(tiny: dict[str, Path], tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fedge.cli import app

    args = ["--model", str(tiny["model"]), "--task", "classification", "--data", str(tiny["data"]), "--edge-devices",
            "2", "--clients", "2", "--out", str(tmp_path)]
    result = CliRunner().invoke(app, ["run", *args], env={"COLUMNS": "400"})
    assert result.exit_code == 2
    assert "not classification of text" in " ".join(result.output.replace("│", " ").split())
    assert not (tmp_path / "results.json").exists()


# ---- the LM's ONNX export ------------------------------------------------------------------------------------------


def test_an_adapted_causal_lm_exports_to_onnx_with_dynamic_batch_and_sequence(tiny: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM

    from fedge.adapters import inject_lora
    from fedge.edge.export import CausalLMLogits, export_causal_lm, run_causal_lm_onnx
    from fedge.federated_model import merged_copy

    model = inject_lora(AutoModelForCausalLM.from_pretrained(str(tiny["model"])), ["q_proj", "v_proj", "down_proj"],
                        rank=4, alpha=8, seed=0)
    with torch.no_grad():  # a trained-looking adapter: B away from zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 300, (6, 20), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 11:] = 0
    result = export_causal_lm(model, ids, mask)
    meta = result.metadata
    assert meta["max_abs_diff_vs_torch"] <= 1e-3 and meta["input_names"] == ["input_ids", "attention_mask"]
    assert meta["fp32_perplexity"] == pytest.approx(meta["torch_perplexity"], rel=1e-4)
    assert result.int8 is not None and meta["int8_bytes_ratio"] < 0.9  # int8 weights (the tiny embedding stays fp32)
    assert abs(math.log(meta["int8_perplexity"] / meta["fp32_perplexity"])) < 0.1
    reference = CausalLMLogits(merged_copy(model)).eval()
    for batch, length in ((1, 5), (3, 33)):  # shapes the export never saw
        x = torch.randint(0, 300, (batch, length), generator=g)
        m = torch.ones_like(x)
        with torch.no_grad():
            expected = reference(x, m).numpy()
        assert np.abs(run_causal_lm_onnx(result.fp32, x.numpy(), m.numpy()) - expected).max() <= 1e-3


def test_an_adapted_causal_lm_deploys_to_two_agents_that_score_its_next_tokens(tiny: dict[str, Path],
                                                                                 tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from fedge.adapters import inject_lora
    from fedge.edge.export import run_causal_lm_onnx
    from fedge.edge.fleet import deploy_to_edge
    from fedge.edge.scoring import pack_tokens, scored

    model = inject_lora(AutoModelForCausalLM.from_pretrained(str(tiny["model"])), ["q_proj", "v_proj"], rank=4, alpha=8,
                        seed=0)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 300, (12, 24), generator=g)
    mask = torch.ones_like(ids)
    mask[3, 10:] = 0  # padding: never scored
    mask[8, 17:] = 0
    report = deploy_to_edge(model, TensorDataset(ids, mask), devices=2, workdir=tmp_path, precisions=["", "fp32"],
                            task="causal-lm")
    assert report["deployed"] == 2 and report["artifact"]["max_abs_diff_vs_torch"] <= 1e-3
    assert set(report["artifact"]["formats"]) == {"fp32", "int8"}
    assert report["fp32"]["perplexity"] > 1 and report["int8"]["bytes"] < report["fp32"]["bytes"]
    assert report["formats_served"] == {"int8": 1, "fp32": 1}  # edge-1 declared fp32 only
    shards = dict(zip(("edge-0", "edge-1"), np.array_split(np.arange(len(ids)), 2)))
    for name, device in report["fleet"].items():
        check = device["checks"][device["format"]]
        assert check["passed"] and device["failures"] == 0 and device["predictions"] == len(shards[name])
        if device["format"] == "int8":  # compared with fp32 on the device's own sequences, token by token
            assert check["reference"] == "device inputs" and check["top1"] >= 0.95
            assert check["samples"] == int(mask[shards[name]][:, 1:].sum())
        # Each device served its sequences once: its accuracy is its format's next-token accuracy on them.
        served = (tmp_path / "registry" / "artifacts" / "v000001" / f"{device['format']}.bin").read_bytes()
        x = pack_tokens(ids[shards[name]].numpy(), mask[shards[name]].numpy())
        rows, labels = scored(x, run_causal_lm_onnx(served, x[:, 0], x[:, 1]))
        assert device["accuracy"] == pytest.approx(float((rows.argmax(1) == labels).mean()), abs=1e-9)


def test_a_scenario_names_the_local_epochs_its_data_is_meant_for() -> None:
    from fedge.scenario import default_local_epochs

    assert default_local_epochs("stdlib-code") == 1  # one pass over a package's sequences per round
    assert default_local_epochs("digits-shift") is None  # fedge run's own default then
    with pytest.raises(ValueError, match="unknown scenario"):
        default_local_epochs("no-such-scenario")
