"""What the bench measures: CPU and memory from /proc, the machine's load, one wave of
workflows with its latencies and costs, histories, and medians and percentiles over them."""

from __future__ import annotations

import asyncio
import math
import os
import statistics
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowHandle

from bench.lib.actions import actions_from_history
from bench.lib.stack import HOST, BenchStack

# A saga that never completes (NEEDS_ATTENTION) must not hang the bench.
WORKFLOW_TIMEOUT_S = 300.0
_CLK_TCK = os.sysconf("SC_CLK_TCK")


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


def wait_if_asked(max_load: float | None, max_wait_s: float) -> None:
    """With a `max_load`, wait for a quiet machine first and say how quiet it got."""
    if max_load is not None:
        print(f"load {wait_for_quiet(max_load, max_wait_s):.2f}")


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max of a figure over the repetitions."""
    clean = [v for v in values if v == v]  # drop NaN
    if not clean:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan")}
    return {"median": statistics.median(clean), "min": min(clean), "max": max(clean)}


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
    # Queries the bench sent to learn the outcome (a polling caller): billable, not in history.
    queries: int = 0
    # Calls the processor sandbox logged under /v1 during the wave; None: not counted.
    processor_calls: int | None = None

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
        # What serves the workflows, the bench's caller left out (issue 22's stack CPU).
        stack = ("worker", "server", "sandboxes")
        figures["stack_cpu_s_per_wf"] = sum(self.cpu_s.get(k, 0.0) for k in stack) / done
        for name in ("events", "workflow_tasks", "activities", "local_activities", "actions"):
            if name in self.history:
                figures[f"history_{name}"] = float(self.history[name])
        figures["queries_per_wf"] = self.queries / done
        if "actions" in self.history:
            figures["actions_per_wf"] = float(self.history["actions"]) + self.queries / done
        if self.processor_calls is not None:
            completed = self.n - self.errors
            figures["processor_calls_per_wf"] = (
                self.processor_calls / completed if completed else float("nan")
            )
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
    wait: Callable[[WorkflowHandle[Any, Any]], Awaitable[Any]] | None = None,
) -> Wave:
    """Start every workflow with at most `concurrency` in flight; wait for each to complete.

    With `rate`, an open loop: the i-th start is due i / rate seconds in, whatever the others
    do, so both sides of a comparison get the same offered load (still capped at
    `concurrency` in flight). Without it, a closed loop: a new start as soon as one ends.
    Latency is from just before the start call to the result, as a caller sees it; `wait`
    is how the caller learns it (default: the workflow's result).
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
                outcome = handle.result() if wait is None else wait(handle)
                result = await asyncio.wait_for(outcome, WORKFLOW_TIMEOUT_S)
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
    """Events, workflow tasks, activities and billable Actions per workflow, over a sample of
    the wave."""
    chosen = list(workflow_ids)[:sample]
    per_workflow: list[Counter[str]] = []
    actions: list[Counter[str]] = []
    gate = asyncio.Semaphore(8)

    async def one(workflow_id: str) -> None:
        async with gate:
            history = await client.get_workflow_handle(workflow_id).fetch_history()
        per_workflow.append(Counter(EventType.Name(e.event_type) for e in history.events))
        actions.append(actions_from_history(history))

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
        "actions": statistics.median(sum(a.values()) for a in actions),
        "actions_max": max(sum(a.values()) for a in actions),
        "actions_by_kind": dict(sorted(actions[0].items())),
        "event_types": {
            name.removeprefix("EVENT_TYPE_").lower(): count
            for name, count in sorted(per_workflow[0].items())
        },
    }
