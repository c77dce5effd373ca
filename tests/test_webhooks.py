"""The processor's webhook receiver over real HTTP, on the real Temporal test server.

Stand-in workflows take the names the receiver starts by ("RefundSaga", "FailedRefundTask"):
what they then do is the saga's business, tested with the saga. Events are signed here with
Stripe's scheme written out and verified by the product through the `stripe` package.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import socket
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import uvicorn
from pydantic import SecretStr
from sqlalchemy import insert
from starlette.types import ASGIApp
from temporalio import workflow
from temporalio.client import Client, WorkflowExecutionDescription, WorkflowExecutionStatus
from temporalio.service import RetryConfig, RPCError, RPCStatusCode
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from console.webhooks import WEBHOOK_PATH, WebhooksRefused, build_app, serve
from refundsaga import search_attributes as sa
from refundsaga.contracts import RefundRequest, SagaState
from refundsaga.ids import failed_refund_id_for, reconcile_id_for
from refundsaga.models import LedgerEntry
from refundsaga.processor_events import PROCESSOR_EVENT_SIGNAL, FailedRefund, ProcessorEvent
from refundsaga.settings import Settings
from refundsaga.store import OasisStore
from refundsaga.store.inbox import ProcessorInbox
from refundsaga.store.schema import Purchase
from refundsaga.temporal import payload_data_converter
from tests.fixtures.stripe_events import (
    WEBHOOK_SECRET,
    body_of,
    charge,
    dispute,
    event,
    new_id,
    ours,
    refund,
    signature,
)

# What the seeded buyer is called: it must never reach a log.
BUYER_NAME = "Jenny Rosen"
BUYER_EMAIL_DOMAIN = "example.com"


@workflow.defn(name="RefundSaga")
class StandInSaga:
    """Keeps its request and the processor events it is sent; ends COMPLETED when told."""

    def __init__(self) -> None:
        self._request: RefundRequest | None = None
        self._events: list[str] = []
        self._complete = False

    @workflow.run
    async def run(self, request: RefundRequest) -> str:
        self._request = request
        await workflow.wait_condition(lambda: self._complete)
        workflow.upsert_search_attributes([sa.REFUND_STATE.value_set(SagaState.COMPLETED.value)])
        return SagaState.COMPLETED.value

    @workflow.signal(name=PROCESSOR_EVENT_SIGNAL)
    def processor_event(self, event: ProcessorEvent) -> None:
        self._events.append(event.refund_id)

    @workflow.signal
    def complete(self) -> None:
        self._complete = True

    @workflow.query
    def request(self) -> RefundRequest | None:
        return self._request

    @workflow.query
    def events(self) -> list[str]:
        return self._events


@workflow.defn(name="FailedRefundTask")
class StandInFailedRefundTask:
    """Keeps its input until an operator closes it."""

    def __init__(self) -> None:
        self._task: FailedRefund | None = None
        self._closed = False

    @workflow.run
    async def run(self, task: FailedRefund) -> None:
        self._task = task
        await workflow.wait_condition(lambda: self._closed)

    @workflow.signal
    def close(self) -> None:
        self._closed = True

    @workflow.query
    def task(self) -> FailedRefund | None:
        return self._task


@asynccontextmanager
async def served(app: ASGIApp) -> AsyncIterator[str]:
    """Serve `app` with uvicorn on a free loopback port, on this event loop (the Temporal
    client's); yields the base URL once it listens."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(
        uvicorn.Config(app, log_config=None, log_level="warning", access_log=False, lifespan="off")
    )
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("the receiver stopped during start-up")
            await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await task
        sock.close()


@dataclass
class Receiver:
    """The receiver on a port of its own, with its store, inbox and Temporal client."""

    url: str
    http: httpx.AsyncClient
    client: Client
    store: OasisStore
    inbox: ProcessorInbox
    task_queue: str
    workflow_ids: set[str] = field(default_factory=set)

    def purchase(self) -> tuple[int, str]:
        """A purchase paid by a new charge: (purchase id, charge id)."""
        charge_id = new_id("ch")
        user = self.store.create_user(
            name=BUYER_NAME, email=f"jenny.{uuid.uuid4().hex[:6]}@{BUYER_EMAIL_DOMAIN}"
        )
        product = self.store.create_product(
            code="COURSE-WH", title="Course", entitlement_source="oasis"
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

    async def post(
        self, payload: dict[str, Any] | bytes, *, sig: str | None = None, url: str | None = None
    ) -> httpx.Response:
        """POST an event as the processor does, signed with the endpoint's secret unless
        `sig` says otherwise."""
        body = payload if isinstance(payload, bytes) else body_of(payload)
        headers = {"content-type": "application/json; charset=utf-8"}
        headers["stripe-signature"] = signature(body) if sig is None else sig
        if not headers["stripe-signature"]:
            del headers["stripe-signature"]
        return await self.http.post(
            f"{url or self.url}{WEBHOOK_PATH}", content=body, headers=headers
        )

    async def delivered(self, payload: dict[str, Any]) -> str:
        """Deliver an event, expect 200, and return what the inbox recorded of it."""
        response = await self.post(payload)
        assert response.status_code == 200, response.text
        assert response.json() == {"received": True}
        handled = self.inbox.handled(payload["id"])
        assert handled is not None
        return handled.outcome

    async def describe(self, workflow_id: str) -> WorkflowExecutionDescription | None:
        try:
            return await self.client.get_workflow_handle(workflow_id).describe()
        except RPCError as err:
            if err.status == RPCStatusCode.NOT_FOUND:
                return None
            raise

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

    async def complete(self, workflow_id: str, run_id: str) -> None:
        handle = self.client.get_workflow_handle(workflow_id, run_id=run_id)
        await handle.signal(StandInSaga.complete)
        assert await handle.result() == SagaState.COMPLETED.value


def start_purchase_ids_anew(store: OasisStore) -> None:
    """Make this test's purchase ids its own: the workflow ids derive from them, and the
    test server outlives each test's database."""
    user = store.create_user(name="Offset", email=f"offset.{uuid.uuid4().hex[:6]}@example.org")
    product = store.create_product(code="OFFSET", title="Offset", entitlement_source="oasis")
    with store.engine.begin() as db:
        db.execute(
            insert(Purchase).values(
                id=random.randrange(1_000_000, 2_000_000_000),
                user_id=user,
                product_id=product,
                amount_cents=1,
                currency="usd",
                processor_charge_id=new_id("ch"),
            )
        )


@pytest.fixture
async def receiver(
    time_env: WorkflowEnvironment, sqlite_store: OasisStore
) -> AsyncIterator[Receiver]:
    task_queue = f"webhooks-{uuid.uuid4().hex[:8]}"
    settings = Settings(task_queue=task_queue, processor_webhook_secret=SecretStr(WEBHOOK_SECRET))
    inbox = ProcessorInbox(sqlite_store.engine)
    start_purchase_ids_anew(sqlite_store)
    app = build_app(settings, time_env.client, inbox)
    async with (
        Worker(
            time_env.client,
            task_queue=task_queue,
            workflows=[StandInSaga, StandInFailedRefundTask],
            workflow_runner=UnsandboxedWorkflowRunner(),
        ),
        served(app) as url,
        httpx.AsyncClient(timeout=10.0) as http,
    ):
        world = Receiver(
            url=url,
            http=http,
            client=time_env.client,
            store=sqlite_store,
            inbox=inbox,
            task_queue=task_queue,
        )
        yield world
        # Nothing left waiting on the shared test server once this worker is gone.
        for workflow_id in world.workflow_ids:
            description = await world.describe(workflow_id)
            if description and description.status == WorkflowExecutionStatus.RUNNING:
                await time_env.client.get_workflow_handle(workflow_id).terminate("test over")


def no_personal_data(caplog: pytest.LogCaptureFixture) -> None:
    text = caplog.text.lower()
    assert "jenny" not in text and BUYER_EMAIL_DOMAIN not in text and "evergreen" not in text


# --- reconciliations --------------------------------------------------------------------------


async def test_a_signed_outside_refund_starts_one_reconciliation(
    receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    purchase_id, charge_id = receiver.purchase()
    obj = refund(charge=charge_id)
    payload = event("refund.created", obj)

    assert await receiver.delivered(payload) == "reconcile_started"

    description = await receiver.describe(reconcile_id_for(purchase_id))
    assert description is not None and description.workflow_type == "RefundSaga"
    assert description.status == WorkflowExecutionStatus.RUNNING
    listed = description.typed_search_attributes
    assert listed.get(sa.REFUND_SOURCE) == "webhook"
    assert listed.get(sa.PURCHASE_ID) == str(purchase_id)
    assert listed.get(sa.REQUESTED_BY) == "processor"
    request = await receiver.client.get_workflow_handle(reconcile_id_for(purchase_id)).query(
        StandInSaga.request
    )
    assert request is not None and request.reconcile is not None
    assert request.purchase_id == purchase_id and request.amount_cents is None
    assert request.reconcile.kind == "external_refund"
    assert request.reconcile.processor_object_id == obj["id"]
    assert request.reconcile.event_id == payload["id"]
    assert payload["id"] in caplog.text and "reconcile_started" in caplog.text
    no_personal_data(caplog)


async def test_the_same_event_twice_starts_one(receiver: Receiver) -> None:
    purchase_id, charge_id = receiver.purchase()
    payload = event("refund.created", refund(charge=charge_id))
    body = body_of(payload)
    sig = signature(body)

    first = await receiver.post(body, sig=sig)
    run = await receiver.describe(reconcile_id_for(purchase_id))
    second = await receiver.post(body, sig=sig)
    again = await receiver.describe(reconcile_id_for(purchase_id))

    assert (first.status_code, second.status_code) == (200, 200)
    assert run is not None and again is not None and again.run_id == run.run_id
    handled = receiver.inbox.handled(payload["id"])
    assert handled is not None and handled.outcome == "reconcile_started"


async def test_different_events_about_the_same_refund_start_one(
    receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    purchase_id, charge_id = receiver.purchase()
    obj = refund(charge=charge_id)

    # As the processor may deliver them: out of order, the charge (with the cardholder's
    # details) before the refund's own events.
    listed = charge(charge_id=charge_id, refunds=[obj])
    first = await receiver.delivered(event("charge.refunded", listed))
    run = await receiver.describe(reconcile_id_for(purchase_id))
    later = [
        await receiver.delivered(event("refund.updated", obj)),
        await receiver.delivered(event("refund.created", obj)),
    ]
    after = await receiver.describe(reconcile_id_for(purchase_id))

    assert [first, *later] == ["reconcile_started"] * 3
    # One run: every start after the first found it running.
    assert run is not None and after is not None and after.run_id == run.run_id
    assert after.status == WorkflowExecutionStatus.RUNNING
    no_personal_data(caplog)


async def test_a_refund_the_ledger_holds_starts_nothing_more(receiver: Receiver) -> None:
    purchase_id, charge_id = receiver.purchase()
    obj = refund(charge=charge_id)
    assert await receiver.delivered(event("refund.created", obj)) == "reconcile_started"
    first = await receiver.describe(reconcile_id_for(purchase_id))
    assert first is not None
    # The reconciliation records the refund and ends.
    receiver.store.record_refunds(
        purchase_id,
        [
            LedgerEntry(
                processor_refund_id=obj["id"], amount_cents=4900, currency="usd", source="external"
            )
        ],
        workflow_id=reconcile_id_for(purchase_id),
    )
    await receiver.complete(reconcile_id_for(purchase_id), first.run_id)

    assert await receiver.delivered(event("refund.updated", obj)) == "already_reconciled"
    after = await receiver.describe(reconcile_id_for(purchase_id))
    assert after is not None and after.run_id == first.run_id


async def test_a_lost_dispute_starts_one_chargeback_reconciliation(receiver: Receiver) -> None:
    purchase_id, charge_id = receiver.purchase()
    obj = dispute(charge=charge_id, status="needs_response")

    withdrawn = await receiver.delivered(event("charge.dispute.funds_withdrawn", obj))
    closed = await receiver.delivered(event("charge.dispute.closed", {**obj, "status": "lost"}))

    assert (withdrawn, closed) == ("reconcile_started", "reconcile_started")
    handle = receiver.client.get_workflow_handle(reconcile_id_for(purchase_id))
    request = await handle.query(StandInSaga.request)
    assert request is not None and request.reconcile is not None
    assert request.reconcile.kind == "chargeback"
    assert request.reconcile.processor_object_id == obj["id"]
    assert "chargeback" in request.reason


async def test_an_event_for_a_charge_oasis_did_not_make_starts_nothing(receiver: Receiver) -> None:
    purchase_id, _ = receiver.purchase()

    outcome = await receiver.delivered(event("refund.created", refund(charge=new_id("ch"))))

    assert outcome == "unknown_charge"
    assert await receiver.describe(reconcile_id_for(purchase_id)) is None


async def test_an_event_type_it_does_not_act_on_is_acknowledged(receiver: Receiver) -> None:
    payload = event("payment_intent.succeeded", {"id": new_id("pi"), "object": "payment_intent"})

    assert await receiver.delivered(payload) == "ignored"


# --- refused deliveries -------------------------------------------------------------------------


def _forged(body: bytes) -> str:
    return signature(body, secret="whsec_someone_else")


def _stale(body: bytes) -> str:
    return signature(body, timestamp=int(time.time()) - 600)


def _tampered(body: bytes) -> str:
    return signature(body.replace(b'"amount": 4900', b'"amount": 4901'))


@pytest.mark.parametrize(
    ("make_sig", "reason"),
    [
        (_forged, "does not match"),
        (_tampered, "does not match"),
        (_stale, "tolerance"),
        (lambda body: "", "no Stripe-Signature header"),
        (lambda body: "v1=abc", "malformed Stripe-Signature header"),
        (lambda body: f"t={int(time.time())},v0=abc", "malformed Stripe-Signature header"),
    ],
    ids=["forged", "tampered", "stale", "unsigned", "no-timestamp", "other-scheme"],
)
async def test_a_delivery_that_is_not_the_processors_starts_nothing(
    receiver: Receiver, caplog: pytest.LogCaptureFixture, make_sig: Any, reason: str
) -> None:
    caplog.set_level(logging.INFO)
    purchase_id, charge_id = receiver.purchase()
    payload = event("refund.created", refund(charge=charge_id))
    body = body_of(payload)
    if make_sig is _tampered:
        # The processor signed the original; the body sent says something else.
        sig, body = signature(body), body.replace(b'"amount": 4900', b'"amount": 4901')
    else:
        sig = make_sig(body)

    response = await receiver.post(body, sig=sig)

    assert response.status_code == 400
    error = response.json()["error"]
    assert reason in error and "\n" not in error
    assert not receiver.inbox.seen(payload["id"])
    assert await receiver.describe(reconcile_id_for(purchase_id)) is None
    assert payload["id"] not in caplog.text
    no_personal_data(caplog)


@pytest.mark.parametrize(
    "body",
    [
        b"not json at all",
        b"\xff\xfe\x00",
        b"[]",
        json.dumps({"object": "event", "type": "refund.created", "data": {}}).encode(),
        json.dumps({"id": "evt_1", "object": "event", "type": "refund.created"}).encode(),
    ],
    ids=["not-json", "not-utf8", "array", "no-id", "no-object"],
)
async def test_a_signed_body_that_is_not_an_event_is_refused(
    receiver: Receiver, caplog: pytest.LogCaptureFixture, body: bytes
) -> None:
    caplog.set_level(logging.INFO)

    response = await receiver.post(body, sig=signature(body))

    assert response.status_code == 400
    assert "\n" not in response.json()["error"]
    assert not receiver.inbox.seen("evt_1")
    assert "not json at all" not in caplog.text


async def test_a_body_too_large_for_an_event_is_refused(receiver: Receiver) -> None:
    body = b"{" + b" " * (600 * 1024) + b"}"

    response = await receiver.post(body)

    assert response.status_code == 413


# --- sagas waiting on a refund, and refunds failed after completion ----------------------------


async def test_a_refund_update_wakes_the_saga_waiting_on_it(receiver: Receiver) -> None:
    purchase_id, charge_id = receiver.purchase()
    workflow_id, first_run = await receiver.saga(purchase_id)
    obj = refund(
        charge=charge_id, status="pending", metadata=ours(workflow_id, first_run, purchase_id)
    )

    payload = event("refund.updated", {**obj, "status": "succeeded"})

    outcome = await receiver.delivered(payload)
    # Delivered again, as the processor does: the inbox keeps it from waking the saga twice.
    again = await receiver.post(payload)

    assert outcome == "signalled" and again.status_code == 200
    events = await receiver.client.get_workflow_handle(workflow_id).query(StandInSaga.events)
    assert events == [obj["id"]]


async def test_a_failure_of_a_refund_still_followed_wakes_the_saga_and_opens_no_task(
    receiver: Receiver,
) -> None:
    purchase_id, charge_id = receiver.purchase()
    workflow_id, first_run = await receiver.saga(purchase_id)
    obj = refund(
        charge=charge_id, status="failed", metadata=ours(workflow_id, first_run, purchase_id)
    )

    assert await receiver.delivered(event("refund.failed", obj)) == "signalled"
    assert await receiver.describe(failed_refund_id_for(obj["id"])) is None


async def test_a_failure_after_the_saga_completed_opens_exactly_one_task(
    receiver: Receiver,
) -> None:
    purchase_id, charge_id = receiver.purchase()
    workflow_id, first_run = await receiver.saga(purchase_id)
    await receiver.complete(workflow_id, first_run)
    obj = refund(
        charge=charge_id,
        amount=4900,
        status="failed",
        metadata=ours(workflow_id, first_run, purchase_id),
        failure_reason="expired_or_canceled_card",
    )
    task_id = failed_refund_id_for(obj["id"])
    receiver.workflow_ids.add(task_id)

    reported = event("refund.failed", obj)
    first = await receiver.delivered(reported)
    opened = await receiver.describe(task_id)
    second = await receiver.delivered(event("refund.updated", obj))
    still = await receiver.describe(task_id)

    assert (first, second) == ("failed_task_started", "failed_task_started")
    assert opened is not None and opened.workflow_type == "FailedRefundTask"
    assert still is not None and still.run_id == opened.run_id
    assert opened.typed_search_attributes.get(sa.PURCHASE_ID) == str(purchase_id)
    task = await receiver.client.get_workflow_handle(task_id).query(StandInFailedRefundTask.task)
    assert task == FailedRefund(
        refund_id=obj["id"],
        charge_id=charge_id,
        purchase_id=purchase_id,
        amount_cents=4900,
        currency="usd",
        saga_workflow_id=workflow_id,
        failure_reason="expired_or_canceled_card",
        source="webhook",
        event_id=reported["id"],
    )

    # Once it has ended, a later report starts a new run: the task itself refuses a failure
    # already decided (the store says so), and a report refused earlier blocks nothing.
    await receiver.client.get_workflow_handle(task_id).signal(StandInFailedRefundTask.close)
    await receiver.client.get_workflow_handle(task_id).result()
    third = await receiver.delivered(event("refund.failed", obj))
    rerun = await receiver.describe(task_id)

    assert third == "failed_task_started"
    assert rerun is not None and rerun.run_id != opened.run_id


async def test_a_later_saga_under_the_same_workflow_id_is_not_taken_for_the_first(
    receiver: Receiver,
) -> None:
    purchase_id, charge_id = receiver.purchase()
    workflow_id, first_run = await receiver.saga(purchase_id)
    await receiver.complete(workflow_id, first_run)
    later = await receiver.client.start_workflow(
        "RefundSaga",
        RefundRequest(purchase_id=purchase_id, reason="second partial refund", requested_by="sam"),
        id=workflow_id,
        task_queue=receiver.task_queue,
    )
    obj = refund(charge=charge_id, metadata=ours(workflow_id, first_run, purchase_id))
    receiver.workflow_ids.add(failed_refund_id_for(obj["id"]))

    updated = await receiver.delivered(event("refund.updated", obj))
    failed = await receiver.delivered(event("refund.failed", {**obj, "status": "failed"}))

    assert (updated, failed) == ("saga_ended", "failed_task_started")
    assert await later.query(StandInSaga.events) == []


async def test_a_failure_of_a_saga_temporal_forgot_opens_a_task_when_the_ledger_paid_it(
    receiver: Receiver,
) -> None:
    purchase_id, charge_id = receiver.purchase()
    gone = f"refund-{purchase_id}-gone"
    unpaid = refund(charge=charge_id, status="failed", metadata=ours(gone, "run-1", purchase_id))
    paid = refund(charge=charge_id, status="failed", metadata=ours(gone, "run-1", purchase_id))
    receiver.store.record_refunds(
        purchase_id,
        [
            LedgerEntry(
                processor_refund_id=paid["id"],
                amount_cents=4900,
                currency="usd",
                source="processor",
            )
        ],
        workflow_id=gone,
    )
    receiver.workflow_ids.add(failed_refund_id_for(paid["id"]))

    assert await receiver.delivered(event("refund.failed", unpaid)) == "saga_not_found"
    assert await receiver.delivered(event("refund.failed", paid)) == "failed_task_started"
    assert await receiver.describe(failed_refund_id_for(unpaid["id"])) is None


# --- failures to act, start-up, health -----------------------------------------------------------


async def test_temporal_unreachable_answers_500_so_the_processor_retries(
    receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{probe.getsockname()[1]}"
    unreachable = await Client.connect(
        dead,
        lazy=True,
        data_converter=payload_data_converter,
        retry_config=RetryConfig(max_retries=1, initial_interval_millis=10),
    )
    settings = Settings(
        task_queue=receiver.task_queue, processor_webhook_secret=SecretStr(WEBHOOK_SECRET)
    )
    purchase_id, charge_id = receiver.purchase()
    payload = event("refund.created", refund(charge=charge_id))

    async with served(build_app(settings, unreachable, receiver.inbox)) as url:
        response = await receiver.post(payload, url=url)

    assert response.status_code == 500
    assert not receiver.inbox.seen(payload["id"])
    assert payload["id"] in caplog.text
    no_personal_data(caplog)
    # The processor's retry, once Temporal answers, is acted on.
    assert await receiver.delivered(payload) == "reconcile_started"
    assert await receiver.describe(reconcile_id_for(purchase_id)) is not None


async def test_the_receiver_refuses_to_start_without_a_secret(receiver: Receiver) -> None:
    for secret in (None, SecretStr("  ")):
        settings = Settings(task_queue=receiver.task_queue, processor_webhook_secret=secret)
        with pytest.raises(WebhooksRefused, match="REFUND_PROCESSOR_WEBHOOK_SECRET") as refused:
            build_app(settings, receiver.client, receiver.inbox)
        assert "\n" not in str(refused.value)
        with pytest.raises(WebhooksRefused):
            serve(settings)


async def test_health(receiver: Receiver) -> None:
    response = await receiver.http.get(f"{receiver.url}/healthz")

    assert response.status_code == 200 and response.json() == {"ok": True}
