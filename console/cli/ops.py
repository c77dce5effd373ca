"""Ops' commands: unblock a saga (resolve), confirm a manual AMS removal, and undo a mistaken
revoke (restore-progress, restore-status)."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import typer

from console import operations as ops
from console.cli.output import (
    ExitCode,
    JsonOpt,
    SagaRef,
    build,
    emit_json,
    emit_receipt,
    fail,
    load_settings,
    out,
    run,
)
from console.cli.signing import send_signed
from console.cli.views import render_restore
from console.terminal import markup_safe
from refundsaga.contracts import (
    AmsConfirmation,
    Resolution,
    RestoreRequest,
    RestoreState,
    RestoreStatus,
)
from refundsaga.signing import sign_ops_decision
from refundsaga.temporal import connect

app = typer.Typer()


@app.command("confirm-ams")
def confirm_ams(
    saga: SagaRef,
    operator: Annotated[str, typer.Option("--as", "--operator", help="Your user name.")],
    reference: Annotated[str, typer.Option(help="The AMS's reference for the removal.")],
    note: Annotated[str, typer.Option(help="Optional note.")] = "",
    as_json: JsonOpt = False,
) -> None:
    """Confirm you removed the entitlement in an AMS without integration.

    Example: refund confirm-ams refund-42 --as olivia --reference AMS-CASE-77
    """
    confirmation: AmsConfirmation = build(
        AmsConfirmation, operator=operator, ams_reference=reference, note=note
    )
    workflow_id, receipt = send_signed(saga, confirmation, sign_ops_decision, ops.confirm_ams)
    if as_json:
        emit_receipt(workflow_id, receipt)
    else:
        out.print(f"{markup_safe(workflow_id)}: {markup_safe(receipt.message)}")


class ResolveChoice(StrEnum):
    retry = "retry"
    skip = "skip"
    abort = "abort"


@app.command()
def resolve(
    saga: SagaRef,
    action: Annotated[ResolveChoice, typer.Argument(help="retry, skip or abort the step.")],
    operator: Annotated[str, typer.Option("--as", "--operator", help="Your user name.")],
    note: Annotated[str, typer.Option(help="Why (recorded).")] = "",
    as_json: JsonOpt = False,
) -> None:
    """Unblock a saga in NEEDS_ATTENTION: retry the step, skip it, or abort the saga.

    Example: refund resolve refund-42 retry --as olivia --note "AMS back up"
    """
    resolution: Resolution = build(Resolution, action=action.value, operator=operator, note=note)
    workflow_id, receipt = send_signed(saga, resolution, sign_ops_decision, ops.resolve)
    if as_json:
        emit_receipt(workflow_id, receipt)
    else:
        out.print(
            f"{markup_safe(workflow_id)}: {markup_safe(receipt.message)}; "
            f"state {receipt.state.value}"
        )


def _restore_id(ref: str) -> tuple[str, str]:
    """(saga workflow id, restore workflow id) from either, or from a purchase id."""
    ref = ref.strip()
    if ref.startswith("restore-"):
        saga = ref.removeprefix("restore-")
    else:
        saga = ops.resolve_workflow_id(ref)
    return saga, ops.restore_id_for(saga)


@app.command("restore-progress")
def restore_progress(
    saga: SagaRef,
    operator: Annotated[str, typer.Option("--operator", "--as", help="Your user name.")],
    reason: Annotated[str, typer.Option(help="Why (kept in history: no names or emails).")],
    as_json: JsonOpt = False,
) -> None:
    """Undo a mistaken revoke: restore a completed saga's archived progress, with approval.

    Possible within the retention window (REFUND_RESTORE_RETENTION, default 30 days), and not
    when the user has new progress a restore would overwrite. Another approver approves it.

    Example: refund restore-progress refund-42 --operator olivia --reason "revoked by mistake"
    """
    saga_id, restore_id = _restore_id(saga)
    request: RestoreRequest = build(
        RestoreRequest, saga_workflow_id=saga_id, operator=operator, reason=reason
    )
    settings = load_settings()

    async def go() -> RestoreStatus:
        client = await connect(settings)
        await ops.start_restore(client, settings, request)
        return await ops.wait_restore(
            client,
            restore_id,
            {s for s in RestoreState if s != RestoreState.CHECKING},
            timeout_s=60,
        )

    status = run(go())
    if status.state == RestoreState.REFUSED:
        fail(f"{restore_id} refused: {status.error}")
    if status.state in ops.RESTORE_ENDS and status.state != RestoreState.COMPLETED:
        fail(f"{restore_id} ended {status.state.value}: {status.error}", ExitCode.ERROR)
    if as_json:
        emit_json(status)
        return
    render_restore(status)
    if status.state == RestoreState.AWAITING_APPROVAL:
        out.print(
            f"next: an approver other than {markup_safe(operator)} runs "
            f"`refund approve {markup_safe(restore_id)} --as <name>`"
        )


@app.command("restore-status")
def restore_status(
    ref: Annotated[str, typer.Argument(help="restore-refund-42, refund-42 or 42.")],
    wait_for: Annotated[
        str | None, typer.Option("--wait-for", help="Wait until this state (e.g. COMPLETED).")
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait with --wait-for.")] = 60.0,
    as_json: JsonOpt = False,
) -> None:
    """Show a restore: the snapshot, its window, who approved, what was restored.

    Example: refund restore-status refund-42 --wait-for COMPLETED
    """
    _, restore_id = _restore_id(ref)
    if wait_for is not None and wait_for not in RestoreState.__members__:
        fail(f"--wait-for: one of {', '.join(RestoreState.__members__)}")
    settings = load_settings()

    async def go() -> RestoreStatus:
        client = await connect(settings)
        if wait_for is None:
            return await ops.restore_status(client, restore_id)
        status = await ops.wait_restore(
            client, restore_id, {RestoreState(wait_for)}, timeout_s=timeout
        )
        if status.state != RestoreState(wait_for):
            raise ops.Refused(
                f"{restore_id} ended {status.state.value}"
                + (f": {status.error}" if status.error else "")
            )
        return status

    result = run(go())
    if as_json:
        emit_json(result)
    else:
        render_restore(result)
