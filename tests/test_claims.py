"""One refund request in flight per purchase, enforced by the store (SQLite and PostgreSQL)."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from refundsaga.models import LedgerEntry
from refundsaga.store import OasisStore, PurchaseClaimed, RefundRefused
from refundsaga.store.schema import RefundClaim


def _purchase(store: OasisStore, amount: int = 10_000) -> int:
    user = store.create_user(name="Ada", email="ada@example.org")
    product = store.create_product(code="C1", title="Course", entitlement_source="oasis")
    return store.create_purchase(
        user_id=user,
        product_id=product,
        amount_cents=amount,
        currency="usd",
        processor_charge_id="ch_c1",
    )


def _holder(store: OasisStore, purchase_id: int) -> tuple[str, str] | None:
    with store.engine.begin() as db:
        row = db.execute(
            select(RefundClaim.request_id, RefundClaim.workflow_id).where(
                RefundClaim.purchase_id == purchase_id
            )
        ).one_or_none()
    return None if row is None else (row.request_id, row.workflow_id)


def test_one_request_holds_a_purchase_until_it_releases_it(store: OasisStore) -> None:
    purchase = _purchase(store)
    assert store.claim_purchase(purchase_id=purchase, request_id="r1", workflow_id="w1") == (
        "claimed"
    )
    # The same request again (a retried activity, a reset run) still holds it.
    assert store.claim_purchase(purchase_id=purchase, request_id="r1", workflow_id="w1") == "held"
    with pytest.raises(PurchaseClaimed, match="saga w1"):
        store.claim_purchase(purchase_id=purchase, request_id="r2", workflow_id="other-w")
    assert _holder(store, purchase) == ("r1", "w1")

    # A refused saga's end releases nothing; the holder's end does.
    store.close_saga(
        workflow_id="other-w",
        purchase_id=purchase,
        state="FAILED",
        revoked=False,
        decisions=[],
        detail={},
        request_id="r2",
    )
    assert _holder(store, purchase) == ("r1", "w1")
    store.close_saga(
        workflow_id="w1",
        purchase_id=purchase,
        state="REJECTED",
        revoked=False,
        decisions=[],
        detail={},
        request_id="r1",
    )
    assert _holder(store, purchase) is None
    assert store.claim_purchase(purchase_id=purchase, request_id="r2", workflow_id="w2") == (
        "claimed"
    )


def test_a_new_request_under_the_holders_workflow_id_takes_the_claim_over(
    store: OasisStore,
) -> None:
    # Temporal runs one execution per workflow id: a new request under the holder's id means
    # the holder's run closed without releasing (terminated by hand).
    purchase = _purchase(store)
    store.claim_purchase(purchase_id=purchase, request_id="refund-9/run-a", workflow_id="refund-9")
    outcome = store.claim_purchase(
        purchase_id=purchase, request_id="refund-9/run-b", workflow_id="refund-9"
    )
    assert outcome == "taken_over"
    assert _holder(store, purchase) == ("refund-9/run-b", "refund-9")
    events = [e.event for e in store.audit_trail(purchase_id=purchase)]
    assert events == ["claim_taken_over"]


def test_a_refund_is_allowed_only_for_the_holder_and_within_the_ledgers_rest(
    store: OasisStore,
) -> None:
    purchase = _purchase(store, amount=10_000)
    with pytest.raises(RefundRefused, match="does not hold"):
        store.check_refund(purchase_id=purchase, request_id="r1", amount_cents=100)
    store.claim_purchase(purchase_id=purchase, request_id="r1", workflow_id="w1")
    store.check_refund(purchase_id=purchase, request_id="r1", amount_cents=10_000)
    with pytest.raises(RefundRefused, match="does not hold"):
        store.check_refund(purchase_id=purchase, request_id="r2", amount_cents=100)

    store.record_refunds(
        purchase,
        [
            LedgerEntry(
                processor_refund_id="re_x", amount_cents=7_500, currency="usd", source="external"
            )
        ],
        workflow_id=None,
    )
    store.check_refund(purchase_id=purchase, request_id="r1", amount_cents=2_500)
    with pytest.raises(RefundRefused, match="2500 the ledger has left"):
        store.check_refund(purchase_id=purchase, request_id="r1", amount_cents=2_501)
