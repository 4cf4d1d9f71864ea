"""A real Flower deployment on one machine: a SuperLink and N SuperNodes on loopback, driven by `flwr`.

Every piece is Flower's own binary (`flower-superlink`, `flower-supernode`,
`flwr run`, `flwr ls`, `flwr supernode register`), talking gRPC and HTTP over
real sockets, exactly as on separate machines; only the addresses are local.
Each process is started in its own session so that stopping it also stops the
SuperExec and ServerApp/ClientApp processes Flower spawns under it.

Two ways to run a node's ClientApp (`isolation`):
- `process` (default): the SuperNode runs with `--isolation process` and a
  long-lived ClientApp process (`fedge clientapp`, `fedge.client.worker`) beside
  it serves its messages, so a message costs its work, not a Python start-up;
- `subprocess`: Flower's stock mode, a fresh `flwr-clientapp` process per message.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import tomli_w

from fedge.errors import UserError
from fedge.processes import ChildProcess
from fedge.progress import report
from fedge.server.certs import Credentials, create_credentials
from fedge.server.federation import ROUND_PATTERN

CONNECTION = "fedge-local"
FINISHED = "finished"
#: Flower's binaries a local deployment runs
BINARIES = ("flower-superlink", "flower-supernode", "flwr")
#: what a deployment keeps in its workdir; a new deployment there removes them first (each run owns its state)
STATE = ("state.db", "state.db-shm", "state.db-wal", "state.db-journal", "logs", "flwr-home", "certs")
#: how a SuperNode runs its ClientApp: one long-lived process beside it, or Flower's process per message
ISOLATION_MODES = ("process", "subprocess")
#: how often Flower's SuperExec asks for tasks in subprocess mode (Flower's default: 1 s)
SUPEREXEC_POLL = "0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def find_app_dir(start: str | Path | None = None) -> Path:
    """The Flower app folder (a pyproject.toml with `[tool.flwr.app]`): `start`, the cwd, or fedge's source checkout."""
    import fedge

    candidates = [Path(start)] if start else [Path.cwd(), Path(fedge.__file__).resolve().parents[1]]
    for folder in candidates:
        pyproject = folder / "pyproject.toml"
        if pyproject.exists() and "[tool.flwr.app]" in pyproject.read_text():
            return folder.resolve()
    raise UserError(f"no Flower app (a pyproject.toml with [tool.flwr.app]) in {', '.join(str(c) for c in candidates)}",
                    "run this from fedge's source folder (the app Flower packages)")


def packaged_by_flower(app_dir: Path, path: Path) -> bool:
    """Whether `flwr run` would put files written under `path` (results.json, checkpoints) into the app it
    packages from `app_dir`: `path` is inside the app and its .gitignore does not exclude it."""
    from flwr.cli.utils import filter_paths_for_publish

    try:
        relative = Path(path).resolve().relative_to(app_dir.resolve())
    except ValueError:
        return False
    ignore = app_dir / ".gitignore"
    probe = (relative / "results.json").as_posix()
    kept = filter_paths_for_publish({probe: b"", ".gitignore": ignore.read_bytes() if ignore.exists() else b""})
    return probe in kept


def check_outside_app(app_dir: Path, path: Path, option: str) -> None:
    """Refuse an output folder whose files Flower would package into the app (later runs would ship them, and
    fail once they nest too deep)."""
    if packaged_by_flower(app_dir, path):
        top = Path(path).resolve().relative_to(app_dir.resolve()).parts[0]
        raise UserError(f"{option} {path} is inside the Flower app {app_dir}, and `flwr run` would package what "
                        "this run writes there into the app", f"use a folder outside it (or under fedge-out/), or "
                        f"add {top}/ to {app_dir / '.gitignore'}")


@dataclass
class LocalDeployment:
    """SuperLink + SuperNodes on loopback. Use as a context manager so every process is stopped on exit."""

    workdir: Path
    num_nodes: int
    app_dir: Path = field(default_factory=find_app_dir)
    secure: bool = False  # TLS on every API and SuperNode authentication
    fleet_port: int = field(default_factory=free_port)
    control_port: int = field(default_factory=free_port)
    superlink: ChildProcess | None = None
    nodes: dict[str, ChildProcess] = field(default_factory=dict)  # by process name
    followers: list[ChildProcess] = field(default_factory=list)  # `flwr log` streams of the runs
    credentials: Credentials | None = None
    #: a folder of node-<i>.npz files: each SuperNode trains on its own file (node config `data-path`)
    node_data: Path | None = None
    isolation: str = "process"
    #: the long-lived ClientApp process beside each SuperNode (isolation "process"), by the SuperNode's name
    clientapps: dict[str, ChildProcess] = field(default_factory=dict)
    #: what those processes import before their first message (the nodes train LoRA through peft)
    preload: tuple[str, ...] = ("peft",)

    def __post_init__(self) -> None:
        if self.isolation not in ISOLATION_MODES:
            raise ValueError(f"isolation must be one of {ISOLATION_MODES}, not {self.isolation!r}")
        self.workdir = Path(self.workdir).resolve()
        for name in (*STATE, *(p.name for p in self.workdir.glob("run-config-*.toml"))):
            target = self.workdir / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        self.flwr_home = self.workdir / "flwr-home"
        self.logs = self.workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        if self.secure:  # one key more than nodes: never registered, for checking that strangers are refused
            self.credentials = create_credentials(self.workdir / "certs", nodes=self.num_nodes + 1)
        self._write_connection()

    # ---- configuration ----

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({"FLWR_HOME": str(self.flwr_home), "FLWR_DISABLE_UPDATE_CHECK": "1", "PYTHONUNBUFFERED": "1",
                    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": SUPEREXEC_POLL})
        return env

    def _write_connection(self) -> None:
        """`$FLWR_HOME/config.toml`: the `flwr` CLI's SuperLink connection (Control API address, TLS root)."""
        conn: dict[str, Any] = {"address": f"127.0.0.1:{self.control_port}"}
        if self.credentials is not None:
            conn["root-certificates"] = str(self.credentials.ca_cert)
        else:
            conn["insecure"] = True
        (self.flwr_home / "config.toml").write_text(tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: conn}}))

    def superlink_command(self) -> list[str]:
        cmd = ["flower-superlink", "--disable-runtime-dependency-installation",
               "--fleet-api-address", f"127.0.0.1:{self.fleet_port}", "--host", "127.0.0.1",
               "--port", str(self.control_port), "--database", str(self.workdir / "state.db")]
        if self.credentials is None:
            return [*cmd, "--insecure"]
        c = self.credentials
        return [*cmd, "--ssl-ca-certfile", str(c.ca_cert), "--ssl-certfile", str(c.server_cert),
                "--ssl-keyfile", str(c.server_key), "--enable-supernode-auth"]

    def node_config(self, partition: int) -> str:
        config = f"partition-id={partition} num-partitions={self.num_nodes}"
        if self.node_data is not None:
            config += f" data-path='{(Path(self.node_data) / f'node-{partition}.npz').resolve()}'"
        return config

    def supernode_command(self, partition: int, runtime_port: int, key: Path | None = None,
                          max_retries: int | None = None, secret: Path | None = None) -> list[str]:
        """`flower-supernode`; in process isolation its Runtime API (TLS when secure) waits for `fedge clientapp`."""
        launcher = ["flower-supernode"] if self.isolation == "subprocess" else [sys.executable, "-m", "fedge.cli", "supernode"]
        cmd = [*launcher, "--superlink", f"127.0.0.1:{self.fleet_port}", "--port", str(runtime_port),
               "--node-config", self.node_config(partition), "--isolation", self.isolation]
        if max_retries is not None:
            cmd += ["--max-retries", str(max_retries)]
        if self.isolation == "process" and secret is not None:
            cmd += ["--superexec-auth-secret-file", str(secret)]
        if self.credentials is None:
            return [*cmd, "--insecure"]
        c = self.credentials
        key = key or c.node_keys[partition][0]
        cmd += ["--root-certificates", str(c.ca_cert), "--auth-supernode-private-key", str(key)]
        if self.isolation == "process":
            cmd += ["--ssl-certfile", str(c.server_cert), "--ssl-keyfile", str(c.server_key), "--ssl-ca-certfile",
                    str(c.ca_cert)]
        return cmd

    def clientapp_command(self, runtime_port: int, supernode_pid: int, secret: Path | None = None) -> list[str]:
        """The long-lived ClientApp process of one SuperNode: it leaves when that SuperNode does."""
        cmd = [sys.executable, "-m", "fedge.cli", "clientapp", "--runtime-api-address", f"127.0.0.1:{runtime_port}",
               "--parent-pid", str(supernode_pid)]
        for module in self.preload:
            cmd += ["--preload", module]
        if secret is not None:
            cmd += ["--superexec-auth-secret-file", str(secret)]
        if self.credentials is None:
            return [*cmd, "--insecure"]
        return [*cmd, "--root-certificates", str(self.credentials.ca_cert)]

    # ---- processes ----

    def _spawn(self, name: str, cmd: list[str]) -> ChildProcess:
        return ChildProcess.spawn(name, cmd, self.logs / f"{name}.log", env=self.env(), cwd=self.workdir)

    def flwr(self, *args: str, timeout: float = 120.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        """One `flwr` CLI call against this deployment's SuperLink connection."""
        done = subprocess.run(["flwr", *args], env=self.env(), cwd=self.app_dir, capture_output=True, text=True, check=False,
                              timeout=timeout)
        if check and done.returncode != 0:
            raise RuntimeError(f"flwr {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        return done

    def start_superlink(self, timeout: float = 90.0) -> ChildProcess:
        self.superlink = self._spawn("superlink", self.superlink_command())
        deadline = time.monotonic() + timeout
        while not (port_open(self.fleet_port) and port_open(self.control_port)):
            if not self.superlink.alive() or time.monotonic() > deadline:
                last = (self.superlink.tail(5).strip().splitlines() or ["(no output)"])[-1]
                raise UserError(f"the SuperLink did not come up: {last}", f"its log: {self.superlink.log}")
            time.sleep(0.5)
        return self.superlink

    def register_nodes(self, count: int | None = None) -> None:
        """Add the first `count` node public keys to the SuperLink (authentication on)."""
        assert self.credentials is not None
        for private, public in self.credentials.node_keys[: self.num_nodes if count is None else count]:
            self.flwr("supernode", "register", str(public), CONNECTION, "--name", private.stem)

    def start_supernode(self, partition: int, key: Path | None = None, max_retries: int | None = None,
                        name: str | None = None) -> ChildProcess:
        name = name or f"supernode-{partition}"
        if name in self.nodes and self.nodes[name].alive():
            raise RuntimeError(f"{name} is already running")
        runtime_port = free_port()
        secret = None
        if self.isolation == "process":  # the Runtime API then answers only whoever holds this node's secret
            secret = self.workdir / "secrets" / f"{name}.secret"
            secret.parent.mkdir(parents=True, exist_ok=True)
            secret.write_bytes(secrets.token_bytes(32))
            secret.chmod(0o600)
        proc = self._spawn(name, self.supernode_command(partition, runtime_port, key, max_retries, secret))
        self.nodes[name] = proc
        if self.isolation == "process":
            self.clientapps[name] = self._spawn(f"{name}-clientapp",
                                                self.clientapp_command(runtime_port, proc.popen.pid, secret))
        return proc

    def start(self) -> LocalDeployment:
        self.start_superlink()
        if self.credentials is not None:
            self.register_nodes()
        for i in range(self.num_nodes):
            self.start_supernode(i)
        return self

    def stop_superlink(self, sig: int = signal.SIGTERM) -> None:
        if self.superlink is not None:
            self.superlink.stop(sig=sig)

    def stop(self) -> None:
        for proc in [*self.followers, *self.clientapps.values(), *self.nodes.values()]:
            proc.stop()
        self.stop_superlink()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- runs ----

    def submit(self, run_config: dict[str, Any]) -> int:
        """`flwr run` of the app with `run_config` overrides; returns the run id."""
        overrides = self.workdir / f"run-config-{time.time_ns()}.toml"
        overrides.write_text(tomli_w.dumps(run_config))
        done = self.flwr("run", str(self.app_dir), CONNECTION, "--run-config", str(overrides), "--format", "json",
                         check=False)
        try:
            reply = json.loads(done.stdout)
        except json.JSONDecodeError:
            reply = {"error-message": (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]}
        if done.returncode != 0 or not reply.get("success"):
            reason = " ".join(str(reply.get("error-message", "")).split())
            raise UserError(f"`flwr run` did not start the run: {reason}", f"Flower's app folder: {self.app_dir}")
        return int(reply["run-id"])

    def follow(self, run_id: int) -> ChildProcess:
        """Stream the run's log (`flwr log`, which ends with the run) into logs/run-<id>.log."""
        follower = self._spawn(f"run-{run_id}", ["flwr", "log", str(run_id), CONNECTION])
        self.followers.append(follower)
        return follower

    def run_info(self, run_id: int) -> dict[str, Any]:
        done = self.flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json", timeout=60)
        runs = json.loads(done.stdout).get("runs", [])
        return dict(runs[0]) if runs else {}

    def wait(self, run_id: int, timeout: float, poll: float = 1.0, cli_every: float = 20.0,
             run_log: Path | None = None) -> dict[str, Any]:
        """Wait until `flwr ls` reports the run finished (completed, failed or stopped); the last run info.

        Each `flwr` call costs a Python start-up, so the CLI is asked when the
        SuperLink's log says the run's ServerApp task finished, and otherwise
        only every `cli_every` seconds. The rounds the run's log (`run_log`, see
        `follow`) announces are reported as progress.
        """
        deadline = time.monotonic() + timeout
        marker = f" of run {run_id}"
        info: dict[str, Any] = {}
        superlink_lines, round_lines = LineReader(self.superlink.log if self.superlink else None), LineReader(run_log)
        last_ask = float("-inf")
        while time.monotonic() < deadline:
            for line in round_lines.new_lines():
                if found := ROUND_PATTERN.search(line):
                    method, done, total, accuracy = found.groups()
                    report(f"run {run_id}: {method}, rounds", int(done), int(total), f"accuracy {accuracy}")
            lines = superlink_lines.new_lines()
            hint = any("Finished task" in line and line.rstrip().endswith(marker) for line in lines)
            if hint or time.monotonic() - last_ask >= cli_every:
                last_ask = time.monotonic()
                try:
                    info = self.run_info(run_id)
                except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError):
                    info = {}
                if str(info.get("status", "")).startswith(FINISHED):
                    return info
                if hint:
                    last_ask = float("-inf")  # finishing: ask again on the next poll
            time.sleep(poll)
        raise UserError(f"run {run_id} not finished after {timeout:.0f}s (last status {info.get('status')})",
                        f"give it longer (--timeout), or see the logs in {self.logs}")

    def logs_of(self, run_id: int) -> str:
        return self.flwr("log", str(run_id), CONNECTION, "--show", check=False, timeout=60).stdout


class LineReader:
    """The whole lines a growing log file gained since the last call (a partial last line waits for its end)."""

    def __init__(self, path: Path | None) -> None:
        self.path, self.offset = path, 0

    def new_lines(self) -> list[str]:
        if self.path is None or not self.path.exists():
            return []
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            raw = fh.read()
        complete = raw[: raw.rfind(b"\n") + 1]
        self.offset += len(complete)
        return complete.decode(errors="replace").splitlines()


def failure_reason(log: str) -> str:
    """The line of a run's log that says why it failed (its last error), else its last line."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "ERROR" in line or "Exception" in line]
    return (errors or lines or ["(the run left no log)"])[-1]


def run_local(workdir: str | Path, num_nodes: int, run_config: dict[str, Any], *, secure: bool = False,
              timeout: float = 3600.0, app_dir: str | Path | None = None, node_data: Path | None = None,
              isolation: str = "process") -> dict[str, Any]:
    """Start the deployment, run the federation through `flwr run`, wait, stop everything; results.json's content.

    The run's results.json (written by the ServerApp into `out-dir`) gains a
    `deployment` entry: run id, final status, Flower's own network byte count,
    the per-message overhead (median and max) and where the logs are.
    Output folders inside the app that Flower would package are refused before
    anything starts.
    """
    from fedge.results import load_results, write_results

    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        raise UserError(f"Flower's {', '.join(missing)} not found on PATH", "install fedge's dependencies (.ci/install)")
    out_dir = Path(run_config.get("out-dir", Path(workdir) / "out")).resolve()
    run_config = {**run_config, "out-dir": str(out_dir), "num-clients": num_nodes}
    app = find_app_dir(app_dir)
    check_outside_app(app, out_dir, "--out")
    check_outside_app(app, Path(workdir), "--workdir")
    started = time.perf_counter()
    task = f"SuperLink + {num_nodes} SuperNodes"
    report(task, 0, 2, "starting")
    deployment = LocalDeployment(Path(workdir), num_nodes, app_dir=app, secure=secure, node_data=node_data,
                                 isolation=isolation)
    with deployment:
        deployment.start()
        report(task, 1, 2, "submitting the run (`flwr run`)")
        run_id = deployment.submit(run_config)
        report(task, 2, 2, f"run {run_id}")
        follower = deployment.follow(run_id)
        info = deployment.wait(run_id, timeout, run_log=follower.log)
        server_log = follower.output() or deployment.logs_of(run_id)  # a line per message with its timeline
        (deployment.logs / "serverapp.log").write_text(server_log)
        if info.get("status") != f"{FINISHED}:completed":
            raise UserError(f"run {run_id} ended {info.get('status')}: {failure_reason(server_log)}",
                            f"its whole log: {follower.log}")
    results = load_results(out_dir)
    method = results.get("methods", {}).get(str(run_config.get("method", "")), {})
    results["deployment"] = {
        "run_id": run_id,
        "status": info.get("status"),
        "supernodes": num_nodes,
        "secure": secure,
        "isolation": isolation,
        "flower_network_bytes": info.get("network-traffic", {}),
        "per_message_overhead_s": method.get("per_message_overhead_s", {}),
        "seconds": time.perf_counter() - started,
        "logs": str(deployment.logs),
    }
    write_results(out_dir, results)
    return results
