"""Approvers' commands: what waits for me, approve (one saga, or every one a filter selects)
and reject. A batch or a restore waiting for approval is approved the same way."""

from __future__ import annotations

import dataclasses
import sys
from collections import Counter
from typing import Annotated, Any

import typer
from rich.table import Table

from console import operations as ops
from console.cli.output import (
    ExitCode,
    JsonOpt,
    SagaRef,
    build,
    counts_progress,
    emit_json,
    emit_receipt,
    fail,
    load_settings,
    money,
    out,
    run,
    when,
)
from console.cli.signing import send_signed, signing_key
from console.terminal import markup_safe
from refundsaga.contracts import ApprovalDecision, SagaState, SagaStatus
from refundsaga.signing import sign_decision
from refundsaga.temporal import connect

app = typer.Typer()


def _decide(ref: str, approver: str, comment: str, approve: bool, as_json: bool) -> None:
    """One approval or rejection, signed for the saga's run when a key is set."""
    decision: ApprovalDecision = build(
        ApprovalDecision, approver=approver, approve=approve, comment=comment
    )
    workflow_id, receipt = send_signed(ref, decision, sign_decision, ops.decide)
    if as_json:
        emit_receipt(workflow_id, receipt)
        return
    required = receipt.required_approvals or 0
    if not approve:
        after = "the saga ends REJECTED; nothing changes"
    elif receipt.approvals >= required:
        after = "all approvals are in: the refund proceeds"
    else:
        after = f"waiting for {required - receipt.approvals} more approval(s)"
    out.print(
        f"{markup_safe(workflow_id)}: {markup_safe(receipt.message)} "
        f"({receipt.approvals}/{required} approvals); {after}"
    )


@app.command()
def approve(
    saga: Annotated[
        str | None,
        typer.Argument(help="Workflow id (refund-42) or purchase id (42); or use --query."),
    ] = None,
    approver: Annotated[
        str | None, typer.Option("--as", "--approver", help="Your user name (required).")
    ] = None,
    comment: Annotated[str, typer.Option(help="Optional comment.")] = "",
    query: Annotated[
        str | None,
        typer.Option(
            "--query",
            help="Approve every saga waiting for approval that this Temporal list filter "
            "matches, e.g. 'RequestedBy=\"sam\" AND RefundAmountCents < 10000'.",
        ),
    ] = None,
    limit: Annotated[
        int, typer.Option(min=1, max=100_000, help="With --query: at most this many.")
    ] = 1000,
    concurrency: Annotated[
        int, typer.Option(min=1, max=200, help="With --query: decisions in flight.")
    ] = 20,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="With --query: list what matches; change nothing.")
    ] = False,
    yes: Annotated[
        bool, typer.Option("--yes", help="With --query: do not ask for confirmation.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Approve a refund waiting for approval, or every one a list filter matches.

    With --query, each matching saga gets its own decision (signed for its run when
    REFUND_SIGNING_KEY_FILE is set) and still applies its policy: a saga that refuses (your own
    request, already decided by you) is reported and the others go on. Exit 2 if any refused.

    Example: refund approve refund-42 --as bob --comment "checked the order"

    Example: refund approve --query 'RequestedBy="sam"' --as bob --dry-run
    """
    if approver is None:
        fail("--as is required (your user name)")
    if (saga is None) == (query is None):
        fail("give either a saga (refund-42 or 42) or --query FILTER")
    if saga is not None:
        if dry_run or yes:
            fail("--dry-run and --yes go with --query")
        _decide(saga, approver, comment, True, as_json)
        return
    assert query is not None
    _approve_matching(query, approver, comment, limit, concurrency, dry_run, yes, as_json)


def _approve_matching(
    filter_: str,
    approver: str,
    comment: str,
    limit: int,
    concurrency: int,
    dry_run: bool,
    yes: bool,
    as_json: bool,
) -> None:
    decision: ApprovalDecision = build(
        ApprovalDecision, approver=approver, approve=True, comment=comment
    )
    if not filter_.strip():
        fail("--query is empty: give a filter, e.g. 'RequestedBy=\"sam\"'")
    try:
        query = ops.awaiting_approval_query(filter_)
    except ops.Refused as e:
        fail(str(e), ExitCode.REFUSED)
    settings = load_settings()
    key = signing_key(settings)

    def decision_for(execution: Any) -> ApprovalDecision:
        if key is None:
            return decision
        signature = sign_decision(key, execution.id, decision, run_id=execution.run_id)
        return decision.model_copy(update={"signature": signature})

    def confirmed(listed: list[Any]) -> bool:
        """Listed and shown what matched; True when the decisions should go out."""
        if dry_run or not listed:
            if as_json:
                emit_json({"query": query, "matched": [e.id for e in listed], "dry_run": dry_run})
            else:
                for execution in listed:
                    out.print(markup_safe(execution.id), highlight=False)
                out.print(
                    f"{len(listed)} saga(s) waiting for approval match {markup_safe(query)}",
                    highlight=False,
                )
            return False
        if yes:
            return True
        if not sys.stdin.isatty():
            fail(f"{len(listed)} saga(s) match; pass --yes to approve them without a prompt")
        if not typer.confirm(f"approve {len(listed)} saga(s) as {approver}?"):
            fail("nothing approved")
        return True

    async def go() -> list[ops.BulkDecision] | None:
        client = await connect(settings)
        _, listed = await ops.select_for_approval(client, filter_, limit=limit)
        if not confirmed(listed):
            return None
        with counts_progress(as_json) as progress:
            task = progress.add_task("approving", total=len(listed), counts="")
            tally: Counter[str] = Counter()

            def done(one: ops.BulkDecision) -> None:
                tally[one.outcome] += 1
                progress.update(
                    task,
                    advance=1,
                    counts=" ".join(f"{k} {v}" for k, v in sorted(tally.items())),
                )
                if not as_json and one.outcome != "approved":
                    progress.console.print(
                        f"{markup_safe(one.workflow_id)}: {one.outcome}: "
                        f"{markup_safe(one.message)}",
                        highlight=False,
                    )

            return await ops.decide_listed(
                client, listed, decision_for, concurrency=concurrency, on_done=done
            )

    results = run(go())
    if results is None:
        return
    counts = Counter(r.outcome for r in results)
    if as_json:
        emit_json(
            {
                "query": query,
                "counts": dict(counts),
                "results": [dataclasses.asdict(r) for r in results],
            }
        )
    else:
        out.print(
            f"{counts['approved']} approved, {counts['refused']} refused, "
            f"{counts['failed']} failed, of {len(results)} matching {markup_safe(query)}",
            highlight=False,
        )
    if counts["failed"]:
        raise typer.Exit(ExitCode.ERROR)
    if counts["refused"]:
        raise typer.Exit(ExitCode.REFUSED)


@app.command()
def reject(
    saga: SagaRef,
    approver: Annotated[str, typer.Option("--as", "--approver", help="Your user name.")],
    comment: Annotated[str, typer.Option(help="Why (optional).")] = "",
    as_json: JsonOpt = False,
) -> None:
    """Reject a refund: nothing changes, the saga ends REJECTED.

    Example: refund reject 42 --as carol --comment "already credited"
    """
    _decide(saga, approver, comment, False, as_json)


@app.command()
def pending(
    approver: Annotated[str, typer.Option("--approver", "--as", help="Your user name.")],
    limit: Annotated[int, typer.Option(help="At most this many.")] = 100,
    as_json: JsonOpt = False,
) -> None:
    """What this approver may decide now (not their own requests, not decided yet).

    Example: refund pending --approver bob
    """
    settings = load_settings()
    if approver not in settings.approvers:
        fail(f"{approver} is not on the approver allowlist (REFUND_APPROVERS)")

    async def go() -> list[SagaStatus]:
        client = await connect(settings)
        query = ops.list_query(state=SagaState.AWAITING_APPROVAL)
        found = []
        for execution in await ops.list_sagas(client, query, limit=limit):
            status = await ops.get_status(client, execution.id)
            mine = status.requested_by == approver
            decided = any(a.approver == approver for a in status.approvals)
            if status.state == SagaState.AWAITING_APPROVAL and not mine and not decided:
                found.append(status)
        return found

    statuses = run(go())
    if as_json:
        emit_json([s.model_dump(mode="json") for s in statuses])
        return
    table = Table("workflow", "purchase", "amount", "requested by", "approvals", "waiting since")
    for s in statuses:
        table.add_row(
            markup_safe(s.workflow_id),
            str(s.purchase_id),
            money(s.amount_cents, s.currency),
            markup_safe(s.requested_by),
            f"{sum(a.approve for a in s.approvals)}/{s.required_approvals}",
            when(s.waiting_since),
        )
    out.print(table if statuses else f"nothing waits for {markup_safe(approver)}")
