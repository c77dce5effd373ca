"""How a saga, a batch and a restore look to a person: panels, tables and a progress bar.

Every string a workflow or an outside system wrote is printed through `markup_safe`.
"""

from __future__ import annotations

from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table

from console.cli.output import load_settings, money, out, when
from console.terminal import markup_safe
from refundsaga.contracts import BatchPlan, BatchStatus, BatchSummary, RestoreStatus, SagaStatus


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
            f"{when(status.waiting_since)} UTC"
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
        table.add_row(when(entry.at), safe(entry.step), safe(entry.actor), safe(entry.outcome))
    out.print(table)
    out.print(
        f"Temporal UI: {safe(ui_url)}/namespaces/default/workflows/{safe(status.workflow_id)}"
    )


def render_batch_plan(plan: BatchPlan) -> None:
    """A dry run's plan: one row per purchase, then the totals."""
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
    out.print(Panel(batch_summary_text(plan.summary), title="batch (dry run)", expand=False))


def batch_summary_text(summary: BatchSummary) -> str:
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


def batch_bar(status: BatchStatus) -> Table:
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
            f"{when(status.waiting_since)} UTC: refund approve {safe(status.workflow_id)} "
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
        out.print(Panel(batch_summary_text(status.summary), title="plan", expand=False))
    out.print(batch_bar(status))
    if status.issues:
        table = Table("purchase", "outcome", "why", title="not simply done")
        for issue in status.issues[-20:]:
            table.add_row(str(issue.purchase_id), safe(issue.outcome), safe(issue.reason or ""))
        out.print(table)
    out.print(
        f"Temporal UI: {safe(ui_url)}/namespaces/default/workflows/{safe(status.workflow_id)}"
    )


def render_restore(status: RestoreStatus) -> None:
    """A restore for a person: the snapshot, its window, approvals, what was restored."""
    safe = markup_safe
    lines = [
        f"[bold]{safe(status.workflow_id)}[/bold]  state [bold]{status.state.value}[/bold]",
        f"saga {safe(status.saga_workflow_id)}  operator {safe(status.operator)}",
    ]
    check = status.check
    if check and check.archived_at:
        lines.append(
            f"snapshot: {check.rows} progress record(s) of user {check.user_id} in product "
            f"{check.product_id}, archived {when(check.archived_at)} UTC, restorable until "
            f"{when(status.expires_at)} UTC"
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
