"""Flower 1.39's fixed pauses and fedge's shorter ones: the schedule, and the real Flower modules they replace."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fedge.flower_pauses import (
    FLOWER_IDLE_PAUSE,
    FLOWER_REPLY_PAUSE,
    PauseRefused,
    ShorterPauses,
    shorten_supernode_pauses,
)


def test_a_node_asks_often_while_active_and_backs_off_to_flowers_pause_when_idle() -> None:
    pauses = ShorterPauses(min_pause=0.1, reply_pause=0.05, active_for=3600.0)
    assert pauses.pause_for(FLOWER_IDLE_PAUSE) == 0.1  # never had a message: still the short pause at first
    pauses.note_ask(True)
    for _ in range(50):
        pauses.note_ask(False)
    assert pauses.pause_for(FLOWER_IDLE_PAUSE) == 0.1  # within the active window
    assert pauses.pause_for(FLOWER_REPLY_PAUSE) == 0.05 and pauses.pause_for(1.25) == 1.25
    idle = ShorterPauses(min_pause=0.1, reply_pause=0.05, active_for=0.0)
    seen = []
    for _ in range(8):
        idle.note_ask(False)
        seen.append(idle.pause_for(FLOWER_IDLE_PAUSE))
    assert seen == [0.2, 0.4, 0.8, 1.6, 3.0, 3.0, 3.0, 3.0]
    idle.note_ask(True)
    assert idle.pause_for(FLOWER_IDLE_PAUSE) == 0.1


PATCH_THE_REAL_MODULES = """
import functools, time
import flwr.superlink.grid.http_grid as grid
import flwr.supernode.start_client_internal as loop
from fedge.flower_pauses import ShorterPauses, quicken_object_pulls, shorten_supernode_pauses

pauses = shorten_supernode_pauses(loop, 0.1, 0.05)
assert loop.time is pauses and loop.time.monotonic is time.monotonic
assert loop.pull_objects.keywords == {"initial_backoff": 0.1, "backoff_cap": 0.25}
assert loop._pull_and_store_message.__name__ == "pull_and_note"
quicken_object_pulls(grid, 0.1)
quicken_object_pulls(grid, 0.2)  # a second call replaces the first, it does not wrap it
assert isinstance(grid.pull_objects, functools.partial) and not isinstance(grid.pull_objects.func, functools.partial)
assert grid.pull_objects.keywords["initial_backoff"] == 0.2
print("patched")
"""


def test_the_pauses_fit_flowers_own_supernode_loop_and_grid() -> None:
    done = subprocess.run([sys.executable, "-c", PATCH_THE_REAL_MODULES], capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0 and "patched" in done.stdout, done.stderr[-2000:]


def test_a_supernode_loop_it_does_not_know_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "other_supernode_loop.py").write_text(
        "import time\n\ndef _pull_and_store_message():\n    return None\n\ndef loop():\n    time.sleep(5)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import other_supernode_loop

    with pytest.raises(PauseRefused, match="not the SuperNode loop of Flower 1.39"):
        shorten_supernode_pauses(other_supernode_loop, 0.1, 0.05)


STOP_A_SUPERNODE_THAT_HANGS_AT_EXIT = """
import threading
import fedge.client.supernode as supernode
supernode.EXIT_DEADLINE_S = 2.0


class Finalizer:
    def __del__(self):  # never returns, as grpcio's deadlocked channel finalizer, once no other thread may run
        lock = threading.Lock()
        lock.acquire()
        lock.acquire()


held = Finalizer()  # finalized with this module, after Python has stopped its daemon threads
supernode.run_supernode(["--insecure", "--superlink", "127.0.0.1:9", "--port", "{port}", "--isolation", "process"])
"""


def test_a_supernode_that_hangs_while_stopping_is_ended_by_its_deadline() -> None:
    import signal
    import time

    from fedge.server.local_deployment import free_port

    script = STOP_A_SUPERNODE_THAT_HANGS_AT_EXIT.format(port=free_port())
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # started: its Runtime API serves (Flower's exit handlers are in place by then)
            if "Uvicorn running" in line:
                break
        time.sleep(2)
        assert proc.poll() is None, proc.communicate()[0]
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)  # without the deadline it would wait forever on the finalizer
        print(f"ended {time.monotonic() - started:.1f} s after SIGTERM")
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "Timeout (0:00:02)!" in out, out[-2000:]  # faulthandler's report, then its exit
