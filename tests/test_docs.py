"""The docs test: every command of the README and docs/, as written, in a fresh clone, in order, twice in a row.

The commands are the ```bash blocks of each page, read from the Markdown here (`doc_blocks`), so the docs and
this test cannot drift apart. A block whose preceding line is `<!-- docs-test: skip REASON -->` is left out, as
is a line named by `<!-- docs-test: skip-line "PREFIX" | REASON -->` (what needs another host, or what CI runs
as a step of its own); the test says what it left out and why. Each page runs in a bash of its own (`set -e`:
the first failing command fails the test, named with its page and line), from the clone's root.

The clone is a `git clone` of this checkout (its committed state). Before the README's first command it gets
the virtual environment the README asks for, created with the system's packages (where CI's install already
put the heavy dependencies), so the README's own `bash .ci/install` installs the clone into it quickly and every
later `fedge` runs the clone's code. HOME and FEDGE_CACHE are fresh folders shared by both passes, as on one
new machine. Background services the pages start and stop (registry, agent, SuperLink, SuperNodes), and those
Flower starts on its own (the simulation connection's local SuperLink), are stopped when the test ends.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = ("README.md", "docs/deployment.md", "docs/edge.md", "docs/architecture.md")
MARK = re.compile(r"^<!--\s*docs-test:\s*(skip-line|skip)\s+(.*?)\s*-->$")
SKIP_LINE = re.compile(r'^"(?P<prefix>[^"]+)"\s*\|\s*(?P<reason>.+)$')
PASS_TIMEOUT_S = 45 * 60  # one page of one pass at most; the whole test at most two of them


@dataclass
class Block:
    page: str
    line: int  # of the opening fence
    text: str
    skipped: str = ""  # why the whole block is left out


def doc_blocks(page: Path, name: str) -> list[Block]:
    """The page's ```bash blocks in order, with the docs-test marks applied."""
    lines = page.read_text().splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        fence = re.match(r"^```(\w*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        mark = MARK.match(lines[i - 1].strip()) if i > 0 else None
        if fence.group(1) == "bash":
            body = lines[i + 1 : end]
            block = Block(name, i + 1, "\n".join(body))
            if mark and mark.group(1) == "skip":
                block.skipped = mark.group(2)
            elif mark:
                spec = SKIP_LINE.match(mark.group(2))
                assert spec, f"{name}:{i}: skip-line needs \"PREFIX\" | REASON"
                kept = [b for b in body if not b.strip().startswith(spec["prefix"])]
                assert len(kept) < len(body), f"{name}:{i}: no line starts with {spec['prefix']!r}"
                block.text = "\n".join(kept)
                blocks.append(Block(name, i + 1, spec["prefix"], skipped=spec["reason"]))
            blocks.append(block)
        else:
            assert not mark, f"{name}:{i}: a docs-test mark on a {fence.group(1) or 'plain'} block, which never runs"
        i = end + 1
    return blocks


def page_script(blocks: list[Block], clone: Path) -> str:
    parts = ["set -eo pipefail", f"cd {clone}", ". .venv/bin/activate",
             "trap 'kill $(jobs -p) 2>/dev/null || true' EXIT"]  # what a failed page left running
    for block in blocks:
        if not block.skipped:
            parts += [f"echo \">>> {block.page}:{block.line} $(date +%T)\" >&2", block.text]
    return "\n".join(parts) + "\n"


class Orphans:
    """Adopt the processes the pages' commands leave behind (Linux: a child subreaper), to stop them at the end."""

    PR_SET_CHILD_SUBREAPER = 36

    def __enter__(self) -> Self:
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.prctl(self.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        return self

    def stop_all(self) -> list[str]:
        """Stop every descendant still running; their command lines."""
        left = psutil.Process().children(recursive=True)
        names = []
        for proc in left:
            try:
                names.append(" ".join(proc.cmdline()[:4]))
            except psutil.Error:  # gone, or a zombie waiting to be reaped
                pass
        for proc in left:
            try:
                proc.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(left, timeout=20)
        for proc in alive:
            proc.kill()
        psutil.wait_procs(alive, timeout=10)
        return names

    def __exit__(self, *exc: object) -> None:
        self.stop_all()
        self.libc.prctl(self.PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
        while True:  # reap what was adopted
            try:
                if os.waitpid(-1, os.WNOHANG) == (0, 0):
                    break
            except ChildProcessError:
                break


def test_the_parser_reads_blocks_marks_and_skipped_lines(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text('Text.\n\n```bash\necho one\n```\n\n<!-- docs-test: skip on another host -->\n```bash\nssh x\n```\n'
                    '<!-- docs-test: skip-line "python -m pytest" | CI runs it -->\n```bash\nfedge run\npython -m pytest -q\n```\n'
                    '```toml\n[a]\n```\n')
    blocks = doc_blocks(page, "page.md")
    assert [(b.line, b.text, b.skipped) for b in blocks] == [
        (3, "echo one", ""), (8, "ssh x", "on another host"), (12, "python -m pytest", "CI runs it"), (12, "fedge run", "")]


@pytest.mark.docs
@pytest.mark.slow
@pytest.mark.timeout(2 * PASS_TIMEOUT_S)
def test_every_documented_command_runs_as_written_twice(tmp_path: Path) -> None:
    clone = tmp_path / "fedge"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(clone / ".venv")], check=True)
    home, cache = tmp_path / "home", tmp_path / "cache"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FLWR_HOME", "VIRTUAL_ENV")}
    env.update(HOME=str(home), FEDGE_CACHE=str(cache), PYTHONUNBUFFERED="1")
    pages = {name: doc_blocks(clone / name, name) for name in PAGES}
    for name, blocks in pages.items():
        for block in blocks:
            if block.skipped:
                print(f"skipped {name}:{block.line} ({block.text.splitlines()[0][:60]}...): {block.skipped}")
    ran = sum(1 for blocks in pages.values() for b in blocks if not b.skipped)
    assert ran >= 8, "the docs' command blocks were not found"
    with Orphans() as orphans:
        for attempt in (1, 2):
            for name, blocks in pages.items():
                log = tmp_path / f"pass{attempt}-{name.replace('/', '-')}.log"
                started = time.monotonic()
                with open(log, "w") as sink:
                    done = subprocess.run(["bash", "-c", page_script(blocks, clone)], env=env, stdout=sink, check=False,
                                          stderr=subprocess.STDOUT, timeout=PASS_TIMEOUT_S)
                print(f"pass {attempt} {name}: {time.monotonic() - started:.0f}s, exit {done.returncode}")
                if done.returncode != 0:
                    text = log.read_text(errors="replace")
                    where = re.findall(r">>> (\S+)", text)
                    pytest.fail(f"pass {attempt}: {where[-1] if where else name} failed (exit {done.returncode}):\n"
                                f"{text[-6000:]}")
            left = orphans.stop_all()
            assert not [c for c in left if "fedge" in c and "agent" in c], f"agents left running: {left}"
    # What the commands wrote is all ignored by git, so Flower never packaged any of it into the app.
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=clone, capture_output=True,
                            text=True, check=True).stdout
    assert status == "", f"files the docs' commands left where Flower packages the app:\n{status}"
    # Each run owns its outputs: pass 2 replaced pass 1's, and the ServerApp set pass 1's results aside.
    assert (clone / "fedge-out" / "results.json").is_file() and (clone / "runs" / "fedzip" / "results.json").is_file()
    assert list((clone / "runs" / "flwr-sim").glob("results.*.json")), "a second flwr run merged into results.json"
    shutil.rmtree(clone / ".venv", ignore_errors=True)
