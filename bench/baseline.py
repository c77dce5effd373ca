"""The bench's no-op baseline workflows, their activity, and the bench's own worker process
(which also runs the naive saga, `bench/naive.py`)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from datetime import timedelta
from typing import Any

from temporalio import activity, workflow
from temporalio.common import RetryPolicy
from temporalio.worker import Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner

# The standard saga with auto-approval runs seven activities: prepare, refund, record, revoke,
# deentitle, verify, close. The baseline runs as many, so the ratio compares the saga's own
# overhead (search attributes, payloads, real I/O) with Temporal's floor for that shape.
STANDARD_SAGA_ACTIVITIES = 7
BASELINE_WORKFLOW = "BenchBaseline"
BASELINE_SA_WORKFLOW = "BenchBaselineSearchAttributes"
GO_SIGNAL = "go"
# The standard saga upserts its search attributes six times (each state it passes through).
SAGA_UPSERTS = 6


@activity.defn(name="bench_noop_step")
async def noop_step(step: int) -> int:
    """A plain activity that does nothing: what remains is Temporal's cost of one step."""
    return step


@workflow.defn(name=BASELINE_WORKFLOW)
class BenchBaseline:
    """Waits for one signal, then runs `steps` no-op activities one after another."""

    def __init__(self) -> None:
        self._go = False

    @workflow.run
    async def run(self, steps: int) -> int:
        await workflow.wait_condition(lambda: self._go)
        for step in range(steps):
            await workflow.execute_activity(
                noop_step,
                step,
                start_to_close_timeout=timedelta(seconds=20),
                retry_policy=RetryPolicy(maximum_attempts=8),
            )
        return steps

    @workflow.signal(name=GO_SIGNAL)
    def go(self) -> None:
        self._go = True


@workflow.defn(name=BASELINE_SA_WORKFLOW)
class BenchBaselineSearchAttributes:
    """The baseline plus the saga's search-attribute upserts: isolates what they cost."""

    def __init__(self) -> None:
        self._go = False

    @workflow.run
    async def run(self, steps: int) -> int:
        from refundsaga.search_attributes import REFUND_STATE

        await workflow.wait_condition(lambda: self._go)
        for step in range(steps):
            if step < SAGA_UPSERTS:
                workflow.upsert_search_attributes([REFUND_STATE.value_set(f"STEP_{step}")])
            await workflow.execute_activity(
                noop_step,
                step,
                start_to_close_timeout=timedelta(seconds=20),
                retry_policy=RetryPolicy(maximum_attempts=8),
            )
        return steps

    @workflow.signal(name=GO_SIGNAL)
    def go(self) -> None:
        self._go = True


def sandboxed_queue(baseline_queue: str) -> str:
    """Where the bench worker runs the baseline in the SDK's sandbox (`baseline_sandboxed`)."""
    return f"{baseline_queue}-sandboxed"


async def _serve(baseline_queue: str) -> None:
    # Imported here: a test that only needs the workflow classes should not load settings.
    from activities.run_scope import RunScopeInterceptor
    from bench.naive import NaiveSaga, naive_queue
    from refundsaga.contracts import processor_task_queue
    from refundsaga.settings import get_settings
    from refundsaga.temporal import connect
    from worker import poller_behavior, saga_activities, workflow_runner

    settings = get_settings()
    client = await connect(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    # Same concurrency limits, pollers and workflow runner as the stack's saga worker, so
    # neither side gets more; the second queue runs the baseline in the SDK's sandbox whatever
    # the setting, and the naive saga always runs there (the SDK's default).
    limits: dict[str, Any] = {
        "max_concurrent_activities": settings.max_concurrent_activities,
        "activity_task_poller_behavior": poller_behavior(settings),
    }
    workflow_limits: dict[str, Any] = {
        "max_concurrent_workflow_tasks": settings.max_concurrent_workflow_tasks,
        "max_cached_workflows": settings.max_cached_workflows,
        "workflow_task_poller_behavior": poller_behavior(settings),
    }
    async with saga_activities(settings) as activities, contextlib.AsyncExitStack() as stack:
        workers = [
            Worker(
                client,
                task_queue=queue,
                workflows=[BenchBaseline, BenchBaselineSearchAttributes],
                activities=[noop_step],
                workflow_runner=runner,
                **limits,
                **workflow_limits,
            )
            for queue, runner in (
                (baseline_queue, workflow_runner(settings)),
                (sandboxed_queue(baseline_queue), SandboxedWorkflowRunner()),
            )
        ]
        naive = naive_queue(baseline_queue)
        # The naive saga's workers as the saga's (worker.build_workers): the same activities
        # and the processor calls on their own queue at the same limit.
        workers += [
            Worker(
                client,
                task_queue=naive,
                workflows=[NaiveSaga],
                activities=activities.others(),
                workflow_runner=SandboxedWorkflowRunner(),
                interceptors=[RunScopeInterceptor()],
                **limits,
                **workflow_limits,
            ),
            Worker(
                client,
                task_queue=processor_task_queue(naive),
                activities=activities.processor_calls(),
                max_task_queue_activities_per_second=settings.processor_calls_per_s or None,
                interceptors=[RunScopeInterceptor()],
                **limits,
            ),
        ]
        for worker in workers:
            await stack.enter_async_context(worker)
        print("bench worker polling", *(w.task_queue for w in workers), flush=True)
        await stop.wait()


def main() -> None:
    """`python -m bench.baseline --task-queue Q`: the bench's worker for the baselines.

    It reads `REFUND_*` from the environment like the stack's worker does.
    """
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--task-queue", required=True)
    parser.add_argument("--bench-worker-tag", default="", help="labels the process in `ps`")
    args = parser.parse_args()
    asyncio.run(_serve(args.task_queue))


if __name__ == "__main__":
    from refundsaga.temporal import run_and_exit

    run_and_exit(main)
