"""Test-wide settings: one base-model cache per test session, shared by every process the tests start.

The cache is a fresh folder (each session trains the base model once, as a fresh machine would) that the
session removes when it ends, unless FEDGE_TEST_CACHE names a folder to keep and reuse.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

_KEEP = os.environ.get("FEDGE_TEST_CACHE")
_CACHE = _KEEP or tempfile.mkdtemp(prefix="fedge-test-cache-")
os.environ["FEDGE_CACHE"] = _CACHE  # inherited by Ray workers and subprocesses


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The docs test (about half an hour) runs only when a -m expression names it (`pytest -m docs`)."""
    if "docs" in (config.getoption("markexpr") or ""):
        return
    deselected = [item for item in items if item.get_closest_marker("docs")]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if not item.get_closest_marker("docs")]


def pytest_unconfigure(config: pytest.Config) -> None:
    if not _KEEP:
        shutil.rmtree(_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def digits():
    from fedge.scenario import load_scenario

    return load_scenario("digits-shift", seed=0, alpha=0.5)


@pytest.fixture
def run_identity():
    """Flower messages can only be built inside a run; give this process one for the test."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[tuple[Any, str]]:
    """A registry serving on loopback (gRPC), and its address; stopped afterwards."""
    from fedge.edge.registry import Registry, start

    reg = Registry(tmp_path / "registry")
    server, port = start(reg, "127.0.0.1", 0, workers=16)
    yield reg, f"127.0.0.1:{port}"
    reg.stop()
    server.stop(grace=0.5).wait()


@pytest.fixture
def device(tmp_path: Path, registry: tuple[Any, str]) -> Iterator[Any]:
    """A started agent (labelled local data, default precisions) on the test's registry; stopped afterwards."""
    from _edge_support import make_agent

    reg, address = registry
    agent = make_agent(tmp_path, address, reg)
    yield agent
    agent.stop()
