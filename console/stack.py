"""The embedded stack: starts, checks and stops Temporal, both sandboxes and the worker locally."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO, Literal, TypeVar

import httpx
from pydantic import SecretStr
from temporalio.api.enums.v1 import IndexedValueType, TaskQueueType
from temporalio.api.operatorservice.v1 import (
    AddSearchAttributesRequest,
    ListSearchAttributesRequest,
)
from temporalio.api.taskqueue.v1 import PollerInfo, TaskQueue
from temporalio.api.workflowservice.v1 import (
    CountWorkflowExecutionsRequest,
    DescribeTaskQueueRequest,
)
from temporalio.client import Client

from refundsaga import search_attributes
from refundsaga.settings import Settings

__all__ = [
    "COMPONENTS",
    "ComponentState",
    "ComponentStatus",
    "StackError",
    "down",
    "stack_env",
    "status",
    "up",
]

HOST = "127.0.0.1"
COMPONENTS = ("temporal", "ui", "processor", "ams", "worker")
"""Every component `status()` reports, in start order (`ui` is served by the temporal process)."""

ComponentState = Literal["running", "stopped", "starting", "unhealthy"]

# The processes the stack owns, in start order; `down()` stops them in reverse.
_PROCESSES = ("temporal", "processor", "ams", "worker")
# Ports each process listens on: (component, settings field). The field names the env var.
_PORTS: dict[str, tuple[tuple[str, str], ...]] = {
    "temporal": (("temporal", "temporal_port"), ("ui", "ui_port")),
    "processor": (("processor", "processor_port"),),
    "ams": (("ams", "ams_port"),),
    "worker": (),
}
_VENV_BIN = Path(sys.executable).parent
# `python -c` leaves later arguments alone, so this tag only labels the worker's command line:
# it shows which data dir a worker in `ps` belongs to and lets us tell our worker from a
# recycled pid.
_WORKER_TAG = "--refundsaga-stack="
_POLL_S = 0.1
_PROBE_TIMEOUT_S = 0.5
_FAILED_START_GRACE_S = 10.0
_KILL_WAIT_S = 5.0
_LOG_TAIL_LINES = 5

_T = TypeVar("_T")

# How the stack runs `temporal server start-dev` (the bench starts its own server with these).
# WAL with synchronous=NORMAL skips the fsync per commit: a power loss or OS crash can lose the
# last few transactions, but never corrupts the file (an application crash loses nothing).
# Fine for a laptop's dev stack.
DEV_SERVER_PRAGMAS = ("journal_mode=wal", "synchronous=normal")
# The CLI's dev server sets system.forceSearchAttributesCacheRefreshOnRead, so that an attribute
# created a moment ago is usable at once: then every call that names or stores search
# attributes reads them from the database again (measured: 18 cluster-metadata reads and 6
# namespace reads per saga, bench/README.md). A production server caches them. The stack
# registers its attributes when the server starts (--search-attribute), and waits for any it
# registers later to be usable (_Temporal.ensure_search_attributes), so it keeps the cache.
DEV_SERVER_DYNAMIC_CONFIG = ("system.forceSearchAttributesCacheRefreshOnRead=false",)


def dev_server_tuning(
    pragmas: Sequence[str] = DEV_SERVER_PRAGMAS,
    dynamic_config: Sequence[str] = DEV_SERVER_DYNAMIC_CONFIG,
) -> list[str]:
    """The `--sqlite-pragma` and `--dynamic-config-value` flags the stack starts its server with."""
    flags: list[str] = []
    for pragma in pragmas:
        flags += ["--sqlite-pragma", pragma]
    for value in dynamic_config:
        flags += ["--dynamic-config-value", value]
    return flags


# Popen objects of the processes this Python process started: polling them reaps an exited
# child, which would otherwise linger as a zombie that still looks alive to kill(pid, 0).
_children: dict[int, subprocess.Popen[bytes]] = {}


class StackError(RuntimeError):
    """The stack could not be brought up or down; the message says what to do next."""


@dataclass
class ComponentStatus:
    """What one component of the stack is doing.

    Attributes:
        name: `temporal`, `ui`, `processor`, `ams` or `worker`.
        state: `running` (alive and answering), `stopped`, `starting` or `unhealthy` (alive
            but not answering).
        pid: The process id, None when stopped (`ui` shares the temporal process).
        url: Where to reach it: the gRPC address for temporal, HTTP URLs for the UI and the
            sandboxes, the task queue name for the worker.
    """

    name: str
    state: ComponentState
    pid: int | None
    url: str | None

    def to_dict(self) -> dict[str, Any]:
        """The status as a JSON-ready dict."""
        return asdict(self)


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports, held open together while chosen."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in socks:
            sock.bind((HOST, 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def private_settings(data_dir: Path, **overrides: Any) -> Settings:
    """Settings of a stack of its own (tests, chaos, benches): `data_dir`, free loopback ports,
    never the default ones, and the addresses that go with them; `overrides` on top.

    Every field set here is explicit, so `settings_env` hands all of it to a subprocess.
    """
    temporal, ui, processor, ams = free_ports(4)
    fields: dict[str, Any] = {
        "data_dir": data_dir,
        "temporal_port": temporal,
        "ui_port": ui,
        "processor_port": processor,
        "ams_port": ams,
        "temporal_address": f"{HOST}:{temporal}",
        "temporal_ui_url": _http_url(ui),
        "processor_url": _http_url(processor),
        "ams_url": _http_url(ams),
    }
    return Settings(**(fields | overrides))


def stack_env(settings: Settings) -> dict[str, str]:
    """The `REFUND_*` environment that points a process at the stack's components.

    The stack's worker gets this on top of the current environment (plus the sandbox API keys,
    which are left out here so that printing this dict never shows a secret). URLs are derived
    from the stack's ports, not from `processor_url` and friends.

    Args:
        settings: The settings the stack runs with.

    Returns:
        Variable name to value; `REFUND_DATABASE_URL` may carry a database password.
    """
    return {
        "REFUND_DATA_DIR": str(settings.data_dir.resolve()),
        "REFUND_TEMPORAL_ADDRESS": _temporal_address(settings),
        "REFUND_TEMPORAL_NAMESPACE": settings.temporal_namespace,
        "REFUND_TEMPORAL_UI_URL": _http_url(settings.ui_port),
        "REFUND_TASK_QUEUE": settings.task_queue,
        "REFUND_DATABASE_URL": settings.resolved_database_url,
        "REFUND_PROCESSOR_URL": _http_url(settings.processor_port),
        "REFUND_AMS_URL": _http_url(settings.ams_port),
    }


def up(
    settings: Settings,
    *,
    on_progress: Callable[[str], None] = lambda _: None,
    timeout_s: float = 60,
) -> list[ComponentStatus]:
    """Start whatever part of the stack is not running and wait until all of it is ready.

    Idempotent: components already running and healthy are left alone; stale pid files are
    removed. If anything fails, the processes this call started are stopped again. Call it from
    synchronous code (it runs its own event loop).

    Args:
        settings: Data dir, ports, keys, namespace and task queue of the stack.
        on_progress: Receives one human-readable line per step.
        timeout_s: Budget for the whole call, start-ups and readiness checks included.

    Returns:
        The status of every component, in `COMPONENTS` order.

    Raises:
        StackError: A port is taken, the temporal CLI is missing, a component exited during
            start-up or was not ready in time (the message names its log file and quotes it).
    """
    deadline = time.monotonic() + timeout_s
    paths = _Paths.of(settings)
    for directory in (paths.data_dir, paths.logs, paths.pids):
        private_directory(directory)
    run = _UpRun(settings, paths, on_progress, deadline, timeout_s)
    with _locked(paths, deadline), _Temporal(settings) as temporal:
        run.temporal = temporal
        try:
            run.start_all()
        except BaseException:
            run.stop_started()
            raise
        return _status(settings, temporal)


def down(
    settings: Settings,
    *,
    on_progress: Callable[[str], None] = lambda _: None,
    timeout_s: float = 20,
) -> list[ComponentStatus]:
    """Stop the stack in reverse start order and check that its ports are free again.

    Each process group gets SIGTERM, then SIGKILL if it is still alive after `timeout_s`.
    Idempotent: with nothing running it only removes stale pid files.

    Args:
        settings: The settings the stack was started with (data dir and ports).
        on_progress: Receives one human-readable line per step.
        timeout_s: Grace period each process gets between SIGTERM and SIGKILL.

    Returns:
        The status of every component, in `COMPONENTS` order (all stopped).

    Raises:
        StackError: A process survived SIGKILL, a port is still taken afterwards, or another
            `up`/`down` holds the stack's lock for too long.
    """
    paths = _Paths.of(settings)
    if not paths.data_dir.is_dir():
        on_progress(f"nothing to stop: {paths.data_dir} does not exist")
        return status(settings)
    freed: list[tuple[str, int, str]] = []
    failures: list[StackError] = []
    # An `up` in progress holds the lock for up to its whole budget (60 s by default).
    with _locked(paths, time.monotonic() + timeout_s + 60):
        for name in reversed(_PROCESSES):
            pid = _owned_pid(paths, name, on_progress)
            if pid is None:
                continue
            on_progress(f"{name}: stopping (pid {pid})")
            started = time.monotonic()
            try:
                _stop(name, pid, timeout_s, on_progress)
            except StackError as err:
                failures.append(err)  # still stop the others
                continue
            paths.pid(name).unlink(missing_ok=True)
            on_progress(f"{name}: stopped in {time.monotonic() - started:.1f}s")
            freed.extend(_ports_of(settings, name))
    if failures:
        raise failures[0]
    _wait_ports_free(freed)
    return status(settings)


def status(settings: Settings) -> list[ComponentStatus]:
    """What each component is doing, from pid files and quick health probes.

    Args:
        settings: The settings the stack was started with.

    Returns:
        One status per component, in `COMPONENTS` order.
    """
    with _Temporal(settings) as temporal:
        return _status(settings, temporal)


# -- where things live -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Paths:
    data_dir: Path

    @classmethod
    def of(cls, settings: Settings) -> _Paths:
        return cls(settings.data_dir.resolve())

    @property
    def logs(self) -> Path:
        return self.data_dir / "logs"

    @property
    def pids(self) -> Path:
        return self.data_dir / "pids"

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def pid(self, name: str) -> Path:
        return self.pids / f"{name}.pid"

    def markers(self, name: str) -> tuple[str, ...]:
        """Arguments that the command line of this stack's `name` process contains."""
        return {
            "temporal": ("start-dev", str(self.data_dir / "temporal.db")),
            "processor": ("sandboxes.processor", str(self.data_dir / "processor.json")),
            "ams": ("sandboxes.ams", str(self.data_dir / "ams.json")),
            "worker": (f"{_WORKER_TAG}{self.data_dir}",),
        }[name]


def _temporal_address(settings: Settings) -> str:
    return f"{HOST}:{settings.temporal_port}"


def _http_url(port: int) -> str:
    return f"http://{HOST}:{port}"


def _ports_of(settings: Settings, name: str) -> list[tuple[str, int, str]]:
    """(component, port, env var that moves it) for each port the process listens on."""
    return [
        (component, getattr(settings, attr), f"REFUND_{attr.upper()}")
        for component, attr in _PORTS[name]
    ]


# -- the start-up ----------------------------------------------------------------------------


@dataclass
class _UpRun:
    """One `up()` call: what it started, so a failure can stop exactly that."""

    settings: Settings
    paths: _Paths
    on_progress: Callable[[str], None]
    deadline: float
    timeout_s: float
    temporal: _Temporal | None = None
    started: list[tuple[str, int]] = field(default_factory=list)

    def start_all(self) -> None:
        running = {name: _owned_pid(self.paths, name, self.on_progress) for name in _PROCESSES}
        # Fail before starting anything when a port is taken or the CLI is missing, so a
        # doomed call leaves nothing behind and returns at once.
        temporal_bin = _find_binary("temporal") if running["temporal"] is None else ""
        for name, pid in running.items():
            if pid is None:
                _check_ports_free(self.settings, name)
        self.start_temporal(running["temporal"], temporal_bin)
        self.start_sandbox("processor", running["processor"], self.settings.processor_port)
        self.start_sandbox("ams", running["ams"], self.settings.ams_port)
        self.on_progress("store: migrating")
        # Imported here: Alembic and SQLAlchemy would add a third of a second to every
        # `refund stack status`, which never migrates.
        from refundsaga.store.migrate import upgrade

        try:
            upgrade(self.settings.resolved_database_url)
        except Exception as err:
            raise StackError(
                f"store migration failed ({type(err).__name__}: {err}); check REFUND_DATABASE_URL"
            ) from err
        self.start_worker(running["worker"])

    def start_temporal(self, pid: int | None, temporal_bin: str) -> None:
        settings, paths = self.settings, self.paths
        assert self.temporal is not None
        temporal = self.temporal
        if pid is None:
            argv = [
                temporal_bin,
                "server",
                "start-dev",
                "--ip",
                HOST,
                "--port",
                str(settings.temporal_port),
                "--ui-port",
                str(settings.ui_port),
                "--db-filename",
                str(paths.data_dir / "temporal.db"),
                "--namespace",
                settings.temporal_namespace,
                "--log-level",
                "warn",
                *search_attributes.dev_server_flags(),
                *dev_server_tuning(),
            ]
            if _supports_flag(temporal_bin, "--ui-disable-news-fetch"):
                # The UI would otherwise fetch a news feed from the internet on every load.
                argv.append("--ui-disable-news-fetch")
            pid = self.spawn("temporal", argv, dict(os.environ))
        else:
            self.on_progress(f"temporal: already running (pid {pid})")
        self.wait_ready("temporal", pid, temporal.ready)
        self.ensure_search_attributes()
        ui_url = _http_url(settings.ui_port)
        self.wait_ready("ui", pid, lambda: _http_ok(f"{ui_url}/", timeout_s=1.0))
        self.on_progress(f"temporal: ready at {_temporal_address(settings)}, UI at {ui_url}")

    def ensure_search_attributes(self) -> None:
        assert self.temporal is not None
        missing = self.temporal.ensure_search_attributes(self.remaining(cap=30))
        if missing:
            self.on_progress(f"temporal: registered missing search attributes {missing}")

    def start_sandbox(self, name: str, pid: int | None, port: int) -> None:
        if pid is None:
            key = (
                self.settings.processor_api_key
                if name == "processor"
                else self.settings.ams_api_key
            )
            argv = [
                sys.executable,
                "-m",
                f"sandboxes.{name}",
                "--host",
                HOST,
                "--port",
                str(port),
                "--state",
                str(self.paths.data_dir / f"{name}.json"),
            ]
            # Through the environment, not --api-key: argv is visible to everyone in `ps`.
            env = {**os.environ, "SANDBOX_API_KEY": key.get_secret_value()}
            pid = self.spawn(name, argv, env)
        else:
            self.on_progress(f"{name}: already running (pid {pid})")
        url = _http_url(port)
        self.wait_ready(name, pid, lambda: _http_ok(f"{url}/healthz", timeout_s=1.0))
        self.on_progress(f"{name}: ready at {url}")

    def start_worker(self, pid: int | None) -> None:
        assert self.temporal is not None
        temporal = self.temporal
        task_queue = self.settings.task_queue
        if pid is None:
            argv = [
                sys.executable,
                "-c",
                "import worker, refundsaga.temporal as t; t.run_and_exit(worker.main)",
                f"{_WORKER_TAG}{self.paths.data_dir}",
            ]
            spawned_at = time.time()
            pid = self.spawn("worker", argv, _worker_env(self.settings))
            alive_since = time.monotonic()
            worker_pid = pid

            def ready() -> bool:
                # A worker that dies right after connecting must not pass, hence the second.
                if time.monotonic() - alive_since < 1.0:
                    return False
                pollers = temporal.pollers(task_queue, timeout_s=1.0)
                return any(_is_poller_of(p, worker_pid, spawned_at) for p in pollers)
        else:
            self.on_progress(f"worker: already running (pid {pid})")

            def ready() -> bool:
                return bool(temporal.pollers(task_queue, timeout_s=1.0))

        self.wait_ready("worker", pid, ready)
        self.on_progress(f"worker: polling task queue {task_queue}")
        result = temporal.ensure_purge_schedule(timeout_s=self.remaining(cap=10))
        self.on_progress(f"schedules: purge of expired progress snapshots {result}")

    def spawn(self, name: str, argv: list[str], env: dict[str, str]) -> int:
        _check_ports_free(self.settings, name)  # again: something may have taken it since
        log_path = self.paths.log(name)
        self.on_progress(f"{name}: starting (log: {log_path})")
        with private_log(log_path) as log:
            log.write(f"\n--- refundsaga stack: {name} starting at {datetime.now()}\n".encode())
            log.flush()
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                # Its own session: a Ctrl-C in the terminal that ran `up` does not reach it,
                # and `down` can signal the whole process group.
                start_new_session=True,
            )
        _children[proc.pid] = proc
        self.started.append((name, proc.pid))
        _write_pid(self.paths.pid(name), proc.pid)
        return proc.pid

    def wait_ready(self, name: str, pid: int, ready: Callable[[], bool]) -> None:
        """Poll `ready` until it holds, the process exits, or the deadline passes."""
        process = "temporal" if name == "ui" else name
        log_path = self.paths.log(process)
        while True:
            if not _alive(pid):
                proc = _children.get(pid)
                code = "" if proc is None else f" with code {proc.returncode}"
                raise StackError(
                    f"{name} exited during start-up{code}: see {log_path}" + _log_tail(log_path)
                )
            if ready():
                return
            if time.monotonic() >= self.deadline:
                ours = any(p == pid for _, p in self.started)
                hint = "" if ours else " (it was already running: try `refund stack down`)"
                raise StackError(
                    f"{name} was not ready within {self.timeout_s:g}s{hint}: see {log_path}"
                    + _log_tail(log_path)
                )
            time.sleep(_POLL_S)

    def remaining(self, cap: float) -> float:
        return max(0.5, min(cap, self.deadline - time.monotonic()))

    def stop_started(self) -> None:
        """Stop what this call started, newest first; errors here must not hide the cause."""
        for name, pid in reversed(self.started):
            if not _alive(pid):
                self.paths.pid(name).unlink(missing_ok=True)
                continue
            self.on_progress(f"{name}: stopping (pid {pid}) after the failed start")
            with contextlib.suppress(StackError):
                _stop(name, pid, _FAILED_START_GRACE_S, self.on_progress)
            self.paths.pid(name).unlink(missing_ok=True)


def settings_env(settings: Settings) -> dict[str, str]:
    """The settings given explicitly (not from defaults) as `REFUND_*` variables, so the worker
    process runs with the Settings object the stack was started with, not only the shell's."""
    env: dict[str, str] = {}
    for name in settings.model_fields_set:
        value = getattr(settings, name)
        if value is None:
            continue
        if isinstance(value, SecretStr):
            text = value.get_secret_value()
        elif isinstance(value, list):
            text = ",".join(str(v) for v in value)
        elif isinstance(value, dict):
            text = json.dumps(value)
        elif isinstance(value, timedelta):
            text = str(int(value.total_seconds()))
        else:
            text = str(value)
        env[f"REFUND_{name.upper()}"] = text
    return env


def _worker_env(settings: Settings) -> dict[str, str]:
    env = {**os.environ, **settings_env(settings), **stack_env(settings)}
    # The keys the sandboxes were started with, so the worker's requests are accepted.
    env["REFUND_PROCESSOR_API_KEY"] = settings.processor_api_key.get_secret_value()
    env["REFUND_AMS_API_KEY"] = settings.ams_api_key.get_secret_value()
    return env


def _is_poller_of(poller: PollerInfo, pid: int, spawned_at: float) -> bool:
    """Whether a poller is the worker we just started, not one a stopped worker left behind.

    Temporal keeps listing pollers for a while after their worker is gone. The SDK's default
    identity is `<pid>@<host>`; a poll that started after the spawn is ours too, which still
    holds if the worker's identity is ever configured.
    """
    if poller.identity.startswith(f"{pid}@"):
        return True
    seen = poller.last_access_time
    return seen.seconds + seen.nanos / 1e9 > spawned_at


# -- processes -------------------------------------------------------------------------------


def _find_binary(name: str) -> str:
    beside = _VENV_BIN / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if not found:
        raise StackError(f"{name} CLI not found in {_VENV_BIN}: run `make install`")
    return found


@functools.lru_cache(maxsize=8)
def _supports_flag(temporal_bin: str, flag: str) -> bool:
    try:
        result = subprocess.run(
            [temporal_bin, "server", "start-dev", "--help"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return flag in result.stdout


def _write_pid(path: Path, pid: int) -> None:
    tmp = path.with_suffix(".pid.tmp")
    tmp.write_text(f"{pid}\n")
    tmp.replace(path)


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    proc = _children.get(pid)
    if proc is not None:
        # Kept after exit too: a failed start-up reports the exit code from it.
        return proc.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: _is_ours() will say it is not ours
    # An exited process whose parent has not reaped it still answers kill(pid, 0).
    stat = _read_proc(pid, "stat")
    return stat is None or stat.rsplit(b")", 1)[-1].split()[:1] != [b"Z"]


def _read_proc(pid: int, entry: str) -> bytes | None:
    try:
        return Path(f"/proc/{pid}/{entry}").read_bytes()
    except OSError:
        return None


def _is_ours(pid: int, paths: _Paths, name: str) -> bool:
    """Whether `pid` is this stack's `name` process and not an unrelated one that reused it."""
    markers = paths.markers(name)
    raw = _read_proc(pid, "cmdline")
    if raw is not None:
        argv = raw.decode(errors="replace").split("\0")
        return all(marker in argv for marker in markers)
    if Path("/proc/self").exists():
        return False  # gone, or another user's process we may not inspect
    try:  # no /proc (macOS): ask ps, whose output joins the arguments with spaces
        command = subprocess.run(
            ["ps", "-o", "command=", "-p", str(pid)],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return True  # cannot tell: trust the pid file
    return all(marker in command for marker in markers)


def _owned_pid(paths: _Paths, name: str, on_progress: Callable[[str], None]) -> int | None:
    """The pid of this stack's live `name` process; a stale pid file is removed."""
    path = paths.pid(name)
    pid = _read_pid(path)
    if pid is not None and _alive(pid) and _is_ours(pid, paths, name):
        return pid
    if path.exists():
        on_progress(f"{name}: removing stale pid file {path}")
        path.unlink(missing_ok=True)
    return None


def _live_pid(paths: _Paths, name: str) -> int | None:
    """Like `_owned_pid` but read-only, for `status()`."""
    pid = _read_pid(paths.pid(name))
    if pid is not None and _alive(pid) and _is_ours(pid, paths, name):
        return pid
    return None


def _signal_group(pid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        # Started with start_new_session, so it leads its own group; signal the group to
        # reach anything it spawned, but never a group we did not create.
        if os.getpgid(pid) == pid:
            os.killpg(pid, signum)
        else:
            os.kill(pid, signum)


def _wait_dead(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while _alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _stop(name: str, pid: int, timeout_s: float, on_progress: Callable[[str], None]) -> None:
    _signal_group(pid, signal.SIGTERM)
    if _wait_dead(pid, timeout_s):
        return
    on_progress(f"{name}: still running {timeout_s:g}s after SIGTERM, sending SIGKILL")
    _signal_group(pid, signal.SIGKILL)
    if not _wait_dead(pid, _KILL_WAIT_S):
        raise StackError(f"{name} (pid {pid}) survived SIGKILL; check `ps -p {pid}`")


def private_directory(path: Path) -> None:
    """A data directory only its owner can read: it holds the store, state and logs."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)


def private_log(path: Path) -> BinaryIO:
    """A log file opened for appending, owner only: logs may quote requests and errors."""
    fd = os.open(path, os.O_CREAT | os.O_APPEND | os.O_WRONLY, 0o600)
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, "ab")


@contextlib.contextmanager
def _locked(paths: _Paths, deadline: float) -> Iterator[None]:
    """Serialize `up` and `down` on one data dir across processes."""
    private_directory(paths.data_dir)
    with (paths.data_dir / "stack.lock").open("a") as lock:
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise StackError(
                        f"another `refund stack` command is running for {paths.data_dir}; "
                        "wait for it to finish and try again"
                    ) from None
                time.sleep(_POLL_S)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _log_tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        with path.open("rb") as log:
            log.seek(max(0, path.stat().st_size - 16_384))
            text = log.read().decode(errors="replace")
    except OSError:
        return ""
    tail = [line[:300] for line in text.splitlines() if line.strip()][-lines:]
    return "".join(f"\n    {line}" for line in tail)


# -- ports and probes ------------------------------------------------------------------------


def _port_in_use(port: int) -> bool:
    # Binding catches a socket that is bound but not listening; connecting catches a listener
    # that bind() would not conflict with (e.g. on another address on some systems).
    # SO_REUSEADDR as servers set it, so connections in TIME_WAIT do not count as "in use".
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return True
    return _tcp_open(port, _PROBE_TIMEOUT_S)


def _tcp_open(port: int, timeout_s: float) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _check_ports_free(settings: Settings, name: str) -> None:
    for component, port, env_var in _ports_of(settings, name):
        if _port_in_use(port):
            raise StackError(
                f"port {port} ({component}) is in use by another process; stop it or set {env_var}"
            )


def _wait_ports_free(ports: list[tuple[str, int, str]], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    for component, port, env_var in ports:
        while _port_in_use(port):
            if time.monotonic() >= deadline:
                raise StackError(
                    f"port {port} ({component}) is still in use after stopping the stack: "
                    f"another process holds it; find it with `ss -ltnp` or set {env_var}"
                )
            time.sleep(_POLL_S)


def _http_ok(url: str, timeout_s: float) -> bool:
    try:
        # trust_env=False: an HTTP(S)_PROXY from the environment must not capture loopback.
        with httpx.Client(timeout=timeout_s, trust_env=False, follow_redirects=True) as http:
            return http.get(url).status_code == 200
    except httpx.HTTPError:
        return False


class _Temporal:
    """A Temporal client on a private event loop, so that the stack's API can stay synchronous.

    A private loop (not `asyncio.run`) leaves the caller's current event loop untouched.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.address = _temporal_address(settings)
        self._loop = asyncio.new_event_loop()
        self._client: Client | None = None

    def __enter__(self) -> _Temporal:
        return self

    def __exit__(self, *exc: object) -> None:
        self._client = None
        self._loop.close()

    def _call(self, make: Callable[[], Coroutine[Any, Any, _T]], timeout_s: float) -> _T:
        return self._loop.run_until_complete(asyncio.wait_for(make(), timeout_s))

    def _connect(self, timeout_s: float) -> Client:
        if self._client is None:
            self._client = self._call(
                lambda: Client.connect(
                    self.address,
                    namespace=self.settings.temporal_namespace,
                    connect_timeout=timedelta(seconds=timeout_s),
                ),
                timeout_s + 0.5,
            )
        return self._client

    def ready(self, timeout_s: float = 2.0) -> bool:
        """Serving: the port accepts, the health check passes, the namespace answers."""
        if not _tcp_open(self.settings.temporal_port, timeout_s):
            return False
        try:
            client = self._connect(timeout_s)
            request = ListSearchAttributesRequest(namespace=self.settings.temporal_namespace)
            return self._call(
                lambda: client.service_client.check_health(timeout=timedelta(seconds=timeout_s)),
                timeout_s + 0.5,
            ) and bool(
                self._call(
                    lambda: client.operator_service.list_search_attributes(
                        request, timeout=timedelta(seconds=timeout_s)
                    ),
                    timeout_s + 0.5,
                )
            )
        except Exception:
            # Any failure while it starts up just means "not yet"; the caller has the deadline.
            return False

    def ensure_search_attributes(self, timeout_s: float) -> list[str]:
        """Register the saga's search attributes that are missing, e.g. on an old db file.

        Returns:
            The names that had to be added.

        Raises:
            StackError: One exists with another type, or the calls failed.
        """
        namespace = self.settings.temporal_namespace
        wanted = {
            key.name: IndexedValueType.Value(f"INDEXED_VALUE_TYPE_{key.indexed_value_type.name}")
            for key in search_attributes.ALL
        }
        try:
            client = self._connect(timeout_s)
            existing = self._call(
                lambda: client.operator_service.list_search_attributes(
                    ListSearchAttributesRequest(namespace=namespace),
                    timeout=timedelta(seconds=timeout_s),
                ),
                timeout_s + 0.5,
            ).custom_attributes
            clashing = [n for n, kind in wanted.items() if n in existing and existing[n] != kind]
            if clashing:
                raise StackError(
                    f"search attributes {clashing} exist in {namespace} with another type; "
                    f"run `refund stack down` and delete {_Paths.of(self.settings).data_dir}"
                    "/temporal.db"
                )
            missing = {n: kind for n, kind in wanted.items() if n not in existing}
            if missing:
                self._call(
                    lambda: client.operator_service.add_search_attributes(
                        AddSearchAttributesRequest(namespace=namespace, search_attributes=missing),
                        timeout=timedelta(seconds=timeout_s),
                    ),
                    timeout_s + 0.5,
                )
                self._await_usable(client, sorted(missing), timeout_s)
        except StackError:
            raise
        except Exception as err:
            raise StackError(
                f"could not check the search attributes on {self.address} "
                f"({type(err).__name__}: {err}); see {_Paths.of(self.settings).log('temporal')}"
            ) from err
        return sorted(missing)

    def _await_usable(self, client: Client, names: list[str], timeout_s: float) -> None:
        """Wait until a visibility query naming `names` is accepted: the server caches its
        search attributes (DEV_SERVER_DYNAMIC_CONFIG), and refuses one registered a moment ago
        for a few seconds (a start naming it fails, an upsert's workflow task is retried)."""
        query = " AND ".join(f"{name} IS NULL" for name in names)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self._call(
                    lambda: client.workflow_service.count_workflow_executions(
                        CountWorkflowExecutionsRequest(
                            namespace=self.settings.temporal_namespace, query=query
                        ),
                        timeout=timedelta(seconds=max(deadline - time.monotonic(), 0.1)),
                    ),
                    max(deadline - time.monotonic(), 0.1) + 0.5,
                )
                return
            except Exception as err:
                if time.monotonic() >= deadline:
                    raise StackError(
                        f"search attributes {names} were registered on {self.address} but are "
                        f"not usable yet ({type(err).__name__}: {err}); run `refund stack up` "
                        "again in a minute"
                    ) from err
                time.sleep(0.25)

    def ensure_purge_schedule(self, timeout_s: float) -> str:
        """The daily purge of expired progress snapshots (see operations.ensure_purge_schedule).

        Returns:
            ``created`` or ``updated``; a failure is reported, not raised: the stack works
            without it, and `refund schedules ensure` can be run later.
        """
        from console.operations import ensure_purge_schedule
        from refundsaga.temporal import payload_data_converter

        async def ensure() -> str:
            client = await Client.connect(
                self.address,
                namespace=self.settings.temporal_namespace,
                data_converter=payload_data_converter,
            )
            return await ensure_purge_schedule(client, self.settings)

        try:
            return self._call(ensure, timeout_s)
        except Exception as err:
            return f"not ensured ({type(err).__name__}: {err}); run `refund schedules ensure`"

    def pollers(self, task_queue: str, timeout_s: float) -> list[PollerInfo]:
        """Pollers of the workflow task queue; empty when Temporal does not answer."""
        request = DescribeTaskQueueRequest(
            namespace=self.settings.temporal_namespace,
            task_queue=TaskQueue(name=task_queue),
            task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
        )
        try:
            client = self._connect(timeout_s)
            response = self._call(
                lambda: client.workflow_service.describe_task_queue(
                    request, timeout=timedelta(seconds=timeout_s)
                ),
                timeout_s + 0.5,
            )
        except Exception:
            return []  # a probe: not answering means "no pollers seen"
        return list(response.pollers)


# -- status ----------------------------------------------------------------------------------


def _status(settings: Settings, temporal: _Temporal) -> list[ComponentStatus]:
    paths = _Paths.of(settings)
    pids = {name: _live_pid(paths, name) for name in _PROCESSES}

    def state(pid: int | None, healthy: Callable[[], bool]) -> ComponentState:
        if pid is None:
            return "stopped"
        return "running" if healthy() else "unhealthy"

    temporal_pid = pids["temporal"]
    temporal_state = state(temporal_pid, lambda: temporal.ready(timeout_s=_PROBE_TIMEOUT_S))
    ui_url = _http_url(settings.ui_port)
    processor_url = _http_url(settings.processor_port)
    ams_url = _http_url(settings.ams_port)
    return [
        ComponentStatus("temporal", temporal_state, temporal_pid, _temporal_address(settings)),
        ComponentStatus(
            "ui",
            state(temporal_pid, lambda: _http_ok(f"{ui_url}/", _PROBE_TIMEOUT_S)),
            temporal_pid,
            ui_url,
        ),
        ComponentStatus(
            "processor",
            state(
                pids["processor"], lambda: _http_ok(f"{processor_url}/healthz", _PROBE_TIMEOUT_S)
            ),
            pids["processor"],
            processor_url,
        ),
        ComponentStatus(
            "ams",
            state(pids["ams"], lambda: _http_ok(f"{ams_url}/healthz", _PROBE_TIMEOUT_S)),
            pids["ams"],
            ams_url,
        ),
        ComponentStatus(
            "worker",
            state(
                pids["worker"],
                lambda: (
                    temporal_state == "running"
                    and bool(temporal.pollers(settings.task_queue, _PROBE_TIMEOUT_S))
                ),
            ),
            pids["worker"],
            settings.task_queue,
        ),
    ]
