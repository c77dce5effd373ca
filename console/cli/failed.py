"""Ops' commands for refunds the processor failed after their saga completed (`refund failed
...`): the customer lost access and never got the money; each failure is one task to decide."""

from __future__ import annotations

from typing import Annotated

import typer
from temporalio.client import WorkflowExecution

from console import failed_refunds as tasks
from console.cli.output import JsonOpt, emit_json, load_settings, money, out, run, when
from console.terminal import markup_safe
from refundsaga.failed_refunds import (
    FailedRefundChoice,
    FailedRefundReceipt,
    FailedRefundStatus,
)
from refundsaga.temporal import connect

app = typer.Typer()
failed_app = typer.Typer(
    help="Refunds the processor failed after their saga completed: one ops task each."
)
app.add_typer(failed_app, name="failed")

TaskRef = Annotated[
    str, typer.Argument(help="Task id (refund-failed-re_...) or the failed refund's id (re_...).")
]
Operator = Annotated[str, typer.Option("--as", "--operator", help="Your user name.")]


@failed_app.command("list")
def failed_list(
    limit: Annotated[int, typer.Option(min=1, max=1000, help="At most this many.")] = 100,
    as_json: JsonOpt = False,
) -> None:
    """The open tasks, newest first.

    Example: refund failed list
    """
    settings = load_settings()

    async def go() -> list[WorkflowExecution]:
        return await tasks.list_open(await connect(settings), limit=limit)

    found = run(go())
    if as_json:
        emit_json([{"task_id": e.id, "opened": e.start_time} for e in found])
        return
    if not found:
        out.print("no open failed-refund tasks")
    for execution in found:
        out.print(f"{markup_safe(execution.id)}  opened {when(execution.start_time)}")


@failed_app.command("show")
def failed_show(task: TaskRef, as_json: JsonOpt = False) -> None:
    """One task: what failed, what the check found, and the decision once made.

    Example: refund failed show re_3QabC
    """
    settings = load_settings()

    async def go() -> FailedRefundStatus:
        return await tasks.status(await connect(settings), task)

    status = run(go())
    if as_json:
        emit_json(status)
        return
    out.print(f"[bold]{markup_safe(status.workflow_id)}[/bold]  {status.state.value}")
    out.print(
        f"refund {markup_safe(status.refund_id)} of purchase {status.purchase_id}: "
        f"{money(status.amount_cents, status.currency)}, reported by {status.source}"
    )
    if status.check is not None and status.check.saga_workflow_id:
        out.print(f"made by saga {markup_safe(status.check.saga_workflow_id)}")
    decision = status.decision
    if decision is not None:
        started = (
            f", started {decision.started_workflow_id}" if decision.started_workflow_id else ""
        )
        note = f": {decision.note}" if decision.note else ""
        out.print(
            markup_safe(
                f"decided {decision.choice} by {decision.operator} at {when(decision.at)}"
                f"{' (signed)' if decision.signed else ''}{started}{note}"
            )
        )
    if status.error:
        out.print(f"[red]{markup_safe(status.error)}[/red]")


def _decide(task: str, choice: FailedRefundChoice, by: str, note: str, as_json: bool) -> None:
    settings = load_settings()

    async def go() -> FailedRefundReceipt:
        return await tasks.decide(await connect(settings), settings, task, choice, by, note)

    receipt = run(go())
    if as_json:
        emit_json(receipt)
    else:
        out.print(markup_safe(receipt.message))


@failed_app.command("retry")
def failed_retry(
    task: TaskRef,
    operator: Operator,
    note: Annotated[str, typer.Option(help="Optional note.")] = "",
    as_json: JsonOpt = False,
) -> None:
    """Refund the failed amount again, in a new saga that leaves access as it is.

    Example: refund failed retry re_3QabC --as olivia
    """
    _decide(task, "retry", operator, note, as_json)


@failed_app.command("restore")
def failed_restore(
    task: TaskRef,
    operator: Operator,
    note: Annotated[str, typer.Option(help="Optional note.")] = "",
    as_json: JsonOpt = False,
) -> None:
    """Give the customer's access back (progress; the AMS entitlement stays as it is).

    Example: refund failed restore re_3QabC --as olivia
    """
    _decide(task, "restore_access", operator, note, as_json)


@failed_app.command("close")
def failed_close(
    task: TaskRef,
    operator: Operator,
    note: Annotated[str, typer.Option(help="Why it needs nothing more (required).")],
    as_json: JsonOpt = False,
) -> None:
    """Close the task with a note, e.g. after settling with the customer elsewhere.

    Example: refund failed close re_3QabC --as olivia --note "paid by bank transfer"
    """
    _decide(task, "close", operator, note, as_json)
