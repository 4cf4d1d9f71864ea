"""Each run owns its outputs: what a new run clears, what it never touches, results.json never merged across
runs, outputs never packaged into the Flower app, and the plot that shows every point."""

from __future__ import annotations

import json
import shutil
import zipfile
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest

from fedge.outputs import check_out_dir, clear_previous_run
from fedge.results import accuracy_figure, set_aside

ROOT = Path(__file__).resolve().parents[1]


def make_run(out: Path) -> None:
    (out / "checkpoints" / "fedzip-abc").mkdir(parents=True)
    (out / "checkpoints" / "fedzip-abc" / "checkpoint.json").write_text("{}")
    (out / "edge" / "agents" / "edge-0" / "models").mkdir(parents=True)
    (out / "results.json").write_text("{}")
    (out / "accuracy_vs_uplink.png").write_bytes(b"png")
    (out / "notes.txt").write_text("the user's own file")


def test_a_new_run_clears_an_earlier_runs_outputs_and_nothing_else(tmp_path: Path) -> None:
    make_run(tmp_path)
    removed = clear_previous_run(tmp_path)
    assert sorted(removed) == ["accuracy_vs_uplink.png", "checkpoints", "edge", "results.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_resuming_keeps_the_checkpoints_only(tmp_path: Path) -> None:
    make_run(tmp_path)
    clear_previous_run(tmp_path, keep_checkpoints=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "notes.txt"]


def test_a_folder_without_a_run_is_left_alone(tmp_path: Path) -> None:
    (tmp_path / "edge").mkdir()  # someone's own folder that happens to share a name
    (tmp_path / "export").mkdir()
    assert clear_previous_run(tmp_path) == []
    assert (tmp_path / "edge").is_dir() and (tmp_path / "export").is_dir()


def test_an_out_folder_must_be_creatable(tmp_path: Path) -> None:
    from fedge.errors import UserError

    (tmp_path / "file").write_text("x")
    assert check_out_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    with pytest.raises(UserError, match="is a file, not a folder"):
        check_out_dir(tmp_path / "file" / "out")


def test_an_earlier_results_json_is_set_aside_not_merged_into(tmp_path: Path) -> None:
    (tmp_path / "results.json").write_text(json.dumps({"methods": {"lora-fedavg": {}}, "run": {"clients": 1}}))
    kept = set_aside(tmp_path)
    assert kept is not None and kept.name.startswith("results.") and kept.name != "results.json"
    assert json.loads(kept.read_text())["run"] == {"clients": 1}
    assert not (tmp_path / "results.json").exists()
    (tmp_path / "results.json").write_text("{}")
    assert set_aside(tmp_path) not in (None, kept)  # a second one gets its own name
    assert set_aside(tmp_path) is None


def test_flower_packages_no_run_output_into_the_app(tmp_path: Path) -> None:
    """What the docs' commands write in the app folder (fedge-out/, runs/, certs/, a SuperLink's state.db, the
    `flwr` CLI's .flwr/) stays out of the app Flower builds, however deep; a folder not ignored would not."""
    from flwr.cli.build import build_fab_from_disk

    from fedge.server.local_deployment import packaged_by_flower

    app = tmp_path / "app"
    app.mkdir()
    for name in ("pyproject.toml", ".gitignore", "README.md"):
        shutil.copy(ROOT / name, app / name)
    deep = "/".join(f"d{i}" for i in range(12))
    outputs = [f"fedge-out/checkpoints/{deep}/checkpoint.json", f"runs/fedzip/deployment/{deep}/run-config-1.toml",
               "runs/fedzip/results.json", "certs/node-0.pub", "state.db", ".flwr/config.toml",
               "fedge-out/export/export.json"]
    for rel in outputs:
        (app / rel).parent.mkdir(parents=True, exist_ok=True)
        (app / rel).write_text("{}")
    names = zipfile.ZipFile(BytesIO(build_fab_from_disk(app))).namelist()
    assert "README.md" in names
    assert not [n for n in names if n.startswith(("fedge-out", "runs", "certs", ".flwr", "state.db"))], names
    assert not packaged_by_flower(app, app / "runs" / "x") and not packaged_by_flower(app, tmp_path / "elsewhere")
    assert packaged_by_flower(app, app / "my-outputs")


def test_the_plot_shows_every_point_on_a_log_uplink_axis() -> None:
    """Full-model FedAvg sends ~100x LoRA's bytes: both fit, none is cut at an edge, and no line runs from zero."""
    def rounds(per_round: float, accs: list[float]) -> list[dict[str, float]]:
        return [{"uplink_bytes": per_round, "accuracy": a, "personalized_accuracy": a} for a in accs]

    results = {"scenario": {"name": "digits-shift"}, "base": {"accuracy": 0.25}, "methods": {
        "lora-fedavg": {"rounds": rounds(2e6, [0.4, 0.66, 0.78, 0.81, 0.86])},
        "full-fedavg": {"rounds": rounds(2.6e7, [0.58, 0.81, 0.88, 0.92, 0.95])},
    }}
    fig = accuracy_figure(results)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    lines = [line for line in ax.get_lines() if line.get_label() in ("lora-fedavg", "full-fedavg")]
    assert len(lines) == 2
    for line in lines:
        xs, ys = np.asarray(line.get_xdata()), np.asarray(line.get_ydata())
        assert xs.min() > 0  # the base model is the horizontal line, not a point at zero uplink
        assert x0 < xs.min() and xs.max() < x1 and np.log10(x1 / xs.max()) > 0.05  # a margin past the last point
        assert y0 < ys.min() and ys.max() < y1
    assert y0 < 0.25 < y1  # the base model's line is in view
