"""What a user sees when an input is wrong: one error style, a short message and a hint, a non-zero exit,
no traceback (only with --debug, and never with local variables); every check runs before any work starts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fedge.cli import app

ROOT = Path(__file__).resolve().parents[1]
FEDGE = [sys.executable, "-m", "fedge.cli"]


def fails(args: list[str], *expected: str, code: int | None = None) -> str:
    """Run `fedge ARGS`; it must fail with the one error style and say each of `expected`."""
    result = CliRunner().invoke(app, args)
    output = result.output
    assert result.exit_code != 0, output
    if code is not None:
        assert result.exit_code == code, output
    assert "Traceback" not in output and "locals" not in output, output
    assert output.lstrip().startswith("error:"), output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) <= 2 and lines[-1].startswith(("hint:", "error:")), output
    for text in expected:
        assert text in " ".join(output.split()), output
    return output


@pytest.mark.parametrize(("args", "said"), [
    (["run", "--rounds", "0"], "'--rounds': 0 is not in the range x>=1"),
    (["run", "--clients", "1"], "'--clients': 1 is not in the range x>=2"),
    (["run", "--clients", "3", "--clients-per-round", "4"], "4 is more than --clients 3"),
    (["run", "--lora-rank", "0"], "'--lora-rank': 0 is not in the range x>=1"),
    (["run", "--edge-devices", "-1"], "'--edge-devices'"),
    (["deploy-local", "--rounds", "0"], "'--rounds': 0 is not in the range x>=1"),
    (["deploy-local", "--clients", "1"], "'--clients': 1 is not in the range x>=2"),
    (["edge", "deploy", "--devices", "0"], "'--devices': 0 is not in the range x>=1"),
    (["export", "--int8-mode", "int4"], "'--int8-mode'"),
])
def test_a_bad_value_is_refused_before_anything_runs(args: list[str], said: str) -> None:
    fails(args, said, f"hint: see `fedge {' '.join(a for a in args[:2] if not a.startswith('-'))} --help`", code=2)


def test_unknown_methods_are_listed_in_full() -> None:
    from fedge.methods import available_methods

    out = fails(["run", "--methods", "lora-fedavg,nosuch"], "unknown methods ['nosuch']")
    assert ", ".join(available_methods()) in " ".join(out.split())  # never cut off


def test_an_out_path_through_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("a file")
    for args in (["run", "--out"], ["deploy-local", "--out"], ["export", "--out"]):
        fails([*args, str(tmp_path / "README.md" / "out")], "README.md is a file, not a folder", code=1)


@pytest.mark.parametrize(("override", "said"), [
    ("fraction-train=0.5", "no method run uses 'fraction-train'; valid keys:"),  # a Flower FedAvg key fedge has not
    ("local-epochs=0", "local-epochs must be at least 1"),
    ("fedzip.top-z=0.1", "'fedzip' is not one of the methods run"),
    ("scenario='nosuch'", "unknown scenario 'nosuch'"),
])
def test_every_run_config_key_and_value_is_checked_up_front(tmp_path: Path, override: str, said: str) -> None:
    fails(["run", "--methods", "lora-fedavg", "--out", str(tmp_path / "out"), "--run-config", override], said)
    assert not (tmp_path / "out").exists()  # refused before the run made anything


def test_registry_serve_with_a_missing_file_to_publish(tmp_path: Path) -> None:
    fails(["registry", "serve", "--workdir", str(tmp_path / "reg"), "--publish", str(tmp_path / "model.onnx")],
          "'--publish': Path", "does not exist", code=2)


@pytest.mark.parametrize("command", [["registry", "publish", "FILE", "--token", "t"], ["registry", "status"]])
def test_an_unreachable_registry(tmp_path: Path, command: list[str]) -> None:
    model = tmp_path / "model.onnx"
    model.write_bytes(b"onnx")
    args = [str(model) if a == "FILE" else a for a in command]
    fails([*args, "--registry", "127.0.0.1:1"], "the registry at 127.0.0.1:1 is not reachable",
          "hint: start it with `fedge registry serve`", code=1)


def test_an_agent_without_the_registry_key_or_with_unfit_data(tmp_path: Path) -> None:
    from fedge.edge.artifacts import load_or_create_key, public_pem

    key = tmp_path / "registry.pub.pem"
    agent = ["edge", "agent", "--registry", "127.0.0.1:1", "--public-key", str(key)]
    fails(agent, "'--public-key': File", "does not exist", code=2)
    key.write_bytes(public_pem(load_or_create_key(tmp_path / "registry.pem").public_key()))
    np.savez(tmp_path / "samples.npz", inputs=np.zeros((2, 1, 32, 32), np.float32))
    (tmp_path / "file").write_text("x")
    fails([*agent, "--workdir", str(tmp_path / "file" / "cam-0")], "file is a file, not a folder", code=1)
    fails([*agent, "--workdir", str(tmp_path / "cam-0"), "--data", str(tmp_path / "samples.npz")],
          "has no array named x (it has inputs)", "samples.npz", code=1)


def test_export_refuses_a_checkpoint_given_as_weights_and_a_folder_without_a_run(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    ckpt = tmp_path / "checkpoints" / "lora-fedavg-abc" / "round-0002.safetensors"
    ckpt.parent.mkdir(parents=True)
    save_file({"global/base_model.model.fc1.lora_A.weight": np.zeros((2, 2), np.float32)}, str(ckpt))
    fails(["export", "--weights", str(ckpt)], "is a run's checkpoint", f"--checkpoint {ckpt.parent}", code=1)
    fails(["export", "--from", str(tmp_path / "nowhere")], "no such folder", code=1)
    fails(["export", "--from", str(tmp_path)], "no results.json and no checkpoint there", code=1)
    fails(["export", "--method", "fedzip"], "--method picks a method of a run", code=2)
    fails(["export", "--from", str(tmp_path), "--weights", str(ckpt)], "give one of --from, --checkpoint, --weights and --adapter")


def test_export_names_the_methods_a_run_has(tmp_path: Path) -> None:
    (tmp_path / "results.json").write_text(json.dumps({"run": {"methods": ["fedzip"]},
                                                       "methods": {"fedzip": {"checkpoint": {}}}}))
    fails(["export", "--from", str(tmp_path), "--method", "flasc"], "--method flasc: not in the run", "it ran fedzip")
    fails(["export", "--from", str(tmp_path)], "fedzip", "ran with checkpoint=off")


def test_deploy_local_refuses_outputs_flower_would_package(tmp_path: Path) -> None:
    """An output folder inside the app and not in its .gitignore would ship in the next `flwr run`'s app."""
    inside = ROOT / "not-ignored-outputs"
    fails(["deploy-local", "--out", str(inside)], f"--out {inside} is inside the Flower app",
          "add not-ignored-outputs/ to", code=1)
    assert not inside.exists()


def test_deploy_local_checks_node_data_and_run_config_before_starting(tmp_path: Path) -> None:
    nodes = tmp_path / "nodes"
    nodes.mkdir()
    (nodes / "node-0.npz").write_bytes(b"")
    fails(["deploy-local", "--clients", "2", "--node-data", str(nodes), "--out", str(tmp_path / "out")],
          "lacks node-1.npz", f"fedge node-data {nodes} --clients 2")
    fails(["deploy-local", "--min-replies", "0", "--out", str(tmp_path / "out")], "min-replies must be positive")


def test_an_unexpected_failure_is_one_line_and_points_to_debug(monkeypatch: pytest.MonkeyPatch) -> None:
    import fedge.methods

    def broken() -> list[str]:
        raise RuntimeError("registry of methods is broken\nsecond line")

    monkeypatch.setattr(fedge.methods, "available_methods", broken)
    fails(["methods"], "RuntimeError: registry of methods is broken (+1 lines)",
          "hint: an unexpected failure; `fedge --debug ...` shows where it happened", code=1)


def test_debug_shows_the_traceback_without_locals(tmp_path: Path) -> None:
    """In a real process: the same error with --debug adds the traceback, and no local variables."""
    command = [*FEDGE, "export", "--from", str(tmp_path / "nowhere")]
    plain = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    debug = subprocess.run([*command[:3], "--debug", *command[3:]], capture_output=True, text=True, timeout=120,
                           check=False)
    assert plain.returncode == 1 and plain.stderr.startswith("error: --from") and "Traceback" not in plain.stderr
    assert plain.stdout == ""  # errors go to stderr
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "UserError" in debug.stderr
    assert "locals" not in debug.stderr.lower()


@pytest.mark.slow
def test_a_federation_that_fails_ends_with_its_reason(tmp_path: Path) -> None:
    """A round timeout no client can meet and no retry: round 1 gets no reply and cannot aggregate. The
    simulation's failure is the command's error, with no traceback (Flower's own log of it included)."""
    done = subprocess.run([*FEDGE, "run", "--methods", "fedzip", "--rounds", "1", "--clients", "2", "--local-epochs", "1",
                           "--edge-devices", "0", "--out", str(tmp_path / "out"),
                           "--run-config", "round-timeout=0.01 round-retries=0"],
                          capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    assert "error: round 1: too few replies after 1 attempts" in done.stderr
    assert "hint: the nodes' errors are in the log" in done.stderr
    assert "Traceback" not in done.stdout + done.stderr
