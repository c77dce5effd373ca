"""Where a worker's Python time goes: py-spy samples while a wave runs, grouped by library."""

from __future__ import annotations

import contextlib
import signal
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
