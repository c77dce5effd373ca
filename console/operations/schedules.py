"""The Temporal schedules RefundSaga relies on: the daily purge of expired progress snapshots."""

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
from workflows.restore_progress import PurgeExpiredSnapshots

PURGE_SCHEDULE_ID = "refund-purge-expired-snapshots"
PURGE_EVERY = timedelta(days=1)


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
    try:
        await client.create_schedule(PURGE_SCHEDULE_ID, schedule)
        return "created"
    except ScheduleAlreadyRunningError:
        pass
    except RPCError as err:
        raise OperationError(f"cannot create schedule {PURGE_SCHEDULE_ID}: {err.message}") from err
    try:
        await client.get_schedule_handle(PURGE_SCHEDULE_ID).update(
            lambda _current: ScheduleUpdate(schedule=schedule)
        )
    except RPCError as err:
        raise OperationError(f"cannot update schedule {PURGE_SCHEDULE_ID}: {err.message}") from err
    return "updated"
