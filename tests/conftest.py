"""Test-wide settings: one base-model cache per test session, shared by every process the tests start."""

from __future__ import annotations

import os
import tempfile

import pytest

_CACHE = os.environ.get("FEDGE_TEST_CACHE") or tempfile.mkdtemp(prefix="fedge-test-cache-")
os.environ["FEDGE_CACHE"] = _CACHE  # inherited by Ray workers and subprocesses


@pytest.fixture(scope="session")
def digits():
    from fedge.scenario import load_scenario

    return load_scenario("digits-shift", seed=0, alpha=0.5)
