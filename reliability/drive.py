"""The people of a chaos run: they start each saga, decide, confirm and retry until it ends.

Where the money goes back outside OASIS, the processor's dashboard or a lost dispute acts
instead of support, and the approvers find the reconciliation the processor's events started.
Where a refund fails after its saga completed, an operator closes the ops task it opened.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TypeVar

import httpx
from temporalio.client import Client, WorkflowExecutionDescription, WorkflowExecutionStatus

from console import failed_refunds
from console import operations as ops
from refundsaga import search_attributes as sa
from refundsaga.contracts import AmsConfirmation, ApprovalDecision, RefundRequest, Resolution
from refundsaga.failed_refunds import FailedRefundState
from refundsaga.ids import failed_refund_id_for
from refundsaga.settings import Settings
from refundsaga.temporal import connect
from reliability.config import Reporter
from reliability.faults import WebhookFaults, sandbox_admin
from reliability.records import SEEDED_OUTSIDE, RunRecord, SagaPlan, SagaRun

__all__ = ["MAX_RESOLUTIONS", "OPERATOR", "POLL_S", "REQUESTER", "People"]

T = TypeVar("T")

REQUESTER = "sam"
# Fates forced on the events of the first dashboard refunds, disputes and late failures, in
# turn: their webhooks never arrive (the sweep must find them), arrive twice out of order.
FORCED_FATES = ("drop", "duplicate", "drop")
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
        webhooks: WebhookFaults | None = None,
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
        self.webhooks = webhooks
        self.fates = list(FORCED_FATES) if webhooks is not None else []
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
        """Start a saga (or return the money outside OASIS and find its reconciliation) and
        follow it to its end; after a reset, follow its new run only."""
        run = self.runs[plan.index]
        try:
            if reset:
                ended = await self.follow(plan, run, park=True)
            else:
                async with self.slots:
                    if plan.reconciles:
                        await self.money_back(plan, run)
                        await self.find_reconciliation(plan, run)
                    else:
                        await self.start(plan, run)
                    ended = await self.follow(plan, run, park=True)
            if not ended:
                await self.cleared.wait()
                await self.follow(plan, run, park=False)
            if plan.fail_late and not reset and run.end_state == "COMPLETED":
                await self.fail_late(plan, run)
        except Exception as err:
            run.problems.append(f"{type(err).__name__}: {err}")

    async def admin(self, path: str, body: dict[str, object]) -> dict[str, object]:
        """One call to the processor sandbox's admin API (not subject to its faults)."""
        url, headers = sandbox_admin(self.settings, "processor")
        async with httpx.AsyncClient(timeout=10.0, trust_env=False) as http:
            response = await http.post(f"{url}{path}", json=body, headers=headers)
        response.raise_for_status()
        answer: dict[str, object] = response.json()
        return answer

    @contextlib.asynccontextmanager
    async def fate(self) -> AsyncIterator[None]:
        """The next forced webhook fate, if any is left, over the events made inside."""
        if self.webhooks is None or not self.fates:
            yield
            return
        async with self.webhooks.forcing(self.fates.pop(0)):
            yield

    async def money_back(self, plan: SagaPlan, run: SagaRun) -> None:
        """The money goes back outside OASIS: a dashboard refund, or a dispute the association
        loses (the seeded `already_refunded` purchases were refunded at seeding)."""
        if plan.scenario != SEEDED_OUTSIDE:
            charge = f"/_sandbox/charges/{plan.charge_id}"
            async with self.fate():
                if plan.money_back == "dispute":
                    dispute = await self.admin(f"{charge}/dispute", {})
                    run.money_back_id = str(dispute["id"])
                    await self.admin(
                        f"/_sandbox/disputes/{run.money_back_id}/close", {"status": "lost"}
                    )
                else:
                    refund = await self.admin(
                        f"{charge}/refund_outside", {"amount": plan.money_back_cents}
                    )
                    run.money_back_id = str(refund["id"])
            self.record.money_back += 1
        run.money_back_at = time.monotonic()

    async def find_reconciliation(self, plan: SagaPlan, run: SagaRun) -> None:
        """Wait for the reconciliation of the purchase to be listed, as an approver finds it
        with `refund list --source webhook|sweep`; note who started it."""
        query = ops.list_query(purchase_id=plan.purchase_id)
        while time.monotonic() < self.deadline:
            listed = await self.call(
                functools.partial(ops.list_sagas, self.client, query, limit=10), timeout_s=20
            )
            for execution in listed:
                source = execution.typed_search_attributes.get(sa.REFUND_SOURCE)
                if execution.id == plan.workflow_id and source:
                    run.source = source
                    run.started_at = time.monotonic()
                    self.started += 1
                    return
            await asyncio.sleep(2 * POLL_S * self.jitter.uniform(0.7, 1.3))
        raise TimeoutError(f"no reconciliation of purchase {plan.purchase_id} within the budget")

    async def fail_late(self, plan: SagaPlan, run: SagaRun) -> None:
        """The processor fails the saga's refund after the saga completed; an operator finds
        the ops task it opened and closes it with a note (the money was paid another way)."""
        (refund_id,) = run.refund_ids
        async with self.fate():
            await self.admin(f"/_sandbox/refunds/{refund_id}/fail", {})
        run.failed_refund_id = refund_id
        self.record.late_failures += 1
        task_id = failed_refund_id_for(refund_id)
        while time.monotonic() < self.deadline:
            try:
                status = await self.call(
                    functools.partial(failed_refunds.status, self.client, task_id), timeout_s=20
                )
            except ops.Refused:  # not opened yet: the event or the sweep is on its way
                status = None
            if status is not None and status.state == FailedRefundState.CLOSED:
                break
            if status is not None and status.state == FailedRefundState.OPEN and status.check:
                with contextlib.suppress(ops.Refused):  # an earlier try landed
                    await self.call(
                        functools.partial(
                            failed_refunds.decide,
                            self.client,
                            self.settings,
                            task_id,
                            "close",
                            OPERATOR,
                            "chaos: paid back by bank transfer",
                        ),
                        timeout_s=45,
                    )
            await asyncio.sleep(POLL_S * self.jitter.uniform(0.7, 1.3))
        else:
            raise TimeoutError(f"{task_id} not closed within the budget")
        run.task_closed = True
        self.record.tasks_closed += 1

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
            run.refund_ids = list(status.refund.processor_refund_ids)
        else:
            status_name = description.status.name if description.status else "unknown"
            run.end_state = f"workflow {status_name}"
        self.settle(run)
