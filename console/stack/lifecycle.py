"""The stack as a whole: `up` starts what is not running and waits until all of it is ready,
`down` stops it in reverse order, `status` says what each component is doing."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from temporalio.api.taskqueue.v1 import PollerInfo

from console.stack import processes
from console.stack.components import (
    PROCESSES,
    ComponentState,
    ComponentStatus,
    Paths,
    StackError,
    http_url,
    ports_of,
    sandbox_argv,
    temporal_address,
    webhook_secret,
    webhook_url,
    webhooks_argv,
    webhooks_env,
    worker_argv,
    worker_env,
)
from console.stack.devserver import TemporalAdmin, dev_server_argv, temporal_binary
from refundsaga.settings import Settings

_FAILED_START_GRACE_S = 10.0


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
    paths = Paths.of(settings)
    for directory in (paths.data_dir, paths.logs, paths.pids):
        processes.private_directory(directory)
    run = _UpRun(settings, paths, on_progress, deadline, timeout_s)
    with processes.locked(paths.data_dir, deadline), TemporalAdmin(settings) as temporal:
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
    paths = Paths.of(settings)
    if not paths.data_dir.is_dir():
        on_progress(f"nothing to stop: {paths.data_dir} does not exist")
        return status(settings)
    freed: list[tuple[str, int, str]] = []
    failures: list[StackError] = []
    # An `up` in progress holds the lock for up to its whole budget (60 s by default).
    with processes.locked(paths.data_dir, time.monotonic() + timeout_s + 60):
        for name in reversed(PROCESSES):
            pid = _owned_pid(paths, name, on_progress)
            if pid is None:
                continue
            on_progress(f"{name}: stopping (pid {pid})")
            started = time.monotonic()
            try:
                processes.stop(name, pid, timeout_s, on_progress)
            except StackError as err:
                failures.append(err)  # still stop the others
                continue
            paths.pid(name).unlink(missing_ok=True)
            on_progress(f"{name}: stopped in {time.monotonic() - started:.1f}s")
            freed.extend(ports_of(settings, name))
    if failures:
        raise failures[0]
    processes.wait_ports_free(freed)
    return status(settings)


def status(settings: Settings) -> list[ComponentStatus]:
    """What each component is doing, from pid files and quick health probes.

    Args:
        settings: The settings the stack was started with.

    Returns:
        One status per component, in `COMPONENTS` order.
    """
    with TemporalAdmin(settings) as temporal:
        return _status(settings, temporal)


# -- the start-up ----------------------------------------------------------------------------


@dataclass
class _UpRun:
    """One `up()` call: what it started, so a failure can stop exactly that."""

    settings: Settings
    paths: Paths
    on_progress: Callable[[str], None]
    deadline: float
    timeout_s: float
    temporal: TemporalAdmin | None = None
    started: list[tuple[str, int]] = field(default_factory=list)

    def start_all(self) -> None:
        running = {name: _owned_pid(self.paths, name, self.on_progress) for name in PROCESSES}
        # Fail before starting anything when a port is taken or the CLI is missing, so a
        # doomed call leaves nothing behind and returns at once.
        temporal_bin = temporal_binary() if running["temporal"] is None else ""
        for name, pid in running.items():
            if pid is None:
                processes.check_ports_free(ports_of(self.settings, name))
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
        self.start_webhooks(running["webhooks"])

    def start_temporal(self, pid: int | None, temporal_bin: str) -> None:
        settings = self.settings
        assert self.temporal is not None
        temporal = self.temporal
        if pid is None:
            argv = dev_server_argv(settings, temporal_bin)
            pid = self.spawn("temporal", argv, dict(os.environ))
        else:
            self.on_progress(f"temporal: already running (pid {pid})")
        self.wait_ready("temporal", pid, temporal.ready)
        self.ensure_search_attributes()
        ui_url = http_url(settings.ui_port)
        self.wait_ready("ui", pid, lambda: processes.http_ok(f"{ui_url}/", timeout_s=1.0))
        self.on_progress(f"temporal: ready at {temporal_address(settings)}, UI at {ui_url}")

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
            argv = sandbox_argv(name, port, self.paths.data_dir)
            # Through the environment, not --api-key: argv is visible to everyone in `ps`.
            env = {**os.environ, "SANDBOX_API_KEY": key.get_secret_value()}
            if name == "processor":
                # The processor sends its events to the stack's receiver, as Stripe would.
                env["SANDBOX_WEBHOOK_URL"] = webhook_url(self.settings)
                env["SANDBOX_WEBHOOK_SECRET"] = webhook_secret(self.settings).get_secret_value()
            pid = self.spawn(name, argv, env)
        else:
            self.on_progress(f"{name}: already running (pid {pid})")
        url = http_url(port)
        self.wait_ready(name, pid, lambda: processes.http_ok(f"{url}/healthz", timeout_s=1.0))
        self.on_progress(f"{name}: ready at {url}")

    def start_worker(self, pid: int | None) -> None:
        assert self.temporal is not None
        temporal = self.temporal
        task_queue = self.settings.task_queue
        if pid is None:
            argv = worker_argv(self.paths.data_dir)
            spawned_at = time.time()
            pid = self.spawn("worker", argv, worker_env(self.settings))
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
        result = temporal.ensure_sweep_schedule(timeout_s=self.remaining(cap=10))
        self.on_progress(f"schedules: reconciliation sweep of the processor {result}")

    def start_webhooks(self, pid: int | None) -> None:
        if pid is None:
            pid = self.spawn(
                "webhooks", webhooks_argv(self.paths.data_dir), webhooks_env(self.settings)
            )
        else:
            self.on_progress(f"webhooks: already running (pid {pid})")
        health = f"{http_url(self.settings.webhooks_port)}/healthz"
        self.wait_ready("webhooks", pid, lambda: processes.http_ok(health, timeout_s=1.0))
        self.on_progress(
            f"webhooks: receiving the processor's events at {webhook_url(self.settings)}"
        )

    def spawn(self, name: str, argv: list[str], env: dict[str, str]) -> int:
        processes.check_ports_free(
            ports_of(self.settings, name)
        )  # again: something may have taken it
        log = self.paths.log(name)
        self.on_progress(f"{name}: starting (log: {log})")
        pid = processes.spawn(name, argv, env, log=log, pid_file=self.paths.pid(name))
        self.started.append((name, pid))
        return pid

    def wait_ready(self, name: str, pid: int, ready: Callable[[], bool]) -> None:
        """Poll `ready` until it holds, the process exits, or the deadline passes."""
        process = "temporal" if name == "ui" else name
        log_path = self.paths.log(process)
        while True:
            if not processes.alive(pid):
                returncode = processes.exit_code(pid)
                code = "" if returncode is None else f" with code {returncode}"
                raise StackError(
                    f"{name} exited during start-up{code}: see {log_path}"
                    + processes.log_tail(log_path)
                )
            if ready():
                return
            if time.monotonic() >= self.deadline:
                ours = any(p == pid for _, p in self.started)
                hint = "" if ours else " (it was already running: try `refund stack down`)"
                raise StackError(
                    f"{name} was not ready within {self.timeout_s:g}s{hint}: see {log_path}"
                    + processes.log_tail(log_path)
                )
            time.sleep(processes.POLL_S)

    def remaining(self, cap: float) -> float:
        return max(0.5, min(cap, self.deadline - time.monotonic()))

    def stop_started(self) -> None:
        """Stop what this call started, newest first; errors here must not hide the cause."""
        for name, pid in reversed(self.started):
            if not processes.alive(pid):
                self.paths.pid(name).unlink(missing_ok=True)
                continue
            self.on_progress(f"{name}: stopping (pid {pid}) after the failed start")
            with contextlib.suppress(StackError):
                processes.stop(name, pid, _FAILED_START_GRACE_S, self.on_progress)
            self.paths.pid(name).unlink(missing_ok=True)


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


# -- status ----------------------------------------------------------------------------------


def _status(settings: Settings, temporal: TemporalAdmin) -> list[ComponentStatus]:
    paths = Paths.of(settings)
    pids = {name: processes.live_pid(paths.pid(name), paths.markers(name)) for name in PROCESSES}

    def state(pid: int | None, healthy: Callable[[], bool]) -> ComponentState:
        if pid is None:
            return "stopped"
        return "running" if healthy() else "unhealthy"

    probe_s = processes.PROBE_TIMEOUT_S
    temporal_pid = pids["temporal"]
    temporal_state = state(temporal_pid, lambda: temporal.ready(timeout_s=probe_s))
    ui_url = http_url(settings.ui_port)
    processor_url = http_url(settings.processor_port)
    ams_url = http_url(settings.ams_port)
    return [
        ComponentStatus("temporal", temporal_state, temporal_pid, temporal_address(settings)),
        ComponentStatus(
            "ui",
            state(temporal_pid, lambda: processes.http_ok(f"{ui_url}/", probe_s)),
            temporal_pid,
            ui_url,
        ),
        ComponentStatus(
            "processor",
            state(
                pids["processor"],
                lambda: processes.http_ok(f"{processor_url}/healthz", probe_s),
            ),
            pids["processor"],
            processor_url,
        ),
        ComponentStatus(
            "ams",
            state(
                pids["ams"],
                lambda: processes.http_ok(f"{ams_url}/healthz", probe_s),
            ),
            pids["ams"],
            ams_url,
        ),
        ComponentStatus(
            "worker",
            state(
                pids["worker"],
                lambda: (
                    temporal_state == "running"
                    and bool(temporal.pollers(settings.task_queue, probe_s))
                ),
            ),
            pids["worker"],
            settings.task_queue,
        ),
        ComponentStatus(
            "webhooks",
            state(
                pids["webhooks"],
                lambda: processes.http_ok(f"{http_url(settings.webhooks_port)}/healthz", probe_s),
            ),
            pids["webhooks"],
            webhook_url(settings),
        ),
    ]


def _owned_pid(paths: Paths, name: str, on_progress: Callable[[str], None]) -> int | None:
    """The pid of this stack's live `name` process; a stale pid file is removed."""
    return processes.owned_pid(paths.pid(name), paths.markers(name), name, on_progress)
