"""Read what a chaos run left behind, saga by saga, as plain data for the invariants.

The charge and its refunds at the processor, the ledger rows, purchase and progress in the
store, the entitlement at the AMS, and what Temporal said of the saga's end (seen by the
driver). The injected faults are read by `reliability.faults.fault_counts`.
"""

from __future__ import annotations

from collections.abc import Sequence

import httpx
from sqlalchemy import create_engine, text

from refundsaga.settings import Settings
from reliability.faults import sandbox_admin
from reliability.records import LedgerRow, ProcessorRefundFact, SagaFacts, SagaPlan, SagaRun

__all__ = ["collect_facts"]


def collect_facts(
    settings: Settings, plans: Sequence[SagaPlan], runs: Sequence[SagaRun]
) -> list[SagaFacts]:
    """Read each saga's traces: the charge at the processor, the store's rows, the AMS member."""
    facts: list[SagaFacts] = []
    auth = {"Authorization": f"Bearer {settings.processor_api_key.get_secret_value()}"}
    engine = create_engine(settings.resolved_database_url)
    try:
        with httpx.Client(timeout=10.0, trust_env=False) as http, engine.connect() as db:
            for plan, run in zip(plans, runs, strict=True):
                charge = http.get(
                    f"{settings.processor_url}/v1/charges/{plan.charge_id}", headers=auth
                )
                charge.raise_for_status()
                body = charge.json()
                refunds = tuple(
                    ProcessorRefundFact(
                        refund_id=r["id"],
                        amount_cents=r["amount"],
                        status=r["status"],
                        workflow_id=(r.get("metadata") or {}).get("workflow_id"),
                    )
                    for r in body["refunds"]["data"]
                )
                purchase = db.execute(
                    text("SELECT refunded_cents, status FROM purchases WHERE id = :id"),
                    {"id": plan.purchase_id},
                ).one()
                rows = tuple(
                    LedgerRow(*row)
                    for row in db.execute(
                        text(
                            "SELECT processor_refund_id, amount_cents, status, source "
                            "FROM refunds WHERE purchase_id = :id ORDER BY id"
                        ),
                        {"id": plan.purchase_id},
                    )
                )
                archived = db.execute(
                    text("SELECT count(*) FROM progress_archive WHERE workflow_id = :wid"),
                    {"wid": plan.workflow_id},
                ).scalar_one()
                left = db.execute(
                    text(
                        "SELECT count(*) FROM course_progress "
                        "WHERE user_id = :user AND product_id = :product"
                    ),
                    {"user": plan.user_id, "product": plan.product_id},
                ).scalar_one()
                ams_state: str | None = None
                if plan.ams_member_id:
                    member = http.get(
                        f"{settings.ams_url}/_sandbox/members/{plan.ams_member_id}",
                        headers=sandbox_admin(settings, "ams")[1],
                    )
                    member.raise_for_status()
                    for entitlement in member.json()["entitlements"]:
                        if entitlement["product_code"] == plan.ams_product_code:
                            ams_state = entitlement["status"]
                error = run.error or "; ".join([*run.problems, *run.attention[-1:]]) or None
                if run.end_state is None and run.last_state:
                    error = f"last seen {run.last_state}" + (f"; {error}" if error else "")
                facts.append(
                    SagaFacts(
                        end_state=run.end_state,
                        error=error,
                        saga_ams_state=run.saga_ams_state,
                        processor_refunds=refunds,
                        processor_refunded_cents=int(body["amount_refunded"]),
                        ledger_refunded_cents=int(purchase[0]),
                        purchase_status=str(purchase[1]),
                        ledger_rows=rows,
                        archived=int(archived),
                        progress_left=int(left),
                        ams_entitlement=ams_state,
                    )
                )
    finally:
        engine.dispose()
    return facts
