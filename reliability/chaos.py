"""Chaos harness: refund sagas on a private stack under faults, kills and restarts, then checks."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO, TypeVar, cast

import httpx
from pydantic import SecretStr
from sqlalchemy import create_engine, text
from temporalio.client import Client, WorkflowExecutionDescription, WorkflowExecutionStatus
from temporalio.runtime import Runtime, TelemetryConfig, TelemetryFilter

from console import operations as ops
from console import stack
from console.seed import SCENARIOS, Scenario, SeededPurchase, seed_purchase
from refundsaga import search_attributes as sa
from refundsaga.contracts import AmsConfirmation, ApprovalDecision, RefundRequest, Resolution
from refundsaga.logs import core_logging
from refundsaga.settings import SANDBOX_AMS_KEY, SANDBOX_PROCESSOR_KEY, Settings
from refundsaga.store import OasisStore
from refundsaga.temporal import connect, run_and_exit
from reliability import faults as ext
from reliability.faults import (
    FAULT_KINDS,
    OUTAGE,
    PROFILES,
    ProfileWindow,
    PruneRecord,
    ResetRecord,
    endpoint,
    fault_counts,
    sandbox_admin,
)

__all__ = [
    "ChaosConfig",
    "Invariant",
    "LedgerRow",
    "ProcessorRefundFact",
    "RestartRecord",
    "RunRecord",
    "SagaFacts",
    "SagaPlan",
    "SagaRun",
    "build_report",
    "check_chaos",
    "check_invariants",
    "check_restarts",
    "endpoint",
    "format_table",
    "main",
    "run_chaos",
]

T = TypeVar("T")

REQUESTER = "sam"
APPROVERS = ("alice", "bob", "carol")
OPERATOR = "olivia"
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
PROCESSES = ("temporal", "processor", "ams", "worker")
COUNTED_STATUSES = ("succeeded", "pending", "requires_action")
POLL_S = 1.0
MAX_RESOLUTIONS = 5


# -- what the harness asked for, what it found, and the checks ------------------------------


@dataclass(frozen=True)
class SagaPlan:
    """One saga as the harness plans it: the seeded purchase and what people will decide."""

    index: int
    scenario: str
    purchase_id: int
    user_id: int
    product_id: int
    charge_id: str
    purchase_cents: int
    partial_cents: int | None
    reject: bool
    approvers: tuple[str, ...]
    entitlement_source: str
    ams_member_id: str | None
    ams_product_code: str | None
    progress_seeded: int

    @property
    def workflow_id(self) -> str:
        return ops.workflow_id_for(self.purchase_id)

    @property
    def expected_state(self) -> str:
        return "REJECTED" if self.reject else "COMPLETED"

    @property
    def full(self) -> bool:
        return self.partial_cents is None

    @property
    def revokes(self) -> bool:
        """A completed full refund revokes progress and entitlement; nothing else does."""
        return self.full and not self.reject

    @property
    def asked_cents(self) -> int:
        """The money the saga itself must move at the processor."""
        if self.reject or self.scenario == "already_refunded":
            return 0
        return self.purchase_cents if self.partial_cents is None else self.partial_cents

    @property
    def external_cents(self) -> int:
        """The money refunded outside OASIS before the saga started."""
        return self.purchase_cents if self.scenario == "already_refunded" else 0

    @property
    def ledger_cents(self) -> int:
        """What the OASIS ledger must show afterwards."""
        return 0 if self.reject else self.asked_cents + self.external_cents


@dataclass(frozen=True)
class ProcessorRefundFact:
    refund_id: str
    amount_cents: int
    status: str
    workflow_id: str | None
    """From the refund's metadata: the saga that made it; None for refunds made elsewhere."""


@dataclass(frozen=True)
class LedgerRow:
    processor_refund_id: str
    amount_cents: int
    status: str
    source: str


@dataclass(frozen=True)
class SagaFacts:
    """What the processor, the store and the AMS hold for one saga after the run."""

    end_state: str | None
    error: str | None = None
    saga_ams_state: str | None = None
    processor_refunds: tuple[ProcessorRefundFact, ...] = ()
    processor_refunded_cents: int = 0
    ledger_refunded_cents: int = 0
    purchase_status: str = "active"
    ledger_rows: tuple[LedgerRow, ...] = ()
    archived: int = 0
    progress_left: int = 0
    ams_entitlement: str | None = None
    """`active`, `removed`, or None when the buyer has no AMS entitlement to the product."""


@dataclass(frozen=True)
class RestartRecord:
    """One `stack.up` after the harness stopped something: what was down, what restarted."""

    killed: str
    down_before: tuple[str, ...]
    restarted: tuple[str, ...]
    at_s: float


@dataclass
class Invariant:
    """One property of the run; it holds when it was checked at least once and never broke."""

    name: str
    description: str
    checked: int = 0
    breaches: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        # A check that looked at nothing proves nothing: it does not count as held.
        return self.checked > 0 and not self.breaches

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def _money(refunds: Sequence[ProcessorRefundFact]) -> str:
    return ", ".join(f"{r.refund_id} {r.amount_cents} {r.status}" for r in refunds) or "none"


def check_invariants(outcomes: Sequence[tuple[SagaPlan, SagaFacts]]) -> list[Invariant]:
    """Check each saga's end and its traces at the processor, in the store and in the AMS.

    Args:
        outcomes: Each saga's plan with the facts found after the run.

    Returns:
        The five per-saga invariants, each with the sagas that broke it.
    """
    ends = Invariant("end_states", "every saga reached its expected end state")
    money = Invariant(
        "processor_refunds", "per charge, the processor refunded what was asked, no duplicate"
    )
    ledger = Invariant(
        "ledger_matches_processor", "per charge, the OASIS ledger equals the processor"
    )
    progress = Invariant(
        "progress_archived", "every deleted progress record has its archived snapshot"
    )
    entitlements = Invariant(
        "entitlements", "AMS entitlements removed exactly for the sagas that asked"
    )
    for plan, facts in outcomes:
        who = f"{plan.workflow_id} ({plan.scenario}{', rejected' if plan.reject else ''})"

        ends.checked += 1
        if facts.end_state != plan.expected_state:
            ends.breaches.append(
                f"{who}: ended {facts.end_state or 'not at all'}, expected {plan.expected_state}"
                + (f"; error: {facts.error}" if facts.error else "")
            )

        money.checked += 1
        counted = [r for r in facts.processor_refunds if r.status in COUNTED_STATUSES]
        own = [r for r in counted if r.workflow_id == plan.workflow_id]
        others = [r for r in counted if r.workflow_id != plan.workflow_id]
        problems: list[str] = []
        if plan.asked_cents == 0 and own:
            problems.append(f"refunds by the saga, none expected: {_money(own)}")
        if plan.asked_cents > 0:
            if len(own) > 1:
                problems.append(f"duplicate refund: {len(own)} refunds by the saga: {_money(own)}")
            elif not own:
                problems.append(f"no refund by the saga, expected {plan.asked_cents}")
            elif own[0].amount_cents != plan.asked_cents or own[0].status != "succeeded":
                problems.append(f"refund {_money(own)}, expected {plan.asked_cents} succeeded")
        if sum(r.amount_cents for r in others) != plan.external_cents:
            problems.append(
                f"refunds not by the saga: {_money(others)}, expected {plan.external_cents}"
            )
        expected_total = plan.asked_cents + plan.external_cents
        if facts.processor_refunded_cents != expected_total:
            problems.append(
                f"charge {plan.charge_id} amount_refunded {facts.processor_refunded_cents}, "
                f"expected {expected_total}"
            )
        money.breaches.extend(f"{who}: {p}" for p in problems)

        ledger.checked += 1
        problems = []
        rows = {
            (r.processor_refund_id, r.amount_cents)
            for r in facts.ledger_rows
            if r.status != "failed"
        }
        held = {(r.refund_id, r.amount_cents) for r in counted}
        expected_rows = set() if plan.reject else held
        if rows != expected_rows:
            problems.append(
                f"ledger rows {sorted(rows)} but the processor holds {sorted(held)}"
                + (" (rejected: the ledger must stay empty)" if plan.reject else "")
            )
        if facts.ledger_refunded_cents != plan.ledger_cents:
            problems.append(
                f"purchase.refunded_cents {facts.ledger_refunded_cents}, expected "
                f"{plan.ledger_cents} (processor: {facts.processor_refunded_cents})"
            )
        status = "active" if plan.reject else ("refunded" if plan.full else "partially_refunded")
        if facts.purchase_status != status:
            problems.append(f"purchase status {facts.purchase_status}, expected {status}")
        ledger.breaches.extend(f"{who}: {p}" for p in problems)

        progress.checked += 1
        archived, left = (plan.progress_seeded, 0) if plan.revokes else (0, plan.progress_seeded)
        if (facts.archived, facts.progress_left) != (archived, left):
            progress.breaches.append(
                f"{who}: {facts.archived} archived / {facts.progress_left} left, expected "
                f"{archived} archived / {left} left of {plan.progress_seeded} seeded"
            )

        entitlements.checked += 1
        expected_ams: str | None = None
        if plan.entitlement_source == "ams":
            expected_ams = "removed" if plan.revokes else "active"
        elif plan.entitlement_source == "ams_manual":
            # No integration: the saga must not call the AMS; a person removes it and confirms.
            expected_ams = "active"
        if facts.ams_entitlement != expected_ams:
            entitlements.breaches.append(
                f"{who}: AMS entitlement {facts.ams_entitlement}, expected {expected_ams}"
            )
        manual = plan.entitlement_source == "ams_manual" and plan.revokes
        if manual and facts.saga_ams_state != "confirmed":
            entitlements.breaches.append(
                f"{who}: manual AMS task {facts.saga_ams_state}, expected confirmed"
            )
    return [ends, money, ledger, progress, entitlements]


def check_restarts(restarts: Sequence[RestartRecord]) -> Invariant:
    """Every `stack.up` restarted exactly what was down, and only what the harness killed was."""
    invariant = Invariant(
        "stack_restarts_only_what_is_down",
        "stack.up restarts only what is down; nothing goes down unless killed",
    )
    for record in restarts:
        invariant.checked += 1
        crashed = sorted(set(record.down_before) - {record.killed})
        if crashed:
            invariant.breaches.append(
                f"{', '.join(crashed)} went down on its own (found at {record.at_s:.0f}s, "
                f"the harness had killed {record.killed})"
            )
        extra = sorted(set(record.restarted) - set(record.down_before))
        missing = sorted(set(record.down_before) - set(record.restarted))
        if extra or missing:
            invariant.breaches.append(
                f"after killing {record.killed} at {record.at_s:.0f}s: down "
                f"{list(record.down_before)}, restarted {list(record.restarted)}"
            )
    return invariant


def check_chaos(
    *,
    kills: int,
    planned_kills: int,
    temporal_restarts: int,
    faults: int,
    outage: bool,
    errors: Sequence[str] = (),
    missing: Sequence[str] = (),
) -> Invariant:
    """The chaos the run promised happened: a quiet run must not pass for a resilient one.

    Args:
        missing: Breaches found elsewhere, e.g. by `faults.check_resets_and_prunes`.
    """
    invariant = Invariant(
        "chaos_happened", "the planned kills, restarts, resets, key prunings and faults happened"
    )
    invariant.checked = 1
    invariant.breaches.extend(f"chaos schedule: {error}" for error in errors)
    invariant.breaches.extend(missing)
    if kills != planned_kills:
        invariant.breaches.append(f"{kills} worker kills, {planned_kills} planned")
    if temporal_restarts != 1:
        invariant.breaches.append(f"{temporal_restarts} Temporal restarts, 1 planned")
    if faults == 0:
        invariant.breaches.append("no fault was injected")
    if not outage:
        invariant.breaches.append("the planned AMS outage did not happen")
    return invariant


# -- configuration ------------------------------------------------------------------------------


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

    @property
    def planned_kills(self) -> int:
        return self.kills if self.kills is not None else max(2, round(self.n / 50))

    @property
    def planned_resets(self) -> int:
        return ext.planned_resets(self.n, self.resets)

    @property
    def budget_s(self) -> float:
        if self.timeout_s is not None:
            return self.timeout_s
        return 240 + self.outage_s + 3 * self.n


def chaos_settings(data_dir: Path) -> Settings:
    """Settings of a private stack: its own data dir, free ports, the sandbox keys."""
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


# -- seeding ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Choice:
    scenario: Scenario
    reject: bool
    partial_cents: int | None
    approvers: tuple[str, ...]


def plan_choices(n: int, rng: random.Random, reject_rate: float) -> list[_Choice]:
    """Scenarios evenly mixed and shuffled, some rejections, partial amounts, approver order."""
    scenarios = [cast(Scenario, SCENARIOS[i % len(SCENARIOS)]) for i in range(n)]
    rng.shuffle(scenarios)
    rejects = max(1, round(n * reject_rate)) if n >= 2 else 0
    rejected = set(rng.sample(range(n), rejects))
    choices = []
    for i, scenario in enumerate(scenarios):
        # Below the partial product's price (249.00), in whole dollars.
        partial = rng.randrange(5, 240) * 100 if scenario == "partial" else None
        approvers = tuple(rng.sample(APPROVERS, len(APPROVERS)))
        choices.append(_Choice(scenario, i in rejected, partial, approvers))
    return choices


def seed_all(settings: Settings, choices: Sequence[_Choice], say: Reporter) -> list[SagaPlan]:
    """Seed one purchase per planned saga in the store and both sandboxes."""
    plans: list[SagaPlan] = []
    store = OasisStore.from_url(settings.resolved_database_url)
    try:
        with httpx.Client(timeout=10.0, trust_env=False) as http:
            for index, choice in enumerate(choices):
                seeded: SeededPurchase = seed_purchase(
                    store,
                    http,
                    processor_url=settings.processor_url,
                    ams_url=settings.ams_url,
                    processor_api_key=settings.processor_api_key.get_secret_value(),
                    ams_api_key=settings.ams_api_key.get_secret_value(),
                    scenario=choice.scenario,
                )
                with store.engine.connect() as db:
                    row = db.execute(
                        text(
                            "SELECT p.entitlement_source, "
                            "(SELECT count(*) FROM course_progress c "
                            " WHERE c.user_id = :user AND c.product_id = :product) "
                            "FROM products p WHERE p.id = :product"
                        ),
                        {"user": seeded.user_id, "product": seeded.product_id},
                    ).one()
                plans.append(
                    SagaPlan(
                        index=index,
                        scenario=choice.scenario,
                        purchase_id=seeded.purchase_id,
                        user_id=seeded.user_id,
                        product_id=seeded.product_id,
                        charge_id=seeded.charge_id,
                        purchase_cents=seeded.amount_cents,
                        partial_cents=choice.partial_cents,
                        reject=choice.reject,
                        approvers=choice.approvers,
                        entitlement_source=str(row[0]),
                        ams_member_id=seeded.ams_member_id,
                        ams_product_code=seeded.ams_product_code,
                        progress_seeded=int(row[1]),
                    )
                )
    finally:
        store.close()
    say(f"seeded {len(plans)} purchases: {dict(Counter(p.scenario for p in plans))}")
    return plans


# -- the run ------------------------------------------------------------------------------------


@dataclass
class SagaRun:
    """What the harness saw of one saga while driving it."""

    started_at: float | None = None
    ended_at: float | None = None
    decided: int = 0
    approved: bool = False
    required_approvals: int | None = None
    confirmed: bool = False
    resolutions: int = 0
    settled: bool = False
    parked: bool = False
    end_state: str | None = None
    end_run_id: str | None = None
    last_state: str | None = None
    error: str | None = None
    saga_ams_state: str | None = None
    attention: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


@dataclass
class RunRecord:
    """Everything the run did, for the report."""

    kills: int = 0
    temporal_restarts: int = 0
    restarts: list[RestartRecord] = field(default_factory=list)
    resets: list[ResetRecord] = field(default_factory=list)
    prunes: list[PruneRecord] = field(default_factory=list)
    outage: bool = False
    profiles_applied: int = 0
    windows: list[ProfileWindow] = field(default_factory=list)
    decisions: int = 0
    confirmations: int = 0
    resolutions: int = 0
    retried_calls: int = 0
    run_s: float = 0.0
    cleared_at_s: float | None = None
    chaos_errors: list[str] = field(default_factory=list)


class Harness:
    """Drives every saga as people would while the chaos schedule breaks things around it."""

    def __init__(
        self, config: ChaosConfig, settings: Settings, plans: Sequence[SagaPlan], say: Reporter
    ) -> None:
        self.config = config
        self.settings = settings
        self.plans = list(plans)
        self.say = say
        self.runs = [SagaRun() for _ in plans]
        # A poll and its action, or a reset, at a time per saga: a reset never lands between
        # the harness seeing a run end and recording its end.
        self.locks = [asyncio.Lock() for _ in plans]
        self.followers: list[asyncio.Task[None]] = []  # sagas reset after their driver ended
        self.reset_indexes: set[int] = set()
        self.record = RunRecord()
        self.rng = random.Random(config.seed * 7919 + 1)  # chaos schedule and fault profiles
        self.jitter = random.Random(config.seed)  # poll jitter: keeps pollers out of lockstep
        self.slots = asyncio.Semaphore(config.concurrency)
        self.cleared = asyncio.Event()
        self.deadline = time.monotonic() + config.budget_s
        self.started = 0
        self.decided = 0
        self.settled = 0
        self.current: dict[str, str] = {"processor": "none", "ams": "none"}
        self.outage_active = False
        self.down: str | None = None  # what the harness killed and has not restarted yet
        self._client: Client | None = None
        self._http: httpx.AsyncClient | None = None

    @property
    def client(self) -> Client:
        assert self._client is not None
        return self._client

    @property
    def http(self) -> httpx.AsyncClient:
        assert self._http is not None
        return self._http

    @property
    def progress(self) -> int:
        """Three steps per saga (started, decided, settled): the clock of the chaos schedule."""
        return self.started + self.decided + self.settled

    async def run(self) -> RunRecord:
        began = time.monotonic()
        self._client = await connect(self.settings)
        async with httpx.AsyncClient(timeout=10.0, trust_env=False) as http:
            self._http = http
            await self.apply_profiles()
            drivers = [asyncio.create_task(self.drive(plan)) for plan in self.plans]
            chaos = asyncio.create_task(self.chaos_schedule())
            rotation = asyncio.create_task(self.rotate_faults())
            ticker = asyncio.create_task(self.tick())
            # Faults stay on until every saga has ended or waits for ops and the schedule is
            # through; a quarter of the budget is kept for the clean finish.
            clear_by = began + self.config.budget_s * 0.75
            while time.monotonic() < clear_by:
                if self.settled == len(self.plans) and chaos.done():
                    break
                await asyncio.sleep(0.5)
            if not chaos.done():
                self.say("time is running out: stopping the chaos schedule early")
                chaos.cancel()
            rotation.cancel()
            for outcome in await asyncio.gather(chaos, rotation, return_exceptions=True):
                if isinstance(outcome, Exception):
                    self.record.chaos_errors.append(f"{type(outcome).__name__}: {outcome}")
                    self.say(f"chaos schedule failed: {outcome}")
            await self.clear_faults()
            # Whatever is down now went down on its own: the restart record shows it.
            with contextlib.suppress(stack.StackError):  # recorded in chaos_errors
                await self.restart(self.down or "nothing")
            self.record.cleared_at_s = self.say.elapsed()
            parked = sum(1 for r in self.runs if r.parked and r.end_state is None)
            self.say(f"faults cleared; resolving {parked} saga(s) in NEEDS_ATTENTION with retry")
            self.cleared.set()
            remaining = max(5.0, self.deadline - time.monotonic())
            _, pending = await asyncio.wait([*drivers, *self.followers], timeout=remaining)
            for task in pending:
                task.cancel()
            await asyncio.gather(*drivers, *self.followers, return_exceptions=True)
            ticker.cancel()
            await asyncio.gather(ticker, return_exceptions=True)
            self.say(self.status_line())
        self.record.run_s = time.monotonic() - began
        return self.record

    # -- people -----------------------------------------------------------------------------

    async def call(self, make: Callable[[], Awaitable[T]], *, timeout_s: float) -> T:
        """Call Temporal like a person would: on an outage or a timeout, try again shortly."""
        while True:
            try:
                return await asyncio.wait_for(make(), timeout_s)
            except ops.Refused:
                raise
            except Exception:
                # Temporal restarting or a worker down: both pass; the deadline bounds waiting.
                self.record.retried_calls += 1
                if time.monotonic() >= self.deadline:
                    raise
                await asyncio.sleep(self.jitter.uniform(0.5, 2.0))

    async def drive(self, plan: SagaPlan, *, reset: bool = False) -> None:
        """Start a saga and follow it to its end; after a reset, follow its new run only."""
        run = self.runs[plan.index]
        try:
            if reset:
                ended = await self.follow(plan, run, park=True)
            else:
                async with self.slots:
                    await self.start(plan, run)
                    ended = await self.follow(plan, run, park=True)
            if ended:
                return
            await self.cleared.wait()
            await self.follow(plan, run, park=False)
        except Exception as err:
            run.problems.append(f"{type(err).__name__}: {err}")

    async def start(self, plan: SagaPlan, run: SagaRun) -> None:
        request = RefundRequest(
            purchase_id=plan.purchase_id,
            amount_cents=plan.partial_cents,
            reason=f"chaos run: {plan.scenario}",
            requested_by=REQUESTER,
        )
        # Refused: an earlier attempt started it and the answer was lost in a restart.
        with contextlib.suppress(ops.Refused):
            await self.call(
                functools.partial(ops.start_refund, self.client, self.settings, request),
                timeout_s=20,
            )
        run.started_at = time.monotonic()
        self.started += 1

    async def follow(self, plan: SagaPlan, run: SagaRun, *, park: bool) -> bool:
        """Poll the saga and act on what it waits for; True once it ended, False when parked."""
        handle = self.client.get_workflow_handle(plan.workflow_id)
        while time.monotonic() < self.deadline:
            async with self.locks[plan.index]:
                description: WorkflowExecutionDescription = await self.call(
                    handle.describe, timeout_s=10
                )
                if description.status != WorkflowExecutionStatus.RUNNING:
                    await self.finish(plan, run, description)
                    return True
                state = description.typed_search_attributes.get(sa.REFUND_STATE)
                run.last_state = state
                if state == "AWAITING_APPROVAL" and run.required_approvals != run.decided:
                    await self.approve(plan, run)
                elif state == "AWAITING_AMS_CONFIRMATION" and not run.confirmed:
                    await self.confirm(plan, run)
                elif state == "NEEDS_ATTENTION":
                    status = await self.call(
                        functools.partial(ops.get_status, self.client, plan.workflow_id),
                        timeout_s=20,
                    )
                    if status.error and (not run.attention or run.attention[-1] != status.error):
                        run.attention.append(status.error)
                    if park and not self.cleared.is_set():
                        if not run.parked:
                            run.parked = True
                            self.settle(run)
                            self.say(f"{plan.workflow_id} waits for ops: {status.error}")
                        return False
                    if run.resolutions >= MAX_RESOLUTIONS:
                        run.problems.append(
                            f"still NEEDS_ATTENTION after {run.resolutions} retries"
                        )
                        return True
                    await self.resolve(plan, run)
            await asyncio.sleep(POLL_S * self.jitter.uniform(0.7, 1.3))
        run.problems.append(f"not ended within the budget; last state {run.last_state}")
        return True

    def settle(self, run: SagaRun) -> None:
        if not run.settled:
            run.settled = True
            self.settled += 1

    async def approve(self, plan: SagaPlan, run: SagaRun) -> None:
        if run.required_approvals is None:
            status = await self.call(
                functools.partial(ops.get_status, self.client, plan.workflow_id), timeout_s=20
            )
            run.required_approvals = status.required_approvals or 0
        required = run.required_approvals
        while run.decided < required:
            approver = plan.approvers[run.decided]
            # A rejection is the last decision needed: for two approvers, one approves first.
            approve = not (plan.reject and run.decided == required - 1)
            decision = ApprovalDecision(approver=approver, approve=approve, comment="chaos run")
            try:
                await self.call(
                    functools.partial(ops.decide, self.client, plan.workflow_id, decision),
                    timeout_s=45,
                )
            except ops.Refused as err:
                # The update may have landed before Temporal or the worker went away.
                status = await self.call(
                    functools.partial(ops.get_status, self.client, plan.workflow_id),
                    timeout_s=20,
                )
                if not any(a.approver == approver for a in status.approvals):
                    run.problems.append(f"{approver}'s decision refused: {err}")
                    run.decided = required  # nothing more a person can do
                    break
            run.decided += 1
            self.record.decisions += 1
        if run.decided >= required and not run.approved:
            run.approved = True  # counted once: a reset run may need its decisions again
            self.decided += 1

    async def confirm(self, plan: SagaPlan, run: SagaRun) -> None:
        confirmation = AmsConfirmation(
            operator=OPERATOR, ams_reference=f"AMS-CASE-{plan.purchase_id}", note="chaos run"
        )
        try:
            await self.call(
                functools.partial(ops.confirm_ams, self.client, plan.workflow_id, confirmation),
                timeout_s=45,
            )
        except ops.Refused as err:
            status = await self.call(
                functools.partial(ops.get_status, self.client, plan.workflow_id), timeout_s=20
            )
            if status.ams.state != "confirmed":
                if status.state.value != "AWAITING_AMS_CONFIRMATION":
                    return  # a reset run not there yet (its listed state lags): confirm later
                run.problems.append(f"AMS confirmation refused: {err}")
        run.confirmed = True
        self.record.confirmations += 1

    async def resolve(self, plan: SagaPlan, run: SagaRun) -> None:
        resolution = Resolution(action="retry", operator=OPERATOR, note="chaos: faults cleared")
        with contextlib.suppress(ops.Refused):  # no longer waiting: an earlier try landed
            await self.call(
                functools.partial(ops.resolve, self.client, plan.workflow_id, resolution),
                timeout_s=45,
            )
        run.resolutions += 1
        self.record.resolutions += 1

    async def finish(
        self, plan: SagaPlan, run: SagaRun, description: WorkflowExecutionDescription
    ) -> None:
        run.ended_at = time.monotonic()
        run.end_run_id = description.run_id
        if description.status == WorkflowExecutionStatus.COMPLETED:
            status = await self.call(
                functools.partial(ops.get_status, self.client, plan.workflow_id), timeout_s=20
            )
            run.end_state = status.state.value
            run.error = status.error
            run.saga_ams_state = status.ams.state
        else:
            status_name = description.status.name if description.status else "unknown"
            run.end_state = f"workflow {status_name}"
        self.settle(run)

    # -- chaos ------------------------------------------------------------------------------

    async def chaos_schedule(self) -> None:
        """Kill the worker, restart Temporal, take the AMS down, reset sagas and let the
        processor forget its keys, at seeded progress marks."""
        total = 3 * len(self.plans)
        actions = [
            (self.rng.uniform(0.08, 0.85) * total, "kill") for _ in range(self.config.planned_kills)
        ]
        actions.append((self.rng.uniform(0.25, 0.6) * total, "temporal"))
        if self.config.outage_s > 0:
            actions.append((self.rng.uniform(0.1, 0.3) * total, "outage"))
        marks = ext.reset_marks(self.rng, total, self.config.planned_resets)
        actions.extend((mark, "reset-ended" if ended else "reset") for mark, ended in marks)
        actions.extend(
            (self.rng.uniform(0.1, 0.7) * total, "prune") for _ in range(self.config.prunes)
        )
        actions.sort()
        outage: asyncio.Task[None] | None = None
        for mark, action in actions:
            while self.progress < mark:
                await asyncio.sleep(0.2)
            # A moment of our choosing, not the next poll's.
            await asyncio.sleep(self.rng.uniform(0.0, 2.0))
            if action == "kill":
                await self.kill_worker()
            elif action == "temporal":
                await self.restart_temporal()
            elif action.startswith("reset"):
                await self.reset_saga(prefer_ended=action == "reset-ended")
            elif action == "prune":
                await self.prune_keys()
            else:
                outage = asyncio.create_task(self.ams_outage())
        if outage is not None:
            await outage

    async def statuses(self) -> dict[str, stack.ComponentStatus]:
        return {c.name: c for c in await asyncio.to_thread(stack.status, self.settings)}

    async def kill(self, name: str) -> bool:
        """SIGKILL a component's process group and wait until the stack sees it stopped."""
        component = (await self.statuses())[name]
        if component.pid is None:
            self.say(f"{name} is not running: nothing to kill")
            return False
        # The stack starts each process in its own session: the group is that process and
        # whatever it spawned, nothing else.
        os.killpg(component.pid, signal.SIGKILL)
        self.down = name
        for _ in range(100):
            if (await self.statuses())[name].state == "stopped":
                break
            await asyncio.sleep(0.1)
        return True

    async def restart(self, killed: str) -> None:
        before = await self.statuses()
        for attempt in range(1, 4):
            try:
                await asyncio.to_thread(stack.up, self.settings, timeout_s=90)
                break
            except stack.StackError as err:
                self.say(f"stack.up failed (attempt {attempt}/3): {err}")
                if attempt == 3:
                    self.record.chaos_errors.append(f"restart after killing {killed}: {err}")
                    raise
                await asyncio.sleep(2.0)
        after = await self.statuses()
        self.record.restarts.append(
            RestartRecord(
                killed=killed,
                down_before=tuple(n for n in PROCESSES if before[n].state == "stopped"),
                restarted=tuple(n for n in PROCESSES if before[n].pid != after[n].pid),
                at_s=self.say.elapsed(),
            )
        )
        self.down = None

    async def kill_worker(self) -> None:
        if not await self.kill("worker"):
            return
        self.record.kills += 1
        down_s = self.rng.uniform(0.3, 3.0)
        self.say(f"worker killed (SIGKILL #{self.record.kills}); restarting in {down_s:.1f}s")
        await asyncio.sleep(down_s)
        await self.restart("worker")
        self.say(f"worker restarted: {self.status_line()}")

    async def restart_temporal(self) -> None:
        if not await self.kill("temporal"):
            return
        down_s = self.rng.uniform(1.0, 3.0)
        self.say(f"Temporal dev server killed; restarting in {down_s:.1f}s")
        await asyncio.sleep(down_s)
        await self.restart("temporal")
        self.record.temporal_restarts += 1
        restarted = self.record.restarts[-1].restarted
        self.say(f"Temporal restarted (restarted: {', '.join(restarted) or 'nothing'})")

    async def reset_saga(self, *, prefer_ended: bool) -> None:
        """Press Reset on an approved saga, as ops do in the Temporal UI; follow the new run.

        The new run must end as the old one was to. A saga of the kind preferred (ended or
        still running) is awaited for 20 s, then any approved saga will do.
        """
        index, tries = None, 0
        while index is None:
            candidates = [
                (i, r.end_state is not None)
                for i, r in enumerate(self.runs)
                if r.approved and not self.plans[i].reject
            ]
            index = ext.pick_reset_target(
                self.rng,
                candidates,
                prefer_ended=prefer_ended,
                strict=tries < 40,
                already_reset=self.reset_indexes,
            )
            tries += 1
            await asyncio.sleep(0 if index is not None else 0.5)
        plan, run = self.plans[index], self.runs[index]
        async with self.locks[index]:
            record = await ext.reset_saga(
                self.client,
                plan.workflow_id,
                call=lambda make: self.call(make, timeout_s=20),
                clock=self.say.elapsed,
            )
            ended = run.end_state is not None
            run.end_state = run.ended_at = run.end_run_id = None
            run.decided, run.confirmed = 0, False  # re-applied by Temporal, else decided again
            self.reset_indexes.add(index)
            self.record.resets.append(record)
        self.say(f"{plan.workflow_id} reset from {record.state}: new run {record.new_run_id}")
        if ended:
            self.followers.append(asyncio.create_task(self.drive(plan, reset=True)))

    async def prune_keys(self) -> None:
        url, headers = sandbox_admin(self.settings, "processor")
        record = await ext.prune_keys(
            self.http,
            url,
            headers,
            in_flight=lambda: sum(1 for r in self.runs if r.started_at and not r.end_state),
            waiting_for_ops=lambda: sum(1 for r in self.runs if r.parked and not r.end_state),
            clock=self.say.elapsed,
        )
        self.record.prunes.append(record)
        self.say(f"processor forgot its idempotency keys (clock +1 day): {self.status_line()}")

    async def ams_outage(self) -> None:
        self.outage_active = True
        self.record.outage = True
        await self.configure("ams", "outage", OUTAGE)
        self.say(f"AMS outage: every AMS call fails for {self.config.outage_s:.0f}s")
        try:
            await asyncio.sleep(self.config.outage_s)
        finally:
            self.outage_active = False
        await self.configure("ams", *self.draw_profile())
        self.say("AMS outage over")

    def draw_profile(self) -> tuple[str, dict[str, Any]]:
        name = self.rng.choice(sorted(PROFILES))
        return name, {**PROFILES[name](self.rng), "seed": self.rng.randrange(2**31)}

    async def configure(self, sandbox: str, name: str, body: dict[str, Any]) -> None:
        url, headers = sandbox_admin(self.settings, sandbox)
        response = await self.http.post(f"{url}/_sandbox/faults", json=body, headers=headers)
        response.raise_for_status()
        self.current[sandbox] = name
        self.record.profiles_applied += 1
        self.record.windows.append(ProfileWindow(sandbox, time.time(), body.get("latency_ms", 0)))

    async def apply_profiles(self) -> None:
        await self.configure("processor", *self.draw_profile())
        profile = self.draw_profile()  # drawn even during an outage: the sequence stays seeded
        if not self.outage_active:
            await self.configure("ams", *profile)

    async def rotate_faults(self) -> None:
        while True:
            await asyncio.sleep(self.rng.uniform(4.0, 10.0))
            await self.apply_profiles()

    async def clear_faults(self) -> None:
        for sandbox in ("processor", "ams"):
            await self.configure(sandbox, "none", {})

    def status_line(self) -> str:
        ended = sum(1 for r in self.runs if r.end_state is not None)
        parked = sum(1 for r in self.runs if r.parked and r.end_state is None)
        return (
            f"started {self.started}/{len(self.plans)}, decided {self.decided}, ended {ended}, "
            f"waiting for ops {parked} | worker kills {self.record.kills}, restarts "
            f"{len(self.record.restarts)} (Temporal {self.record.temporal_restarts}) | faults "
            f"processor={self.current['processor']} ams={self.current['ams']}"
        )

    async def tick(self) -> None:
        while True:
            await asyncio.sleep(5.0)
            self.say(self.status_line())


# -- facts and the report -----------------------------------------------------------------------


def collect_facts(
    settings: Settings, plans: Sequence[SagaPlan], runs: Sequence[SagaRun]
) -> list[SagaFacts]:
    """Read each saga's traces: the charge at the processor, the store's rows, the AMS member."""
    facts: list[SagaFacts] = []
    auth = {"Authorization": f"Bearer {settings.processor_api_key.get_secret_value()}"}
    engine = create_engine(settings.resolved_database_url)
    try:
        with httpx.Client(timeout=10.0, trust_env=False) as http, engine.connect() as db:
            for plan, run in zip(plans, runs, strict=True):
                charge = http.get(
                    f"{settings.processor_url}/v1/charges/{plan.charge_id}", headers=auth
                )
                charge.raise_for_status()
                body = charge.json()
                refunds = tuple(
                    ProcessorRefundFact(
                        refund_id=r["id"],
                        amount_cents=r["amount"],
                        status=r["status"],
                        workflow_id=(r.get("metadata") or {}).get("workflow_id"),
                    )
                    for r in body["refunds"]["data"]
                )
                purchase = db.execute(
                    text("SELECT refunded_cents, status FROM purchases WHERE id = :id"),
                    {"id": plan.purchase_id},
                ).one()
                rows = tuple(
                    LedgerRow(*row)
                    for row in db.execute(
                        text(
                            "SELECT processor_refund_id, amount_cents, status, source "
                            "FROM refunds WHERE purchase_id = :id ORDER BY id"
                        ),
                        {"id": plan.purchase_id},
                    )
                )
                archived = db.execute(
                    text("SELECT count(*) FROM progress_archive WHERE workflow_id = :wid"),
                    {"wid": plan.workflow_id},
                ).scalar_one()
                left = db.execute(
                    text(
                        "SELECT count(*) FROM course_progress "
                        "WHERE user_id = :user AND product_id = :product"
                    ),
                    {"user": plan.user_id, "product": plan.product_id},
                ).scalar_one()
                ams_state: str | None = None
                if plan.ams_member_id:
                    member = http.get(
                        f"{settings.ams_url}/_sandbox/members/{plan.ams_member_id}",
                        headers=sandbox_admin(settings, "ams")[1],
                    )
                    member.raise_for_status()
                    for entitlement in member.json()["entitlements"]:
                        if entitlement["product_code"] == plan.ams_product_code:
                            ams_state = entitlement["status"]
                error = run.error or "; ".join([*run.problems, *run.attention[-1:]]) or None
                if run.end_state is None and run.last_state:
                    error = f"last seen {run.last_state}" + (f"; {error}" if error else "")
                facts.append(
                    SagaFacts(
                        end_state=run.end_state,
                        error=error,
                        saga_ams_state=run.saga_ams_state,
                        processor_refunds=refunds,
                        processor_refunded_cents=int(body["amount_refunded"]),
                        ledger_refunded_cents=int(purchase[0]),
                        purchase_status=str(purchase[1]),
                        ledger_rows=rows,
                        archived=int(archived),
                        progress_left=int(left),
                        ams_entitlement=ams_state,
                    )
                )
    finally:
        engine.dispose()
    return facts


def _percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def build_report(
    *,
    config: ChaosConfig,
    plans: Sequence[SagaPlan],
    runs: Sequence[SagaRun],
    record: RunRecord,
    faults: dict[str, dict[str, Any]],
    invariants: Sequence[Invariant],
    timings: dict[str, float],
) -> dict[str, Any]:
    durations = [
        r.ended_at - r.started_at
        for r in runs
        if r.started_at is not None and r.ended_at is not None
    ]
    injected = {
        kind: sum(int(faults[s][kind]) for s in faults) for kind in (*FAULT_KINDS, "delayed")
    }
    return {
        "ok": all(i.ok for i in invariants),
        "n": config.n,
        "seed": config.seed,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "saga_duration_s": {
            "median": round(statistics.median(durations), 1) if durations else 0.0,
            "p95": round(_percentile(durations, 0.95), 1),
            "max": round(max(durations, default=0.0), 1),
        },
        "scenarios": dict(Counter(p.scenario for p in plans)),
        "end_states": dict(Counter(r.end_state or "not ended" for r in runs)),
        "expected_end_states": dict(Counter(p.expected_state for p in plans)),
        "chaos": {
            "worker_kills": record.kills,
            "planned_worker_kills": config.planned_kills,
            "stack_restarts": sum(1 for r in record.restarts if r.restarted),
            "temporal_restarts": record.temporal_restarts,
            "restarts": [asdict(r) for r in record.restarts],
            **ext.report(record.resets, record.prunes, config.planned_resets),
            "ams_outage_s": config.outage_s if record.outage else 0,
            "fault_profiles_applied": record.profiles_applied,
            "faults_cleared_at_s": record.cleared_at_s,
        },
        "faults": {"by_sandbox": faults, "total": injected},
        "people": {
            "decisions": record.decisions,
            "ams_confirmations": record.confirmations,
            "resolutions": record.resolutions,
            "sagas_in_needs_attention": sum(1 for r in runs if r.attention),
            "retried_calls": record.retried_calls,
        },
        "invariants": [i.to_dict() for i in invariants],
    }


def format_table(report: dict[str, Any]) -> str:
    """The report for a person: the figures, then one row per invariant."""
    chaos, people = report["chaos"], report["people"]
    faults = report["faults"]["total"]
    lines = [
        f"chaos run: n={report['n']} seed={report['seed']} "
        f"in {report['timings_s'].get('total', 0):.0f}s "
        f"(sagas {report['timings_s'].get('run', 0):.0f}s; saga median "
        f"{report['saga_duration_s']['median']}s, p95 {report['saga_duration_s']['p95']}s)",
        f"  scenarios:   {report['scenarios']}",
        f"  end states:  {report['end_states']} (expected {report['expected_end_states']})",
        f"  chaos:       {chaos['worker_kills']} worker kills, {chaos['stack_restarts']} restarts "
        f"({chaos['temporal_restarts']} of Temporal), AMS outage {chaos['ams_outage_s']:.0f}s, "
        f"{chaos['fault_profiles_applied']} fault profiles",
        ext.table_line(chaos),
        "  faults:      "
        + ", ".join(f"{kind} {count}" for kind, count in faults.items())
        + " | "
        + ", ".join(
            f"{s}: {c['requests']} requests" + (" (log full)" if c["log_truncated"] else "")
            for s, c in report["faults"]["by_sandbox"].items()
        ),
        f"  people:      {people['decisions']} decisions, {people['ams_confirmations']} AMS "
        f"confirmations, {people['resolutions']} retries from NEEDS_ATTENTION "
        f"({people['sagas_in_needs_attention']} sagas), {people['retried_calls']} calls retried",
        "",
    ]
    width = max(len(i["name"]) for i in report["invariants"])
    lines.append(f"  {'invariant':<{width}}  {'checked':>7}  result")
    for inv in report["invariants"]:
        verdict = "held" if inv["ok"] else f"BREACHED ({len(inv['breaches'])})"
        lines.append(f"  {inv['name']:<{width}}  {inv['checked']:>7}  {verdict}")
        for breach in inv["breaches"][:10]:
            lines.append(f"      - {breach}")
        if len(inv["breaches"]) > 10:
            lines.append(f"      ... and {len(inv['breaches']) - 10} more")
    lines.append("")
    lines.append("ALL INVARIANTS HELD" if report["ok"] else "INVARIANTS BREACHED")
    return "\n".join(lines)


# -- entry points -------------------------------------------------------------------------------


def run_chaos(config: ChaosConfig, *, stream: TextIO = sys.stderr) -> dict[str, Any]:
    """Bring up a private stack, run the sagas under chaos, check, and always stop the stack.

    Returns:
        The report; `report["ok"]` says whether every invariant held.

    Raises:
        stack.StackError: The stack could not be brought up.
    """
    say = Reporter(stream)
    # The SDK's own log lines (every gRPC retry while Temporal restarts) would drown the
    # progress lines; the harness reports what matters itself.
    quiet = TelemetryFilter(core_level="ERROR", other_level="ERROR")
    Runtime.set_default(
        # Forwarded: what core does log (errors) goes through the masking logger, not stderr.
        Runtime(telemetry=TelemetryConfig(logging=core_logging(quiet))),
        error_if_already_set=False,
    )
    created = config.data_dir is None
    data_dir = config.data_dir or Path(tempfile.mkdtemp(prefix="refund-chaos-"))
    data_dir = data_dir.resolve()
    if not created and data_dir.exists() and any(data_dir.iterdir()):
        raise stack.StackError(f"{data_dir} is not empty: the harness needs a fresh data dir")
    settings = chaos_settings(data_dir)
    timings: dict[str, float] = {}
    say(
        f"chaos run n={config.n} seed={config.seed} in {data_dir} (Temporal "
        f"{settings.temporal_address}, processor {settings.processor_url}, AMS {settings.ams_url})"
    )
    try:
        with policy_environment():
            mark = time.monotonic()
            stack.up(settings, on_progress=lambda m: say(f"stack: {m}"), timeout_s=120)
            timings["stack_up"] = time.monotonic() - mark
            mark = time.monotonic()
            choices = plan_choices(config.n, random.Random(config.seed), config.reject_rate)
            plans = seed_all(settings, choices, say)
            timings["seed"] = time.monotonic() - mark
            harness = Harness(config, settings, plans, say)
            record = asyncio.run(harness.run())
            timings["run"] = record.run_s
            mark = time.monotonic()
            faults = fault_counts(settings, record.windows)
            facts = collect_facts(settings, plans, harness.runs)
            invariants = [
                *check_invariants(list(zip(plans, facts, strict=True))),
                check_restarts(record.restarts),
                check_chaos(
                    kills=record.kills,
                    planned_kills=config.planned_kills,
                    temporal_restarts=record.temporal_restarts,
                    faults=sum(int(c[k]) for c in faults.values() for k in FAULT_KINDS),
                    outage=record.outage or config.outage_s <= 0,
                    errors=record.chaos_errors,
                    missing=ext.check_resets_and_prunes(
                        resets=record.resets,
                        planned_resets=config.planned_resets,
                        prunes=record.prunes,
                        planned_prunes=config.prunes,
                        end_runs={
                            p.workflow_id: r.end_run_id
                            for p, r in zip(plans, harness.runs, strict=True)
                        },
                    ),
                ),
            ]
            timings["check"] = time.monotonic() - mark
    finally:
        say("stopping the stack")
        with contextlib.suppress(stack.StackError):
            stack.down(settings, timeout_s=10)
        if created and not config.keep:
            shutil.rmtree(data_dir, ignore_errors=True)
        elif config.keep or not created:
            say(f"data dir kept: {data_dir}")
    timings["total"] = say.elapsed()
    return build_report(
        config=config,
        plans=plans,
        runs=harness.runs,
        record=record,
        faults=faults,
        invariants=invariants,
        timings=timings,
    )


def parse_args(argv: Sequence[str] | None) -> tuple[ChaosConfig, bool]:
    parser = argparse.ArgumentParser(
        prog="python -m reliability.chaos",
        description="Run refund sagas on a private stack under faults, worker kills, a "
        "Temporal restart, resets and key pruning, then check the invariants; exit 1 on any "
        "breach.",
        epilog="example: python -m reliability.chaos --n 30 --seed 1 --json",
    )
    parser.add_argument("--n", type=int, default=30, help="sagas to run (default 30)")
    parser.add_argument("--seed", type=int, default=1, help="seed of every random choice")
    parser.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    parser.add_argument("--data-dir", type=Path, help="fresh data dir (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the temp data dir")
    parser.add_argument("--concurrency", type=int, default=30, help="sagas driven at once")
    parser.add_argument("--kills", type=int, help="worker kills (default max(2, n/50))")
    parser.add_argument("--resets", type=int, help="sagas reset by ops (default max(2, n/20))")
    parser.add_argument(
        "--prunes", type=int, default=2, help="processor clock jumps past 24 h (default 2)"
    )
    parser.add_argument(
        "--outage-s", type=float, default=150.0, help="AMS outage length, 0 for none (default 150)"
    )
    parser.add_argument("--timeout-s", type=float, help="budget of the saga phase")
    args = parser.parse_args(argv)
    if args.n < 1 or args.concurrency < 1:
        parser.error("--n and --concurrency must be at least 1")
    if (args.resets is not None and args.resets < 0) or args.prunes < 0:
        parser.error("--resets and --prunes must not be negative")
    config = ChaosConfig(
        n=args.n,
        seed=args.seed,
        concurrency=args.concurrency,
        kills=args.kills,
        resets=args.resets,
        prunes=args.prunes,
        outage_s=args.outage_s,
        timeout_s=args.timeout_s,
        data_dir=args.data_dir,
        keep=args.keep,
    )
    return config, args.json


def main(argv: Sequence[str] | None = None) -> int:
    config, as_json = parse_args(argv)
    try:
        report = run_chaos(config)
    except (stack.StackError, httpx.HTTPError, OSError) as err:
        print(f"chaos: {err}", file=sys.stderr)
        return 2
    table = format_table(report)
    if as_json:
        print(table, file=sys.stderr)
        print(json.dumps(report, indent=2))
    else:
        print(table)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    run_and_exit(main)
