"""The Temporal schedules RefundSaga relies on: the daily purge of expired progress snapshots,
and the reconciliation sweep of the processor's lists."""

from __future__ import annotations

from datetime import timedelta

from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleAlreadyRunningError,
    ScheduleIntervalSpec,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleSpec,
    ScheduleUpdate,
)
from temporalio.service import RPCError

from console.operations.errors import OperationError
from refundsaga.contracts import PurgeInput
from refundsaga.settings import Settings
from refundsaga.sweep import SweepInput
from workflows.reconciliation_sweep import ReconciliationSweep
from workflows.restore_progress import PurgeExpiredSnapshots

PURGE_SCHEDULE_ID = "refund-purge-expired-snapshots"
PURGE_EVERY = timedelta(days=1)
SWEEP_SCHEDULE_ID = "refund-reconciliation-sweep"


async def ensure_purge_schedule(client: Client, settings: Settings) -> str:
    """Create the daily purge of expired progress snapshots, or bring it up to date.

    Safe to call at every deploy or `refund stack up`: the schedule's retention and task
    queue follow the settings of the caller.

    Returns:
        ``created`` or ``updated``.
    """
    schedule = Schedule(
        action=ScheduleActionStartWorkflow(
            PurgeExpiredSnapshots.run,
            PurgeInput(retention=settings.restore_retention),
            id=f"{PURGE_SCHEDULE_ID}-run",
            task_queue=settings.task_queue,
            static_summary="Purge progress snapshots past the restore retention",
        ),
        spec=ScheduleSpec(intervals=[ScheduleIntervalSpec(every=PURGE_EVERY)]),
        policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP),
    )
    return await _create_or_update(client, PURGE_SCHEDULE_ID, schedule)


async def ensure_sweep_schedule(client: Client, settings: Settings) -> str:
    """Create the reconciliation sweep, every `REFUND_SWEEP_EVERY`, or bring it up to date.

    A sweep still running when the next is due is not doubled (SKIP): the next one reads
    from the mark the running one leaves. Safe to call at every deploy or `refund stack up`.

    Returns:
        ``created`` or ``updated``.
    """
    schedule = Schedule(
        action=ScheduleActionStartWorkflow(
            ReconciliationSweep.run,
            SweepInput(
                page_size=settings.sweep_page_size,
                overlap=settings.sweep_overlap,
                # The first sweep reads back as far as one interval would have.
                first_lookback=settings.sweep_every,
            ),
            id=f"{SWEEP_SCHEDULE_ID}-run",
            task_queue=settings.task_queue,
            static_summary="Reconcile what the processor reported that no webhook brought",
        ),
        spec=ScheduleSpec(intervals=[ScheduleIntervalSpec(every=settings.sweep_every)]),
        policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP),
    )
    return await _create_or_update(client, SWEEP_SCHEDULE_ID, schedule)


async def trigger_sweep(client: Client) -> None:
    """Run the reconciliation sweep once now (skipped if one is running).

    Raises:
        OperationError: The schedule does not exist (`refund schedules ensure`) or Temporal
            refused.
    """
    try:
        await client.get_schedule_handle(SWEEP_SCHEDULE_ID).trigger()
    except RPCError as err:
        raise OperationError(
            f"cannot trigger schedule {SWEEP_SCHEDULE_ID}: {err.message}; "
            "run `refund schedules ensure` first if it does not exist"
        ) from err


async def _create_or_update(client: Client, schedule_id: str, schedule: Schedule) -> str:
    try:
        await client.create_schedule(schedule_id, schedule)
        return "created"
    except ScheduleAlreadyRunningError:
        pass
    except RPCError as err:
        raise OperationError(f"cannot create schedule {schedule_id}: {err.message}") from err
    try:
        await client.get_schedule_handle(schedule_id).update(
            lambda _current: ScheduleUpdate(schedule=schedule)
        )
    except RPCError as err:
        raise OperationError(f"cannot update schedule {schedule_id}: {err.message}") from err
    return "updated"
