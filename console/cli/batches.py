"""`refund batch`: refund every buyer of a cancelled event or course with one approval (from a
product or a CSV file, with a dry run), and `refund batch status` to follow or list batches."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.panel import Panel
from rich.table import Table

from console import operations as ops
from console.cli.output import (
    ExitCode,
    JsonOpt,
    build,
    counts_progress,
    emit_json,
    err,
    fail,
    load_settings,
    money,
    open_store,
    out,
    run,
)
from console.cli.views import batch_summary_text, render_batch, render_batch_plan
from console.terminal import markup_safe
from refundsaga import search_attributes as sa
from refundsaga.contracts import (
    MAX_BATCH_PURCHASES,
    BatchPlan,
    BatchRefundInput,
    BatchState,
    BatchStatus,
)
from refundsaga.temporal import TemporalUnavailable, connect

app = typer.Typer()
batch_app = typer.Typer(
    help="Refund every buyer of a cancelled event or course with one approval; `status` "
    'follows a batch.\n\nExample: refund batch --product 3 --reason "event cancelled" '
    "--requested-by sam --dry-run"
)
app.add_typer(batch_app, name="batch")


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
        store = open_store(settings)

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
            render_batch_plan(result)
        return

    async def go() -> BatchStatus:
        client = await connect(settings)
        handle = await ops.start_batch(client, settings, inp)
        return await ops.wait_batch_planned(client, handle.id, timeout_s=600)

    status = run(go())
    if status.state == BatchState.FAILED:
        fail(f"{status.workflow_id}: {status.error}", ExitCode.ERROR)
    if as_json:
        emit_json(status)
        return
    workflow_id = markup_safe(status.workflow_id)
    out.print(f"started [bold]{workflow_id}[/bold]: {status.state.value}")
    if status.summary:
        out.print(Panel(batch_summary_text(status.summary), title="plan", expand=False))
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
                "state": e.typed_search_attributes.get(sa.REFUND_STATE),
                "requested_by": e.typed_search_attributes.get(sa.REQUESTED_BY),
                "amount_cents": e.typed_search_attributes.get(sa.REFUND_AMOUNT_CENTS),
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
