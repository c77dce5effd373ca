"""The `refund` command line: support starts sagas, approvers decide, ops watch and unblock.

Exit codes: 0 done; 2 refused or invalid input (nothing was started or changed); 1 anything
else (Temporal unreachable, a timeout). Every verb has `--json` for scripts.
"""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import json
import sys
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import BaseModel, ValidationError
from rich.markup import escape
from rich.panel import Panel
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn
from rich.progress_bar import ProgressBar
from rich.table import Table
from temporalio.client import Client

from console import operations as ops
from console.terminal import json_for_terminal, markup_safe, printable, terminal_console
from refundsaga.contracts import (
    MAX_BATCH_PURCHASES,
    AmsConfirmation,
    ApprovalDecision,
    BatchPlan,
    BatchRefundInput,
    BatchState,
    BatchStatus,
    BatchSummary,
    RefundRequest,
    Resolution,
    RestoreRequest,
    RestoreState,
    RestoreStatus,
    SagaState,
    SagaStatus,
    describe_plan,
    format_money,
)
from refundsaga.settings import Settings, get_settings
from refundsaga.signing import (
    SigningError,
    generate_private_key,
    public_key_b64,
    sign_decision,
    sign_ops_decision,
    write_private_key,
)
from refundsaga.temporal import TemporalUnavailable, connect, run_and_exit

T = TypeVar("T")

app = typer.Typer(
    name="refund",
    help=(
        "Durable, auditable refunds for OASIS. Support starts a saga, approvers decide, "
        "ops watch and unblock.\n\nExit codes: 0 done, 2 refused or invalid input "
        "(nothing changed), 1 anything else."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
stack_app = typer.Typer(help="The embedded stack: Temporal dev server + UI, sandboxes, worker.")
db_app = typer.Typer(help="The OASIS store's schema migrations.")
app.add_typer(stack_app, name="stack")
app.add_typer(db_app, name="db")
batch_app = typer.Typer(
    help="Refund every buyer of a cancelled event or course with one approval; `status` "
    'follows a batch.\n\nExample: refund batch --product 3 --reason "event cancelled" '
    "--requested-by sam --dry-run"
)
app.add_typer(batch_app, name="batch")
schedules_app = typer.Typer(help="Temporal schedules RefundSaga relies on.")
app.add_typer(schedules_app, name="schedules")
keys_app = typer.Typer(help="Signing keys for attributable approvals.")
app.add_typer(keys_app, name="keys")

# Free text below is passed through `markup_safe` where it is printed; these consoles also
# show any control character that slips through instead of sending it to the terminal.
out = terminal_console()
err = terminal_console(stderr=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
SagaRef = Annotated[str, typer.Argument(help="Workflow id (refund-42) or purchase id (42).")]


class ExitCode:
    OK = 0
    ERROR = 1
    REFUSED = 2


def counts_progress(as_json: bool) -> Progress:
    """A bar with a counts column; on stderr when stdout carries JSON, off when not a TTY."""
    console = err if as_json else out
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[counts]}"),
        console=console,
        disable=not console.is_terminal,
    )


def print_error(message: str) -> None:
    # Messages quote user input and outside systems' errors: "[/x]" is text, not markup, and
    # control characters are shown. Newlines stay (a stack error quotes its log's lines) but
    # are indented, so no quoted text stands as a line of its own.
    text = escape(printable(message, keep_newlines=True)).replace("\n", "\n  ")
    err.print(f"[red]error:[/red] {text}", highlight=False, soft_wrap=True)


def fail(message: str, code: int = ExitCode.REFUSED) -> NoReturn:
    print_error(message)
    raise typer.Exit(code)


def _validation_message(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "input"
        parts.append(f"{where}: {item['msg']}")
    return "invalid input: " + "; ".join(parts)


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine and turn every known failure into a one-line message and exit code."""
    try:
        return asyncio.run(coro)
    except ops.Refused as e:
        fail(str(e), ExitCode.REFUSED)
    except ValidationError as e:
        fail(_validation_message(e), ExitCode.REFUSED)
    except (ops.OperationError, TemporalUnavailable) as e:
        fail(str(e), ExitCode.ERROR)


def load_settings() -> Settings:
    """The settings, or a one-line message naming the bad REFUND_* variable."""
    try:
        return get_settings()
    except ValidationError as e:
        fail("invalid settings: " + _validation_message(e).removeprefix("invalid input: "))


def build(model: type[BaseModel], **fields: Any) -> Any:
    """Validate user input into a message model before anything is sent anywhere."""
    try:
        return model(**fields)
    except ValidationError as e:
        fail(_validation_message(e))


def emit_json(payload: Any) -> None:
    if isinstance(payload, BaseModel):
        text = payload.model_dump_json(indent=2)
    else:
        text = json.dumps(payload, indent=2, default=str)
    sys.stdout.write(json_for_terminal(text) + "\n")


def money(cents: int | None, currency: str | None) -> str:
    return "rest" if cents is None else format_money(cents, currency)


def _when(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def render_status(status: SagaStatus, ui_url: str) -> None:
    """The saga for a person: the plan, what it waits for, and its timeline."""
    # Every string here may come from a raw signal or an outside system: markup_safe.
    safe = markup_safe
    lines = [
        f"[bold]{safe(status.workflow_id)}[/bold]  state [bold]{status.state.value}[/bold]",
        f"purchase {status.purchase_id}  amount {money(status.amount_cents, status.currency)}"
        f"  requested by {safe(status.requested_by)}",
    ]
    if status.waiting_for:
        lines.append(
            f"[yellow]waiting for {status.waiting_for.value}[/yellow] since "
            f"{_when(status.waiting_since)} UTC"
        )
    if status.required_approvals is not None:
        approved = [safe(a.approver) for a in status.approvals if a.approve]
        lines.append(
            f"approvals {len(approved)}/{status.required_approvals}"
            + (f" ({', '.join(approved)})" if approved else "")
        )
    if status.refund.source:
        refund_ids = ", ".join(safe(i) for i in status.refund.processor_refund_ids)
        lines.append(
            f"refund {money(status.refund.amount_cents, status.currency)} "
            f"({safe(status.refund.source)}: {refund_ids})"
        )
    if status.progress_deleted is not None:
        lines.append(f"progress deleted {status.progress_deleted}")
    lines.append(f"AMS {safe(status.ams.mode)}: {safe(status.ams.state)}")
    if status.access is not None:
        access = "still has access via " + ", ".join(safe(r) for r in status.access.reasons)
        lines.append(f"access {'gone' if not status.access.has_access else access}")
    if status.error:
        lines.append(f"[red]{safe(status.error)}[/red]")
    for ignored in status.ignored[-3:]:
        lines.append(
            f"[dim]ignored {safe(ignored.kind)} by {safe(ignored.by)}: {safe(ignored.reason)}[/dim]"
        )
    out.print(Panel("\n".join(lines), title="refund saga", expand=False))
    table = Table("time (UTC)", "step", "actor", "outcome", title="timeline")
    for entry in status.timeline:
        table.add_row(_when(entry.at), safe(entry.step), safe(entry.actor), safe(entry.outcome))
    out.print(table)
    out.print(
        f"Temporal UI: {safe(ui_url)}/namespaces/default/workflows/{safe(status.workflow_id)}"
    )


# --- support ----------------------------------------------------------------------------------


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
        handle = await ops.start_refund(client, settings, request)
        if not wait:
            return handle.id
        status = await ops.wait_for_state(
            client,
            handle.id,
            {s for s in SagaState if s != SagaState.PREPARING},
            timeout_s=60,
        )
        if status.state == SagaState.FAILED:
            raise ops.Refused(f"{handle.id} refused the request: {status.error}")
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


# --- approvers --------------------------------------------------------------------------------


def _signing_key(settings: Settings) -> Ed25519PrivateKey | None:
    """The signing key when REFUND_SIGNING_KEY_FILE is set; a bad file is a one-line refusal."""
    try:
        return ops.signing_key(settings)
    except ops.Refused as e:
        fail(str(e))


_OpsDecision = TypeVar("_OpsDecision", Resolution, AmsConfirmation)


async def _signed_ops(
    client: Client, key: Ed25519PrivateKey | None, workflow_id: str, decision: _OpsDecision
) -> _OpsDecision:
    """The operator's decision, signed for the saga's current run when a key is set."""
    if key is None:
        return decision
    run_id = (await ops.describe(client, workflow_id)).run_id
    signature = sign_ops_decision(key, workflow_id, decision, run_id=run_id)
    return decision.model_copy(update={"signature": signature})


def _decide(ref: str, approver: str, comment: str, approve: bool, as_json: bool) -> None:
    decision: ApprovalDecision = build(
        ApprovalDecision, approver=approver, approve=approve, comment=comment
    )
    workflow_id = ops.resolve_workflow_id(ref)
    settings = load_settings()
    key = _signing_key(settings)

    async def go() -> Any:
        client = await connect(settings)
        signed = decision
        if key is not None:
            # The signature binds the decision to this saga's run, so it cannot be replayed
            # onto a later saga for the same purchase (same workflow id).
            run_id = (await ops.describe(client, workflow_id)).run_id
            signature = sign_decision(key, workflow_id, decision, run_id=run_id)
            signed = decision.model_copy(update={"signature": signature})
        return await ops.decide(client, workflow_id, signed)

    receipt = run(go())
    if as_json:
        emit_json({"workflow_id": workflow_id, **receipt.model_dump(mode="json")})
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
    key = _signing_key(settings)

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
            _when(s.waiting_since),
        )
    out.print(table if statuses else f"nothing waits for {markup_safe(approver)}")


# --- everyone: status and list ------------------------------------------------------------------


class StateChoice(StrEnum):
    PREPARING = "PREPARING"
    AWAITING_APPROVAL = "AWAITING_APPROVAL"
    REFUNDING = "REFUNDING"
    REVOKING = "REVOKING"
    DEENTITLING = "DEENTITLING"
    AWAITING_AMS_CONFIRMATION = "AWAITING_AMS_CONFIRMATION"
    VERIFYING = "VERIFYING"
    NEEDS_ATTENTION = "NEEDS_ATTENTION"
    COMPLETED = "COMPLETED"
    REJECTED = "REJECTED"
    EXPIRED = "EXPIRED"
    CANCELLED = "CANCELLED"
    FAILED = "FAILED"


@app.command()
def status(
    saga: SagaRef,
    wait_for: Annotated[
        list[StateChoice] | None,
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
            states = {SagaState(s.value) for s in wait_for}
            return await ops.wait_for_state(client, workflow_id, states, timeout_s=timeout)
        return await ops.get_status(client, workflow_id)

    result = run(go())
    if as_json:
        emit_json(result)
    else:
        render_status(result, settings.temporal_ui_url)


@app.command("list")
def list_(
    state: Annotated[StateChoice | None, typer.Option(help="Only sagas in this state.")] = None,
    waiting_for: Annotated[
        str | None, typer.Option(help="approval, ams_confirmation or ops.")
    ] = None,
    requested_by: Annotated[str | None, typer.Option(help="Only this requester's.")] = None,
    purchase: Annotated[int | None, typer.Option(help="Only this purchase's.")] = None,
    since: Annotated[
        str | None, typer.Option(help="Started since: ISO date/time, or 24h / 7d.")
    ] = None,
    limit: Annotated[int, typer.Option(help="At most this many.")] = 50,
    as_json: JsonOpt = False,
) -> None:
    """List sagas, newest first, by the search attributes ops use in the Temporal UI.

    Example: refund list --state NEEDS_ATTENTION --since 7d
    """
    if waiting_for and waiting_for not in ("approval", "ams_confirmation", "ops", "none"):
        fail("--waiting-for must be approval, ams_confirmation, ops or none")
    started_since = _parse_since(since) if since else None
    query = ops.list_query(
        state=SagaState(state.value) if state else None,
        waiting_for=waiting_for,
        requested_by=requested_by,
        purchase_id=purchase,
        since=started_since,
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
                "state": attrs.get(ops.sa.REFUND_STATE),
                "waiting_for": attrs.get(ops.sa.WAITING_FOR),
                "purchase_id": attrs.get(ops.sa.PURCHASE_ID),
                "amount_cents": attrs.get(ops.sa.REFUND_AMOUNT_CENTS),
                "requested_by": attrs.get(ops.sa.REQUESTED_BY),
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


# --- ops --------------------------------------------------------------------------------------


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
    workflow_id = ops.resolve_workflow_id(saga)
    settings = load_settings()
    key = _signing_key(settings)

    async def go() -> Any:
        client = await connect(settings)
        signed = await _signed_ops(client, key, workflow_id, confirmation)
        return await ops.confirm_ams(client, workflow_id, signed)

    receipt = run(go())
    if as_json:
        emit_json({"workflow_id": workflow_id, **receipt.model_dump(mode="json")})
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
    workflow_id = ops.resolve_workflow_id(saga)
    settings = load_settings()
    key = _signing_key(settings)

    async def go() -> Any:
        client = await connect(settings)
        signed = await _signed_ops(client, key, workflow_id, resolution)
        return await ops.resolve(client, workflow_id, signed)

    receipt = run(go())
    if as_json:
        emit_json({"workflow_id": workflow_id, **receipt.model_dump(mode="json")})
    else:
        out.print(
            f"{markup_safe(workflow_id)}: {markup_safe(receipt.message)}; "
            f"state {receipt.state.value}"
        )


@app.command()
def access(
    user: Annotated[int, typer.Option(help="OASIS user id.")],
    product: Annotated[int, typer.Option(help="OASIS product id.")],
    as_json: JsonOpt = False,
) -> None:
    """Evaluate the OASIS access rule: does the user have access, and why.

    Example: refund access --user 7 --product 3 --json
    """
    from refundsaga.access import decide_access
    from refundsaga.ams import AmsError, HttpAmsClient
    from refundsaga.store import OasisStore

    settings = load_settings()
    store = _open_store(settings, OasisStore)
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
    from refundsaga.store import OasisStore

    settings = load_settings()
    store = _open_store(settings, OasisStore)
    try:
        events = store.purchase_audit(purchase)
    finally:
        store.close()
    rows = [
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


def _open_store(settings: Settings, store_cls: Any) -> Any:
    from refundsaga.store.migrate import upgrade

    try:
        upgrade(settings.resolved_database_url)
        return store_cls.from_url(settings.resolved_database_url)
    except Exception as e:
        fail(f"cannot open the OASIS store ({type(e).__name__}): {e}", ExitCode.ERROR)


@app.command()
def seed(
    scenario: Annotated[
        list[str] | None,
        typer.Option(
            help="standard, already_refunded, partial, manual_ams, oasis_entitled, "
            "pending_refund (repeatable; default: all)."
        ),
    ] = None,
    count: Annotated[int, typer.Option(min=1, max=10_000, help="Purchases per scenario.")] = 1,
    as_json: JsonOpt = False,
) -> None:
    """Create demo purchases, consistent in the store and both sandboxes.

    Example: refund seed --scenario standard --count 3 --json
    """
    from console.seed import SCENARIOS, SeedError
    from console.seed import seed as seed_data
    from refundsaga.store import OasisStore

    chosen = scenario or list(SCENARIOS)
    unknown = [s for s in chosen if s not in SCENARIOS]
    if unknown:
        fail(f"unknown scenario {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    settings = load_settings()
    store = _open_store(settings, OasisStore)
    try:
        purchases = seed_data(
            store,
            processor_url=settings.processor_url,
            ams_url=settings.ams_url,
            processor_api_key=settings.processor_api_key.get_secret_value(),
            ams_api_key=settings.ams_api_key.get_secret_value(),
            scenarios=chosen,  # type: ignore[arg-type]
            count=count,
        )
    except SeedError as e:
        fail(str(e), ExitCode.ERROR)
    finally:
        store.close()
    if as_json:
        emit_json([p.model_dump(mode="json") for p in purchases])
        return
    table = Table("purchase", "scenario", "amount", "charge", "user", "product", "AMS member")
    for p in purchases:
        table.add_row(
            str(p.purchase_id),
            markup_safe(p.scenario),
            money(p.amount_cents, p.currency),
            markup_safe(p.charge_id),
            str(p.user_id),
            str(p.product_id),
            markup_safe(p.ams_member_id or "-"),
        )
    out.print(table)


# --- batches: every buyer of a cancelled event or course --------------------------------------


def _read_batch_csv(path: Path) -> list[int]:
    """Purchase ids from a CSV file with a `purchase_id` column; any bad row refuses the file."""
    if not path.is_file():
        fail(f"{path}: no such file")
    ids: list[int] = []
    problems: list[str] = []
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if "purchase_id" not in (reader.fieldnames or []):
            fail(f"{path}: no purchase_id column")
        for number, row in enumerate(reader, start=2):
            raw = (row.get("purchase_id") or "").strip()
            if not raw.isdigit() or int(raw) == 0:
                problems.append(f"row {number}: purchase_id {raw!r} is not a positive number")
            elif int(raw) in ids:
                problems.append(f"row {number}: purchase {raw} appears twice")
            else:
                ids.append(int(raw))
            if len(ids) > MAX_BATCH_PURCHASES:
                fail(f"{path}: more than {MAX_BATCH_PURCHASES} purchases; split the file")
    if problems:
        # A batch is approved as a whole: it starts from a file that is right as a whole.
        fail(f"{path}: " + "; ".join(problems[:5]) + ("; ..." if len(problems) > 5 else ""))
    if not ids:
        fail(f"{path}: no purchases")
    return ids


def _render_batch_plan(plan: BatchPlan) -> None:
    table = Table(
        "purchase", "user", "refund", "already refunded", "progress", "entitlement", "skipped: why"
    )
    for item in plan.items:
        table.add_row(
            str(item.purchase_id),
            str(item.user_id or "-"),
            money(item.amount_cents, item.currency) if item.included else "-",
            "yes" if item.already_refunded else "",
            str(item.progress_records) if item.included else "-",
            markup_safe(item.ams_action) if item.included else "-",
            markup_safe(item.skip_reason or ""),
        )
    out.print(table)
    out.print(Panel(_batch_summary_text(plan.summary), title="batch (dry run)", expand=False))


def _batch_summary_text(summary: BatchSummary) -> str:
    limit = load_settings().processor_calls_per_s  # the worker's, when it shares this setting
    totals = ", ".join(
        money(cents, currency) for currency, cents in summary.totals_by_currency.items()
    )
    lines = [
        f"purchases {summary.purchases}: {summary.included} to refund, {summary.skipped} skipped",
        f"money to move {totals or '0'} ({summary.already_refunded} already refunded at the "
        "processor: no money moves for those)",
        f"progress records to delete {summary.progress_records}",
        "entitlements: "
        + (
            ", ".join(f"{n} {markup_safe(action)}" for action, n in summary.ams_actions.items())
            or "none"
        ),
        f"approvals needed {summary.required_approvals} (on the total)",
        f"pace: at most {summary.window} sagas at once, {summary.rate_per_s:g} started per second",
        "processor calls: "
        + (f"at most {limit:g} a second for all sagas together" if limit else "no limit")
        + " (REFUND_PROCESSOR_CALLS_PER_S)",
    ]
    lines += [f"skipped {n}: {markup_safe(why)}" for why, n in summary.skip_reasons.items()]
    return "\n".join(lines)


def _batch_bar(status: BatchStatus) -> Table:
    total = status.summary.included if status.summary else 0
    c = status.counts
    finished = c.done + c.failed + c.skipped
    grid = Table.grid(padding=(0, 1))
    pct = 100 * finished / total if total else 100.0
    grid.add_row(ProgressBar(total=max(total, 1), completed=finished if total else 1, width=40))
    grid.add_row(f"{pct:.0f}%  {finished}/{total} finished")
    return grid


def render_batch(status: BatchStatus, ui_url: str) -> None:
    """A batch for a person: plan, approvals, progress bar and counts, what needs people."""
    c = status.counts
    safe = markup_safe
    lines = [
        f"[bold]{safe(status.workflow_id)}[/bold]  state [bold]{status.state.value}[/bold]"
        f"  requested by {safe(status.requested_by)}  runs {status.runs}",
    ]
    if status.waiting_for:
        lines.append(
            f"[yellow]waiting for {status.waiting_for.value}[/yellow] since "
            f"{_when(status.waiting_since)} UTC: refund approve {safe(status.workflow_id)} "
            "--as <name>"
        )
    if status.required_approvals is not None:
        approved = [safe(a.approver) for a in status.approvals if a.approve]
        lines.append(
            f"approvals {len(approved)}/{status.required_approvals}"
            + (f" ({', '.join(approved)})" if approved else "")
        )
    lines.append(
        f"done {c.done}  running {c.running}  waiting {c.waiting}  needing attention "
        f"{c.needs_attention}  failed {c.failed}  to start {c.pending}  skipped {c.skipped}"
    )
    currencies = list(status.summary.totals_by_currency) if status.summary else []
    currency = currencies[0] if len(currencies) == 1 else None
    lines.append(f"money refunded {money(c.refunded_cents, currency)}")
    if status.attention:
        lines.append(
            "[red]needs attention:[/red] "
            + ", ".join(f"refund-{pid}" for pid in status.attention)
            + " (refund resolve <saga> retry|skip|abort)"
        )
    if status.error:
        lines.append(f"[red]{safe(status.error)}[/red]")
    out.print(Panel("\n".join(lines), title="batch refund", expand=False))
    if status.summary:
        out.print(Panel(_batch_summary_text(status.summary), title="plan", expand=False))
    out.print(_batch_bar(status))
    if status.issues:
        table = Table("purchase", "outcome", "why", title="not simply done")
        for issue in status.issues[-20:]:
            table.add_row(str(issue.purchase_id), safe(issue.outcome), safe(issue.reason or ""))
        out.print(table)
    out.print(
        f"Temporal UI: {safe(ui_url)}/namespaces/default/workflows/{safe(status.workflow_id)}"
    )


@batch_app.callback(invoke_without_command=True)
def batch(
    ctx: typer.Context,
    product: Annotated[
        int | None, typer.Option(help="Refund every purchase of this product.")
    ] = None,
    csv_file: Annotated[
        Path | None, typer.Option("--csv", help="Or the purchases in this file (purchase_id).")
    ] = None,
    reason: Annotated[
        str | None, typer.Option(help="Why (kept in history: no names or emails).")
    ] = None,
    requested_by: Annotated[
        str | None, typer.Option("--requested-by", "--as", help="Your user name (e.g. sam).")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show what would happen; change nothing.")
    ] = False,
    window: Annotated[
        int | None, typer.Option(min=1, max=1000, help="Sagas running at once (default: setting).")
    ] = None,
    rate: Annotated[
        float | None,
        typer.Option(
            min=0.01,
            max=1000,
            help="Sagas started per second (default: setting). Processor calls of all sagas "
            "are limited apart from this (REFUND_PROCESSOR_CALLS_PER_S).",
        ),
    ] = None,
    starts_per_run: Annotated[
        int, typer.Option(min=1, max=5000, hidden=True, help="Continue as new after this many.")
    ] = 250,
    as_json: JsonOpt = False,
) -> None:
    """Refund every buyer of a cancelled event or course with one approval.

    Example: refund batch --product 3 --reason "event cancelled" --requested-by sam --dry-run
    """
    if ctx.invoked_subcommand is not None:
        return
    if (product is None) == (csv_file is None):
        fail("give either --product P or --csv FILE")
    if not reason or not requested_by:
        fail("--reason and --requested-by are required")
    purchase_ids = _read_batch_csv(csv_file) if csv_file is not None else None
    inp: BatchRefundInput = build(
        BatchRefundInput,
        product_id=product,
        purchase_ids=purchase_ids,
        reason=reason,
        requested_by=requested_by,
        window=window,
        rate_per_s=rate,
        starts_per_run=starts_per_run,
    )
    settings = load_settings()
    if dry_run:
        from refundsaga.store import OasisStore

        store = _open_store(settings, OasisStore)

        async def plan() -> BatchPlan:
            try:
                client = await connect(settings)
            except TemporalUnavailable:
                err.print("[dim]Temporal unreachable: sagas running now are not shown[/dim]")
                client = None
            return await ops.dry_run_batch(
                client,
                settings,
                store,
                product_id=product,
                purchase_ids=purchase_ids,
                window=window,
                rate_per_s=rate,
            )

        try:
            result = run(plan())
        finally:
            store.close()
        if as_json:
            emit_json(result)
        else:
            _render_batch_plan(result)
        return

    async def go() -> BatchStatus:
        client = await connect(settings)
        handle = await ops.start_batch(client, settings, inp)
        deadline = time.monotonic() + 600
        while True:
            status = await ops.batch_status(client, handle.id)
            if status.state != BatchState.PLANNING or time.monotonic() > deadline:
                return status
            await asyncio.sleep(0.5)

    status = run(go())
    if status.state == BatchState.FAILED:
        fail(f"{status.workflow_id}: {status.error}", ExitCode.ERROR)
    if as_json:
        emit_json(status)
        return
    workflow_id = markup_safe(status.workflow_id)
    out.print(f"started [bold]{workflow_id}[/bold]: {status.state.value}")
    if status.summary:
        out.print(Panel(_batch_summary_text(status.summary), title="plan", expand=False))
    if status.state == BatchState.AWAITING_APPROVAL:
        out.print(f"next: an approver runs `refund approve {workflow_id} --as <name>`")
    out.print(f"watch: refund batch status {workflow_id} --wait")


@batch_app.command("status")
def batch_status_(
    batch_id: Annotated[
        str | None, typer.Argument(help="The batch (batch-product-3); omit to list batches.")
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Follow it until it ends.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait with --wait.")] = 3600.0,
    limit: Annotated[int, typer.Option(help="Batches to list.")] = 20,
    as_json: JsonOpt = False,
) -> None:
    """Show a batch's progress with a progress bar, or list the batches.

    Example: refund batch status batch-product-3 --wait
    """
    settings = load_settings()
    if batch_id is None:

        async def listed() -> list[Any]:
            return await ops.list_batches(await connect(settings), limit=limit)

        rows = [
            {
                "workflow_id": e.id,
                "state": e.typed_search_attributes.get(ops.sa.REFUND_STATE),
                "requested_by": e.typed_search_attributes.get(ops.sa.REQUESTED_BY),
                "amount_cents": e.typed_search_attributes.get(ops.sa.REFUND_AMOUNT_CENTS),
                "started": e.start_time.isoformat(),
            }
            for e in run(listed())
        ]
        if as_json:
            emit_json(rows)
            return
        table = Table("batch", "state", "amount", "by", "started (UTC)")
        for r in rows:
            table.add_row(
                markup_safe(r["workflow_id"]),
                markup_safe(r["state"]),
                money(r["amount_cents"], None),
                markup_safe(r["requested_by"]),
                r["started"][:19].replace("T", " "),
            )
        out.print(table if rows else "no batches")
        return

    async def go() -> BatchStatus:
        client = await connect(settings)
        if not wait:
            return await ops.batch_status(client, batch_id)
        with counts_progress(as_json) as progress:
            task = progress.add_task(markup_safe(batch_id), total=None, counts="")

            def show(status: BatchStatus) -> None:
                c = status.counts
                progress.update(
                    task,
                    total=status.summary.included if status.summary else None,
                    completed=c.done + c.failed + c.skipped,
                    description=f"{markup_safe(batch_id)} {status.state.value}",
                    counts=f"running {c.running} waiting {c.waiting} "
                    f"attention {c.needs_attention} failed {c.failed}",
                )

            return await ops.wait_batch(client, batch_id, timeout_s=timeout, on_poll=show)

    result = run(go())
    if as_json:
        emit_json(result)
    else:
        render_batch(result, settings.temporal_ui_url)


# --- restore of a mistaken revoke ---------------------------------------------------------------


def _restore_id(ref: str) -> tuple[str, str]:
    """(saga workflow id, restore workflow id) from either, or from a purchase id."""
    ref = ref.strip()
    if ref.startswith("restore-"):
        saga = ref.removeprefix("restore-")
    else:
        saga = ops.resolve_workflow_id(ref)
    return saga, ops.restore_id_for(saga)


def render_restore(status: RestoreStatus) -> None:
    safe = markup_safe
    lines = [
        f"[bold]{safe(status.workflow_id)}[/bold]  state [bold]{status.state.value}[/bold]",
        f"saga {safe(status.saga_workflow_id)}  operator {safe(status.operator)}",
    ]
    check = status.check
    if check and check.archived_at:
        lines.append(
            f"snapshot: {check.rows} progress record(s) of user {check.user_id} in product "
            f"{check.product_id}, archived {_when(check.archived_at)} UTC, restorable until "
            f"{_when(status.expires_at)} UTC"
        )
    approved = [safe(a.approver) for a in status.approvals if a.approve]
    lines.append(
        f"approvals {len(approved)}/{status.required_approvals}"
        + (f" ({', '.join(approved)})" if approved else "")
    )
    if status.restored is not None:
        lines.append(f"restored {status.restored} progress record(s)")
    if status.error:
        lines.append(f"[red]{safe(status.error)}[/red]")
    out.print(Panel("\n".join(lines), title="restore progress", expand=False))


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


@schedules_app.command("ensure")
def schedules_ensure(as_json: JsonOpt = False) -> None:
    """Create or update the daily purge of progress snapshots past the restore retention.

    Example: refund schedules ensure
    """
    settings = load_settings()

    async def go() -> str:
        return await ops.ensure_purge_schedule(await connect(settings), settings)

    outcome = run(go())
    if as_json:
        emit_json({"schedule_id": ops.PURGE_SCHEDULE_ID, "outcome": outcome})
    else:
        out.print(
            f"schedule {ops.PURGE_SCHEDULE_ID} {outcome}: purges snapshots older than "
            f"{settings.restore_retention} every day"
        )


# --- operations: worker, stack, db -----------------------------------------------------------


@app.command()
def worker() -> None:
    """Run a worker in the foreground (SIGTERM or Ctrl-C stop it gracefully)."""
    import worker as worker_module

    try:
        worker_module.main()
    except TemporalUnavailable as e:
        fail(str(e), ExitCode.ERROR)


def _progress(message: str) -> None:
    err.print(f"[dim]{markup_safe(message)}[/dim]", highlight=False)


def _stack_call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    from console.stack import StackError

    try:
        return fn(*args, **kwargs)
    except StackError as e:
        fail(str(e), ExitCode.ERROR)


def _print_components(components: list[Any], as_json: bool) -> None:
    if as_json:
        emit_json({"components": [c.to_dict() for c in components]})
        return
    table = Table("component", "state", "pid", "url")
    for c in components:
        color = "green" if c.state == "running" else "red"
        table.add_row(
            c.name, f"[{color}]{c.state}[/{color}]", str(c.pid or "-"), markup_safe(c.url or "-")
        )
    out.print(table)


@stack_app.command("up")
def stack_up(as_json: JsonOpt = False) -> None:
    """Start Temporal (with its UI), the sandboxes, the store and a worker; wait until ready."""
    from console import stack

    settings = load_settings()
    components = _stack_call(stack.up, settings, on_progress=_progress)
    _print_components(components, as_json)
    if not as_json:
        out.print(f"Temporal UI: {settings.temporal_ui_url}")


@stack_app.command("down")
def stack_down(as_json: JsonOpt = False) -> None:
    """Stop every component of the embedded stack and free its ports."""
    from console import stack

    components = _stack_call(stack.down, load_settings(), on_progress=_progress)
    _print_components(components, as_json)


@stack_app.command("status")
def stack_status(as_json: JsonOpt = False) -> None:
    """Show each component: running or not, pid, URL."""
    from console import stack

    _print_components(_stack_call(stack.status, load_settings()), as_json)


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument()] = "head") -> None:
    """Migrate the store up to a revision (default: head)."""
    from refundsaga.store.migrate import upgrade, wait_for_database

    url = load_settings().resolved_database_url
    try:
        wait_for_database(url)
        upgrade(url, revision)
    except Exception as e:
        fail(f"upgrade failed ({type(e).__name__}): {e}", ExitCode.ERROR)
    out.print(f"store at {revision}")


@db_app.command("downgrade")
def db_downgrade(revision: Annotated[str, typer.Argument(help="e.g. -1 or base")]) -> None:
    """Migrate the store down to a revision."""
    from refundsaga.store.migrate import downgrade

    try:
        downgrade(load_settings().resolved_database_url, revision)
    except Exception as e:
        fail(f"downgrade failed ({type(e).__name__}): {e}", ExitCode.ERROR)
    out.print(f"store at {revision}")


@db_app.command("current")
def db_current(as_json: JsonOpt = False) -> None:
    """Show the store's current migration revision."""
    from refundsaga.store.migrate import current

    try:
        revision = current(load_settings().resolved_database_url)
    except Exception as e:
        fail(f"cannot read the revision ({type(e).__name__}): {e}", ExitCode.ERROR)
    if as_json:
        emit_json({"revision": revision})
    else:
        out.print(revision or "empty (no migrations applied)")


@keys_app.command("generate")
def keys_generate(
    out_file: Annotated[
        Path, typer.Option("--out", help="Where to write the private key (PEM, mode 600).")
    ],
    name: Annotated[
        str | None, typer.Option("--as", help="Your approver name, for the settings line.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Create an approver's signing key; print the public key for REFUND_APPROVER_PUBLIC_KEYS.

    Example: refund keys generate --out ~/.refund/bob.pem --as bob
    """
    key = generate_private_key()
    try:
        write_private_key(key, out_file)
    except SigningError as e:
        fail(str(e))
    except OSError as e:
        fail(f"cannot write {out_file}: {e.strerror}")
    public = public_key_b64(key)
    if as_json:
        emit_json({"private_key_file": str(out_file), "public_key": public, "approver": name})
        return
    entry = json.dumps({name or "<approver>": public})
    # Unwrapped and without markup: these lines are copied into settings as they are.
    for line in (
        f"private key written to {out_file}: keep it; set REFUND_SIGNING_KEY_FILE to it",
        f"public key: {public}",
        f"add to the workers' settings: REFUND_APPROVER_PUBLIC_KEYS='{entry}'",
    ):
        out.print(line, markup=False, highlight=False, soft_wrap=True)


def _run_app() -> int:
    """Run the app; a usage error (bad value, unknown choice or option) is one line, exit 2."""
    try:
        result = app(standalone_mode=False)
    except typer.TyperException as e:
        # Typer's parser errors (its vendored click's UsageError and kin) all derive from this.
        if type(e).__name__ == "NoArgsIsHelpError":
            err.print(e.format_message(), markup=False, highlight=False)  # the help text
            return ExitCode.REFUSED
        message = " ".join(str(getattr(e, "format_message", e.__str__)()).split())
        ctx = getattr(e, "ctx", None)
        command = ctx.command_path if ctx is not None else "refund"
        print_error(f"{message} (see `{command} --help`)")
        code = getattr(e, "exit_code", ExitCode.REFUSED)
        return code if isinstance(code, int) else ExitCode.REFUSED
    except typer.Abort:
        print_error("aborted")
        return ExitCode.ERROR
    return result if isinstance(result, int) else ExitCode.OK


def main() -> None:
    """The `refund` console script."""
    run_and_exit(_run_app)


if __name__ == "__main__":
    main()
