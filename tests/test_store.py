"""Tests of the OASIS store against real SQLite and PostgreSQL databases."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Connection, event, text
from sqlalchemy.exc import DataError, IntegrityError
from sqlalchemy.orm import Session

from refundsaga.models import LedgerEntry, PurchaseSnapshot
from refundsaga.store import OasisStore, PurchaseNotFound, StoreError
from refundsaga.store.schema import CourseProgress, Purchase

WORKFLOW = "refund-wf-1"


@dataclass(frozen=True)
class Seeded:
    """Ids of the seeded rows."""

    user_id: int
    other_user_id: int
    product_id: int
    other_product_id: int
    purchase_id: int


@pytest.fixture
def seeded(store: OasisStore) -> Seeded:
    """A user with a 995 usd purchase of an AMS product and 5 progress items, plus neighbours."""
    user_id = store.create_user(name="Ada Lovelace", email="ada@example.org", ams_member_id="M-1")
    other_user_id = store.create_user(name="Bob", email="bob@example.org")
    product_id = store.create_product(code="CRS-1", title="Course 1", entitlement_source="ams")
    other_product_id = store.create_product(
        code="CRS-2", title="Course 2", entitlement_source="oasis"
    )
    purchase_id = store.create_purchase(
        user_id=user_id,
        product_id=product_id,
        amount_cents=995,
        currency="usd",
        processor_charge_id="ch_1",
    )
    store.add_progress(user_id=user_id, product_id=product_id, items=5)
    # Neighbours that a revoke must not touch.
    store.add_progress(user_id=user_id, product_id=other_product_id, items=2)
    store.add_progress(user_id=other_user_id, product_id=product_id, items=3)
    return Seeded(user_id, other_user_id, product_id, other_product_id, purchase_id)


def entry(refund_id: str, amount: int, **overrides: Any) -> LedgerEntry:
    """A processor ledger entry in usd."""
    fields: dict[str, Any] = {
        "processor_refund_id": refund_id,
        "amount_cents": amount,
        "currency": "usd",
        "source": "processor",
    }
    return LedgerEntry(**(fields | overrides))


def rows(store: OasisStore, sql: str, **params: Any) -> list[dict[str, Any]]:
    """Rows of a raw query, as dicts."""
    with store.engine.connect() as connection:
        return [dict(row._mapping) for row in connection.execute(text(sql), params)]


def scalar(store: OasisStore, sql: str, **params: Any) -> Any:
    """The single value of a raw query."""
    with store.engine.connect() as connection:
        return connection.execute(text(sql), params).scalar_one()


@contextmanager
def captured_sql(store: OasisStore) -> Iterator[list[tuple[str, Any]]]:
    """Capture the statements the store sends (transaction control left out)."""
    statements: list[tuple[str, Any]] = []

    def capture(_conn: Connection, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if not re.match(r"\s*(BEGIN|COMMIT|ROLLBACK|SAVEPOINT|RELEASE)", statement, re.I):
            statements.append((statement, parameters))

    event.listen(store.engine, "before_cursor_execute", capture)
    try:
        yield statements
    finally:
        event.remove(store.engine, "before_cursor_execute", capture)


# -- load_purchase -------------------------------------------------------------------------


def test_load_purchase_returns_the_snapshot(store: OasisStore, seeded: Seeded) -> None:
    snapshot = store.load_purchase(seeded.purchase_id)

    assert snapshot == PurchaseSnapshot(
        purchase_id=seeded.purchase_id,
        user_id=seeded.user_id,
        product_id=seeded.product_id,
        product_code="CRS-1",
        entitlement_source="ams",
        ams_member_id="M-1",
        amount_cents=995,
        currency="usd",
        refunded_cents=0,
        status="active",
        processor_charge_id="ch_1",
        progress_count=5,
    )
    assert snapshot.refundable_cents == 995


def test_load_purchase_of_unknown_id_is_none(store: OasisStore) -> None:
    assert store.load_purchase(424242) is None


def test_load_purchase_is_one_query(store: OasisStore, seeded: Seeded) -> None:
    with captured_sql(store) as statements:
        store.load_purchase(seeded.purchase_id)

    assert len(statements) == 1


def test_load_purchase_returns_no_personal_data(store: OasisStore, seeded: Seeded) -> None:
    snapshot = store.load_purchase(seeded.purchase_id)
    assert snapshot is not None

    dumped = snapshot.model_dump_json()
    assert not {"name", "email", "user_name", "user_email"} & set(PurchaseSnapshot.model_fields)
    assert "Ada" not in dumped
    assert "ada@example.org" not in dumped


# -- record_refunds ------------------------------------------------------------------------


def test_record_refunds_twice_records_once(store: OasisStore, seeded: Seeded) -> None:
    entries = [entry("re_1", 300)]

    first = store.record_refunds(seeded.purchase_id, entries, workflow_id=WORKFLOW)
    second = store.record_refunds(seeded.purchase_id, entries, workflow_id=WORKFLOW)

    assert first.recorded == 1
    assert second.recorded == 0
    assert second.refunded_cents == first.refunded_cents == 300
    assert second.purchase_status == "partially_refunded"
    ledger = rows(store, "SELECT * FROM refunds")
    assert len(ledger) == 1
    assert ledger[0]["processor_refund_id"] == "re_1"
    assert ledger[0]["purchase_id"] == seeded.purchase_id
    assert ledger[0]["amount_cents"] == 300
    assert ledger[0]["currency"] == "usd"
    assert ledger[0]["source"] == "processor"
    assert ledger[0]["status"] == "succeeded"
    assert ledger[0]["workflow_id"] == WORKFLOW
    purchase = rows(store, "SELECT * FROM purchases WHERE id = :id", id=seeded.purchase_id)[0]
    assert (purchase["refunded_cents"], purchase["status"]) == (300, "partially_refunded")
    recorded_events = [e for e in store.audit_trail(workflow_id=WORKFLOW)]
    assert [e.event for e in recorded_events] == ["refund_recorded"]


def test_partial_then_rest_is_refunded(store: OasisStore, seeded: Seeded) -> None:
    partial = store.record_refunds(seeded.purchase_id, [entry("re_1", 400)], workflow_id="wf-a")
    # The processor lists every refund of the charge, so the second call repeats the first.
    rest = store.record_refunds(
        seeded.purchase_id, [entry("re_1", 400), entry("re_2", 595)], workflow_id="wf-b"
    )

    assert (partial.recorded, partial.refunded_cents) == (1, 400)
    assert partial.purchase_status == "partially_refunded"
    assert (rest.recorded, rest.refunded_cents, rest.purchase_status) == (1, 995, "refunded")
    snapshot = store.load_purchase(seeded.purchase_id)
    assert snapshot is not None
    assert (snapshot.refunded_cents, snapshot.refundable_cents) == (995, 0)
    assert scalar(store, "SELECT count(*) FROM refunds") == 2


def test_failed_entry_is_not_counted(store: OasisStore, seeded: Seeded) -> None:
    result = store.record_refunds(
        seeded.purchase_id,
        [
            entry("re_ok", 100),
            entry("re_bad", 500, status="failed"),
            entry("re_wait", 50, status="pending"),
        ],
        workflow_id=WORKFLOW,
    )

    assert result.recorded == 3
    assert result.refunded_cents == 150  # failed left out, pending counted
    assert scalar(store, "SELECT count(*) FROM refunds") == 3


def test_status_change_is_applied_not_duplicated(store: OasisStore, seeded: Seeded) -> None:
    store.record_refunds(
        seeded.purchase_id, [entry("re_1", 995, status="pending")], workflow_id=WORKFLOW
    )

    failed = store.record_refunds(
        seeded.purchase_id, [entry("re_1", 995, status="failed")], workflow_id=WORKFLOW
    )

    assert (failed.recorded, failed.refunded_cents, failed.purchase_status) == (0, 0, "active")
    assert rows(store, "SELECT status FROM refunds") == [{"status": "failed"}]
    changed = [
        e for e in store.audit_trail(workflow_id=WORKFLOW) if e.event == "refund_status_changed"
    ]
    assert [e.detail for e in changed] == [
        {"processor_refund_id": "re_1", "from": "pending", "to": "failed"}
    ]


def test_a_refund_named_twice_in_one_call_ends_with_its_last_status(
    store: OasisStore, seeded: Seeded
) -> None:
    result = store.record_refunds(
        seeded.purchase_id,
        [entry("re_1", 995, status="pending"), entry("re_1", 995, status="failed")],
        workflow_id=WORKFLOW,
    )

    assert (result.recorded, result.refunded_cents, result.purchase_status) == (1, 0, "active")
    assert rows(store, "SELECT status FROM refunds") == [{"status": "failed"}]
    events = [e.event for e in store.audit_trail(workflow_id=WORKFLOW)]
    assert events == ["refund_recorded", "refund_status_changed"]


def test_external_refunds_beyond_the_amount_are_capped(store: OasisStore, seeded: Seeded) -> None:
    result = store.record_refunds(
        seeded.purchase_id,
        [entry("re_x1", 900, source="external"), entry("re_x2", 900, source="external")],
        workflow_id=None,
    )

    assert (result.recorded, result.refunded_cents, result.purchase_status) == (2, 995, "refunded")
    assert scalar(store, "SELECT sum(amount_cents) FROM refunds") == 1800
    assert rows(store, "SELECT DISTINCT source, workflow_id FROM refunds") == [
        {"source": "external", "workflow_id": None}
    ]


def test_record_refunds_empty_list_reports_the_ledger(store: OasisStore, seeded: Seeded) -> None:
    store.record_refunds(seeded.purchase_id, [entry("re_1", 100)], workflow_id=WORKFLOW)

    result = store.record_refunds(seeded.purchase_id, [], workflow_id=WORKFLOW)

    assert (result.recorded, result.refunded_cents, result.purchase_status) == (
        0,
        100,
        "partially_refunded",
    )


def test_record_refunds_refuses_another_currency(store: OasisStore, seeded: Seeded) -> None:
    with pytest.raises(StoreError, match="eur"):
        store.record_refunds(
            seeded.purchase_id, [entry("re_1", 100, currency="eur")], workflow_id=None
        )

    assert scalar(store, "SELECT count(*) FROM refunds") == 0


def another_buyers_purchase(store: OasisStore, seeded: Seeded) -> int:
    """A purchase of the same product by the other user, with a charge of its own."""
    return store.create_purchase(
        user_id=seeded.other_user_id,
        product_id=seeded.product_id,
        amount_cents=995,
        currency="usd",
        processor_charge_id="ch_2",
    )


def test_record_refunds_refuses_a_refund_of_another_purchase(
    store: OasisStore, seeded: Seeded
) -> None:
    other = another_buyers_purchase(store, seeded)
    store.record_refunds(other, [entry("re_1", 100)], workflow_id=None)

    with pytest.raises(StoreError, match="re_1"):
        store.record_refunds(seeded.purchase_id, [entry("re_1", 100)], workflow_id=None)

    snapshot = store.load_purchase(seeded.purchase_id)
    assert snapshot is not None
    assert snapshot.refunded_cents == 0


def test_refunded_amount_counts_only_this_purchases_ledger(
    store: OasisStore, seeded: Seeded
) -> None:
    other = another_buyers_purchase(store, seeded)
    store.record_refunds(other, [entry("re_other", 700)], workflow_id=None)
    store.record_refunds(seeded.purchase_id, [entry("re_1", 100)], workflow_id=WORKFLOW)

    result = store.record_refunds(seeded.purchase_id, [entry("re_2", 50)], workflow_id=WORKFLOW)

    # Both of this purchase's refunds (the earlier one is not named this time), not the other's.
    assert (result.recorded, result.refunded_cents) == (1, 150)
    assert rows(store, "SELECT id, refunded_cents FROM purchases ORDER BY id") == [
        {"id": seeded.purchase_id, "refunded_cents": 150},
        {"id": other, "refunded_cents": 700},
    ]


def test_record_refunds_never_downgrades_revoked(store: OasisStore, seeded: Seeded) -> None:
    store.complete_refund(
        purchase_id=seeded.purchase_id, workflow_id=WORKFLOW, outcome="completed", revoked=True
    )

    result = store.record_refunds(seeded.purchase_id, [entry("re_1", 100)], workflow_id=WORKFLOW)

    assert (result.refunded_cents, result.purchase_status) == (100, "revoked")


def test_concurrent_record_refunds_record_once(store: OasisStore, seeded: Seeded) -> None:
    entries = [entry("re_1", 300), entry("re_2", 200)]
    results: list[int] = []
    errors: list[BaseException] = []

    def record() -> None:
        try:
            results.append(
                store.record_refunds(seeded.purchase_id, entries, workflow_id=WORKFLOW).recorded
            )
        except BaseException as exc:  # reported below, a thread cannot raise into the test
            errors.append(exc)

    threads = [threading.Thread(target=record) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert sorted(results) == [0, 0, 0, 2]
    assert scalar(store, "SELECT count(*) FROM refunds") == 2
    assert (
        scalar(store, "SELECT refunded_cents FROM purchases WHERE id = :id", id=seeded.purchase_id)
        == 500
    )


# -- revoke_progress -----------------------------------------------------------------------


def progress_of(store: OasisStore, user_id: int, product_id: int) -> list[dict[str, Any]]:
    """The user's progress rows in the product, as stored."""
    return rows(
        store,
        "SELECT * FROM course_progress WHERE user_id = :u AND product_id = :p ORDER BY id",
        u=user_id,
        p=product_id,
    )


def test_revoke_archives_every_row_then_deletes(store: OasisStore, seeded: Seeded) -> None:
    before = progress_of(store, seeded.user_id, seeded.product_id)

    result = store.revoke_progress(
        purchase_id=seeded.purchase_id,
        user_id=seeded.user_id,
        product_id=seeded.product_id,
        workflow_id=WORKFLOW,
    )

    assert (result.archived, result.deleted) == (5, 5)
    assert progress_of(store, seeded.user_id, seeded.product_id) == []
    archive = rows(store, "SELECT * FROM progress_archive ORDER BY original_progress_id")
    assert [a["original_progress_id"] for a in archive] == [b["id"] for b in before]
    for archived, original in zip(archive, before, strict=True):
        assert archived["user_id"] == seeded.user_id
        assert archived["product_id"] == seeded.product_id
        assert archived["item_key"] == original["item_key"]
        assert archived["workflow_id"] == WORKFLOW
        assert archived["purchase_id"] == seeded.purchase_id
        payload = archived["payload"]
        if isinstance(payload, str):  # SQLite returns JSON as text through raw SQL
            payload = json.loads(payload)
        assert set(payload) == set(original)
        assert payload["id"] == original["id"]
        assert payload["item_key"] == original["item_key"]
        assert payload["percent"] == original["percent"] == 100
        assert payload["completed_at"] is not None
    assert store.archived_progress(workflow_id=WORKFLOW) == 5
    assert store.archived_progress(workflow_id="another") == 0


def test_revoke_leaves_other_users_and_products_alone(store: OasisStore, seeded: Seeded) -> None:
    store.revoke_progress(
        purchase_id=seeded.purchase_id,
        user_id=seeded.user_id,
        product_id=seeded.product_id,
        workflow_id=WORKFLOW,
    )

    assert len(progress_of(store, seeded.user_id, seeded.other_product_id)) == 2
    assert len(progress_of(store, seeded.other_user_id, seeded.product_id)) == 3


def test_revoke_twice_is_harmless(store: OasisStore, seeded: Seeded) -> None:
    kwargs: dict[str, Any] = {
        "purchase_id": seeded.purchase_id,
        "user_id": seeded.user_id,
        "product_id": seeded.product_id,
        "workflow_id": WORKFLOW,
    }
    store.revoke_progress(**kwargs)

    again = store.revoke_progress(**kwargs)

    assert (again.archived, again.deleted) == (0, 0)
    assert store.archived_progress(workflow_id=WORKFLOW) == 5
    revoked = [e for e in store.audit_trail(workflow_id=WORKFLOW) if e.event == "progress_revoked"]
    assert [e.detail for e in revoked] == [
        {"user_id": seeded.user_id, "product_id": seeded.product_id, "archived": 5, "deleted": 5}
    ]


def test_revoke_without_progress_is_audited(store: OasisStore, seeded: Seeded) -> None:
    purchase_id = store.create_purchase(
        user_id=seeded.other_user_id,
        product_id=seeded.other_product_id,
        amount_cents=500,
        currency="usd",
        processor_charge_id="ch_2",
    )

    result = store.revoke_progress(
        purchase_id=purchase_id,
        user_id=seeded.other_user_id,
        product_id=seeded.other_product_id,
        workflow_id="wf-empty",
    )

    assert (result.archived, result.deleted) == (0, 0)
    assert [e.detail["deleted"] for e in store.audit_trail(workflow_id="wf-empty")] == [0]


def test_revoke_refuses_a_purchase_of_someone_else(store: OasisStore, seeded: Seeded) -> None:
    with pytest.raises(StoreError, match="not user"):
        store.revoke_progress(
            purchase_id=seeded.purchase_id,
            user_id=seeded.other_user_id,
            product_id=seeded.product_id,
            workflow_id=WORKFLOW,
        )

    assert len(progress_of(store, seeded.other_user_id, seeded.product_id)) == 3
    assert store.archived_progress(workflow_id=WORKFLOW) == 0


# -- access_facts and complete_refund ------------------------------------------------------


def test_access_facts_follow_the_refund(store: OasisStore, seeded: Seeded) -> None:
    def facts() -> tuple[int, bool]:
        found = store.access_facts(seeded.user_id, seeded.product_id)
        return found.progress_count, found.active_purchase

    assert facts() == (5, True)
    store.record_refunds(seeded.purchase_id, [entry("re_1", 100)], workflow_id=WORKFLOW)
    assert facts() == (5, True)  # partially refunded still entitles
    store.record_refunds(seeded.purchase_id, [entry("re_2", 895)], workflow_id=WORKFLOW)
    assert facts() == (5, False)
    store.revoke_progress(
        purchase_id=seeded.purchase_id,
        user_id=seeded.user_id,
        product_id=seeded.product_id,
        workflow_id=WORKFLOW,
    )
    assert facts() == (0, False)
    assert store.access_facts(seeded.other_user_id, seeded.product_id).progress_count == 3
    assert store.access_facts(424242, seeded.product_id).model_dump() == {
        "progress_count": 0,
        "active_purchase": False,
    }


def test_complete_refund_revokes_a_partial_refund(store: OasisStore, seeded: Seeded) -> None:
    store.record_refunds(seeded.purchase_id, [entry("re_1", 100)], workflow_id=WORKFLOW)

    status = store.complete_refund(
        purchase_id=seeded.purchase_id, workflow_id=WORKFLOW, outcome="completed", revoked=True
    )

    assert status == "revoked"
    assert store.access_facts(seeded.user_id, seeded.product_id).active_purchase is False


def test_complete_refund_keeps_refunded(store: OasisStore, seeded: Seeded) -> None:
    store.record_refunds(seeded.purchase_id, [entry("re_1", 995)], workflow_id=WORKFLOW)

    status = store.complete_refund(
        purchase_id=seeded.purchase_id, workflow_id=WORKFLOW, outcome="completed", revoked=True
    )

    assert status == "refunded"


def test_complete_refund_without_revoke_keeps_status(store: OasisStore, seeded: Seeded) -> None:
    store.record_refunds(seeded.purchase_id, [entry("re_1", 100)], workflow_id=WORKFLOW)

    status = store.complete_refund(
        purchase_id=seeded.purchase_id, workflow_id=WORKFLOW, outcome="completed", revoked=False
    )

    assert status == "partially_refunded"


def test_complete_refund_is_audited_once(store: OasisStore, seeded: Seeded) -> None:
    for _ in range(2):
        status = store.complete_refund(
            purchase_id=seeded.purchase_id, workflow_id=WORKFLOW, outcome="completed", revoked=True
        )
        assert status == "revoked"

    completed = [
        e for e in store.audit_trail(workflow_id=WORKFLOW) if e.event == "refund_completed"
    ]
    assert len(completed) == 1
    assert completed[0].detail == {"outcome": "completed", "revoked": True, "status": "revoked"}
    assert completed[0].purchase_id == seeded.purchase_id
    assert completed[0].actor == "refund-saga"


def test_close_saga_completes_and_records_the_end_once(store: OasisStore, seeded: Seeded) -> None:
    store.record_refunds(seeded.purchase_id, [entry("re_1", 100)], workflow_id=WORKFLOW)
    decisions = [("approved", "bob", {"at": "2026-12-01T00:00:00+00:00", "comment": None})]

    firsts = [
        store.close_saga(
            workflow_id=WORKFLOW,
            purchase_id=seeded.purchase_id,
            state="COMPLETED",
            revoked=True,
            decisions=decisions,
            detail={"branch": "refund"},
        )
        for _ in range(2)
    ]

    assert firsts == [True, False]
    events = [e.event for e in store.audit_trail(workflow_id=WORKFLOW)]
    assert events == ["refund_recorded", "refund_completed", "approved", "saga_ended"]
    assert store.access_facts(seeded.user_id, seeded.product_id).active_purchase is False
    ended = store.audit_trail(workflow_id=WORKFLOW)[-1]
    assert ended.detail == {"state": "COMPLETED", "branch": "refund"}


def test_close_saga_of_another_end_leaves_the_purchase(store: OasisStore, seeded: Seeded) -> None:
    assert store.close_saga(
        workflow_id=WORKFLOW,
        purchase_id=seeded.purchase_id,
        state="REJECTED",
        revoked=False,
        decisions=[("rejected", "bob", {})],
        detail={},
    )

    assert [e.event for e in store.audit_trail(workflow_id=WORKFLOW)] == ["rejected", "saga_ended"]
    assert store.access_facts(seeded.user_id, seeded.product_id).active_purchase is True


def test_close_saga_writes_nothing_when_the_purchase_is_gone(store: OasisStore) -> None:
    with pytest.raises(PurchaseNotFound):
        store.close_saga(
            workflow_id=WORKFLOW,
            purchase_id=424242,
            state="COMPLETED",
            revoked=True,
            decisions=[("approved", "bob", {})],
            detail={},
        )

    assert store.audit_trail(workflow_id=WORKFLOW) == []


# -- audit ---------------------------------------------------------------------------------


def test_audit_trail_contents_and_order(store: OasisStore, seeded: Seeded) -> None:
    store.add_audit(
        event="approved",
        actor="alice",
        workflow_id=WORKFLOW,
        purchase_id=seeded.purchase_id,
        detail={"amount_cents": 995},
    )
    store.record_refunds(seeded.purchase_id, [entry("re_1", 995)], workflow_id=WORKFLOW)
    store.add_audit(event="note", actor="bob", purchase_id=seeded.purchase_id)
    store.add_audit(event="other", actor="carol", workflow_id="wf-other")

    by_workflow = store.audit_trail(workflow_id=WORKFLOW)
    by_purchase = store.audit_trail(purchase_id=seeded.purchase_id)
    both = store.audit_trail(workflow_id=WORKFLOW, purchase_id=seeded.purchase_id)

    assert [(e.event, e.actor) for e in by_workflow] == [
        ("approved", "alice"),
        ("refund_recorded", "refund-saga"),
    ]
    assert by_workflow[0].detail == {"amount_cents": 995}
    assert by_workflow[1].detail == {
        "processor_refund_id": "re_1",
        "amount_cents": 995,
        "currency": "usd",
        "source": "processor",
        "status": "succeeded",
    }
    assert [e.event for e in by_purchase] == ["approved", "refund_recorded", "note"]
    assert by_purchase[2].detail == {} and by_purchase[2].workflow_id is None
    assert both == by_workflow
    assert all(e.at.utcoffset() == timedelta(0) for e in by_purchase)
    assert by_purchase == sorted(by_purchase, key=lambda e: e.at)


def test_audit_trail_needs_a_filter(store: OasisStore) -> None:
    with pytest.raises(ValueError, match="workflow_id or a purchase_id"):
        store.audit_trail()


# -- errors and constraints ----------------------------------------------------------------


@pytest.mark.parametrize("method", ["record_refunds", "revoke_progress", "complete_refund"])
def test_unknown_purchase_is_refused(store: OasisStore, method: str) -> None:
    calls = {
        "record_refunds": lambda: store.record_refunds(
            424242, [entry("re_1", 1)], workflow_id=None
        ),
        "revoke_progress": lambda: store.revoke_progress(
            purchase_id=424242, user_id=1, product_id=1, workflow_id=WORKFLOW
        ),
        "complete_refund": lambda: store.complete_refund(
            purchase_id=424242, workflow_id=WORKFLOW, outcome="completed", revoked=True
        ),
    }

    with pytest.raises(PurchaseNotFound, match="purchase 424242 not found") as raised:
        calls[method]()

    assert raised.value.purchase_id == 424242
    assert scalar(store, "SELECT count(*) FROM audit_events") == 0


@pytest.mark.parametrize(
    "sql",
    [
        pytest.param("UPDATE purchases SET refunded_cents = amount_cents + 1", id="over-refunded"),
        pytest.param("UPDATE purchases SET refunded_cents = -1", id="negative-refunded"),
        pytest.param("UPDATE purchases SET currency = 'USD'", id="upper-currency"),
        pytest.param("UPDATE purchases SET currency = 'us1'", id="digit-currency"),
        pytest.param("UPDATE purchases SET currency = 'usdd'", id="long-currency"),
        pytest.param("UPDATE purchases SET amount_cents = 0, refunded_cents = 0", id="zero-amount"),
        pytest.param("UPDATE purchases SET status = 'gone'", id="bad-status"),
        pytest.param("UPDATE purchases SET user_id = 424242", id="foreign-key"),
        pytest.param("UPDATE products SET entitlement_source = 'crm'", id="bad-source"),
        pytest.param(
            "INSERT INTO course_progress (user_id, product_id, item_key, percent) "
            "SELECT user_id, product_id, item_key, percent FROM course_progress",
            id="duplicate-progress",
        ),
    ],
)
def test_database_refuses_invalid_rows(store: OasisStore, seeded: Seeded, sql: str) -> None:
    # PostgreSQL refuses an over-long value by type (DataError) before checking constraints.
    with pytest.raises((IntegrityError, DataError)), store.engine.begin() as connection:
        connection.execute(text(sql))


def test_currency_check_accepts_lowercase_codes(store: OasisStore, seeded: Seeded) -> None:
    with store.engine.begin() as connection:
        connection.execute(text("UPDATE purchases SET currency = 'eur'"))

    assert scalar(store, "SELECT currency FROM purchases") == "eur"


# -- seeding -------------------------------------------------------------------------------


def test_seeding_is_idempotent(store: OasisStore, seeded: Seeded) -> None:
    assert store.create_user(name="Ada Lovelace", email="ada@example.org") == seeded.user_id
    assert (
        store.create_product(code="CRS-1", title="Renamed", entitlement_source="oasis")
        == seeded.product_id
    )
    assert (
        store.create_purchase(
            user_id=seeded.user_id,
            product_id=seeded.product_id,
            amount_cents=995,
            currency="usd",
            processor_charge_id="ch_1",
        )
        == seeded.purchase_id
    )
    assert store.add_progress(user_id=seeded.user_id, product_id=seeded.product_id, items=5) == 0
    assert store.add_progress(user_id=seeded.user_id, product_id=seeded.product_id, items=7) == 2
    assert scalar(store, "SELECT count(*) FROM users") == 2
    assert scalar(store, "SELECT count(*) FROM products") == 2
    assert scalar(store, "SELECT count(*) FROM purchases") == 1
    keys = [r["item_key"] for r in progress_of(store, seeded.user_id, seeded.product_id)]
    assert keys == [f"module-1/lesson-{i}" for i in range(1, 8)]


def test_create_purchase_refuses_a_charge_of_another_purchase(
    store: OasisStore, seeded: Seeded
) -> None:
    with pytest.raises(StoreError, match="ch_1"):
        store.create_purchase(
            user_id=seeded.other_user_id,
            product_id=seeded.product_id,
            amount_cents=995,
            currency="usd",
            processor_charge_id="ch_1",
        )


def test_timestamps_are_utc(store: OasisStore, seeded: Seeded) -> None:
    with Session(store.engine) as session:
        purchase = session.get(Purchase, seeded.purchase_id)
        progress = session.query(CourseProgress).first()
    assert purchase is not None and progress is not None
    for value in (purchase.created_at, purchase.updated_at, progress.completed_at):
        assert value is not None
        assert value.utcoffset() == timedelta(0)


# -- engine configuration and indexes ------------------------------------------------------


def test_sqlite_store_enforces_foreign_keys_and_uses_wal(sqlite_store: OasisStore) -> None:
    with sqlite_store.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == 15_000


SAGA_TABLES = (
    "users",
    "products",
    "purchases",
    "refunds",
    "course_progress",
    "progress_archive",
    "audit_events",
)


def _full_scans(store: OasisStore, statement: str, parameters: Any) -> list[str]:
    with store.engine.connect() as connection:
        if store.engine.dialect.name == "sqlite":
            plan = connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", parameters)
            details = [str(row[-1]) for row in plan]
            pattern = re.compile(rf"^SCAN ({'|'.join(SAGA_TABLES)})\b")
        else:
            # Tiny tables make a sequential scan the cheapest plan; forbid it to see whether
            # an index can serve the query at all.
            connection.exec_driver_sql("SET enable_seqscan = off")
            plan = connection.exec_driver_sql(f"EXPLAIN {statement}", parameters)
            details = [str(row[0]) for row in plan]
            pattern = re.compile(rf"Seq Scan on ({'|'.join(SAGA_TABLES)})\b")
            connection.rollback()
    return [d for d in details if pattern.search(d.strip())]


def test_saga_queries_are_served_by_indexes(store: OasisStore, seeded: Seeded) -> None:
    with captured_sql(store) as statements:
        store.load_purchase(seeded.purchase_id)
        store.access_facts(seeded.user_id, seeded.product_id)
        store.record_refunds(seeded.purchase_id, [entry("re_1", 995)], workflow_id=WORKFLOW)
        store.revoke_progress(
            purchase_id=seeded.purchase_id,
            user_id=seeded.user_id,
            product_id=seeded.product_id,
            workflow_id=WORKFLOW,
        )
        store.complete_refund(
            purchase_id=seeded.purchase_id, workflow_id=WORKFLOW, outcome="done", revoked=True
        )
        store.archived_progress(workflow_id=WORKFLOW)
        store.audit_trail(workflow_id=WORKFLOW)
        store.audit_trail(purchase_id=seeded.purchase_id)

    queries = [
        (sql, params)
        for sql, params in statements
        if re.match(r"\s*(SELECT|UPDATE|DELETE)", sql, re.I) and not isinstance(params, list)
    ]
    assert len(queries) >= 10
    scans = {sql: _full_scans(store, sql, params) for sql, params in queries}
    assert {sql: found for sql, found in scans.items() if found} == {}
