"""ReconciliationSweep: read the processor's refunds, disputes and late events since the last
high-water mark and start what a missed webhook would have started.

Orchestration only, run by the schedule `refund-reconciliation-sweep`. Each page is one activity
on the processor queue, so the sweep's calls share the processor rate limit with the sagas; a
long backlog continues as new with its place in the lists. The mark moves once every list has
been read, to the newest object seen: a sweep that fails leaves it where it was, and the next
one reads the same window again, which starts nothing twice.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from activities.sweep_activities import SweepActivities
    from refundsaga.contracts import processor_task_queue
    from refundsaga.sweep import (
        SWEEP_WORKFLOW,
        SweepInput,
        SweepMarkInput,
        SweepPageInput,
        SweepProgress,
        SweepResult,
        SweepWindowInput,
        sweep_result,
    )

STORE_TIMEOUT = timedelta(seconds=30)
STORE_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=30)
)
# A page is one processor call, then one dispatch per object (a Temporal call, a store read).
PAGE_TIMEOUT = timedelta(minutes=5)
PAGE_HEARTBEAT = timedelta(minutes=1)
# A few tries through a short outage; after that the sweep fails and the next one reads the
# same window again, its mark unmoved.
PAGE_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    maximum_interval=timedelta(minutes=1),
    maximum_attempts=5,
)
# Three events per page: a run stays far below the history limits, whatever the backlog.
PAGES_PER_RUN = 200


@workflow.defn(name=SWEEP_WORKFLOW)
class ReconciliationSweep:
    """One sweep over the processor's lists since the mark."""

    @workflow.run
    async def run(self, inp: SweepInput) -> SweepResult:
        progress = inp.progress
        if progress is None:
            window = await workflow.execute_local_activity_method(
                SweepActivities.sweep_window,
                SweepWindowInput(overlap=inp.overlap, first_lookback=inp.first_lookback),
                start_to_close_timeout=STORE_TIMEOUT,
                retry_policy=STORE_RETRY,
                summary="read the sweep's mark",
            )
            progress = SweepProgress(window=window)
        pages_this_run = 0
        while progress.listing is not None:
            if pages_this_run >= PAGES_PER_RUN or workflow.info().is_continue_as_new_suggested():
                workflow.continue_as_new(inp.model_copy(update={"progress": progress}))
            page = await workflow.execute_activity_method(
                SweepActivities.sweep_page,
                SweepPageInput(
                    listing=progress.listing,
                    created_gte=progress.window.created_gte,
                    starting_after=progress.starting_after,
                    limit=inp.page_size,
                ),
                task_queue=processor_task_queue(workflow.info().task_queue),
                start_to_close_timeout=PAGE_TIMEOUT,
                heartbeat_timeout=PAGE_HEARTBEAT,
                retry_policy=PAGE_RETRY,
                summary=f"{progress.listing} since {progress.window.created_gte}",
            )
            progress = progress.after(page)
            pages_this_run += 1
        mark = progress.window.mark
        if progress.newest_created is not None:
            mark = await workflow.execute_local_activity_method(
                SweepActivities.advance_sweep_mark,
                SweepMarkInput(created=progress.newest_created, object_id=progress.newest_id),
                start_to_close_timeout=STORE_TIMEOUT,
                retry_policy=STORE_RETRY,
                summary="move the sweep's mark",
            )
        return sweep_result(progress, mark)
