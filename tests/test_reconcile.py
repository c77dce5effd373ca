"""What each processor event asks for (refundsaga.reconcile), and the store's inbox for them."""

from __future__ import annotations

from typing import Any

import pytest

from refundsaga import search_attributes as sa
from refundsaga.contracts import RefundRequest
from refundsaga.models import LedgerEntry
from refundsaga.processor_events import ProcessorEvent, Reconciliation
from refundsaga.reconcile import (
    Ignore,
    LateFailure,
    MalformedEvent,
    Reconcile,
    WakeSaga,
    classify,
    classify_dispute,
    classify_refund,
    first_run_of,
    parse_event,
    reconcile_request,
)
from refundsaga.store import OasisStore
from refundsaga.store.inbox import ProcessorInbox
from tests.fixtures.stripe_events import charge, dispute, event, new_id, ours, refund

CHARGE = "ch_3QxYzLkdIwHu7ix28a3tqPa1"
INTENT = "pi_3QxYzLkdIwHu7ix28a3tqPa1"
SAGA = "refund-42"
FIRST_RUN = "0193a7c1-5a2e-7c3d-9f10-1b2c3d4e5f60"


def classified(event_type: str, obj: dict[str, Any]) -> tuple[dict[str, Any], object]:
    payload = event(event_type, obj)
    return payload, classify(parse_event(payload))


# --- refunds of ours: wake the saga --------------------------------------------------------


@pytest.mark.parametrize("event_type", ["refund.updated", "charge.refund.updated"])
def test_an_update_of_our_refund_wakes_its_saga(event_type: str) -> None:
    obj = refund(charge=CHARGE, metadata=ours(SAGA, FIRST_RUN, 42))

    payload, action = classified(event_type, obj)

    assert action == WakeSaga(
        workflow_id=SAGA,
        first_run_id=FIRST_RUN,
        event=ProcessorEvent(refund_id=obj["id"], event_id=payload["id"]),
        failure=None,
    )


def test_a_failure_of_our_refund_wakes_its_saga_and_carries_the_late_failure() -> None:
    obj = refund(
        charge=CHARGE,
        amount=2500,
        status="failed",
        metadata=ours(SAGA, FIRST_RUN, 42),
        failure_reason="lost_or_stolen_card",
    )

    payload, action = classified("refund.failed", obj)

    assert isinstance(action, WakeSaga)
    assert action.event == ProcessorEvent(refund_id=obj["id"], event_id=payload["id"])
    assert action.failure == LateFailure(
        refund_id=obj["id"],
        charge_id=CHARGE,
        amount_cents=2500,
        currency="usd",
        purchase_id=42,
        failure_reason="lost_or_stolen_card",
        source="webhook",
        event_id=payload["id"],
    )
    task = action.failure.task(42, SAGA)
    assert (task.refund_id, task.purchase_id, task.saga_workflow_id) == (obj["id"], 42, SAGA)


def test_a_failure_without_the_purchase_in_metadata_leaves_it_to_the_charge() -> None:
    metadata = ours(SAGA, FIRST_RUN, 42)
    del metadata["purchase_id"]

    _, action = classified(
        "refund.failed", refund(charge=CHARGE, status="failed", metadata=metadata)
    )

    assert isinstance(action, WakeSaga) and action.failure is not None
    assert action.failure.purchase_id is None


def test_our_own_new_refund_is_left_to_the_saga_that_made_it() -> None:
    _, action = classified(
        "refund.created", refund(charge=CHARGE, metadata=ours(SAGA, FIRST_RUN, 42))
    )

    assert isinstance(action, Ignore)


def test_the_first_run_comes_from_the_request_id() -> None:
    assert first_run_of(f"{SAGA}/{FIRST_RUN}") == FIRST_RUN
    assert first_run_of("no-slash") is None
    assert first_run_of(f"{SAGA}/") is None
    assert first_run_of(None) is None


# --- refunds made elsewhere: reconcile ------------------------------------------------------


@pytest.mark.parametrize("event_type", ["refund.created", "refund.updated"])
def test_a_succeeded_outside_refund_reconciles_its_charge(event_type: str) -> None:
    obj = refund(charge=CHARGE, payment_intent=INTENT)

    payload, action = classified(event_type, obj)

    assert action == Reconcile(
        charge_id=CHARGE,
        payment_intent_id=INTENT,
        reconciliation=Reconciliation(
            kind="external_refund",
            processor_object_id=obj["id"],
            source="webhook",
            event_id=payload["id"],
        ),
    )


@pytest.mark.parametrize(
    ("event_type", "status"),
    [("refund.created", "pending"), ("refund.failed", "failed"), ("refund.updated", "canceled")],
)
def test_an_outside_refund_that_returned_no_money_is_ignored(event_type: str, status: str) -> None:
    _, action = classified(event_type, refund(charge=CHARGE, status=status))

    assert isinstance(action, Ignore)


def test_a_charge_listing_an_outside_refund_reconciles_that_refund() -> None:
    mine = refund(charge=CHARGE, metadata=ours(SAGA, FIRST_RUN, 42))
    outside = refund(charge=CHARGE, amount=100)
    obj = charge(charge_id=CHARGE, refunds=[mine, outside], payment_intent=INTENT)

    payload, action = classified("charge.refunded", obj)

    assert isinstance(action, Reconcile)
    assert action.charge_id == CHARGE and action.payment_intent_id == INTENT
    assert action.reconciliation.processor_object_id == outside["id"]
    assert action.reconciliation.event_id == payload["id"]


def test_a_charge_whose_refunds_are_all_ours_is_ignored() -> None:
    mine = refund(charge=CHARGE, metadata=ours(SAGA, FIRST_RUN, 42))

    _, action = classified("charge.refunded", charge(charge_id=CHARGE, refunds=[mine]))

    assert isinstance(action, Ignore)


def test_a_charge_without_its_refunds_is_left_to_the_refund_events() -> None:
    # Current API versions list no refunds on the charge and send refund.created for each:
    # the bare charge cannot tell an outside refund from ours.
    _, action = classified("charge.refunded", charge(charge_id=CHARGE))

    assert isinstance(action, Ignore)
    assert "refund.created" in action.reason


def test_the_sweep_reconciles_a_refund_it_listed() -> None:
    obj = refund(charge=CHARGE)

    action = classify_refund(obj, event_type=None, source="sweep", event_id=None)

    assert isinstance(action, Reconcile)
    assert action.reconciliation.source == "sweep" and action.reconciliation.event_id is None


# --- disputes --------------------------------------------------------------------------------


def test_a_lost_dispute_reconciles_as_a_chargeback() -> None:
    obj = dispute(charge=CHARGE, status="lost")

    payload, action = classified("charge.dispute.closed", obj)

    assert action == Reconcile(
        charge_id=CHARGE,
        payment_intent_id=None,
        reconciliation=Reconciliation(
            kind="chargeback",
            processor_object_id=obj["id"],
            source="webhook",
            event_id=payload["id"],
        ),
    )


@pytest.mark.parametrize("status", ["won", "warning_closed"])
def test_a_dispute_closed_otherwise_is_ignored(status: str) -> None:
    _, action = classified("charge.dispute.closed", dispute(charge=CHARGE, status=status))

    assert isinstance(action, Ignore)


def test_withdrawn_funds_reconcile_as_a_chargeback() -> None:
    _, action = classified(
        "charge.dispute.funds_withdrawn", dispute(charge=CHARGE, status="needs_response")
    )

    assert isinstance(action, Reconcile)
    assert action.reconciliation.kind == "chargeback"


def test_the_sweep_reconciles_only_lost_disputes() -> None:
    lost = classify_dispute(
        dispute(charge=CHARGE, status="lost"), event_type=None, source="sweep", event_id=None
    )
    open_ = classify_dispute(
        dispute(charge=CHARGE, status="under_review"),
        event_type=None,
        source="sweep",
        event_id=None,
    )

    assert isinstance(lost, Reconcile) and isinstance(open_, Ignore)


# --- everything else ------------------------------------------------------------------------


@pytest.mark.parametrize("event_type", ["payment_intent.succeeded", "customer.created"])
def test_other_event_types_are_ignored(event_type: str) -> None:
    _, action = classified(event_type, {"id": "pi_123", "object": "payment_intent"})

    assert isinstance(action, Ignore)


@pytest.mark.parametrize(
    "body",
    [
        [],
        "evt_1",
        {"type": "refund.updated", "data": {"object": {}}},
        {"id": "not-an-event", "type": "refund.updated", "data": {"object": {}}},
        {"id": "evt_1", "data": {"object": {}}},
        {"id": "evt_1", "type": "refund.updated"},
        {"id": "evt_1", "type": "refund.updated", "data": {"object": "re_1"}},
    ],
)
def test_a_body_that_is_not_an_event_is_malformed(body: object) -> None:
    with pytest.raises(MalformedEvent):
        parse_event(body)


def test_a_refund_with_odd_ids_starts_nothing() -> None:
    odd_charge = refund(charge="../charges/x")
    odd_refund = refund(charge=CHARGE, refund_id="re_x;drop")
    odd_saga = refund(charge=CHARGE, metadata=ours("refund 42\n", FIRST_RUN, 42))

    assert isinstance(classified("refund.created", odd_charge)[1], Ignore)
    assert isinstance(classified("refund.created", odd_refund)[1], Ignore)
    assert isinstance(classified("refund.updated", odd_saga)[1], Ignore)


# --- the reconciliation's request -----------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "object_id", "words"),
    [("external_refund", "re_abc", "outside OASIS"), ("chargeback", "dp_abc", "chargeback")],
)
def test_the_reconciliation_request_names_what_returned_the_money(
    kind: Any, object_id: str, words: str
) -> None:
    reconciliation = Reconciliation(
        kind=kind, processor_object_id=object_id, source="webhook", event_id="evt_1"
    )

    request = reconcile_request(7, reconciliation)

    assert request.purchase_id == 7 and request.amount_cents is None
    assert request.requested_by == "processor"
    assert request.reconcile == reconciliation
    assert object_id in request.reason and words in request.reason
    assert RefundRequest.model_validate_json(request.model_dump_json()) == request


def test_a_reconciliation_is_listed_with_its_source() -> None:
    reconciliation = Reconciliation(
        kind="chargeback", processor_object_id="dp_abc", source="sweep", event_id=None
    )
    listed = sa.at_start(reconcile_request(7, reconciliation))
    support = sa.at_start(RefundRequest(purchase_id=7, reason="asked", requested_by="sam"))

    assert listed.get(sa.REFUND_SOURCE) == "sweep"
    assert listed.get(sa.REQUESTED_BY) == "processor"
    # Support's starts carry no source, so servers without the attribute still take them.
    assert support.get(sa.REFUND_SOURCE) is None


# --- the inbox, on SQLite and PostgreSQL -----------------------------------------------------


@pytest.fixture
def inbox(store: OasisStore) -> ProcessorInbox:
    return ProcessorInbox(store.engine)


def purchase(store: OasisStore, charge_id: str) -> int:
    user = store.create_user(name="Jenny Rosen", email=f"{new_id('u')}@example.org")
    product = store.create_product(code="COURSE-1", title="Course", entitlement_source="oasis")
    return store.create_purchase(
        user_id=user,
        product_id=product,
        amount_cents=4900,
        currency="usd",
        processor_charge_id=charge_id,
    )


def test_an_event_is_recorded_once(inbox: ProcessorInbox) -> None:
    event_id = new_id("evt")
    assert not inbox.seen(event_id)

    first = inbox.record(
        event_id, event_type="refund.created", source="webhook", outcome="reconcile_started"
    )
    again = inbox.record(event_id, event_type="refund.created", source="sweep", outcome="ignored")

    assert (first, again) == (True, False)
    handled = inbox.handled(event_id)
    assert handled is not None and inbox.seen(event_id)
    assert (handled.type, handled.source, handled.outcome) == (
        "refund.created",
        "webhook",
        "reconcile_started",
    )
    assert handled.received_at.tzinfo is not None


def test_a_charge_finds_its_purchase_by_charge_or_payment_intent(
    store: OasisStore, inbox: ProcessorInbox
) -> None:
    by_charge = purchase(store, CHARGE)
    by_intent = purchase(store, INTENT)

    assert inbox.purchase_for_charge(CHARGE) == by_charge
    assert inbox.purchase_for_charge("ch_unknown", INTENT) == by_intent
    assert inbox.purchase_for_charge("ch_unknown") is None
    assert inbox.purchase_for_charge("ch_unknown", "pi_unknown") is None


def test_the_ledger_says_what_it_holds(store: OasisStore, inbox: ProcessorInbox) -> None:
    purchase_id = purchase(store, CHARGE)
    store.record_refunds(
        purchase_id,
        [
            LedgerEntry(
                processor_refund_id="re_outside",
                amount_cents=100,
                currency="usd",
                source="external",
            )
        ],
        workflow_id=None,
    )

    assert inbox.ledger_holds("re_outside") and inbox.ledger_status("re_outside") == "succeeded"
    assert not inbox.ledger_holds("re_other") and inbox.ledger_status("re_other") is None


def test_the_sweep_mark_moves(inbox: ProcessorInbox) -> None:
    assert inbox.sweep_mark("refunds") is None

    inbox.set_sweep_mark("refunds", created=1_767_225_600, last_object_id="re_1")
    inbox.set_sweep_mark("refunds", created=1_767_225_700, last_object_id="re_2")
    inbox.set_sweep_mark("disputes", created=1_767_225_000, last_object_id=None)

    mark = inbox.sweep_mark("refunds")
    assert mark is not None and (mark.created, mark.last_object_id) == (1_767_225_700, "re_2")
    other = inbox.sweep_mark("disputes")
    assert other is not None and other.last_object_id is None
