"""Child processes a launcher owns: output to a log file, a line to wait for, and a stop that takes the whole tree.

One class for both launchers on this machine: the local Flower deployment
(Flower's binaries, which start further processes of their own) and the local
edge fleet (Python children that announce their address on stdout).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import psutil


class ProcessError(RuntimeError):
    """A child exited, or did not print what it was expected to, in time."""


@dataclass
class ChildProcess:
    """A process started in a session of its own, its stdout and stderr appended to `log`."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    log_offset: int = 0  # where this process's output starts in `log` (an earlier run's may precede it)

    @classmethod
    def spawn(cls, name: str, command: list[str], log: Path, env: Mapping[str, str] | None = None,
              cwd: Path | None = None) -> ChildProcess:
        """Start `command` (`env`: the whole environment, default this process's)."""
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as sink:
            offset = sink.tell()
            popen = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                     start_new_session=True)
        return cls(name, popen, log, offset)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        """What this process has written so far."""
        try:
            with open(self.log, "rb") as fh:
                fh.seek(self.log_offset)
                return fh.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_line(self, prefix: str, timeout: float) -> str:
        """The rest of the first whole output line that starts with `prefix` (a child announcing its address)."""
        deadline = time.monotonic() + timeout
        while True:
            exited = not self.alive()  # read before the log: if it had exited, the log is complete
            text = self.output()
            for line in text[: text.rfind("\n") + 1].splitlines():
                if line.startswith(prefix):
                    return line[len(prefix) :].strip()
            if exited or time.monotonic() > deadline:
                raise ProcessError(f"{self.name} did not print {prefix!r} within {timeout:.0f}s "
                                   f"(exit {self.popen.poll()}):\n{self.tail(20)}")
            time.sleep(0.02)

    def stop(self, grace: float = 5.0, sig: int = signal.SIGTERM) -> int | None:
        """Signal the process group, then force it and every descendant; the exit status.

        Flower starts the SuperLink's SuperExec in a session of its own, so the
        group alone would miss it and the ServerApp process under it.
        """
        try:
            descendants = psutil.Process(self.popen.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            descendants = []
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)  # stragglers in the group, the leader included
        except (ProcessLookupError, PermissionError):
            pass
        for child in descendants:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(descendants, timeout=grace)
        try:
            self.popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        return self.popen.returncode

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.output().splitlines()[-lines:])
