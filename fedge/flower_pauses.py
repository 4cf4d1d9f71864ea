"""Flower 1.39's fixed pauses on a message's way, and the shorter ones fedge's own processes use.

Each is a literal in Flower's code, not a setting:

- the SuperNode's loop (`flwr.supernode.start_client_internal`) sleeps 3 s after asking the SuperLink for a
  message and getting none, and 0.5 s between checks for the ClientApp's reply;
- whoever pulls a message's objects (the SuperNode pulling an instruction from the SuperLink, the ServerApp's
  grid pulling a reply) waits 1 s, then 2, 4 ... when an object is not there yet, and the SuperLink hands
  out a message before its sender finished uploading the objects, so a quick puller waits a second for
  bytes that arrive milliseconds later.

A round sends two waves of messages (training, then evaluation); each pays these pauses, which on a small
model are most of a deployed round. `shorten_supernode_pauses` (for `fedge supernode`, the SuperNode's own
process) and `quicken_object_pulls` (for the ServerApp's grid) replace them in the running process, after
checking that the code is the Flower 1.39 code they were written for (pyproject caps flwr below 1.40);
anything else is refused with the reason, and Flower's own binaries work with the rest of fedge as they are.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from functools import partial
from types import ModuleType
from typing import Any

#: Flower 1.39's SuperNode loop, literally: the pause after an empty ask, and between checks for a reply
FLOWER_IDLE_PAUSE, FLOWER_REPLY_PAUSE = 3, 0.5
#: the longest wait between two tries for a missing object, once the first quick tries failed
OBJECT_PULL_CAP = 0.25
#: seconds after a message during which a SuperNode asks for the next one every `min_pause` seconds
ACTIVE_FOR = 10.0


class PauseRefused(RuntimeError):
    """The Flower code in this process is not the one these pauses were written for."""


def quicken_object_pulls(module: ModuleType, first_backoff: float) -> None:
    """Make `module`'s `pull_objects` retry a missing object after `first_backoff` s (doubling up to 0.25 s)."""
    pull = getattr(module, "pull_objects", None)
    if pull is None or "initial_backoff" not in inspect.signature(pull).parameters:
        raise PauseRefused(f"{module.__name__}.pull_objects is not Flower 1.39's")
    original = getattr(pull, "func", pull)  # idempotent: a second call replaces the first
    module.pull_objects = partial(original, initial_backoff=first_backoff, backoff_cap=OBJECT_PULL_CAP)  # type: ignore[attr-defined]


class ShorterPauses:
    """Stands in for the `time` module inside Flower's SuperNode loop; every other name is `time`'s own.

    No message: `min_pause` seconds for `active_for` seconds after the last message (the next wave of an
    active federation comes within seconds), then doubling with each empty ask up to Flower's 3 s, so a
    node idle for long asks the SuperLink no more often than Flower's does. Waiting for the reply (a local
    check, no network): `reply_pause` seconds.
    """

    def __init__(self, min_pause: float, reply_pause: float, active_for: float = ACTIVE_FOR) -> None:
        self.min_pause = min_pause
        self.reply_pause = reply_pause
        self.active_for = active_for
        self.last_message = float("-inf")
        self.slow_asks = 0

    def note_ask(self, got_message: bool) -> None:
        if got_message:
            self.last_message, self.slow_asks = time.monotonic(), 0
        elif time.monotonic() - self.last_message > self.active_for:
            self.slow_asks += 1

    def idle_pause(self) -> float:
        return min(float(FLOWER_IDLE_PAUSE), self.min_pause * 2 ** self.slow_asks)

    def pause_for(self, seconds: float) -> float:
        """The pause that replaces Flower's `seconds`."""
        if seconds == FLOWER_IDLE_PAUSE:
            return self.idle_pause()
        if seconds == FLOWER_REPLY_PAUSE:
            return self.reply_pause
        return seconds

    def sleep(self, seconds: float) -> None:
        time.sleep(self.pause_for(seconds))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def shorten_supernode_pauses(loop: ModuleType, min_pause: float, reply_pause: float) -> ShorterPauses:
    """Give Flower's SuperNode loop module (`flwr.supernode.start_client_internal`) the shorter pauses."""
    source = inspect.getsource(loop)
    pull: Callable[..., int | None] | None = getattr(loop, "_pull_and_store_message", None)
    if (f"time.sleep({FLOWER_IDLE_PAUSE})" not in source or f"time.sleep({FLOWER_REPLY_PAUSE})" not in source
            or pull is None or getattr(loop, "time", None) is not time):
        raise PauseRefused(f"{loop.__name__} is not the SuperNode loop of Flower 1.39; run Flower's flower-supernode")
    pauses = ShorterPauses(min_pause, reply_pause)

    def pull_and_note(*args: Any, **kwargs: Any) -> int | None:
        run_id = pull(*args, **kwargs)
        pauses.note_ask(run_id is not None)
        return run_id

    quicken_object_pulls(loop, min_pause)
    loop.time = pauses  # type: ignore[attr-defined]
    loop._pull_and_store_message = pull_and_note  # type: ignore[attr-defined]
    return pauses
