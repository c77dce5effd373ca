"""The people of a chaos run: they start each saga, decide, confirm and retry until it ends."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from temporalio.client import Client, WorkflowExecutionDescription, WorkflowExecutionStatus

from console import operations as ops
from refundsaga import search_attributes as sa
from refundsaga.contracts import AmsConfirmation, ApprovalDecision, RefundRequest, Resolution
from refundsaga.settings import Settings
from refundsaga.temporal import connect
from reliability.config import Reporter
from reliability.records import RunRecord, SagaPlan, SagaRun

__all__ = ["MAX_RESOLUTIONS", "OPERATOR", "POLL_S", "REQUESTER", "People"]

T = TypeVar("T")

REQUESTER = "sam"
OPERATOR = "olivia"
POLL_S = 1.0
MAX_RESOLUTIONS = 5


class People:
    """Drive every saga as people would, through `console.operations` like the CLI.

    What they see of each saga is in `runs`; what they did in all goes to the shared `record`.
    Until `cleared` is set (the chaos is over) a saga waiting for ops is parked, not retried.
    """

    def __init__(
        self,
        settings: Settings,
        plans: Sequence[SagaPlan],
        say: Reporter,
        record: RunRecord,
        *,
        seed: int,
        concurrency: int,
        deadline: float,
    ) -> None:
        self.settings = settings
        self.plans = list(plans)
        self.say = say
        self.record = record
        self.runs = [SagaRun() for _ in plans]
        # A poll and its action, or a reset, at a time per saga: a reset never lands between
        # the harness seeing a run end and recording its end.
        self.locks = [asyncio.Lock() for _ in plans]
        self.followers: list[asyncio.Task[None]] = []  # sagas reset after their driver ended
        self.jitter = random.Random(seed)  # poll jitter: keeps pollers out of lockstep
        self.slots = asyncio.Semaphore(concurrency)
        self.cleared = asyncio.Event()
        self.deadline = deadline
        self.started = 0
        self.decided = 0
        self.settled = 0
        self._client: Client | None = None

    @property
    def client(self) -> Client:
        assert self._client is not None
        return self._client

    async def connect(self) -> Client:
        self._client = await connect(self.settings)
        return self._client

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
