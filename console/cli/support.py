"""Support's commands: start a saga, follow it, list sagas, and answer "does this user have
access, and why" and "who did what to this purchase"."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from console import operations as ops
from console.cli.output import (
    JsonOpt,
    SagaRef,
    build,
    emit_json,
    fail,
    load_settings,
    money,
    open_store,
    out,
    run,
)
from console.cli.views import render_status
from console.terminal import markup_safe
from refundsaga import search_attributes as sa
from refundsaga.access import decide_access
from refundsaga.ams import AmsError, HttpAmsClient
from refundsaga.contracts import RefundRequest, SagaState, SagaStatus, describe_plan
from refundsaga.temporal import connect

app = typer.Typer()


@app.command()
def start(
    purchase_id: Annotated[int, typer.Argument(help="The OASIS purchase to refund.")],
    reason: Annotated[str, typer.Option(help="Why (kept in history: no names or emails).")],
    requested_by: Annotated[
        str, typer.Option("--requested-by", "--as", help="Your user name (e.g. sam).")
    ],
    amount: Annotated[
        int | None,
        typer.Option(help="Amount in cents; omit for the whole unrefunded rest."),
    ] = None,
    currency: Annotated[str | None, typer.Option(help="Expected currency, e.g. usd.")] = None,
    revoke: Annotated[
        bool | None,
        typer.Option("--revoke/--keep-progress", help="Delete progress (default: if full)."),
    ] = None,
    remove_entitlement: Annotated[
        bool | None,
        typer.Option(
            "--remove-entitlement/--keep-entitlement", help="De-entitle (default: if full)."
        ),
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait/--no-wait", help="Wait until the saga has prepared its plan.")
    ] = True,
    as_json: JsonOpt = False,
) -> None:
    """Start a refund saga for a purchase.

    Example: refund start 42 --reason "duplicate purchase" --as sam --amount 2500
    """
    request: RefundRequest = build(
        RefundRequest,
        purchase_id=purchase_id,
        amount_cents=amount,
        currency=currency,
        reason=reason,
        requested_by=requested_by,
        revoke_progress=revoke,
        remove_entitlement=remove_entitlement,
    )
    settings = load_settings()

    async def go() -> SagaStatus | str:
        client = await connect(settings)
        if not wait:
            return (await ops.start_refund(client, settings, request)).id
        status = await ops.start_refund_planned(client, settings, request)
        if status is None:
            return ops.workflow_id_for(request.purchase_id)  # started, still preparing
        if status.state == SagaState.FAILED:
            raise ops.Refused(f"{status.workflow_id} refused the request: {status.error}")
        return status

    result = run(go())
    if isinstance(result, str):
        if as_json:
            emit_json({"workflow_id": result, "state": "PREPARING"})
        else:
            out.print(f"started {markup_safe(result)}")
        return
    if as_json:
        emit_json(result)
        return
    workflow_id = markup_safe(result.workflow_id)
    out.print(f"started [bold]{workflow_id}[/bold]: {result.state.value}")
    if result.plan:
        out.print(f"plan: {markup_safe(describe_plan(result.plan))}")
    if result.state == SagaState.AWAITING_APPROVAL:
        out.print(f"next: an approver runs `refund approve {workflow_id} --as <name>`")


@app.command()
def status(
    saga: SagaRef,
    wait_for: Annotated[
        list[SagaState] | None,
        typer.Option("--wait-for", help="Wait until the saga is in this state (repeatable)."),
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait with --wait-for.")] = 60.0,
    as_json: JsonOpt = False,
) -> None:
    """Show a saga: its plan, approvals, what it waits for, and its timeline.

    Example: refund status refund-42 --wait-for COMPLETED --timeout 120
    """
    workflow_id = ops.resolve_workflow_id(saga)
    settings = load_settings()

    async def go() -> SagaStatus:
        client = await connect(settings)
        if wait_for:
            states = set(wait_for)
            return await ops.wait_for_state(client, workflow_id, states, timeout_s=timeout)
        return await ops.get_status(client, workflow_id)

    result = run(go())
    if as_json:
        emit_json(result)
    else:
        render_status(result, settings.temporal_ui_url)


@app.command("list")
def list_(
    state: Annotated[SagaState | None, typer.Option(help="Only sagas in this state.")] = None,
    waiting_for: Annotated[
        str | None, typer.Option(help="approval, ams_confirmation or ops.")
    ] = None,
    requested_by: Annotated[str | None, typer.Option(help="Only this requester's.")] = None,
    purchase: Annotated[int | None, typer.Option(help="Only this purchase's.")] = None,
    since: Annotated[
        str | None, typer.Option(help="Started since: ISO date/time, or 24h / 7d.")
    ] = None,
    source: Annotated[
        str | None,
        typer.Option(
            help="support (started by a person), webhook or sweep (reconciliations of money "
            "that went back outside OASIS)."
        ),
    ] = None,
    limit: Annotated[int, typer.Option(help="At most this many.")] = 50,
    as_json: JsonOpt = False,
) -> None:
    """List sagas, newest first, by the search attributes ops use in the Temporal UI.

    Example: refund list --state NEEDS_ATTENTION --since 7d
    """
    if waiting_for and waiting_for not in ("approval", "ams_confirmation", "ops", "none"):
        fail("--waiting-for must be approval, ams_confirmation, ops or none")
    if source and source not in ("support", "webhook", "sweep"):
        fail("--source must be support, webhook or sweep")
    started_since = _parse_since(since) if since else None
    query = ops.list_query(
        state=state,
        waiting_for=waiting_for,
        requested_by=requested_by,
        purchase_id=purchase,
        since=started_since,
        source=source,
        # Ops tasks (refunds failed after completion) have states of their own.
        with_tasks=state is None and source is None,
    )
    settings = load_settings()

    async def go() -> list[Any]:
        return await ops.list_sagas(await connect(settings), query, limit=limit)

    executions = run(go())
    rows = []
    for e in executions:
        attrs = e.typed_search_attributes
        rows.append(
            {
                "workflow_id": e.id,
                "run_id": e.run_id,
                "state": attrs.get(sa.REFUND_STATE),
                "waiting_for": attrs.get(sa.WAITING_FOR),
                "purchase_id": attrs.get(sa.PURCHASE_ID),
                "amount_cents": attrs.get(sa.REFUND_AMOUNT_CENTS),
                "requested_by": attrs.get(sa.REQUESTED_BY),
                "source": attrs.get(sa.REFUND_SOURCE) or sa.SOURCE_SUPPORT,
                "started": e.start_time.isoformat(),
                "temporal_status": e.status.name if e.status else None,
            }
        )
    if as_json:
        emit_json(rows)
        return
    table = Table("workflow", "state", "waiting for", "purchase", "amount", "by", "started (UTC)")
    for r in rows:
        # Search attributes are whatever the workflow's starter set: shown, not obeyed.
        table.add_row(
            markup_safe(r["workflow_id"]),
            markup_safe(r["state"]),
            markup_safe(r["waiting_for"] or "-"),
            str(r["purchase_id"]),
            money(r["amount_cents"], None),
            markup_safe(r["requested_by"]),
            r["started"][:19].replace("T", " "),
        )
    out.print(table if rows else "no sagas match")
    out.print(f"[dim]query: {markup_safe(query)}[/dim]")


def _parse_since(value: str) -> datetime:
    units = {"m": "minutes", "h": "hours", "d": "days"}
    # ASCII digits only ('²'.isdigit() is true), and a span before year 1 is refused, not
    # an OverflowError.
    if value[:-1].isascii() and value[:-1].isdigit() and value[-1] in units:
        try:
            return datetime.now(UTC) - timedelta(**{units[value[-1]]: int(value[:-1])})
        except OverflowError:
            fail(f"--since {value!r} reaches back too far")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        fail(f"--since {value!r}: use an ISO date/time (2026-11-01) or 24h / 7d")
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@app.command()
def access(
    user: Annotated[int, typer.Option(help="OASIS user id.")],
    product: Annotated[int, typer.Option(help="OASIS product id.")],
    as_json: JsonOpt = False,
) -> None:
    """Evaluate the OASIS access rule: does the user have access, and why.

    Example: refund access --user 7 --product 3 --json
    """
    settings = load_settings()
    store = open_store(settings)
    try:
        subject = store.access_subject(user, product)
        if subject is None:
            fail(f"no user {user} or no product {product} in the OASIS store")
        facts = store.access_facts(user, product)
    finally:
        store.close()

    async def ams_entitled() -> bool | None:
        if subject.entitlement_source == "oasis":
            return None
        if not subject.ams_member_id:
            return False
        async with HttpAmsClient(settings.ams_url, settings.ams_api_key) as client:
            try:
                return await client.has_active_entitlement(
                    subject.ams_member_id, subject.product_code
                )
            except AmsError as e:
                raise ops.OperationError(f"the AMS did not answer: {e.message}") from e

    entitled = run(ams_entitled())
    decision = decide_access(
        entitlement_source=subject.entitlement_source,
        progress_count=facts.progress_count,
        active_purchase=facts.active_purchase,
        ams_entitled=entitled,
    )
    payload = {
        "user_id": user,
        "product_id": product,
        "has_access": decision.has_access,
        "reasons": decision.reasons,
        "entitlement_source": subject.entitlement_source,
        "progress_count": facts.progress_count,
    }
    if as_json:
        emit_json(payload)
    elif decision.has_access:
        reasons = ", ".join(markup_safe(r) for r in decision.reasons)
        out.print(f"user {user} HAS access to product {product} via {reasons}")
    else:
        out.print(f"user {user} has NO access to product {product}")


@app.command()
def audit(
    purchase: Annotated[int, typer.Argument(help="OASIS purchase id.", min=1)],
    as_json: JsonOpt = False,
) -> None:
    """Every audit event of every saga, batch and restore run for a purchase: who, what,
    when, which run, and whether a signature backs it.

    Example: refund audit 42 --json
    """
    settings = load_settings()
    store = open_store(settings)
    try:
        events = store.purchase_audit(purchase)
    finally:
        store.close()
    rows: list[dict[str, Any]] = [
        {
            "at": event.at.isoformat(),
            "workflow_id": event.workflow_id,
            "run_id": event.run_id,
            "event": event.event,
            "actor": event.actor,
            "signed": bool(event.detail.get("signature")),
            "detail": event.detail,
        }
        for event in events
    ]
    if as_json:
        emit_json({"purchase_id": purchase, "events": rows})
        return
    if not rows:
        out.print(f"no audit events for purchase {purchase}")
        return
    table = Table(title=f"audit trail of purchase {purchase}")
    for column in ("at (UTC)", "workflow", "run", "event", "who", "signed"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row["at"][:19],
            escape(row["workflow_id"] or "-"),
            (row["run_id"] or "-")[:8],
            escape(row["event"]),
            escape(row["actor"]),
            "yes" if row["signed"] else "",
        )
    out.print(table)
