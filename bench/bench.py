"""Saga throughput against a no-op baseline, side by side on an embedded stack of its own."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from temporalio.api.enums.v1 import EventType, TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client, WorkflowHandle
from temporalio.common import SearchAttributePair, TypedSearchAttributes

from bench.baseline import (
    BASELINE_SA_WORKFLOW,
    BASELINE_WORKFLOW,
    GO_SIGNAL,
    STANDARD_SAGA_ACTIVITIES,
    sandboxed_queue,
)
from console import stack
from console.operations import start_refund
from console.seed import SeededPurchase, seed_purchase
from refundsaga import search_attributes as sa
from refundsaga.contracts import RefundRequest, SagaState, SagaStatus
from refundsaga.settings import Settings
from refundsaga.store import OasisStore
from refundsaga.temporal import connect

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
HOST = "127.0.0.1"
# What console/stack.py passes to `temporal server start-dev`; other settings are started
# by the bench itself so that the comparison can be made on the same code.
STACK_PRAGMAS = stack.DEV_SERVER_PRAGMAS
STACK_DYNAMIC_CONFIG = stack.DEV_SERVER_DYNAMIC_CONFIG
# Above the standard scenario's 99.95 so that it needs no approver (REFUND_AUTO_APPROVE_...).
AUTO_APPROVE_ALL_CENTS = 1_000_000
SAGA_QUEUE = "bench-saga"
BASELINE_QUEUE = "bench-baseline"
VARIANTS = ("saga", "baseline", "baseline_sa", "baseline_sandboxed")
# A saga that never completes (NEEDS_ATTENTION) must not hang the bench.
WORKFLOW_TIMEOUT_S = 300.0
_CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- processes -------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process (its threads included), from /proc."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    # The command name may contain spaces and parentheses: fields start after the last ")".
    fields = raw.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (all cores), from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values[:8]) - idle) / _CLK_TCK


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM so the next reading is this phase's peak (Linux >= 4.0, own processes)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_mb(pid: int, key: str = "VmHWM") -> float:
    """VmHWM (peak) or VmRSS (current) of a process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} for pid {pid}")


def load_1m() -> float:
    """The machine's 1-minute load average."""
    return os.getloadavg()[0]


def wait_for_quiet(max_load: float, max_wait_s: float) -> float:
    """Wait (up to max_wait_s) for the 1-minute load to drop below max_load; return it."""
    deadline = time.monotonic() + max_wait_s
    load = load_1m()
    while load >= max_load and time.monotonic() < deadline:
        time.sleep(5)
        load = load_1m()
    return load


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


# -- the stack -------------------------------------------------------------------------------


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
    binary = Path(sys.executable).parent / "temporal"
    argv = [
        str(binary if binary.exists() else shutil.which("temporal") or "temporal"),
        "server",
        "start-dev",
        "--ip",
        HOST,
        "--port",
        str(settings.temporal_port),
        "--ui-port",
        str(settings.ui_port),
        "--db-filename",
        str(data_dir / "temporal.db"),
        "--namespace",
        settings.temporal_namespace,
        "--log-level",
        "warn",
        *sa.dev_server_flags(),
        "--ui-disable-news-fetch",
    ]
    argv += stack.dev_server_tuning(pragmas, dynamic_config)
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
        queues = [BASELINE_QUEUE, sandboxed_queue(BASELINE_QUEUE)]

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


# -- profiles -------------------------------------------------------------------------------

# Where a sampled frame's file lives -> the group its time is booked to.
_PROFILE_GROUPS = (
    ("temporalio/worker/workflow_sandbox", "temporal: workflow sandbox"),
    ("temporalio/worker/_workflow", "temporal: workflow activations"),
    ("temporalio/worker/_activity", "temporal: activity worker"),
    ("temporalio/converter", "temporal: payload conversion"),
    ("temporalio/contrib/pydantic", "temporal: payload conversion"),
    ("temporalio/", "temporal: other"),
    ("pydantic", "pydantic"),
    ("sqlalchemy", "sqlalchemy"),
    ("sqlite3", "sqlite"),
    ("httpx", "http client"),
    ("httpcore", "http client"),
    ("h11", "http client"),
    ("/workflows/", "saga workflow code"),
    ("/activities/", "saga activity code"),
    ("/refundsaga/", "refundsaga"),
    ("<frozen importlib", "imports (workflow sandbox re-imports)"),
    ("selectors.py", "event loop (waiting)"),
    ("concurrent/futures", "thread pool (waiting)"),
    ("asyncio", "asyncio"),
    ("logging", "logging"),
    ("json", "json"),
)


def _group(frame: str) -> str:
    for marker, group in _PROFILE_GROUPS:
        if marker in frame:
            return group
    return "other"


def profile_summary(raw: Path, top: int = 15) -> dict[str, Any]:
    """Self and inclusive time shares by library, and the hottest frames, of a py-spy raw file.

    Each line of the raw (collapsed) format is `frame;frame;...;frame count`, root first.
    """
    self_by_group: Counter[str] = Counter()
    incl_by_group: Counter[str] = Counter()
    self_by_frame: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack_text, _, count_text = line.rpartition(" ")
        if not stack_text or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack_text.split(";")
        total += count
        self_by_group[_group(frames[-1])] += count
        self_by_frame[frames[-1]] += count
        for group in {_group(f) for f in frames}:
            incl_by_group[group] += count

    def share(counter: Counter[str]) -> dict[str, float]:
        return {k: round(v / max(total, 1), 4) for k, v in counter.most_common()}

    return {
        "samples": total,
        "self_share_by_group": share(self_by_group),
        "inclusive_share_by_group": share(incl_by_group),
        "top_self_frames": {
            k: round(v / max(total, 1), 4) for k, v in self_by_frame.most_common(top)
        },
    }


@contextlib.contextmanager
def profiled(pid: int, out: Path | None, py_spy: str) -> Iterator[None]:
    """Sample `pid` with py-spy (raw format) while the block runs; nothing when `out` is None."""
    if out is None:
        yield
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    # --gil: only samples holding the GIL, i.e. Python actually running (the SDK's Rust core
    # threads are invisible to py-spy and show up only in the process's CPU time).
    argv = [py_spy, "record", "--format", "raw", "--gil", "--nonblocking", "-p", str(pid)]
    proc = subprocess.Popen(
        [*argv, "-o", str(out)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield
    finally:
        # SIGINT makes py-spy write what it sampled and exit.
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


# -- one wave --------------------------------------------------------------------------------


@dataclass
class Wave:
    """One variant's run of N workflows at a bounded concurrency, and what it cost."""

    variant: str
    n: int
    concurrency: int
    wall_s: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    workflow_ids: list[str] = field(default_factory=list)
    cpu_s: dict[str, float] = field(default_factory=dict)
    worker_peak_rss_mb: float = float("nan")
    history: dict[str, Any] = field(default_factory=dict)
    profile: dict[str, Any] = field(default_factory=dict)
    matching: dict[str, float] = field(default_factory=dict)

    def figures(self) -> dict[str, float]:
        """The per-wave figures that are summarised over repetitions."""
        done = max(self.n, 1)
        figures = {
            "per_s": self.n / self.wall_s if self.wall_s else float("nan"),
            "p50_ms": percentile(self.latencies_ms, 50),
            "p95_ms": percentile(self.latencies_ms, 95),
            "p99_ms": percentile(self.latencies_ms, 99),
            "errors": float(self.errors),
            "worker_peak_rss_mb": self.worker_peak_rss_mb,
        }
        for name, seconds in self.cpu_s.items():
            figures[f"{name}_cpu_s_per_wf"] = seconds / done
        # The stack's own CPU per workflow: less sensitive to other people's load than the
        # throughput, and on a CPU-bound box it is what caps the throughput.
        own = ("worker", "server", "sandboxes", "client")
        figures["own_cpu_s_per_wf"] = sum(self.cpu_s.get(k, 0.0) for k in own) / done
        for name in ("events", "workflow_tasks", "activities", "local_activities"):
            if name in self.history:
                figures[f"history_{name}"] = float(self.history[name])
        if self.matching.get("polls"):
            figures["sync_match_share"] = self.matching["sync_polls"] / self.matching["polls"]
            figures["backlog_writes_per_wf"] = self.matching["backlog_writes"] / done
        return figures


def _cpu_snapshot(bench: BenchStack, variant: str) -> dict[str, float]:
    return {
        "worker": cpu_seconds(bench.worker_pid(variant)),
        "server": cpu_seconds(bench.pid("temporal")),
        "sandboxes": cpu_seconds(bench.pid("processor")) + cpu_seconds(bench.pid("ams")),
        "client": cpu_seconds(os.getpid()),
        "machine": machine_busy_seconds(),
    }


def matching_counts(metrics_port: int) -> dict[str, float]:
    """The dev server's task dispatch so far, in the default namespace: tasks handed to a
    waiting poll (sync match) or not, and tasks written to its task backlog (then read back).

    A task with no poll waiting for it costs the server a write and a read of its database.
    """
    text = httpx.get(f"http://{HOST}:{metrics_port}/metrics", timeout=10.0).text
    counts = {"polls": 0.0, "sync_polls": 0.0, "backlog_writes": 0.0}
    for line in text.splitlines():
        if 'namespace="default"' not in line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        if name.startswith("poll_success{"):
            counts["polls"] += float(value)
        elif name.startswith("poll_success_sync{"):
            counts["sync_polls"] += float(value)
        elif name.startswith("persistence_requests{") and 'operation="CreateTasks"' in name:
            counts["backlog_writes"] += float(value)
    return counts


async def run_wave(
    bench: BenchStack,
    variant: str,
    starts: Sequence[Callable[[], Awaitable[WorkflowHandle[Any, Any]]]],
    concurrency: int,
    check: Callable[[Any], str | None],
    rate: float | None = None,
) -> Wave:
    """Start every workflow with at most `concurrency` in flight; wait for each to complete.

    With `rate`, an open loop: the i-th start is due i / rate seconds in, whatever the others
    do, so both sides of a comparison get the same offered load (still capped at
    `concurrency` in flight). Without it, a closed loop: a new start as soon as one ends.
    Latency is from just before the start call to the result, as a caller sees it.
    """
    wave = Wave(variant=variant, n=len(starts), concurrency=concurrency)
    gate = asyncio.Semaphore(concurrency)
    worker_pid = bench.worker_pid(variant)
    rss_reset = reset_peak_rss(worker_pid)

    async def one(index: int, start: Callable[[], Awaitable[WorkflowHandle[Any, Any]]]) -> None:
        if rate is not None:
            await asyncio.sleep(max(0.0, wave_start + index / rate - time.perf_counter()))
        async with gate:
            began = time.perf_counter()
            try:
                handle = await start()
                wave.workflow_ids.append(handle.id)
                result = await asyncio.wait_for(handle.result(), WORKFLOW_TIMEOUT_S)
                problem = check(result)
            except Exception as err:  # a failed workflow is a data point, not a crash
                problem = f"{type(err).__name__}: {err}"
            if problem is None:
                wave.latencies_ms.append((time.perf_counter() - began) * 1000)
            else:
                wave.errors += 1
                if len(wave.error_samples) < 5:
                    wave.error_samples.append(problem)

    dispatched = await asyncio.to_thread(matching_counts, bench.metrics_port)
    before = _cpu_snapshot(bench, variant)
    wave_start = time.perf_counter()
    await asyncio.gather(*(one(i, start) for i, start in enumerate(starts)))
    wave.wall_s = time.perf_counter() - wave_start
    after = _cpu_snapshot(bench, variant)
    now = await asyncio.to_thread(matching_counts, bench.metrics_port)
    wave.matching = {key: now[key] - dispatched[key] for key in now}
    wave.cpu_s = {name: after[name] - before[name] for name in before}
    # Everything else the machine did meanwhile: other people's test runs skew the figures.
    wave.cpu_s["foreign"] = wave.cpu_s.pop("machine") - sum(wave.cpu_s.values())
    wave.worker_peak_rss_mb = rss_mb(worker_pid) if rss_reset else float("nan")
    return wave


async def history_stats(client: Client, workflow_ids: Sequence[str], sample: int) -> dict[str, Any]:
    """Events, workflow tasks and activities per workflow, over a sample of the wave."""
    chosen = list(workflow_ids)[:sample]
    per_workflow: list[Counter[str]] = []
    gate = asyncio.Semaphore(8)

    async def one(workflow_id: str) -> None:
        async with gate:
            history = await client.get_workflow_handle(workflow_id).fetch_history()
        per_workflow.append(Counter(EventType.Name(e.event_type) for e in history.events))

    await asyncio.gather(*(one(w) for w in chosen))
    if not per_workflow:
        return {}

    def median_of(key: str | None) -> float:
        return statistics.median(
            sum(c.values()) if key is None else c.get(key, 0) for c in per_workflow
        )

    return {
        "sampled": len(per_workflow),
        "events": median_of(None),
        "events_max": max(sum(c.values()) for c in per_workflow),
        "workflow_tasks": median_of("EVENT_TYPE_WORKFLOW_TASK_COMPLETED"),
        "activities": median_of("EVENT_TYPE_ACTIVITY_TASK_SCHEDULED"),
        "local_activities": median_of("EVENT_TYPE_MARKER_RECORDED"),
        "event_types": {
            name.removeprefix("EVENT_TYPE_").lower(): count
            for name, count in sorted(per_workflow[0].items())
        },
    }


# -- starting each variant -------------------------------------------------------------------


def refund_request(purchase: SeededPurchase) -> RefundRequest:
    return RefundRequest(
        purchase_id=purchase.purchase_id, reason="bench: duplicate purchase", requested_by="sam"
    )


def _saga_check(result: Any) -> str | None:
    if not isinstance(result, SagaStatus):
        return f"unexpected result {result!r}"
    if result.state != SagaState.COMPLETED:
        return f"{result.workflow_id} ended {result.state.value}: {result.error}"
    return None


def _baseline_check(steps: int) -> Callable[[Any], str | None]:
    def check(result: Any) -> str | None:
        return None if result == steps else f"baseline returned {result!r}"

    return check


_run_counter = 0


async def run_variant(
    client: Client,
    bench: BenchStack,
    variant: str,
    purchases: list[SeededPurchase],
    *,
    n: int,
    concurrency: int,
    baseline_steps: int,
    history_sample: int,
    profile: Path | None = None,
    py_spy: str = "py-spy",
    rate: float | None = None,
) -> Wave:
    """One wave of `variant`: the saga, the baseline, or the baseline with search attributes."""
    global _run_counter
    _run_counter += 1
    run = _run_counter
    starts: list[Callable[[], Awaitable[WorkflowHandle[Any, Any]]]]
    if variant in ("baseline", "baseline_sandboxed"):
        queue = BASELINE_QUEUE if variant == "baseline" else sandboxed_queue(BASELINE_QUEUE)

        def baseline(i: int) -> Callable[[], Awaitable[WorkflowHandle[Any, Any]]]:
            # Signal-with-start: one RPC like the saga's start, and the one signal the
            # baseline waits for arrives with it.
            return lambda: client.start_workflow(
                BASELINE_WORKFLOW,
                baseline_steps,
                id=f"{variant}-{run}-{i}",
                task_queue=queue,
                start_signal=GO_SIGNAL,
            )

        starts = [baseline(i) for i in range(n)]
        check = _baseline_check(baseline_steps)
    elif variant == "baseline_sa":
        attributes = TypedSearchAttributes(
            [
                SearchAttributePair(sa.REFUND_STATE, "STARTED"),
                SearchAttributePair(sa.WAITING_FOR, "none"),
                SearchAttributePair(sa.PURCHASE_ID, "0"),
                SearchAttributePair(sa.REQUESTED_BY, "bench"),
            ]
        )

        def baseline_sa(i: int) -> Callable[[], Awaitable[WorkflowHandle[Any, Any]]]:
            return lambda: client.start_workflow(
                BASELINE_SA_WORKFLOW,
                baseline_steps,
                id=f"baseline-sa-{run}-{i}",
                task_queue=BASELINE_QUEUE,
                start_signal=GO_SIGNAL,
                search_attributes=attributes,
            )

        starts = [baseline_sa(i) for i in range(n)]
        check = _baseline_check(baseline_steps)
    elif variant == "saga":
        saga_settings = bench.settings

        def saga(p: SeededPurchase) -> Callable[[], Awaitable[WorkflowHandle[Any, Any]]]:
            return lambda: start_refund(client, saga_settings, refund_request(p))

        starts = [saga(p) for p in purchases[:n]]
        check = _saga_check
    else:
        raise ValueError(f"unknown variant {variant}")
    with profiled(bench.worker_pid(variant), profile, py_spy):
        wave = await run_wave(bench, variant, starts, concurrency, check, rate)
    if profile is not None and profile.exists():
        wave.profile = profile_summary(profile)
    wave.history = await history_stats(client, wave.workflow_ids, history_sample)
    return wave


# -- summary ---------------------------------------------------------------------------------


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max of a figure over the repetitions."""
    clean = [v for v in values if v == v]  # drop NaN
    if not clean:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan")}
    return {"median": statistics.median(clean), "min": min(clean), "max": max(clean)}


def build_report(
    waves: list[list[Wave]], config: dict[str, Any], seeding: dict[str, float]
) -> dict[str, Any]:
    """The JSON report: headline medians at the top, every figure as median/min/max below."""
    variants = [w.variant for w in waves[0]]
    # Each repetition's figures, per variant.
    by_rep = [{w.variant: w.figures() for w in rep} for rep in waves]
    figures: dict[str, dict[str, dict[str, float]]] = {}
    for variant in variants:
        per_rep = [rep[variant] for rep in by_rep]
        figures[variant] = {key: summarize([f[key] for f in per_rep]) for key in per_rep[0]}

    def ratio(key: str, baseline: str) -> dict[str, float]:
        # Per repetition, then the median: each pair ran back to back on one server.
        return summarize([rep["saga"][key] / rep[baseline][key] for rep in by_rep])

    ratios: dict[str, dict[str, float]] = {}
    if "saga" in variants and "baseline" in variants:
        ratios["throughput_ratio"] = ratio("per_s", "baseline")
        ratios["p95_ratio"] = ratio("p95_ms", "baseline")
        ratios["own_cpu_ratio"] = ratio("own_cpu_s_per_wf", "baseline")
    if "saga" in variants and "baseline_sandboxed" in variants:
        # The same naive shape in the SDK's sandbox, its default: what a team that did not
        # measure would run.
        ratios["throughput_ratio_vs_sandboxed_baseline"] = ratio("per_s", "baseline_sandboxed")

    def med(variant: str, key: str) -> float:
        return figures.get(variant, {}).get(key, {}).get("median", float("nan"))

    report: dict[str, Any] = {
        "saga_per_s": med("saga", "per_s"),
        "baseline_per_s": med("baseline", "per_s"),
        "throughput_ratio": ratios.get("throughput_ratio", {}).get("median", float("nan")),
        "saga_p50_ms": med("saga", "p50_ms"),
        "saga_p95_ms": med("saga", "p95_ms"),
        "saga_p99_ms": med("saga", "p99_ms"),
        "baseline_p50_ms": med("baseline", "p50_ms"),
        "baseline_p95_ms": med("baseline", "p95_ms"),
        "baseline_p99_ms": med("baseline", "p99_ms"),
        "p95_ratio": ratios.get("p95_ratio", {}).get("median", float("nan")),
        "throughput_ratio_vs_sandboxed_baseline": ratios.get(
            "throughput_ratio_vs_sandboxed_baseline", {}
        ).get("median", float("nan")),
        "history_events_per_saga": med("saga", "history_events"),
        "workflow_tasks_per_saga": med("saga", "history_workflow_tasks"),
        "saga_worker_cpu_s_per_saga": med("saga", "worker_cpu_s_per_wf"),
        "saga_server_cpu_s_per_saga": med("saga", "server_cpu_s_per_wf"),
        "baseline_worker_cpu_s_per_wf": med("baseline", "worker_cpu_s_per_wf"),
        "baseline_server_cpu_s_per_wf": med("baseline", "server_cpu_s_per_wf"),
        "saga_worker_peak_rss_mb": med("saga", "worker_peak_rss_mb"),
        # Not a median: every error of every repetition and variant counts.
        "errors": sum(w.errors for rep in waves for w in rep),
    }
    report |= {
        "config": config,
        "seeding": seeding,
        "ratios": ratios,
        "figures": figures,
        "repetitions": [
            [
                {
                    "variant": w.variant,
                    **w.figures(),
                    "wall_s": w.wall_s,
                    "cpu_s": w.cpu_s,
                    "matching": w.matching,
                    "error_samples": w.error_samples,
                    "history": w.history,
                    **({"profile": w.profile} if w.profile else {}),
                }
                for w in rep
            ]
            for rep in waves
        ],
    }
    return report


def jsonable(value: Any) -> Any:
    """NaN (a figure that could not be measured) as null: JSON has no NaN."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def write_report(result: dict[str, Any], *, load_before: float, json_out: Path) -> int:
    """Stamp the load before and after, print the report as JSON, write it; the exit code
    (1 when the run saw errors)."""
    result["load_1m_before"] = load_before
    result["load_1m_after"] = load_1m()
    text = json.dumps(jsonable(result), indent=2)
    print(text)
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(text + "\n")
    print(f"wrote {json_out}")
    return 0 if result["errors"] == 0 else 1


def _fmt(value: float, digits: int = 1) -> str:
    return "-" if value != value else f"{value:,.{digits}f}"


def print_table(report: dict[str, Any]) -> None:
    """The figures as a table: median [min .. max] over the repetitions, per variant."""
    figures: dict[str, dict[str, dict[str, float]]] = report["figures"]
    variants = list(figures)
    rows = [
        ("per_s", "completed / s", 2),
        ("p50_ms", "latency p50 (ms)", 0),
        ("p95_ms", "latency p95 (ms)", 0),
        ("p99_ms", "latency p99 (ms)", 0),
        ("history_events", "history events / wf", 0),
        ("history_workflow_tasks", "workflow tasks / wf", 0),
        ("history_activities", "activities / wf", 0),
        ("history_local_activities", "markers / wf (local act., patch)", 0),
        ("worker_cpu_s_per_wf", "worker CPU s / wf", 4),
        ("server_cpu_s_per_wf", "server CPU s / wf", 4),
        ("sandboxes_cpu_s_per_wf", "sandboxes CPU s / wf", 4),
        ("client_cpu_s_per_wf", "bench client CPU s / wf", 4),
        ("own_cpu_s_per_wf", "stack CPU s / wf (sum)", 4),
        ("foreign_cpu_s_per_wf", "other processes CPU s / wf", 4),
        ("worker_peak_rss_mb", "worker peak RSS (MiB)", 0),
        ("sync_match_share", "polled tasks sync-matched", 2),
        ("backlog_writes_per_wf", "server backlog writes / wf", 1),
        ("errors", "errors", 0),
    ]
    width = 34
    print(f"{'figure':<28}" + "".join(f"{v:>{width}}" for v in variants))
    for key, label, digits in rows:
        cells = []
        for variant in variants:
            f = figures[variant].get(key)
            if f is None:
                cells.append(f"{'-':>{width}}")
                continue
            text = (
                f"{_fmt(f['median'], digits)} "
                f"[{_fmt(f['min'], digits)} .. {_fmt(f['max'], digits)}]"
            )
            cells.append(f"{text:>{width}}")
        print(f"{label:<28}" + "".join(cells))
    # Names longer than the column still get a space before their figure.
    for name, r in report["ratios"].items():
        label = f"{name} "
        print(f"{label:<28}{_fmt(r['median'], 2)} [{_fmt(r['min'], 2)} .. {_fmt(r['max'], 2)}]")
    print(f"errors (all repetitions)    {report['errors']}")


# -- main ------------------------------------------------------------------------------------


def run_bench(
    *,
    n: int,
    concurrency: int,
    reps: int,
    variants: Sequence[str],
    pragmas: Sequence[str] = STACK_PRAGMAS,
    dynamic_config: Sequence[str] = STACK_DYNAMIC_CONFIG,
    history_sample: int = 50,
    baseline_steps: int = STANDARD_SAGA_ACTIVITIES,
    profile_dir: Path | None = None,
    py_spy: str = "py-spy",
    sandbox_state: str = "memory",
    bytecode: str = "inherit",
    rate: float | None = None,
    on_progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Bring up a stack, run `reps` repetitions of every variant back to back, tear down."""
    load_before = load_1m()
    sagas = [v for v in variants if not v.startswith("baseline")]
    with bench_stack(
        auto_approve_below_cents=AUTO_APPROVE_ALL_CENTS,
        pragmas=pragmas,
        dynamic_config=dynamic_config,
        sandbox_state=sandbox_state,
        bytecode=bytecode,
        on_progress=lambda line: on_progress(f"  stack: {line}"),
    ) as bench:
        total = n * reps * len(sagas)
        on_progress(f"seeding {total} standard purchases ...")
        purchases, seed_s = seed_standard(bench.settings, total)
        on_progress(f"seeded {total} in {seed_s:.1f}s ({total / max(seed_s, 1e-9):.0f}/s)")
        pool = iter(purchases)

        async def measure() -> list[list[Wave]]:
            client = await connect(bench.settings)
            waves: list[list[Wave]] = []
            for rep in range(reps):
                # Rotate the order so that neither side always runs on a warmer server.
                order = list(variants[rep % len(variants) :]) + list(
                    variants[: rep % len(variants)]
                )
                rep_waves = []
                for variant in order:
                    batch = [next(pool) for _ in range(n)] if variant in sagas else []
                    wave = await run_variant(
                        client,
                        bench,
                        variant,
                        batch,
                        n=n,
                        concurrency=concurrency,
                        baseline_steps=baseline_steps,
                        history_sample=history_sample,
                        # The first repetition only: sampling costs the worker a little CPU.
                        profile=(
                            profile_dir / f"{variant}.raw.txt"
                            if profile_dir is not None and rep == 0
                            else None
                        ),
                        py_spy=py_spy,
                        rate=rate,
                    )
                    f = wave.figures()
                    on_progress(
                        f"rep {rep + 1}/{reps} {variant:<10} {f['per_s']:6.2f}/s "
                        f"p95 {f['p95_ms']:7.0f} ms  errors {wave.errors}  "
                        f"load {load_1m():.2f}"
                        + (f"  e.g. {wave.error_samples[0]}" if wave.error_samples else "")
                    )
                    rep_waves.append(wave)
                waves.append(rep_waves)
            return waves

        waves = asyncio.run(measure())
        processor_state = bench.data_dir / "processor.json"
        sandbox_state_mb = (
            processor_state.stat().st_size / 2**20 if processor_state.exists() else 0.0
        )
    config = {
        "n": n,
        "concurrency": concurrency,
        "rate_per_s": rate,
        "reps": reps,
        "variants": list(variants),
        "baseline_activities": baseline_steps,
        "baseline_signal": "signal-with-start",
        "temporal_sqlite_pragmas": list(pragmas),
        "temporal_dynamic_config": list(dynamic_config),
        "auto_approve_below_cents": AUTO_APPROVE_ALL_CENTS,
        "cpus": os.cpu_count(),
        "load_1m_before": load_before,
        "load_1m_after": load_1m(),
        "sandbox_state": sandbox_state,
        "bytecode": bytecode,
        "python_dont_write_bytecode": bool(os.environ.get("PYTHONDONTWRITEBYTECODE")),
        "processor_sandbox_state_mb": sandbox_state_mb,
        "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return build_report(waves, config, {"purchases": total, "seconds": seed_s})


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m bench.bench --n 500 [--concurrency C] [--reps 3] [--json-out PATH]`."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench",
        description="RefundSaga throughput and latency against a no-op baseline, same stack.",
    )
    parser.add_argument("--n", type=int, default=500, help="workflows per variant and rep")
    parser.add_argument("--concurrency", type=int, default=20, help="workflows in flight")
    parser.add_argument(
        "--rate",
        type=float,
        default=None,
        help="open loop: start this many workflows a second (same offered load for every "
        "variant; --concurrency still caps those in flight); default: closed loop",
    )
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--variants",
        default="saga,baseline,baseline_sandboxed",
        help=f"comma-separated, from {', '.join(VARIANTS)}",
    )
    parser.add_argument(
        "--sqlite-pragmas",
        default=",".join(STACK_PRAGMAS),
        help="the dev server's --sqlite-pragma values, comma-separated; '' for none",
    )
    parser.add_argument(
        "--dynamic-config",
        action="append",
        metavar="KEY=JSON",
        help="a --dynamic-config-value for the dev server (repeatable), e.g. "
        "system.enableActivityEagerExecution=true, on top of the stack's (one for a key the "
        "stack sets replaces the stack's value)",
    )
    parser.add_argument("--history-sample", type=int, default=50)
    parser.add_argument("--baseline-activities", type=int, default=STANDARD_SAGA_ACTIVITIES)
    parser.add_argument("--json-out", type=Path, default=RESULTS / "latest.json")
    parser.add_argument(
        "--max-load",
        type=float,
        default=None,
        help="wait (up to --max-wait s) for the 1-minute load to drop below this first",
    )
    parser.add_argument("--max-wait", type=float, default=300)
    parser.add_argument(
        "--profile-dir",
        type=Path,
        default=None,
        help="sample each variant's worker with py-spy in the first repetition, raw files here",
    )
    parser.add_argument("--py-spy", default=shutil.which("py-spy") or "py-spy")
    parser.add_argument(
        "--sandbox-state",
        choices=("memory", "file"),
        default="memory",
        help="file: the sandboxes as the stack runs them (whole JSON state rewritten per change)",
    )
    parser.add_argument(
        "--bytecode",
        choices=("inherit", "cache"),
        default="inherit",
        help="cache: let the workers write and use .pyc files (in the data dir) even when "
        "PYTHONDONTWRITEBYTECODE is set",
    )
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - set(VARIANTS)
    if unknown or not variants:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    try:
        dynamic_config = with_overrides(STACK_DYNAMIC_CONFIG, args.dynamic_config or ())
    except ValueError as err:
        parser.error(str(err))
    if args.max_load is not None:
        print(f"load {wait_for_quiet(args.max_load, args.max_wait):.2f}")
    if load_1m() > 1.5:
        print(f"note: 1-minute load is {load_1m():.2f}; figures may be skewed", file=sys.stderr)
    pragmas = tuple(p.strip() for p in args.sqlite_pragmas.split(",") if p.strip())
    report = run_bench(
        n=args.n,
        concurrency=args.concurrency,
        reps=args.reps,
        variants=variants,
        pragmas=pragmas,
        dynamic_config=dynamic_config,
        history_sample=args.history_sample,
        baseline_steps=args.baseline_activities,
        profile_dir=args.profile_dir,
        py_spy=args.py_spy,
        sandbox_state=args.sandbox_state,
        bytecode=args.bytecode,
        rate=args.rate,
    )
    print_table(report)
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(jsonable(report), indent=2, default=str) + "\n")
    print(f"wrote {args.json_out}")
    return 0 if report["errors"] == 0 else 1


if __name__ == "__main__":
    from refundsaga.temporal import run_and_exit

    run_and_exit(lambda: main())
