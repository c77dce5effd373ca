"""`make demo`: the whole refund on the embedded stack, end to end, as a person would run it.

Brings the stack up, seeds a standard purchase (AMS-driven, with progress), starts a saga as
support (`sam`), approves it as a second person (`bob`), waits for COMPLETED, shows what
happened at the processor, in the store and in the AMS, and brings the stack down again
(`--keep-up` leaves it running to look around in the Temporal UI).
"""

from __future__ import annotations

import asyncio
import sys

import httpx

from console import operations as ops
from console import stack
from console.seed import SeededPurchase, seed
from console.terminal import markup_safe, terminal_console
from refundsaga.contracts import ApprovalDecision, RefundRequest, SagaState, format_money
from refundsaga.settings import Settings, get_settings
from refundsaga.store import OasisStore
from refundsaga.temporal import connect, run_and_exit

# Shows, never obeys, control characters in what the stack and the saga say.
console = terminal_console()


def say(command: str) -> None:
    console.print(f"[bold cyan]$ {command}[/bold cyan]")


async def refund_end_to_end(settings: Settings, purchase: SeededPurchase) -> int:
    client = await connect(settings)
    say(f'refund start {purchase.purchase_id} --reason "customer asked" --as sam')
    request = RefundRequest(
        purchase_id=purchase.purchase_id, reason="customer asked", requested_by="sam"
    )
    handle = await ops.start_refund(client, settings, request)
    waiting = await ops.wait_for_state(
        client, handle.id, {SagaState.AWAITING_APPROVAL}, timeout_s=60
    )
    if waiting.plan:
        from refundsaga.contracts import describe_plan

        console.print(f"  plan: {describe_plan(waiting.plan)}")
    say(f"refund approve {handle.id} --as bob")
    await ops.decide(client, handle.id, ApprovalDecision(approver="bob", comment="demo"))
    say(f"refund status {handle.id} --wait-for COMPLETED")
    result = await ops.wait_for_state(client, handle.id, {SagaState.COMPLETED}, timeout_s=120)
    charge = httpx.get(
        f"{settings.processor_url}/v1/charges/{purchase.charge_id}",
        headers={"Authorization": f"Bearer {settings.processor_api_key.get_secret_value()}"},
    ).json()
    entitlements = httpx.get(
        f"{settings.ams_url}/_sandbox/members/{purchase.ams_member_id}",
        headers={"Authorization": f"Bearer {settings.ams_api_key.get_secret_value()}"},
    ).json()
    active = [e["product_code"] for e in entitlements["entitlements"] if e["status"] == "active"]
    store = OasisStore.from_url(settings.resolved_database_url)
    snapshot = store.load_purchase(purchase.purchase_id)
    store.close()
    console.print(f"\n[bold green]{result.workflow_id}: {result.state.value}[/bold green]")
    console.print(
        f"  processor: charge {charge['id']} refunded "
        f"{format_money(charge['amount_refunded'], charge['currency'])} "
        f"in {len(charge['refunds']['data'])} refund(s)"
    )
    if snapshot:
        console.print(
            f"  OASIS store: purchase {snapshot.status}, "
            f"{format_money(snapshot.refunded_cents, snapshot.currency)} in the ledger, "
            f"{snapshot.progress_count} progress records left ({result.progress_deleted} archived "
            "then deleted)"
        )
    console.print(f"  AMS: member {purchase.ams_member_id} active entitlements {active or 'none'}")
    if result.access is not None:
        console.print(f"  access: {'gone' if not result.access.has_access else result.access}")
    console.print(
        f"  approvals: {', '.join(a.approver for a in result.approvals)}; "
        f"timeline of {len(result.timeline)} steps in `refund status {result.workflow_id}`"
    )
    console.print(
        f"  Temporal UI: {settings.temporal_ui_url}/namespaces/{settings.temporal_namespace}"
        f"/workflows/{result.workflow_id}"
    )
    refunded_once = charge["amount_refunded"] == purchase.amount_cents
    ok = result.state == SagaState.COMPLETED and refunded_once and not active
    return 0 if ok else 1


def main() -> int:
    keep_up = "--keep-up" in sys.argv[1:]
    settings = get_settings()
    say("refund stack up")
    try:
        stack.up(settings, on_progress=lambda m: console.print(f"  [dim]{m}[/dim]"))
    except stack.StackError as e:
        console.print(f"[red]error:[/red] {markup_safe(e)}")
        return 1
    try:
        say("refund seed --scenario standard")
        store = OasisStore.from_url(settings.resolved_database_url)
        try:
            (purchase,) = seed(
                store,
                processor_url=settings.processor_url,
                ams_url=settings.ams_url,
                processor_api_key=settings.processor_api_key.get_secret_value(),
                ams_api_key=settings.ams_api_key.get_secret_value(),
                scenarios=["standard"],
            )
        finally:
            store.close()
        console.print(
            f"  purchase {purchase.purchase_id}: {format_money(purchase.amount_cents, 'usd')}, "
            f"charge {purchase.charge_id}, AMS member {purchase.ams_member_id}"
        )
        code = asyncio.run(refund_end_to_end(settings, purchase))
    except (ops.Refused, ops.OperationError) as e:
        console.print(f"[red]error:[/red] {markup_safe(e)}")
        code = 1
    finally:
        if keep_up:
            console.print(f"stack left running: {settings.temporal_ui_url}; `make down` stops it")
        else:
            say("refund stack down")
            stack.down(settings, on_progress=lambda m: console.print(f"  [dim]{m}[/dim]"))
    return code


if __name__ == "__main__":
    run_and_exit(main)
