"""Activities of the BatchRefund, RestoreProgress and PurgeExpiredSnapshots workflows.

Thin adapters like the saga's: domain outcomes in, Temporal errors out. Every activity is safe
to run twice (planning replaces its own plan, a restore finds the rows it restored).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, cast

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.refund_activities import RefundActivities
from refundsaga.batch import audit_mark, plan_batch, recorded_end, to_planned
from refundsaga.contracts import (
    AmsAction,
    ApprovalPolicy,
    ApprovalRecord,
    BatchChildEnd,
    BatchChildEndInput,
    BatchCloseInput,
    BatchItem,
    BatchPageInput,
    BatchPlanInput,
    BatchSummary,
    PurgeCutoff,
    PurgeResult,
    RestoreCheck,
    RestoreCloseInput,
    RestoreInput,
    RestoreRequest,
    RestoreResult,
)
from refundsaga.processor import ProcessorClient, ProcessorError
from refundsaga.settings import Settings
from refundsaga.store import OasisStore
from refundsaga.store.store import RestoreRefused

RESTORE_REFUSED = "RestoreRefused"


def _decisions(approvals: list[ApprovalRecord]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (
            "approved" if a.approve else "rejected",
            a.approver,
            {"at": a.at.isoformat(), "comment": a.comment}
            | ({"signature": a.signature} if a.signature else {}),
        )
        for a in approvals
    ]


class BatchActivities:
    """Batch planning, restores and purges, bound to the worker's store and processor."""

    def __init__(
        self,
        *,
        store: OasisStore,
        processor: ProcessorClient,
        policy: ApprovalPolicy,
        settings: Settings,
    ) -> None:
        self._store = store
        self._processor = processor
        self._policy = policy
        self._settings = settings

    @classmethod
    def alongside(cls, saga: RefundActivities, settings: Settings) -> BatchActivities:
        """Share the saga activities' clients and policy (one pool, one policy per worker)."""
        return cls(
            store=saga._store, processor=saga._processor, policy=saga._policy, settings=settings
        )

    # --- batch refunds ----------------------------------------------------------------------

    @activity.defn
    async def plan_batch(self, inp: BatchPlanInput) -> BatchSummary:
        """Plan the batch (store + processor), record each purchase's plan, return the totals."""
        try:
            plan = await plan_batch(
                self._store,
                self._processor,
                product_id=inp.product_id,
                purchase_ids=inp.purchase_ids,
                policy=self._policy,
                window=inp.window or self._settings.batch_window,
                rate_per_s=inp.rate_per_s or self._settings.batch_rate_per_s,
                on_progress=lambda done, total: activity.heartbeat(done, total),
            )
        except ProcessorError as err:
            raise ApplicationError(
                f"planning read the processor and failed: {err.message}",
                type=type(err).__name__,
                non_retryable=not err.retryable,
            ) from err
        await asyncio.to_thread(
            self._store.save_batch_items, inp.batch_id, [to_planned(i) for i in plan.items]
        )
        return plan.summary

    @activity.defn
    async def batch_page(self, inp: BatchPageInput) -> list[BatchItem]:
        """The next purchases of the approved plan to start, by purchase id."""
        # Read before the page: any saga of it starts later, so its end is above the mark.
        mark = await asyncio.to_thread(audit_mark, self._store)
        rows = await asyncio.to_thread(
            lambda: self._store.batch_page(
                inp.batch_id, after_purchase_id=inp.after_purchase_id, limit=inp.limit
            )
        )
        return [
            BatchItem(
                purchase_id=row.purchase_id,
                currency=row.currency,
                amount_cents=row.amount_cents,
                already_refunded=row.already_refunded,
                progress_records=row.progress_records,
                ams_action=cast(AmsAction, row.ams_action),
                audit_mark=mark,
            )
            for row in rows
        ]

    @activity.defn
    async def child_end(self, inp: BatchChildEndInput) -> BatchChildEnd:
        """A child saga's end as the store holds it: what the batch counts, not the report."""
        return await asyncio.to_thread(
            lambda: recorded_end(
                self._store, workflow_id=inp.workflow_id, after_event_id=inp.after_event_id
            )
        )

    @activity.defn
    async def close_batch(self, inp: BatchCloseInput) -> None:
        """The batch's approvals and end, once, in the audit trail."""
        await asyncio.to_thread(
            lambda: self._store.record_workflow_end(
                workflow_id=inp.batch_id,
                run_key=inp.plan_id,
                event="batch_ended",
                purchase_id=None,
                decisions=_decisions(inp.approvals),
                detail={"state": inp.state.value, **inp.detail},
            )
        )

    # --- restore of a mistaken revoke --------------------------------------------------------

    @activity.defn
    async def check_restore(self, request: RestoreRequest) -> RestoreCheck:
        """What the archive holds for the saga, and the retention and policy in force."""
        info = await asyncio.to_thread(self._store.snapshot_info, request.saga_workflow_id)
        return RestoreCheck(
            saga_workflow_id=info.workflow_id,
            saga_state=info.saga_state,
            revoked=info.revoked,
            purchase_id=info.purchase_id,
            user_id=info.user_id,
            product_id=info.product_id,
            rows=info.rows,
            archived_at=info.archived_at,
            restored_at=info.restored_at,
            restored_by=info.restored_by,
            conflicts=info.conflicts,
            retention=self._settings.restore_retention,
            policy=self._policy,
        )

    @activity.defn
    async def restore_progress(self, inp: RestoreInput) -> RestoreResult:
        """Put the snapshot back; refused (not retried) when expired or conflicting."""
        try:
            outcome = await asyncio.to_thread(
                lambda: self._store.restore_progress(
                    saga_workflow_id=inp.saga_workflow_id,
                    archived_at=inp.archived_at,
                    not_before=inp.not_before,
                    restore_workflow_id=inp.restore_workflow_id,
                    operator=inp.operator,
                    detail={
                        "reason": inp.reason,
                        "approvers": [a.approver for a in inp.approvals if a.approve],
                    },
                )
            )
        except RestoreRefused as err:
            raise ApplicationError(str(err), type=RESTORE_REFUSED, non_retryable=True) from err
        return RestoreResult(**outcome.model_dump())

    @activity.defn
    async def close_restore(self, inp: RestoreCloseInput) -> None:
        """The restore's request, approvals and end, once, in the audit trail."""
        await asyncio.to_thread(
            lambda: self._store.record_workflow_end(
                workflow_id=inp.restore_workflow_id,
                run_key=inp.run_id,
                event="restore_ended",
                purchase_id=inp.purchase_id,
                decisions=[
                    (
                        "restore_requested",
                        inp.operator,
                        {"saga_workflow_id": inp.saga_workflow_id},
                    ),
                    *_decisions(inp.approvals),
                ],
                detail={
                    "state": inp.state.value,
                    "saga_workflow_id": inp.saga_workflow_id,
                    **inp.detail,
                },
            )
        )

    @activity.defn
    async def purge_expired_snapshots(self, inp: PurgeCutoff) -> PurgeResult:
        """Delete archived progress older than the cutoff (it can no longer be restored).

        Never inside the worker's retention, whatever the workflow's input said: anyone can
        start the purge by hand with a retention of zero.
        """
        as_of = inp.as_of or datetime.now(UTC)
        cutoff = min(inp.cutoff, as_of - self._settings.restore_retention)
        outcome = await asyncio.to_thread(
            lambda: self._store.purge_expired_snapshots(cutoff=cutoff)
        )
        return PurgeResult(cutoff=cutoff, deleted=outcome.deleted, sagas=outcome.sagas)

    def all(self) -> list[Callable[..., Any]]:
        """Every activity, for the worker."""
        return [
            self.plan_batch,
            self.batch_page,
            self.child_end,
            self.close_batch,
            self.check_restore,
            self.restore_progress,
            self.close_restore,
            self.purge_expired_snapshots,
        ]
