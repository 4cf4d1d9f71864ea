"""The on-disk cache of what scenarios build once (base models, tokenizers, data arrays), shared by every process
of a run.

`$FEDGE_CACHE` (default `~/.cache/fedge`). A cached folder is built by one
process at a time (a file lock), in a temporary folder renamed into place, so
others wait and then load the same bytes, and a crash never leaves half a build.
"""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
from filelock import FileLock

from fedge.atomic_file import atomic_write


def cache_dir() -> Path:
    return Path(os.environ.get("FEDGE_CACHE", Path.home() / ".cache" / "fedge"))


def build_once(folder: Path, build: Callable[[Path], None]) -> Path:
    """`folder`, built by `build(tmp)` into a temporary folder unless it exists; concurrent callers wait."""
    if folder.is_dir():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if folder.is_dir():  # built by another process while this one waited
            return folder
        tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            build(tmp)
            os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def cached_arrays(name: str, make: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """`cache_dir()/name` (an .npz of named arrays), made by `make()` the first time (any process) and written atomically."""
    path = cache_dir() / name
    if path.exists():
        with np.load(path) as stored:
            return {k: stored[k] for k in stored.files}
    arrays: dict[str, np.ndarray] = make()
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, buffer.getvalue())
    return arrays
