"""The bench's own embedded stack: a dev server, in-memory sandboxes, the stack's worker and
the bench's worker (baselines and naive saga), on a fresh data dir and free ports; and its
seeding."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client

from bench.baseline import sandboxed_queue
from bench.naive import naive_queue
from console import stack
from console.seed import SeededPurchase, seed_purchase
from refundsaga.contracts import RefundRequest
from refundsaga.settings import Settings
from refundsaga.store import OasisStore
from refundsaga.temporal import connect

REPO = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
# What the stack passes to `temporal server start-dev` (console/stack/devserver.py); the
# bench starts its own server with the same flags so the comparison runs on the same code.
STACK_PRAGMAS = stack.DEV_SERVER_PRAGMAS
STACK_DYNAMIC_CONFIG = stack.DEV_SERVER_DYNAMIC_CONFIG
# Above the standard scenario's 99.95 so that it needs no approver (REFUND_AUTO_APPROVE_...).
AUTO_APPROVE_ALL_CENTS = 1_000_000
SAGA_QUEUE = "bench-saga"
BASELINE_QUEUE = "bench-baseline"


def bench_settings(data_dir: Path, *, auto_approve_below_cents: int) -> Settings:
    """Settings for a stack on free ports in `data_dir`, never the default ports."""
    return stack.private_settings(
        data_dir,
        task_queue=SAGA_QUEUE,
        auto_approve_below_cents=auto_approve_below_cents,
        database_url=None,
    )


def _process_env(settings: Settings) -> dict[str, str]:
    # What the stack hands its worker, so the bench's worker talks to the same components.
    env = {**os.environ, **stack.stack_env(settings)}
    env["REFUND_PROCESSOR_API_KEY"] = settings.processor_api_key.get_secret_value()
    env["REFUND_AMS_API_KEY"] = settings.ams_api_key.get_secret_value()
    return env


def _await_exec(proc: subprocess.Popen[bytes], marker: str, timeout_s: float = 10.0) -> None:
    """Wait until the child runs its own program (its command line holds `marker`).

    Until then /proc shows the forking Python's command line, and the stack, reading the pid
    file, would take the process for a stale one and start a second server on the same files.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode(errors="replace")
            if marker in argv.split("\0"):
                return
        time.sleep(0.01)


def with_overrides(values: Sequence[str], overrides: Sequence[str]) -> tuple[str, ...]:
    """`KEY=JSON` dynamic config values with `overrides` on top: the last value of a key wins."""
    merged: dict[str, str] = {}
    for value in (*values, *overrides):
        key, sep, _ = value.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"dynamic config value {value!r} is not KEY=JSON")
        merged[key.strip()] = value
    return tuple(merged.values())


def _spawn_temporal(
    settings: Settings,
    pragmas: Sequence[str],
    metrics_port: int,
    dynamic_config: Sequence[str] = (),
) -> None:
    """Start the dev server as the stack would, with the bench's SQLite pragmas and its
    Prometheus metrics on `metrics_port` (how its matching service dispatched tasks).

    The stack then finds it running under its pid file and adopts it (and stops it on down).
    """
    data_dir = settings.data_dir.resolve()
    for sub in ("logs", "pids"):
        (data_dir / sub).mkdir(parents=True, exist_ok=True)
    argv = stack.dev_server_argv(
        settings, stack.temporal_binary(), pragmas=pragmas, dynamic_config=dynamic_config
    )
    argv += ["--metrics-port", str(metrics_port)]
    with (data_dir / "logs" / "temporal.log").open("ab") as log:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    _await_exec(proc, str(data_dir / "temporal.db"))
    (data_dir / "pids" / "temporal.pid").write_text(f"{proc.pid}\n")


def _spawn_sandbox_in_memory(settings: Settings, name: str, port: int, api_key: str) -> None:
    """Start a sandbox as the stack would, but keeping its state in memory, without access logs.

    The sandboxes rewrite their whole JSON state file (and fsync it) on every change, which
    costs O(charges) per refund: at bench scale that is the sandbox's cost, not the saga's.
    The state path and module name stay on the command line (after `-c`, unused) so that the
    stack recognises the process as its own, adopts it and stops it on `down`.
    """
    data_dir = settings.data_dir.resolve()
    for sub in ("logs", "pids"):
        (data_dir / sub).mkdir(parents=True, exist_ok=True)
    code = (
        "import sys\n"
        f"from sandboxes.{name} import main\n"
        "main(['--host', sys.argv[1], '--port', sys.argv[2], '--log-level', 'warning'])"
    )
    argv = [
        sys.executable,
        "-c",
        code,
        HOST,
        str(port),
        f"sandboxes.{name}",
        str(data_dir / f"{name}.json"),
    ]
    with (data_dir / "logs" / f"{name}.log").open("ab") as log:
        proc = subprocess.Popen(
            argv,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "SANDBOX_API_KEY": api_key},
            start_new_session=True,
        )
    _await_exec(proc, f"sandboxes.{name}")
    (data_dir / "pids" / f"{name}.pid").write_text(f"{proc.pid}\n")


@dataclass
class BenchStack:
    """An embedded stack of the bench's own, plus the bench's worker process."""

    settings: Settings
    data_dir: Path
    bench_worker: subprocess.Popen[bytes]
    pragmas: tuple[str, ...]
    metrics_port: int

    def pid(self, name: str) -> int:
        """The pid of a stack process (`temporal`, `worker`, `processor`, `ams`)."""
        return int((self.data_dir / "pids" / f"{name}.pid").read_text().strip())

    def worker_pid(self, variant: str) -> int:
        """The process that hosts `variant`'s workflows and activities."""
        return self.pid("worker") if variant.startswith("saga") else self.bench_worker.pid


async def _wait_pollers(
    client: Client, namespace: str, queues: Sequence[str], timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    for queue in queues:
        while True:
            response = await client.workflow_service.describe_task_queue(
                DescribeTaskQueueRequest(
                    namespace=namespace,
                    task_queue=TaskQueue(name=queue),
                    task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
                )
            )
            if response.pollers:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"no worker polls {queue} after {timeout_s:g}s")
            await asyncio.sleep(0.2)


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _install_abort_handlers(root: Path, worker: Callable[[], int | None], own_dir: bool) -> None:
    """On SIGINT/SIGTERM kill what this bench started and leave at once.

    A Ctrl-C in the middle of a wave does not unwind cleanly through the Temporal client's
    pending calls, and the processes started in their own sessions would outlive the bench.
    """

    def abort(signum: int, _frame: object) -> None:
        pid = worker()
        if pid is not None:
            _kill_group(pid)
        for pid_file in (root / "pids").glob("*.pid"):
            with contextlib.suppress(ValueError, OSError):
                _kill_group(int(pid_file.read_text().strip()))
        if own_dir:
            shutil.rmtree(root, ignore_errors=True)
        print(f"bench: stopped by signal {signum}; its stack was killed", file=sys.stderr)
        os._exit(128 + signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, abort)


@contextlib.contextmanager
def bench_stack(
    *,
    auto_approve_below_cents: int,
    pragmas: Sequence[str] = STACK_PRAGMAS,
    dynamic_config: Sequence[str] = STACK_DYNAMIC_CONFIG,
    sandbox_state: str = "memory",
    bytecode: str = "inherit",
    data_dir: Path | None = None,
    keep: bool = False,
    on_progress: Callable[[str], None] = lambda _: None,
) -> Iterator[BenchStack]:
    """Bring up a fresh stack (fresh data dir, free ports) and the bench worker; tear down."""
    # The stack's worker subprocess copies os.environ: the approval policy goes through it.
    os.environ["REFUND_AUTO_APPROVE_BELOW_CENTS"] = str(auto_approve_below_cents)
    own_dir = data_dir is None
    root = Path(tempfile.mkdtemp(prefix="refundsaga-bench-")) if data_dir is None else data_dir
    if bytecode == "cache":
        # The workflow sandbox re-imports the workflow module for every workflow run; with
        # PYTHONDONTWRITEBYTECODE and no .pyc that is a compile of its source each time.
        # A private cache dir leaves the work tree untouched.
        os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
        os.environ["PYTHONPYCACHEPREFIX"] = str(root.resolve() / "pycache")
    settings = bench_settings(root.resolve(), auto_approve_below_cents=auto_approve_below_cents)
    worker: subprocess.Popen[bytes] | None = None
    if threading.current_thread() is threading.main_thread():
        _install_abort_handlers(root, lambda: None if worker is None else worker.pid, own_dir)
    try:
        taken = {settings.temporal_port, settings.ui_port}
        taken |= {settings.processor_port, settings.ams_port}
        metrics_port = next(p for p in stack.free_ports(8) if p not in taken)
        _spawn_temporal(settings, pragmas, metrics_port, dynamic_config)
        if sandbox_state == "memory":
            _spawn_sandbox_in_memory(
                settings,
                "processor",
                settings.processor_port,
                settings.processor_api_key.get_secret_value(),
            )
            _spawn_sandbox_in_memory(
                settings, "ams", settings.ams_port, settings.ams_api_key.get_secret_value()
            )
        stack.up(settings, on_progress=on_progress, timeout_s=120)
        argv = [sys.executable, "-m", "bench.baseline", "--task-queue", BASELINE_QUEUE]
        argv += ["--bench-worker-tag", str(settings.data_dir)]
        log = (settings.data_dir / "logs" / "bench-worker.log").open("ab")
        worker = subprocess.Popen(
            argv,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_process_env(settings),
            start_new_session=True,
        )
        log.close()
        queues = [BASELINE_QUEUE, sandboxed_queue(BASELINE_QUEUE), naive_queue(BASELINE_QUEUE)]

        async def ready() -> None:
            client = await connect(settings)
            await _wait_pollers(client, settings.temporal_namespace, queues, 60)

        asyncio.run(ready())
        on_progress(f"bench worker: polling {', '.join(queues)} (pid {worker.pid})")
        yield BenchStack(settings, settings.data_dir, worker, tuple(pragmas), metrics_port)
    finally:
        if worker is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(worker.pid, signal.SIGTERM)
            try:
                worker.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()
        stack.down(settings, on_progress=on_progress)
        if own_dir and not keep:
            shutil.rmtree(root, ignore_errors=True)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


# -- seeding ---------------------------------------------------------------------------------


def seed_standard(settings: Settings, count: int) -> tuple[list[SeededPurchase], float]:
    """`count` purchases of the standard scenario through the store and the sandbox admin API.

    Returns:
        The purchases and the seconds it took (not part of any measurement).
    """
    started = time.perf_counter()
    store = OasisStore.from_url(settings.resolved_database_url)
    try:
        with httpx.Client(timeout=30.0, trust_env=False) as http:
            purchases = [
                seed_purchase(
                    store,
                    http,
                    processor_url=settings.processor_url,
                    ams_url=settings.ams_url,
                    processor_api_key=settings.processor_api_key.get_secret_value(),
                    ams_api_key=settings.ams_api_key.get_secret_value(),
                    scenario="standard",
                )
                for _ in range(count)
            ]
    finally:
        store.close()
    return purchases, time.perf_counter() - started


def refund_request(
    purchase: SeededPurchase, reason: str = "bench: duplicate purchase"
) -> RefundRequest:
    """The standard refund of a seeded purchase, as `refund start` asks it for sam."""
    return RefundRequest(purchase_id=purchase.purchase_id, reason=reason, requested_by="sam")
