"""A long-lived ClientApp process for a SuperNode started with `--isolation process`.

Flower 1.39 runs every message in a fresh `flwr-clientapp` process, which pays
its interpreter, imports (torch, the app) and node-local caches again before it
does any work. In `--isolation process` mode the SuperNode starts no processes
itself: it waits for a SuperExec beside it to take each ClientApp task from its
Runtime API. This module takes that place and runs the tasks in itself, one at a
time, with the same steps as Flower's `flwr-clientapp` (pull the task input,
install the app bundle, load the ClientApp, call it, push the reply and the task
output), so imports and caches live on from one message to the next.

- The app bundle: the first task of a bundle (its FAB hash) loads the bundle's
  own code; a task for another bundle restarts the process (exec, same pid) with
  that task, so code never goes stale.
- Supervision: `supervise` runs the serving process as its child and starts it
  again when it dies (a crash costs the node the message it was serving: the
  SuperNode answers it with an error once the task's heartbeat stops). It stops
  when the SuperNode it serves (`parent_pid`) is gone.
- Polling: every `poll` seconds while a federation is active, every
  `idle_poll` seconds after `busy_window` seconds without a task.

Built on Flower 1.39 internals (`flwr.supernode.runtime.run_clientapp`'s
helpers, `RuntimeHttpClient`, `HeartbeatSender`); pyproject caps flwr below 1.40.
This module imports nothing of fedge, so that the bundle's fedge is the one the
ClientApp runs.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from logging import ERROR, INFO, WARNING
from types import FrameType
from typing import Any

#: the environment variable through which a restarted serving process receives the task it is to run first
PENDING_TASK_ENV = "FEDGE_CLIENTAPP_PENDING_TOKEN"
#: what the serving process imports before its first task (what any fedge ClientApp needs)
DEFAULT_PRELOAD = ("torch", "numpy", "flwr.clientapp", "flwr.serverapp")
#: pause before restarting a serving process that died, doubling up to MAX_RESTART_PAUSE
RESTART_PAUSE, MAX_RESTART_PAUSE = 1.0, 30.0
#: a serving process that lived this long restarts after the shortest pause again
STABLE_AFTER = 60.0
#: seconds between tries for a message object the SuperNode is still fetching from the SuperLink
INPUT_RETRY = 0.05


class Stop(BaseException):
    """SIGTERM or SIGINT: finish the task's bookkeeping (reply, task output) and leave."""


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise Stop(signal.Signals(signum).name)


@dataclass
class RuntimeAccess:
    """How to reach the SuperNode's Runtime API, the same settings as `flower-superexec`'s."""

    address: str
    insecure: bool = True
    root_certificates: str | None = None
    auth_secret_file: str | None = None

    def args(self) -> list[str]:
        args = ["--runtime-api-address", self.address]
        if self.insecure:
            args.append("--insecure")
        if self.root_certificates:
            args += ["--root-certificates", self.root_certificates]
        if self.auth_secret_file:
            args += ["--superexec-auth-secret-file", self.auth_secret_file]
        return args

    def client(self, component: str, token: str | None = None) -> Any:
        """A Runtime API client: the task poller (SuperExec auth) or one task's client (its token)."""
        from flwr.supercore.auth import load_superexec_auth_secret
        from flwr.supercore.interceptors import (
            RuntimeTokenHttpInterceptor,
            RuntimeVersionHttpInterceptor,
            SuperExecAuthHttpInterceptor,
        )
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient
        from flwr.supercore.superexec.run_superexec import _SUPEREXEC_AUTH_METHODS
        from flwr.supercore.tls import validate_and_resolve_root_certificates

        interceptors: list[Any] = [RuntimeVersionHttpInterceptor(component_name=component)]
        if token is not None:
            interceptors.append(RuntimeTokenHttpInterceptor(token))
        elif self.auth_secret_file:
            secret = load_superexec_auth_secret(secret_file=self.auth_secret_file) or b""
            interceptors.append(SuperExecAuthHttpInterceptor(master_secret=secret,
                                                             protected_methods=_SUPEREXEC_AUTH_METHODS))
        return RuntimeHttpClient.from_server_address(
            server_address=self.address,
            insecure=self.insecure,
            root_certificates=validate_and_resolve_root_certificates(self.root_certificates, self.insecure),
            interceptors=interceptors,
            retry_invoker=make_simple_http_retry_invoker(),
        )


@dataclass
class Server:
    """The serving process: takes ClientApp tasks one at a time and runs them in itself."""

    access: RuntimeAccess
    poll: float = 0.1
    idle_poll: float = 1.0
    busy_window: float = 120.0
    #: the app bundle this process has loaded, and its ClientApp
    fab_hash: str | None = None
    app: Any = None
    #: a task brought another bundle than its announced hash said: restart after answering it
    stale: bool = False
    served: int = 0
    last_task: float = field(default_factory=lambda: float("-inf"))

    def run(self, first_token: str | None = None) -> None:
        from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
        from flwr.supercore import log
        from flwr.supercore.constant import TaskType

        if first_token:
            self.serve(first_token, None)
        poller = self.access.client("SuperExec")
        log(INFO, "[fedge clientapp %d] serving ClientApp tasks of %s", os.getpid(), self.access.address)
        while True:
            res = poller.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
            if res.HasField("task") and res.token:
                self.serve(res.token, res.task.fab_hash or None)
                continue
            recent = time.monotonic() - self.last_task < self.busy_window
            time.sleep(self.poll if recent else self.idle_poll)

    def serve(self, token: str, fab_hash: str | None) -> None:
        """Run one task; a task of another bundle than the loaded one restarts the process with it."""
        if self.fab_hash is not None and fab_hash is not None and fab_hash != self.fab_hash:
            restart_with(token, f"a task of app bundle {fab_hash[:12]} (this process runs {self.fab_hash[:12]})")
        run_task(self, token)
        self.served += 1
        self.last_task = time.monotonic()
        if self.stale:
            restart_with(None, "an app bundle other than the loaded one")

    def load_app(self, fab: Any, run: Any) -> Any:
        """The ClientApp of `fab`, installed and imported once per process."""
        if self.app is not None and fab.hash_str == self.fab_hash:
            return self.app
        if self.fab_hash is not None:  # Flower announces a task's bundle hash, so only a task without one gets here
            self.stale = True
            raise RuntimeError(f"app bundle {fab.hash_str[:12]} is not the one this process runs ({self.fab_hash[:12]})")
        from flwr.cli.install import install_from_fab
        from flwr.clientapp.utils import get_load_client_app_fn

        install_from_fab(fab.content, skip_prompt=True)
        forget_installed_fedge()
        load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
        self.app = load(run.fab_id, run.fab_version, fab.hash_str)
        self.fab_hash = fab.hash_str
        return self.app


def forget_installed_fedge() -> None:
    """Drop the fedge modules this process started with, so the bundle's fedge is what the app imports.

    This module's own functions keep working: they hold their globals, not the module table.
    """
    for name in [n for n in sys.modules if n == "fedge" or n.startswith("fedge.")]:
        del sys.modules[name]


def restart_with(token: str | None, why: str) -> None:
    """Replace this process by a fresh interpreter (same pid, same arguments) that runs `token`'s task first."""
    from flwr.supercore import log

    log(INFO, "[fedge clientapp %d] restarting for %s", os.getpid(), why)
    env = dict(os.environ)
    env.pop(PENDING_TASK_ENV, None)
    if token:
        env[PENDING_TASK_ENV] = token
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "fedge.client.worker", *sys.argv[1:]], env)


def run_task(server: Server, token: str) -> None:
    """One ClientApp task, as Flower's `flwr-clientapp` runs it (`run_clientapp`), without leaving the process."""
    from flwr.app import Error, Message
    from flwr.clientapp.client_app import LoadClientAppError
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore import log
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

    started = time.perf_counter()
    client = server.access.client("flwr-clientapp", token)
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    message = context = reply = None
    sub_status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
    marks = {"pulled": started, "called": started}
    try:
        message, context, run, fab = pull_task_input(client, INPUT_RETRY)
        marks["pulled"] = time.perf_counter()
        app = server.load_app(fab, run)
        marks["called"] = time.perf_counter()
        reply = app(message=message, context=context)
        sub_status, details = SubStatus.COMPLETED, ""
    except (Exception, Stop) as ex:  # the message fails; the process goes on (or, on Stop, leaves after the bookkeeping)
        code, reason = ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(ex)}:<'{ex}'>"
        if isinstance(ex, LoadClientAppError):
            code, reason = ErrorCode.LOAD_CLIENT_APP_EXCEPTION, "An exception was raised when attempting to load `ClientApp`"
        log(ERROR, "ClientApp raised an exception", exc_info=ex)
        details = reason
        if message is not None:
            reply = Message(Error(code=code, reason=reason), reply_to=message)
        if isinstance(ex, Stop):
            _finish(client, heartbeat, reply, context, sub_status, details, push_message, push_task_output)
            raise
    answered = time.perf_counter()
    _finish(client, heartbeat, reply, context, sub_status, details, push_message, push_task_output)
    log(INFO, "[fedge clientapp %d] message %d (%s): input %.2fs, app %.2fs, ClientApp %.2fs, reply %.2fs",
        os.getpid(), server.served + 1, message.metadata.message_type if message is not None else "?",
        marks["pulled"] - started, marks["called"] - marks["pulled"], answered - marks["called"],
        time.perf_counter() - answered)


def pull_task_input(client: Any, backoff: float) -> tuple[Any, Any, Any, Any]:
    """The task's message, context, run and bundle: Flower's `run_clientapp.pull_task_input`, retrying a missing
    object every `backoff` seconds (the SuperNode is local) where Flower's waits 1 s, then 2, 4...

    The SuperNode hands out a task before it has the message's content from the SuperLink; a process
    that takes the task at once (this one polls every few tens of milliseconds) would otherwise wait
    seconds for content that arrives in milliseconds.
    """
    from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
    from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest  # pylint: disable=E0611
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf,
        make_pull_object_fn_protobuf,
    )
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
    from flwr.supercore.task_identity import TaskIdentity

    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = res.task_id, res.run.run_id, res.context.node_id
    context, run, fab = context_from_proto(res.context), run_from_proto(res.run), fab_from_proto(res.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("No messages received from Runtime API")
    node, tree = Node(node_id=context.node_id), pulled.message_object_trees[0]
    from flwr.app import Message

    message = pull_and_inflate_object_from_tree(
        tree,
        make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message,
        initial_backoff=backoff,
        backoff_cap=backoff,
    )
    message.metadata.__dict__["_message_id"] = tree.object_id  # a pulled message does not carry its own id
    return message, context, run, fab


def _finish(client: Any, heartbeat: Any, reply: Any, context: Any, sub_status: str, details: str,
            push_message: Callable[..., None], push_task_output: Callable[..., None]) -> None:
    """Push the reply and the task's final status and context; stop the task's heartbeat."""
    from flwr.supercore import log

    try:
        if reply is not None and context is not None:
            try:
                push_message(client, reply, context)
            except Exception as ex:  # noqa: BLE001 (the task output still goes)
                log(ERROR, "Failed to push the reply", exc_info=ex)
        push_task_output(client=client, context=context, sub_status=sub_status, details=details)
    finally:
        heartbeat.stop()
        client.close()


def preload(modules: Sequence[str]) -> None:
    from flwr.supercore import log

    for name in modules:
        started = time.perf_counter()
        try:
            importlib.import_module(name)
        except ImportError as err:
            log(WARNING, "[fedge clientapp %d] cannot preload %s: %s", os.getpid(), name, err)
            continue
        log(INFO, "[fedge clientapp %d] preloaded %s in %.2fs", os.getpid(), name, time.perf_counter() - started)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fedge.client.worker", description=__doc__.splitlines()[0])
    p.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API (its --port)")
    p.add_argument("--insecure", action="store_true", help="reach the Runtime API without TLS")
    p.add_argument("--root-certificates", help="CA certificate of the Runtime API's TLS certificate")
    p.add_argument("--superexec-auth-secret-file", help="the secret the SuperNode was given (same flag)")
    p.add_argument("--parent-pid", type=int, help="leave when this process ends")
    p.add_argument("--poll", type=float, default=0.1, help="seconds between task polls while a federation is active")
    p.add_argument("--idle-poll", type=float, default=1.0, help="seconds between task polls when idle")
    p.add_argument("--busy-window", type=float, default=120.0, help="seconds after a task that count as active")
    p.add_argument("--preload", action="append", default=None, help="more modules to import before the first task")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    """The serving process."""
    args = parser().parse_args(argv)
    if not args.insecure and not args.root_certificates:
        raise SystemExit("give --insecure or --root-certificates for the Runtime API")
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)
    if args.parent_pid is not None:
        from flwr.supercore.app_utils import start_parent_process_monitor

        start_parent_process_monitor(args.parent_pid)  # raises SIGINT here when the parent is gone
    access = RuntimeAccess(args.runtime_api_address, args.insecure, args.root_certificates,
                           args.superexec_auth_secret_file)
    server = Server(access, poll=args.poll, idle_poll=args.idle_poll, busy_window=args.busy_window)
    pending = os.environ.pop(PENDING_TASK_ENV, None)
    if not pending:
        preload([*DEFAULT_PRELOAD, *(args.preload or [])])
    try:
        server.run(pending)
    except Stop:
        pass


def supervise(serve_args: Sequence[str], parent_pid: int | None = None,
              on_event: Callable[[str], None] = print) -> int:
    """Run the serving process and start it again whenever it dies; return when stopped or the parent is gone."""
    import psutil

    stopping: list[str] = []

    def stop(signum: int, frame: FrameType | None) -> None:
        stopping.append(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    pause = RESTART_PAUSE
    while True:
        started = time.monotonic()
        child = subprocess.Popen([sys.executable, "-m", "fedge.client.worker", *serve_args,
                                  "--parent-pid", str(os.getpid())])
        on_event(f"ClientApp process {child.pid} started")
        while child.poll() is None and not stopping and (parent_pid is None or psutil.pid_exists(parent_pid)):
            time.sleep(0.2)
        if child.poll() is None:  # stopped, or the SuperNode is gone: stop the child too
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
            on_event(f"ClientApp process {child.pid} stopped ({stopping[0] if stopping else 'the SuperNode is gone'})")
            return 0
        if stopping:
            return 0
        ran = time.monotonic() - started
        pause = RESTART_PAUSE if ran > STABLE_AFTER else min(2 * pause, MAX_RESTART_PAUSE)
        on_event(f"ClientApp process {child.pid} exited with status {child.returncode} after {ran:.0f}s; "
                 f"starting another in {pause:.0f}s")
        deadline = time.monotonic() + pause
        while time.monotonic() < deadline and not stopping:
            time.sleep(0.1)
        if stopping:
            return 0


if __name__ == "__main__":
    main()
