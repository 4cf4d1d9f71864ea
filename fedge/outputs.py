"""A run's output folder: checking that it can be one, and clearing what an earlier run left in it.

Each run owns its folder. `fedge run` and `fedge deploy-local` start by
removing an earlier run's outputs (only the entries named here, and only from a
folder that holds a fedge run), keeping the checkpoints when asked to resume, so
results, checkpoints and edge-agent state of different runs never mix.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from fedge.errors import UserError
from fedge.results import PLOT_FILE, RESULTS_FILE

CHECKPOINTS = "checkpoints"
#: the local edge fleet (registry and agents), `fedge deploy-local`'s processes, `fedge export --from`'s files
EDGE, DEPLOYMENT, EXPORT = "edge", "deployment", "export"
#: what a run writes into its folder besides its checkpoints
RUN_OUTPUTS = (RESULTS_FILE, PLOT_FILE, EDGE, DEPLOYMENT, EXPORT)


def check_out_dir(path: Path, option: str = "--out") -> Path:
    """`path`, absolute, once it is sure to be (or to be creatable as) a folder this process can write to."""
    path = Path(path).expanduser().absolute()
    for existing in (path, *path.parents):
        if not existing.exists():
            continue
        if not existing.is_dir():
            raise UserError(f"{option} {path}: {existing} is a file, not a folder", f"give {option} a folder path")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise UserError(f"{option} {path}: cannot write in {existing}", f"give {option} a folder you can write to")
        break
    return path


def holds_run(out: Path) -> bool:
    """Whether `out` holds a fedge run's outputs (its results.json, or a committed checkpoint)."""
    return (out / RESULTS_FILE).is_file() or any((out / CHECKPOINTS).glob("*/checkpoint.json"))


def clear_previous_run(out: Path, keep_checkpoints: bool = False) -> list[str]:
    """Remove an earlier run's outputs from `out` (checkpoints too unless `keep_checkpoints`); the names removed."""
    if not holds_run(out):
        return []
    names = [*RUN_OUTPUTS, *(() if keep_checkpoints else (CHECKPOINTS,))]
    removed = []
    for name in names:
        target = out / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        else:
            continue
        removed.append(name)
    return removed
