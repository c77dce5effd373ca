"""The refund-planning rules, pure: what a refund does, or why it may not happen."""

from __future__ import annotations

from itertools import product
from typing import Any

import pytest

from refundsaga.models import EntitlementSource, PurchaseSnapshot
from refundsaga.planning import (
    PlannedRefund,
    PlanRefusal,
    check_request,
    entitlement_action,
    plan_refund,
)
from refundsaga.processor import ProcessorCharge
from tests.fixtures.planning import PRICE, charge, snapshot


def planned(
    purchase: PurchaseSnapshot | None = None, at: ProcessorCharge | None = None, **ask: Any
) -> PlannedRefund:
    ask.setdefault("refunded_everywhere", "plan")
    outcome = plan_refund(7, purchase or snapshot(), at or charge(), **ask)
    assert isinstance(outcome, PlannedRefund), outcome
    return outcome


def refused(
    purchase: PurchaseSnapshot | None, at: ProcessorCharge | None, **ask: Any
) -> PlanRefusal:
    ask.setdefault("refunded_everywhere", "plan")
    outcome = plan_refund(7, purchase, at, **ask)
    assert isinstance(outcome, PlanRefusal), outcome
    return outcome


def test_a_full_refund_moves_the_rest_and_takes_progress_and_entitlement() -> None:
    assert planned() == PlannedRefund(
        amount_cents=PRICE,
        full_refund=True,
        already_refunded=False,
        revoke_progress=True,
        progress_records=4,
        remove_entitlement=True,
        ams_action="remove_via_api",
    )
    # Asking for exactly the rest is a full refund too.
    assert planned(amount_cents=PRICE).full_refund


def test_a_partial_refund_keeps_progress_and_entitlement_unless_asked() -> None:
    part = planned(amount_cents=2_500)
    assert (part.amount_cents, part.full_refund) == (2_500, False)
    assert (part.revoke_progress, part.progress_records) == (False, 0)
    assert (part.remove_entitlement, part.ams_action) == (False, "none")

    asked = planned(amount_cents=2_500, revoke_progress=True, remove_entitlement=True)
    assert (asked.progress_records, asked.ams_action) == (4, "remove_via_api")
    # And a full refund keeps them when asked to.
    kept = planned(revoke_progress=False, remove_entitlement=False)
    assert (kept.full_refund, kept.progress_records, kept.ams_action) == (True, 0, "none")


def test_the_rest_after_an_earlier_partial_refund() -> None:
    before = snapshot(refunded_cents=2_000, status="partially_refunded")
    rest = planned(before, charge(refunded=2_000))
    assert (rest.amount_cents, rest.full_refund) == (7_995, True)
    last_part = planned(before, charge(refunded=2_000), amount_cents=7_995)
    assert last_part.full_refund and last_part.ams_action == "remove_via_api"
    over = refused(before, charge(refunded=2_000), amount_cents=7_996)
    assert over.kind == "exceeds_rest"
    assert over.message == "amount 7996 exceeds the unrefunded rest of 7995 usd"


def test_an_over_refund_is_refused() -> None:
    over = refused(snapshot(), charge(), amount_cents=PRICE + 1)
    assert over.kind == "exceeds_rest"
    assert "exceeds the unrefunded rest of 9995 usd" in over.message


@pytest.mark.parametrize("amount", [0, -1, -PRICE])
def test_an_amount_that_is_not_positive_is_refused(amount: int) -> None:
    refusal = refused(snapshot(), charge(), amount_cents=amount)
    assert (refusal.kind, refusal.message) == (
        "amount_not_positive",
        f"amount {amount} must be positive",
    )
    # Even where the processor has refunded the charge, where any amount is otherwise planned.
    assert refused(snapshot(), charge(refunded=PRICE), amount_cents=amount).kind == (
        "amount_not_positive"
    )


def test_a_charge_refunded_outside_oasis_moves_no_money_but_finishes_the_rest() -> None:
    outside = planned(at=charge(refunded=PRICE))
    assert (outside.amount_cents, outside.already_refunded, outside.full_refund) == (0, True, True)
    assert (outside.progress_records, outside.ams_action) == (4, "remove_via_api")
    # Whatever amount was asked: the processor holds the refund in full.
    for amount in (1_000, PRICE, PRICE * 3):
        asked = planned(at=charge(refunded=PRICE), amount_cents=amount)
        assert (asked.amount_cents, asked.full_refund, asked.revoke_progress) == (0, True, True)


def test_the_processor_refunding_less_than_oasis_expects_is_refused() -> None:
    short = refused(snapshot(), charge(refunded=5_000))
    assert short.kind == "processor_short"
    assert short.message == (
        "the processor can refund only 4995 usd more (5000 already refunded there); "
        "ask for at most that"
    )
    # A part the processor can still refund is planned.
    part = planned(at=charge(refunded=5_000), amount_cents=4_995)
    assert (part.amount_cents, part.full_refund, part.already_refunded) == (4_995, False, False)


def test_a_purchase_refunded_in_oasis_is_refused_while_the_processor_holds_money() -> None:
    done = snapshot(refunded_cents=PRICE, status="refunded")
    for refunded_everywhere in ("plan", "refuse"):
        refusal = refused(done, charge(), refunded_everywhere=refunded_everywhere)
        assert refusal.kind == "refunded_in_oasis"
        assert refusal.message == "purchase 7 is already fully refunded in OASIS"
    # More refunded in OASIS than was paid is as fully refunded.
    assert refused(snapshot(refunded_cents=PRICE + 5), charge()).kind == "refunded_in_oasis"


def test_refunded_everywhere_is_planned_for_the_saga_and_refused_for_the_batch() -> None:
    done = snapshot(refunded_cents=PRICE, status="refunded")
    saga = planned(done, charge(refunded=PRICE))
    assert (saga.amount_cents, saga.already_refunded, saga.full_refund) == (0, True, True)
    assert (saga.progress_records, saga.ams_action) == (4, "remove_via_api")
    batch = refused(done, charge(refunded=PRICE), refunded_everywhere="refuse")
    assert batch.kind == "refunded_in_oasis"


def test_the_two_callers_differ_only_where_both_hold_the_refund_in_full() -> None:
    paid = [0, 2_000, PRICE, PRICE + 5]
    for ledger, processor, amount in product(paid, paid[:3], [None, 1, 2_000, PRICE]):
        bought, at = snapshot(refunded_cents=ledger), charge(refunded=processor)
        saga = plan_refund(7, bought, at, amount_cents=amount, refunded_everywhere="plan")
        batch = plan_refund(7, bought, at, amount_cents=amount, refunded_everywhere="refuse")
        everywhere = ledger >= PRICE and processor >= PRICE
        assert (saga == batch) is not everywhere, (ledger, processor, amount)


@pytest.mark.parametrize(
    ("source", "member", "action"),
    [
        ("ams", "M-70", "remove_via_api"),
        ("ams_manual", None, "manual_task"),
        ("oasis", None, "deactivate_purchase"),
    ],
)
def test_the_entitlement_goes_by_its_source(
    source: EntitlementSource, member: str | None, action: str
) -> None:
    assert entitlement_action(source) == action
    plan = planned(snapshot(entitlement_source=source, ams_member_id=member))
    assert plan.ams_action == action


def test_an_ams_entitlement_without_a_member_id_cannot_be_removed() -> None:
    nobody = snapshot(ams_member_id=None)
    refusal = refused(nobody, charge())
    assert refusal.kind == "no_ams_member"
    assert refusal.message == (
        "user 70 has no AMS member id; the AMS entitlement cannot be removed"
    )
    # Nothing to remove, nothing refused.
    assert planned(nobody, amount_cents=1_000).ams_action == "none"
    assert planned(nobody, remove_entitlement=False).ams_action == "none"


def test_what_the_store_and_the_processor_do_not_know_is_refused() -> None:
    missing = refused(None, charge())
    assert (missing.kind, missing.message) == ("purchase_not_found", "purchase 7 does not exist")
    unknown = refused(snapshot(), None)
    assert (unknown.kind, unknown.message) == (
        "charge_unknown",
        "the processor does not know charge ch_7",
    )
    # The store's refusals come first: they need no processor read.
    assert refused(None, None).kind == "purchase_not_found"
    assert refused(snapshot(), None, currency="eur").kind == "currency_mismatch"


def test_the_currency_asked_must_be_the_purchases() -> None:
    other = refused(snapshot(), charge(), currency="eur")
    assert (other.kind, other.message) == (
        "currency_mismatch",
        "currency eur does not match the purchase's usd",
    )
    assert planned(currency="usd").amount_cents == PRICE
    assert planned(currency=None).amount_cents == PRICE


def test_check_request_passes_the_purchase_through_or_refuses() -> None:
    bought = snapshot()
    assert check_request(7, bought, amount_cents=100, currency="usd") is bought
    refusal = check_request(7, None)
    assert isinstance(refusal, PlanRefusal) and refusal.kind == "purchase_not_found"
    refusal = check_request(7, bought, amount_cents=0)
    assert isinstance(refusal, PlanRefusal) and refusal.kind == "amount_not_positive"
