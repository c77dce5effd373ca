"""Read what a chaos run left behind, saga by saga, as plain data for the invariants.

The charge with its refunds and disputes at the processor, the ledger rows, purchase and
progress in the store, the entitlement at the AMS, what Temporal said of the saga's end (seen
by the driver), and every run Temporal lists of the purchase's sagas and ops tasks, whoever
started them. The injected faults are read by `reliability.faults.fault_counts` and
`webhook_counts`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

import httpx
from sqlalchemy import create_engine, text
from temporalio.client import Client, WorkflowExecution, WorkflowExecutionStatus

from refundsaga import search_attributes as sa
from refundsaga.contracts import SagaState, SagaStatus
from refundsaga.failed_refunds import WORKFLOW_NAME as TASK_WORKFLOW
from refundsaga.reconcile_dispatch import SAGA_WORKFLOW
from refundsaga.settings import Settings
from refundsaga.sweep import SWEEP_WORKFLOW, SweepResult
from refundsaga.temporal import connect
from reliability.faults import sandbox_admin
from reliability.records import (
    LedgerRow,
    OpsTaskFact,
    ProcessorDisputeFact,
    ProcessorRefundFact,
    SagaExecutionFact,
    SagaFacts,
    SagaPlan,
    SagaRun,
    SweepFact,
)

__all__ = ["TemporalFacts", "collect_facts", "collect_temporal"]


@dataclass
class TemporalFacts:
    """Every run of the sagas, ops tasks and sweeps Temporal lists after the run."""

    sagas: dict[int, list[SagaExecutionFact]] = field(default_factory=dict)
    tasks: dict[int, list[OpsTaskFact]] = field(default_factory=dict)
    sweeps: list[SweepFact] = field(default_factory=list)

    def run_states(self) -> dict[str, dict[str, int]]:
        """Reconciliation and ops task runs by the state they were left in (a reset's old
        run: TERMINATED)."""
        reconciliations: Counter[str] = Counter(
            (run.state or run.status) if run.status in ("COMPLETED", "RUNNING") else run.status
            for runs in self.sagas.values()
            for run in runs
            if run.source
        )
        tasks: Counter[str] = Counter(
            (task.state or task.status) if task.status in ("COMPLETED", "RUNNING") else task.status
            for tasks in self.tasks.values()
            for task in tasks
        )
        return {
            "reconciliation": dict(sorted(reconciliations.items())),
            "ops_task": dict(sorted(tasks.items())),
        }


def _status(execution: WorkflowExecution) -> str:
    return execution.status.name if execution.status else "UNKNOWN"


def _ts(moment: datetime | None) -> float | None:
    return None if moment is None else moment.timestamp()


def _purchase(execution: WorkflowExecution) -> int | None:
    value = execution.typed_search_attributes.get(sa.PURCHASE_ID)
    return int(value) if value and value.isdigit() else None


async def _listed(client: Client, workflow_type: str) -> list[WorkflowExecution]:
    return [e async for e in client.list_workflows(f'WorkflowType="{workflow_type}"')]


async def collect_temporal(settings: Settings) -> TemporalFacts:
    """List every RefundSaga, FailedRefundTask and ReconciliationSweep run; read the result of
    each completed reconciliation (what it reconciled) and sweep (what it did)."""
    client = await connect(settings)
    found = TemporalFacts()
    for execution in await _listed(client, SAGA_WORKFLOW):
        purchase = _purchase(execution)
        if purchase is None:
            continue
        state = execution.typed_search_attributes.get(sa.REFUND_STATE)
        source = execution.typed_search_attributes.get(sa.REFUND_SOURCE)
        reconciled = None
        if (
            source
            and execution.status == WorkflowExecutionStatus.COMPLETED
            and state == SagaState.COMPLETED.value
        ):
            handle = client.get_workflow_handle(
                execution.id, run_id=execution.run_id, result_type=SagaStatus
            )
            result = await handle.result(follow_runs=False)
            if result.reconcile is not None:
                reconciled = result.reconcile.processor_object_id
        found.sagas.setdefault(purchase, []).append(
            SagaExecutionFact(
                workflow_id=execution.id,
                run_id=execution.run_id,
                status=_status(execution),
                state=state,
                source=source,
                started_at=execution.start_time.timestamp(),
                closed_at=_ts(execution.close_time),
                reconciled=reconciled,
            )
        )
    for execution in await _listed(client, TASK_WORKFLOW):
        purchase = _purchase(execution)
        if purchase is not None:
            found.tasks.setdefault(purchase, []).append(
                OpsTaskFact(
                    task_id=execution.id,
                    run_id=execution.run_id,
                    status=_status(execution),
                    state=execution.typed_search_attributes.get(sa.REFUND_STATE),
                )
            )
    for execution in await _listed(client, SWEEP_WORKFLOW):
        outcomes: dict[str, int] = {}
        if execution.status == WorkflowExecutionStatus.COMPLETED:
            handle = client.get_workflow_handle(
                execution.id, run_id=execution.run_id, result_type=SweepResult
            )
            outcomes = dict((await handle.result(follow_runs=False)).outcomes)
        found.sweeps.append(SweepFact(execution.run_id, _status(execution), outcomes))
    return found


def collect_facts(
    settings: Settings,
    plans: Sequence[SagaPlan],
    runs: Sequence[SagaRun],
    temporal: TemporalFacts | None = None,
) -> list[SagaFacts]:
    """Read each saga's traces: the charge at the processor, the store's rows, the AMS member;
    with `temporal`, the runs Temporal lists of the purchase's sagas and ops tasks."""
    temporal = temporal or TemporalFacts()
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
                listed = http.get(
                    f"{settings.processor_url}/v1/disputes",
                    params={"charge": plan.charge_id, "limit": 100},
                    headers=auth,
                )
                listed.raise_for_status()
                disputes = tuple(
                    ProcessorDisputeFact(d["id"], int(d["amount"]), d["status"])
                    for d in listed.json()["data"]
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
                        processor_disputes=disputes,
                        sagas=tuple(temporal.sagas.get(plan.purchase_id, ())),
                        ops_tasks=tuple(temporal.tasks.get(plan.purchase_id, ())),
                    )
                )
    finally:
        engine.dispose()
    return facts
