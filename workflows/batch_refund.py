"""The BatchRefund workflow: one approval for a whole batch, then one RefundSaga per purchase.

Orchestration only. The batch plans (an activity records each purchase's plan in the store),
asks for one approval of the total under the saga's policy, then starts a child RefundSaga per
included purchase, already approved by the batch, under a window (children running at once)
and a rate limit (children started per second, paced with durable timers on workflow time).

Children report to the batch by signal, addressed to the batch's workflow id, so the reports
reach whichever run is current: the batch never waits on a child's result, and it continues as
new whenever its history grows, carrying its counters, its cursor and the children still in
flight. A child waiting for people (an AMS confirmation, ops) frees its window slot.

Signals carry no sender, so a report is only a hint: it is taken for a saga this batch started
and holds open, and an end counts only as the store recorded it (child_end), so the batch's
figures and its completion come from the store, never from a report's fields.

Longer than 400 lines: the run loop, the children's accounting and continue-as-new share the
counters, the cursor and the carry, and read best side by side.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy, SearchAttributeUpdate
from temporalio.exceptions import ActivityError, WorkflowAlreadyStartedError

from workflows.approvals import ApprovalHandlers
from workflows.failures import error_text
from workflows.notify import send_notification
from workflows.refund_saga import RefundSaga
from workflows.waiting import wait_for_decision

with workflow.unsafe.imports_passed_through():
    from activities.batch_activities import BatchActivities
    from refundsaga.approval import start_refusal
    from refundsaga.batch import (
        describe_summary,
        keep_recent,
        starts_allowed,
        wait_for_start,
    )
    from refundsaga.contracts import (
        BATCH_REPORT_SIGNAL,
        ApprovalPolicy,
        BatchApproval,
        BatchBucket,
        BatchCarry,
        BatchChild,
        BatchChildEndInput,
        BatchChildReport,
        BatchCloseInput,
        BatchIssue,
        BatchItem,
        BatchPageInput,
        BatchPlanInput,
        BatchRefundInput,
        BatchState,
        BatchStatus,
        BatchSummary,
        Notification,
        NotificationKind,
        RefundRequest,
        TimelineEntry,
        WaitingFor,
        batch_bucket,
        format_money,
    )
    from refundsaga.ids import workflow_id_for
    from refundsaga.search_attributes import (
        REFUND_AMOUNT_CENTS,
        REFUND_STATE,
        REQUESTED_BY,
        WAITING_FOR,
        at_start,
    )

# Planning reads every charge: minutes for a large batch. A worker that dies mid-planning is
# noticed by the missed heartbeat, and the plan is made again (it replaces its own rows).
PLAN_TIMEOUT = timedelta(hours=2)
PLAN_HEARTBEAT = timedelta(minutes=2)
STORE_TIMEOUT = timedelta(seconds=30)
# Store reads and writes are retried until they succeed: a batch must not fail for an outage.
STORE_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1), maximum_interval=timedelta(minutes=1)
)
PLAN_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=2),
    maximum_interval=timedelta(minutes=2),
    maximum_attempts=5,
    non_retryable_error_types=["ProcessorAuthError", "ProcessorRejected"],
)
PAGE_SIZE = 250
# Continue as new well before Temporal's limits (50,000 events): a long batch stays cheap to
# replay, and a worker restart replays one page of it, not all of it.
MAX_HISTORY_EVENTS = 8_000
# The query result stays small: counts are exact, these lists keep the latest.
MAX_LISTED = 100
MAX_TIMELINE = 60


def _forget(task: asyncio.Task[Any]) -> None:
    # Children report by signal; their results are not needed, but an unretrieved failure
    # (a child cancelled by ops) would be logged as an error.
    if not task.cancelled():
        task.exception()


@workflow.defn
class BatchRefund(ApprovalHandlers):
    """Refund every purchase of a batch with one approval, under a window and a rate limit."""

    APPROVAL_SUBJECT = "batch"
    APPROVAL_OBJECT = "the batch"
    IGNORED_KEPT = MAX_LISTED
    _status: BatchStatus

    @workflow.init
    def __init__(self, inp: BatchRefundInput) -> None:
        self._input = inp
        now = workflow.now()
        # The rate limit's window: when the latest sagas started (workflow time).
        self._recent_starts: list[datetime] = []
        # The sagas started and not seen to end: the only ones whose reports count.
        self._children: dict[int, BatchChild] = {}
        info = workflow.info()
        # A carry holds approvals and a running state: anyone can start a batch with one by
        # hand, so it is taken only from the run this one continues. That run id belongs to
        # this workflow id and no hand-made start (nor its cron or retry runs) can know it.
        self._forged_carry = inp.carry is not None and (
            info.continued_run_id is None or inp.carry.written_by_run_id != info.continued_run_id
        )
        if inp.carry is not None and not self._forged_carry:
            self._status = inp.carry.status.model_copy(deep=True)
            self._status.runs += 1
            self._recent_starts = list(inp.carry.recent_starts)
            self._children = dict(inp.carry.children)
        else:
            self._status = BatchStatus(
                workflow_id=info.workflow_id,
                # Batch ids repeat (one per product at a time): the first run names the plan.
                plan_id=f"{info.workflow_id}/{info.run_id}",
                state=BatchState.PLANNING,
                product_id=inp.product_id,
                requested_by=inp.requested_by,
                reason=inp.reason,
                started_at=now,
            )
        self._rejected_by: str | None = None

    # --- the batch ------------------------------------------------------------------------

    @workflow.run
    async def run(self, inp: BatchRefundInput) -> BatchStatus:
        if self._forged_carry:
            self._status.error = (
                "refused: a continue-as-new carry is accepted only from this batch's previous "
                "run; nothing was started"
            )
            return await self._end(BatchState.FAILED)
        if inp.carry is None:
            try:
                summary = await self._plan(inp)
                # With signing on, `requested_by` counts only with its signature.
                refusal = start_refusal(
                    summary.policy, workflow_id=workflow.info().workflow_id, request=inp
                )
                if refusal:
                    self._status.error = f"refused: {refusal}; nothing was started"
                    return await self._end(BatchState.FAILED)
                if not await self._approve(summary):
                    return await self._end(self._status.state)
            except ActivityError as err:
                self._status.error = f"planning failed: {error_text(err)}; nothing changed"
                return await self._end(BatchState.FAILED)
            except asyncio.CancelledError:
                self._status.error = "cancelled before any refund started; nothing changed"
                await self._end(BatchState.CANCELLED)
                raise
            self._start_running(summary)
        try:
            return await self._run_children()
        except asyncio.CancelledError:
            self._status.error = (
                "cancelled: no more sagas start; the sagas already started finish on their own"
            )
            await self._end(BatchState.CANCELLED)
            raise

    async def _plan(self, inp: BatchRefundInput) -> BatchSummary:
        self._set_state(BatchState.PLANNING)
        summary: BatchSummary = await workflow.execute_activity_method(
            BatchActivities.plan_batch,
            BatchPlanInput(
                batch_id=self._status.plan_id,
                product_id=inp.product_id,
                purchase_ids=inp.purchase_ids,
                window=inp.window,
                rate_per_s=inp.rate_per_s,
            ),
            start_to_close_timeout=PLAN_TIMEOUT,
            heartbeat_timeout=PLAN_HEARTBEAT,
            retry_policy=PLAN_RETRY,
            summary="plan the batch: store and processor",
        )
        self._status.summary = summary
        self._status.required_approvals = summary.required_approvals
        self._status.counts.pending = summary.included
        self._mark("plan", describe_summary(summary))
        self._upsert_search_attributes()
        return summary

    # --- one approval for the whole batch ----------------------------------------------------

    async def _approve(self, summary: BatchSummary) -> bool:
        if summary.included == 0:
            self._mark("approve", "nothing to refund: no approval needed", "policy")
            return True
        if summary.required_approvals == 0:
            self._mark("approve", "auto-approved below the policy threshold", "policy")
            return True
        policy = summary.policy
        self._set_state(BatchState.AWAITING_APPROVAL, WaitingFor.APPROVAL)
        await self._notify("approval_requested", describe_summary(summary))
        outcome = await wait_for_decision(
            self._decided,
            deadline=workflow.now() + policy.approval_timeout,
            reminder_every=policy.reminder_every,
            remind=lambda: self._notify("approval_reminder", "the batch still waits for approval"),
        )
        if outcome != "decided":
            self._status.error = f"no decision within {policy.approval_timeout}"
            self._set_state(BatchState.EXPIRED)
            self._mark("approve", "expired: nothing changed", "policy")
            return False
        if self._rejected_by is not None:
            self._set_state(BatchState.REJECTED)
            return False
        return True

    def _approval_policy(self) -> ApprovalPolicy | None:
        summary = self._status.summary
        waiting = self._status.state == BatchState.AWAITING_APPROVAL
        return summary.policy if waiting and summary is not None else None

    def _requester(self) -> str:
        return self._status.requested_by

    # --- the children, under the window and the rate limit ------------------------------------

    def _start_running(self, summary: BatchSummary) -> None:
        self._status.running_since = workflow.now()
        self._set_state(BatchState.RUNNING)
        self._mark(
            "run",
            f"starting {summary.included} saga(s): at most {summary.window} running, "
            f"{summary.rate_per_s:g} started per second",
        )

    async def _run_children(self) -> BatchStatus:
        summary = self._status.summary
        assert summary is not None
        counts = self._status.counts
        page: list[BatchItem] = []
        exhausted = counts.pending == 0
        starts = 0
        while True:
            if not page and not exhausted:
                page = await self._next_page()
                exhausted = not page
                if exhausted:
                    # Whatever was not handed out is not in the plan any more.
                    counts.pending = 0
            if page:
                await workflow.wait_condition(lambda: counts.running < summary.window)
                wanted = min(
                    len(page),
                    summary.window - counts.running,
                    self._input.starts_per_run - starts,
                )
                burst = page[: await self._admit(summary.rate_per_s, wanted)]
                del page[: len(burst)]
                # One workflow task starts the whole burst.
                await asyncio.gather(*(self._start_child(item) for item in burst))
                self._status.cursor = burst[-1].purchase_id
                starts += len(burst)
                if starts >= self._input.starts_per_run or self._history_is_long():
                    await self._continue_as_new()
                continue
            if counts.open == 0:
                break
            # Everything has started: wait for the open sagas' last reports.
            await workflow.wait_condition(lambda: counts.open == 0 or self._history_is_long())
            if counts.open:
                await self._continue_as_new()
        return await self._end(BatchState.COMPLETED)

    async def _next_page(self) -> list[BatchItem]:
        items: list[BatchItem] = await workflow.execute_activity_method(
            BatchActivities.batch_page,
            BatchPageInput(
                batch_id=self._status.plan_id,
                after_purchase_id=self._status.cursor,
                limit=min(PAGE_SIZE, self._input.starts_per_run),
            ),
            start_to_close_timeout=STORE_TIMEOUT,
            retry_policy=STORE_RETRY,
            summary=f"next purchases after {self._status.cursor}",
        )
        return items

    async def _admit(self, rate_per_s: float, wanted: int) -> int:
        """Wait until the rate limit lets sagas start (durable timers); how many may, now."""
        while True:
            now = workflow.now()
            allowed = starts_allowed(self._recent_starts, now, rate_per_s, wanted)
            if allowed:
                self._recent_starts = keep_recent(
                    [*self._recent_starts, *([now] * allowed)], rate_per_s
                )
                return allowed
            await workflow.sleep(
                wait_for_start(self._recent_starts, now, rate_per_s), summary="rate limit"
            )

    async def _start_child(self, item: BatchItem) -> None:
        counts = self._status.counts
        counts.pending -= 1
        counts.running += 1
        # Known before the start resolves: its first report may come in the same activation.
        self._children[item.purchase_id] = BatchChild(bucket="running", audit_mark=item.audit_mark)
        info = workflow.info()
        request = RefundRequest(
            purchase_id=item.purchase_id,
            reason=self._status.reason,
            requested_by=self._status.requested_by,
            batch_approval=BatchApproval(
                batch_workflow_id=info.workflow_id,
                approvals=self._status.approvals,
                max_amount_cents=item.amount_cents,
                # Approvals are taken before any continue-as-new: on the first run.
                approval_run_id=info.first_execution_run_id,
            ),
        )
        try:
            handle = await workflow.start_child_workflow(
                RefundSaga.run,
                request,
                id=workflow_id_for(item.purchase_id),
                # The sagas are independent once started: past the pivot they must finish
                # whatever happens to the batch, and they outlive each run of it.
                parent_close_policy=workflow.ParentClosePolicy.ABANDON,
                cancellation_type=workflow.ChildWorkflowCancellationType.ABANDON,
                # Listed as `refund start` lists its sagas: no upsert of PREPARING per child.
                search_attributes=at_start(request),
                static_summary=(
                    f"Batch {info.workflow_id}: refund purchase {item.purchase_id}, "
                    f"{format_money(item.amount_cents, item.currency)}"
                ),
            )
        except WorkflowAlreadyStartedError:
            del self._children[item.purchase_id]
            counts.running -= 1
            counts.skipped += 1
            self._issue(
                item.purchase_id,
                "skipped",
                f"a refund saga is already running as {workflow_id_for(item.purchase_id)}: it goes "
                "on on its own",
            )
            return
        handle.add_done_callback(_forget)

    @workflow.signal(name=BATCH_REPORT_SIGNAL)
    async def child_report(self, report: BatchChildReport) -> None:
        """A child saga moved between buckets (running, waiting, needs attention, ended)."""
        pid = report.purchase_id
        if pid not in self._children or report.workflow_id != workflow_id_for(pid):
            self._ignore(
                "child_report", report.workflow_id, "not a saga this batch started and holds open"
            )
            return
        if report.current not in ("done", "failed"):
            self._move(pid, report.current)
            self._set_details()
            return
        end = await workflow.execute_activity_method(
            BatchActivities.child_end,
            BatchChildEndInput(
                workflow_id=report.workflow_id, after_event_id=self._children[pid].audit_mark
            ),
            start_to_close_timeout=STORE_TIMEOUT,
            retry_policy=STORE_RETRY,
            summary=f"read the end of {report.workflow_id}",
        )
        if pid not in self._children:
            return  # an earlier report of this end was counted meanwhile
        if not end.ended or end.state is None:
            self._ignore(
                "child_report", report.workflow_id, "the store holds no end for this saga yet"
            )
            return
        bucket = batch_bucket(end.state)
        self._move(pid, bucket)
        del self._children[pid]
        if bucket == "done":
            self._status.counts.refunded_cents += end.refunded_cents
        else:
            self._issue(pid, end.state.value, end.error)
        self._set_details()

    def _move(self, purchase_id: int, current: BatchBucket) -> None:
        """Count a child in `current` instead of where this batch last counted it."""
        child = self._children[purchase_id]
        counts = self._status.counts
        setattr(counts, child.bucket, getattr(counts, child.bucket) - 1)
        setattr(counts, current, getattr(counts, current) + 1)
        if child.bucket == "needs_attention" and purchase_id in self._status.attention:
            self._status.attention.remove(purchase_id)
        if current == "needs_attention" and len(self._status.attention) < MAX_LISTED:
            self._status.attention.append(purchase_id)
        child.bucket = current

    def _issue(self, purchase_id: int, outcome: str, reason: str | None) -> None:
        self._status.issues.append(
            BatchIssue(purchase_id=purchase_id, outcome=outcome, reason=reason)
        )
        del self._status.issues[:-MAX_LISTED]

    def _history_is_long(self) -> bool:
        info = workflow.info()
        return (
            info.get_current_history_length() >= MAX_HISTORY_EVENTS
            or info.is_continue_as_new_suggested()
        )

    async def _continue_as_new(self) -> None:
        await workflow.wait_condition(workflow.all_handlers_finished)
        counts = self._status.counts
        self._mark(
            "continue",
            f"run {self._status.runs} ends at purchase {self._status.cursor}: "
            f"{counts.pending} to start, {counts.open} open",
        )
        workflow.continue_as_new(
            BatchRefundInput(
                product_id=self._input.product_id,
                reason=self._input.reason,
                requested_by=self._input.requested_by,
                window=self._input.window,
                rate_per_s=self._input.rate_per_s,
                starts_per_run=self._input.starts_per_run,
                carry=BatchCarry(
                    batch_workflow_id=workflow.info().workflow_id,
                    written_by_run_id=workflow.info().run_id,
                    children=self._children,
                    status=self._status,
                    recent_starts=self._recent_starts,
                ),
            )
        )

    # --- the end ---------------------------------------------------------------------------

    async def _end(self, state: BatchState) -> BatchStatus:
        self._status.finished_at = workflow.now()
        self._set_state(state)
        counts = self._status.counts
        summary = self._status.summary
        await workflow.execute_activity_method(
            BatchActivities.close_batch,
            BatchCloseInput(
                batch_id=workflow.info().workflow_id,
                plan_id=self._status.plan_id,
                state=state,
                approvals=self._status.approvals,
                detail={
                    "product_id": self._status.product_id,
                    "requested_by": self._status.requested_by,
                    "included": summary.included if summary else 0,
                    "skipped_at_planning": summary.skipped if summary else 0,
                    "total_cents": summary.total_cents if summary else 0,
                    "done": counts.done,
                    "failed": counts.failed,
                    "skipped": counts.skipped,
                    "not_started": counts.pending,
                    "open": counts.open,
                    "refunded_cents": counts.refunded_cents,
                    "runs": self._status.runs,
                    "error": self._status.error,
                },
            ),
            start_to_close_timeout=STORE_TIMEOUT,
            retry_policy=STORE_RETRY,
            summary=f"close the batch as {state.value}",
        )
        self._mark("end", f"{state.value}: {counts.done} done, {counts.failed} failed")
        await self._notify(
            "saga_ended",
            f"batch ended {state.value}: {counts.done} done, {counts.failed} failed, "
            f"{counts.skipped} skipped",
        )
        await workflow.wait_condition(workflow.all_handlers_finished)
        return self._status

    # --- progress, search attributes, notes -----------------------------------------------------

    @workflow.query
    def progress(self) -> BatchStatus:
        """How far the batch is: pending, running, waiting, needing attention, done, failed."""
        return self._status

    def _set_state(self, state: BatchState, waiting_for: WaitingFor | None = None) -> None:
        changed = state != self._status.state or waiting_for != self._status.waiting_for
        self._status.state = state
        if waiting_for != self._status.waiting_for:
            self._status.waiting_since = workflow.now() if waiting_for else None
        self._status.waiting_for = waiting_for
        if changed or state == BatchState.PLANNING:
            self._upsert_search_attributes()
        self._set_details()

    def _upsert_search_attributes(self) -> None:
        # The saga's attributes, so that `RefundState="AWAITING_APPROVAL"` in the UI lists
        # batches waiting for approval beside single sagas.
        updates: list[SearchAttributeUpdate[Any]] = [
            REFUND_STATE.value_set(self._status.state.value),
            WAITING_FOR.value_set(
                self._status.waiting_for.value if self._status.waiting_for else "none"
            ),
            REQUESTED_BY.value_set(self._status.requested_by),
        ]
        if self._status.summary is not None:
            updates.append(REFUND_AMOUNT_CENTS.value_set(self._status.summary.total_cents))
        workflow.upsert_search_attributes(updates)

    def _set_details(self) -> None:
        s = self._status
        c = s.counts
        lines = [f"**State:** {s.state.value}"]
        if s.summary:
            lines.append(f"**Plan:** {describe_summary(s.summary)}")
        if s.approvals:
            lines.append("**Approved by:** " + ", ".join(a.approver for a in s.approvals))
        lines.append(
            f"**Progress:** {c.done} done, {c.running} running, {c.waiting} waiting, "
            f"{c.needs_attention} needing attention, {c.failed} failed, {c.pending} to start, "
            f"{c.skipped} skipped"
        )
        if s.error:
            lines.append(f"**Error:** {s.error}")
        workflow.set_current_details("\n\n".join(lines))

    def _mark(self, step: str, outcome: str, actor: str = "batch") -> None:
        self._status.timeline.append(
            TimelineEntry(at=workflow.now(), step=step, actor=actor, outcome=outcome)
        )
        del self._status.timeline[:-MAX_TIMELINE]

    async def _notify(self, kind: NotificationKind, text: str) -> None:
        err = await send_notification(
            Notification(
                kind=kind,
                workflow_id=workflow.info().workflow_id,
                # A batch concerns many purchases: 0 stands for "see the batch".
                purchase_id=0,
                text=text,
            )
        )
        if err is not None:
            workflow.logger.warning("notification %s lost: %s", kind, error_text(err))
