"""The on-disk cache of what scenarios build once (base models, tokenizers), shared by every process of a run.

`$FEDGE_CACHE` (default `~/.cache/fedge`). A cached folder is built by one
process at a time (a file lock), in a temporary folder renamed into place, so
others wait and then load the same bytes, and a crash never leaves half a build.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock


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
