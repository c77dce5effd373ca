"""The RefundSaga worker: the workflows and their activities on the saga's task queue, and the
processor calls on the rate-limited queue beside it (`REFUND_PROCESSOR_CALLS_PER_S`).

Run with `python worker.py` or `refund worker`. SIGTERM or SIGINT shut it down gracefully:
it stops polling and gives in-flight activities time to finish before handing them back.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import timedelta

from temporalio.client import Client
from temporalio.worker import (
    PollerBehavior,
    PollerBehaviorAutoscaling,
    PollerBehaviorSimpleMaximum,
    UnsandboxedWorkflowRunner,
    Worker,
    WorkflowRunner,
)
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner

from activities.batch_activities import BatchActivities
from activities.failed_refund_activities import FailedRefundActivities
from activities.refund_activities import RefundActivities
from activities.run_scope import RunScopeInterceptor
from activities.sweep_activities import SweepActivities
from refundsaga.ams import HttpAmsClient
from refundsaga.approval import policy_from_settings
from refundsaga.contracts import processor_task_queue
from refundsaga.logs import configure_logging
from refundsaga.metrics import MetricsConfigError, runtime_from_settings
from refundsaga.notify import NotifyConfigError, notifier_from_settings, validate_notify_settings
from refundsaga.processor import ProcessorClient
from refundsaga.settings import Settings, get_settings
from refundsaga.store import OasisStore
from refundsaga.store.migrate import upgrade, wait_for_database
from refundsaga.temporal import connect, run_and_exit
from workflows.batch_refund import BatchRefund
from workflows.failed_refund import FailedRefundTask
from workflows.reconciliation_sweep import ReconciliationSweep
from workflows.refund_saga import RefundSaga
from workflows.restore_progress import PurgeExpiredSnapshots, RestoreProgress

log = logging.getLogger("refundsaga.worker")

GRACEFUL_SHUTDOWN = timedelta(seconds=30)


@asynccontextmanager
async def saga_activities(settings: Settings) -> AsyncIterator[RefundActivities]:
    """The activities with their clients, opened for the worker's lifetime."""
    notifier = notifier_from_settings(settings)  # first: it is the one that can refuse settings
    store = OasisStore.from_url(
        settings.resolved_database_url, pool_size=settings.database_pool_size
    )
    processor = ProcessorClient(
        settings.processor_url,
        settings.processor_api_key,
        timeout_s=settings.processor_timeout_s,
        api_version=settings.processor_api_version,
    )
    ams = HttpAmsClient(settings.ams_url, settings.ams_api_key, timeout_s=settings.ams_timeout_s)
    try:
        yield RefundActivities(
            store=store,
            processor=processor,
            ams=ams,
            notifier=notifier,
            policy=policy_from_settings(settings),
        )
    finally:
        await notifier.aclose()
        await processor.aclose()
        await ams.aclose()
        store.close()


def workflow_runner(settings: Settings) -> WorkflowRunner:
    """The SDK's sandbox when `REFUND_WORKFLOW_SANDBOX` is true, else the plain runner.

    The plain runner imports the workflow modules once per process instead of once per
    workflow run; determinism is checked by the tests, which run the sandbox (settings.py).
    """
    if settings.workflow_sandbox:
        return SandboxedWorkflowRunner()
    return UnsandboxedWorkflowRunner()


def poller_behavior(settings: Settings) -> PollerBehavior:
    """How many polls a worker keeps open per task queue (`REFUND_WORKER_POLLERS`)."""
    if settings.worker_pollers == "auto":
        return PollerBehaviorAutoscaling()
    return PollerBehaviorSimpleMaximum(maximum=settings.worker_pollers)


WORKFLOWS: list[type] = [
    RefundSaga,
    BatchRefund,
    RestoreProgress,
    PurgeExpiredSnapshots,
    FailedRefundTask,
    ReconciliationSweep,
]


def build_workers(
    client: Client,
    settings: Settings,
    activities: RefundActivities,
    *,
    task_queue: str | None = None,
    workflows: Sequence[type] = WORKFLOWS,
) -> list[Worker]:
    """The saga's two workers: its own task queue, and the processor queue beside it.

    The activities that call the processor run on `processor_task_queue(task_queue)`, which
    the Temporal server dispatches at `processor_calls_per_s` for every worker polling it:
    one limit on processor calls for all sagas and batches, retries included.
    """
    queue = task_queue or settings.task_queue
    rate = settings.processor_calls_per_s or None  # 0: no limit
    batch = BatchActivities.alongside(activities, settings)
    failed = FailedRefundActivities.alongside(activities, client)
    sweep = SweepActivities.alongside(activities, client, settings, task_queue=queue)
    return [
        Worker(
            client,
            task_queue=queue,
            workflows=list(workflows),
            activities=[*activities.others(), *batch.all(), *failed.others(), *sweep.others()],
            max_concurrent_activities=settings.max_concurrent_activities,
            max_concurrent_workflow_tasks=settings.max_concurrent_workflow_tasks,
            max_cached_workflows=settings.max_cached_workflows,
            workflow_runner=workflow_runner(settings),
            workflow_task_poller_behavior=poller_behavior(settings),
            activity_task_poller_behavior=poller_behavior(settings),
            graceful_shutdown_timeout=GRACEFUL_SHUTDOWN,
            interceptors=[RunScopeInterceptor()],
        ),
        Worker(
            client,
            task_queue=processor_task_queue(queue),
            activities=[
                *activities.processor_calls(),
                *failed.processor_calls(),
                *sweep.processor_calls(),
            ],
            max_concurrent_activities=settings.max_concurrent_activities,
            max_task_queue_activities_per_second=rate,
            activity_task_poller_behavior=poller_behavior(settings),
            graceful_shutdown_timeout=GRACEFUL_SHUTDOWN,
            interceptors=[RunScopeInterceptor()],
        ),
    ]


@asynccontextmanager
async def running(workers: Sequence[Worker]) -> AsyncIterator[None]:
    """Run the workers together; leaving shuts them all down (gracefully)."""
    async with AsyncExitStack() as stack:
        for worker in workers:
            await stack.enter_async_context(worker)
        try:
            yield
        finally:
            # Drain them at once, not one after the other (shutdown is safe to repeat).
            await asyncio.gather(*(worker.shutdown() for worker in workers))


async def run_worker(settings: Settings, *, migrate: bool = True) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    # Configuration mistakes fail here, before waiting for the database or Temporal.
    validate_notify_settings(settings)
    runtime = runtime_from_settings(settings)
    if migrate:
        url = settings.resolved_database_url
        await asyncio.to_thread(wait_for_database, url)
        await asyncio.to_thread(upgrade, url)
    client = await connect(settings, runtime=runtime)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with (
        saga_activities(settings) as activities,
        running(build_workers(client, settings, activities)),
    ):
        log.info(
            "worker started",
            extra={
                "task_queue": settings.task_queue,
                "processor_calls_per_s": settings.processor_calls_per_s or "unlimited",
                "namespace": settings.temporal_namespace,
                "metrics": settings.metrics_address,
            },
        )
        await stop.wait()
        log.info("worker stopping: finishing in-flight activities")
    log.info("worker stopped")


def main() -> None:
    settings = get_settings()
    configure_logging(settings.log_format)
    try:
        asyncio.run(run_worker(settings))
    except (NotifyConfigError, MetricsConfigError) as err:
        # One line naming the variable to fix, not a traceback.
        raise SystemExit(f"refund worker: {err}") from None


if __name__ == "__main__":
    run_and_exit(main)
