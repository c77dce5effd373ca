"""A chaos run's knobs, its private stack's settings and policy, and its progress lines."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TextIO

from pydantic import SecretStr

from console import stack
from refundsaga.settings import SANDBOX_AMS_KEY, SANDBOX_PROCESSOR_KEY, Settings
from reliability import faults as ext

__all__ = [
    "APPROVERS",
    "POLICY_ENV",
    "ChaosConfig",
    "Reporter",
    "chaos_settings",
    "policy_environment",
]

APPROVERS = ("alice", "bob", "carol")
DUAL_APPROVAL_CENTS = 50_000
TASK_QUEUE = "refund-chaos"
# Client timeouts below the longest hang, so hung requests end both ways: some as the
# sandbox's 504 after `hang_ms`, some as a client-side timeout.
CLIENT_TIMEOUT_S = 3
# The worker reads its settings from its environment, not from the Settings object the stack
# is started with, so the policy travels through os.environ (set only while the harness runs).
# Approval never expires during a run; reminders and the AMS escalation fire within minutes so
# their timers are exercised too.
POLICY_ENV = {
    "REFUND_APPROVERS": ",".join(APPROVERS),
    "REFUND_DUAL_APPROVAL_CENTS": str(DUAL_APPROVAL_CENTS),
    "REFUND_AUTO_APPROVE_BELOW_CENTS": "0",
    # ISO 8601: these settings refuse a plain number of seconds given as a string.
    "REFUND_APPROVAL_TIMEOUT": "PT6H",
    "REFUND_APPROVAL_REMINDER_EVERY": "PT30S",
    "REFUND_AMS_REMINDER_EVERY": "PT15S",
    "REFUND_AMS_ESCALATE_AFTER": "PT30S",
    "REFUND_PROCESSOR_TIMEOUT_S": str(CLIENT_TIMEOUT_S),
    "REFUND_AMS_TIMEOUT_S": str(CLIENT_TIMEOUT_S),
    "REFUND_APPROVER_PUBLIC_KEYS": "{}",
    "REFUND_LOG_FORMAT": "json",
}
# The reconciliation sweep every few seconds, not every 10 minutes: a dropped webhook is then
# made up for within the run. Its overlap re-reads a minute: the sandbox shows every object at
# once, and a shorter window keeps each sweep to a few pages.
SWEEP_EVERY_S = 15.0
SWEEP_OVERLAP = timedelta(minutes=1)


@dataclass(frozen=True)
class ChaosConfig:
    """One run's knobs; everything random is drawn from `seed`."""

    n: int
    seed: int
    concurrency: int = 30
    kills: int | None = None
    resets: int | None = None
    prunes: int = 2
    outage_s: float = 150.0
    reject_rate: float = 0.12
    timeout_s: float | None = None
    data_dir: Path | None = None
    keep: bool = False
    webhook_faults: bool = True
    outside_share: float = 0.1
    late_failures: int | None = None
    receiver_kills: int = 1
    sweep_every_s: float = SWEEP_EVERY_S

    @property
    def planned_kills(self) -> int:
        return self.kills if self.kills is not None else max(2, round(self.n / 50))

    @property
    def planned_late_failures(self) -> int:
        """About one saga in a hundred, at least one, unless the run says how many."""
        if self.late_failures is not None:
            return self.late_failures
        return max(1, round(self.n / 100))

    @property
    def planned_resets(self) -> int:
        return ext.planned_resets(self.n, self.resets)

    @property
    def budget_s(self) -> float:
        if self.timeout_s is not None:
            return self.timeout_s
        return 240 + self.outage_s + 3 * self.n


def chaos_settings(data_dir: Path, *, sweep_every_s: float = SWEEP_EVERY_S) -> Settings:
    """Settings of a private stack: its own data dir, free ports, the sandbox keys, and a
    reconciliation sweep every `sweep_every_s` seconds."""
    return stack.private_settings(
        data_dir,
        database_url=f"sqlite:///{(data_dir / 'oasis.db').resolve()}",
        processor_api_key=SecretStr(SANDBOX_PROCESSOR_KEY),
        ams_api_key=SecretStr(SANDBOX_AMS_KEY),
        task_queue=TASK_QUEUE,
        approvers=list(APPROVERS),
        dual_approval_cents=DUAL_APPROVAL_CENTS,
        auto_approve_below_cents=0,
        processor_timeout_s=CLIENT_TIMEOUT_S,
        ams_timeout_s=CLIENT_TIMEOUT_S,
        sweep_every=timedelta(seconds=sweep_every_s),
        sweep_overlap=SWEEP_OVERLAP,
    )


@contextlib.contextmanager
def policy_environment() -> Iterator[None]:
    """Set POLICY_ENV for the worker processes the stack spawns meanwhile, then restore."""
    saved = {name: os.environ.get(name) for name in POLICY_ENV}
    os.environ.update(POLICY_ENV)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class Reporter:
    """Progress lines with the time since the start, on stderr."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.started = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def __call__(self, message: str) -> None:
        print(f"[{self.elapsed():6.1f}s] {message}", file=self.stream, flush=True)
