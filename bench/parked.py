"""Parked sagas: N sagas waiting for approval, their idle cost, then one bulk approval wave."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from temporalio.client import Client

from bench.lib.measure import (
    cpu_seconds,
    load_1m,
    machine_busy_seconds,
    reset_peak_rss,
    rss_mb,
    wait_if_asked,
)
from bench.lib.options import add_run_options
from bench.lib.report import RESULTS, jsonable, write_report
from bench.lib.stack import BenchStack, bench_stack, refund_request, seed_standard
from console.operations import decide_listed, start_refund
from console.seed import SeededPurchase
from refundsaga.contracts import ApprovalDecision, RefundRequest, SagaState, SagaStatus
from refundsaga.temporal import connect

# The standard purchase (99.95) needs one approval; the reference sagas refund 49.99 of one
# (with revoke and entitlement removal, so they run the same seven steps) and need none.
AUTO_APPROVE_BELOW_CENTS = 5_000
REFERENCE_AMOUNT_CENTS = 4_999
APPROVER = "bob"
POLL_S = 1.0


async def count(client: Client, query: str) -> int:
    """How many workflows match a visibility query."""
    return (await client.count_workflows(query)).count


async def wait_count(
    client: Client, query: str, target: int, timeout_s: float, label: str
) -> float:
    """Poll until `target` workflows match `query`; return the seconds it took."""
    began = time.perf_counter()
    last = -1
    while True:
        found = await count(client, query)
        if found >= target:
            return time.perf_counter() - began
        if time.perf_counter() - began > timeout_s:
            raise RuntimeError(f"{label}: only {found} of {target} after {timeout_s:g}s")
        if found != last:
            print(f"  {label}: {found}/{target}", flush=True)
            last = found
        await asyncio.sleep(POLL_S)


async def bounded(
    items: Sequence[Any], concurrency: int, action: Callable[[Any], Any]
) -> list[Any]:
    """Run `action` on every item with at most `concurrency` in flight; keep the outcomes."""
    gate = asyncio.Semaphore(concurrency)

    async def one(item: Any) -> Any:
        async with gate:
            try:
                return await action(item)
            except Exception as err:  # one refusal must not stop the wave
                return err

    return await asyncio.gather(*(one(i) for i in items))


async def approve_by_query(
    client: Client, query: str, *, approver: str, comment: str, concurrency: int
) -> dict[str, Any]:
    """What `refund approve --query` does: list, then one validating `decide` update per saga
    run (console.operations.decide_listed), at most `concurrency` in flight."""
    listed_at = time.perf_counter()
    listed = [w async for w in client.list_workflows(query)]
    listed_s = time.perf_counter() - listed_at
    decision = ApprovalDecision(approver=approver, approve=True, comment=comment)
    began = time.perf_counter()
    results = await decide_listed(client, listed, lambda _: decision, concurrency=concurrency)
    not_approved = [r for r in results if r.outcome != "approved"]
    return {
        "listed": len(listed),
        "list_s": listed_s,
        "updates_s": time.perf_counter() - began,
        "approved": len(results) - len(not_approved),
        "refused": sum(1 for r in not_approved if r.outcome == "refused"),
        "failed": sum(1 for r in not_approved if r.outcome == "failed"),
        "samples": [f"{r.workflow_id}: {r.outcome}: {r.message}" for r in not_approved[:5]],
    }


def _request(purchase: SeededPurchase, *, reference: bool) -> RefundRequest:
    if reference:
        return RefundRequest(
            purchase_id=purchase.purchase_id,
            amount_cents=REFERENCE_AMOUNT_CENTS,
            reason="bench: reference wave",
            requested_by="sam",
            revoke_progress=True,
            remove_entitlement=True,
        )
    return refund_request(purchase, reason="bench: parked")


async def run_parked(
    bench: BenchStack,
    purchases: list[SeededPurchase],
    *,
    n: int,
    reference: int,
    concurrency: int,
    approve_concurrency: int,
    idle_s: float,
) -> dict[str, Any]:
    """Park N, measure them idle, run the reference wave, approve all N; the figures."""
    settings = bench.settings
    client = await connect(settings)
    parked, ref = purchases[:n], purchases[n : n + reference]
    worker, server = bench.pid("worker"), bench.pid("temporal")
    result: dict[str, Any] = {"n": n, "reference_n": reference}

    # 1. Park N: each saga prepares, notifies and waits for an approver.
    print(f"parking {n} sagas ...", flush=True)
    reset_peak_rss(worker)
    began = time.perf_counter()
    starts = await bounded(
        parked,
        concurrency,
        lambda p: start_refund(client, settings, _request(p, reference=False)),
    )
    start_errors = [s for s in starts if isinstance(s, Exception)]
    waiting = 'WorkflowType="RefundSaga" AND RefundState="AWAITING_APPROVAL"'
    await wait_count(client, waiting, n - len(start_errors), 3600, "awaiting approval")
    park_s = time.perf_counter() - began
    result["park"] = {
        "seconds": park_s,
        "per_s": n / park_s,
        "start_errors": len(start_errors),
        "worker_peak_rss_mb": rss_mb(worker),
    }

    # 2. Idle: nothing to do until an approver comes; what does waiting cost?
    print(f"idle for {idle_s:g}s ...", flush=True)
    await asyncio.sleep(5)  # let the last workflow tasks and visibility writes settle
    cpu0 = {"worker": cpu_seconds(worker), "server": cpu_seconds(server)}
    machine0 = machine_busy_seconds()
    await asyncio.sleep(idle_s)
    result["idle"] = {
        "seconds": idle_s,
        "worker_cpu_pct_of_core": 100 * (cpu_seconds(worker) - cpu0["worker"]) / idle_s,
        "server_cpu_pct_of_core": 100 * (cpu_seconds(server) - cpu0["server"]) / idle_s,
        "machine_cpu_pct_of_core": 100 * (machine_busy_seconds() - machine0) / idle_s,
        "worker_rss_mb": rss_mb(worker, "VmRSS"),
        "worker_peak_rss_mb": rss_mb(worker),
        "server_rss_mb": rss_mb(server, "VmRSS"),
    }
    print(f"  idle: {json.dumps(jsonable(result['idle']))}", flush=True)

    # 3. The reference: auto-approved sagas of the same steps, same server, N still parked.
    if ref:
        print(f"reference wave of {len(ref)} auto-approved sagas ...", flush=True)
        latencies: list[float] = []

        async def one(p: SeededPurchase) -> None:
            t0 = time.perf_counter()
            handle = await start_refund(client, settings, _request(p, reference=True))
            status: SagaStatus = await handle.result()
            if status.state != SagaState.COMPLETED:
                raise RuntimeError(f"{handle.id} ended {status.state.value}: {status.error}")
            latencies.append(time.perf_counter() - t0)

        began = time.perf_counter()
        outcomes = await bounded(ref, concurrency, one)
        ref_s = time.perf_counter() - began
        errors = [o for o in outcomes if isinstance(o, Exception)]
        result["reference"] = {
            "seconds": ref_s,
            "per_s": len(ref) / ref_s,
            "errors": len(errors),
            "samples": [str(e) for e in errors[:3]],
        }
        print(f"  reference: {result['reference']['per_s']:.2f}/s", flush=True)

    # 4. Bulk approval: list by query, one validating update each, then they all run.
    print(f"approving {n} parked sagas ...", flush=True)
    reset_peak_rss(worker)
    cpu0 = {"worker": cpu_seconds(worker), "server": cpu_seconds(server)}
    began = time.perf_counter()
    approval = await approve_by_query(
        client,
        waiting,
        approver=APPROVER,
        comment="bench: bulk approval",
        concurrency=approve_concurrency,
    )
    completed = 'WorkflowType="RefundSaga" AND RefundState="COMPLETED"'
    done_target = n - len(start_errors) + (len(ref) - result.get("reference", {}).get("errors", 0))
    await wait_count(client, completed, done_target, 3600, "completed")
    wave_s = time.perf_counter() - began
    attention = await count(client, 'WorkflowType="RefundSaga" AND RefundState="NEEDS_ATTENTION"')
    result["approval"] = approval | {
        "seconds": wave_s,
        "per_s": approval["approved"] / wave_s,
        "needs_attention": attention,
        "worker_cpu_s_per_saga": (cpu_seconds(worker) - cpu0["worker"]) / max(n, 1),
        "server_cpu_s_per_saga": (cpu_seconds(server) - cpu0["server"]) / max(n, 1),
        "worker_peak_rss_mb": rss_mb(worker),
    }
    if "reference" in result:
        result["approval_to_reference_ratio"] = (
            result["approval"]["per_s"] / result["reference"]["per_s"]
        )
    result["errors"] = (
        len(start_errors)
        + approval["refused"]
        + approval["failed"]
        + attention
        + result.get("reference", {}).get("errors", 0)
    )
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m bench.parked --n 10000`: park, idle, reference wave, bulk approval."""
    parser = argparse.ArgumentParser(prog="python -m bench.parked", description=__doc__)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--reference", type=int, default=500, help="auto-approved sagas")
    parser.add_argument("--concurrency", type=int, default=20, help="starts in flight")
    parser.add_argument("--approve-concurrency", type=int, default=20, help="updates in flight")
    parser.add_argument("--idle-s", type=float, default=60.0)
    parser.add_argument("--json-out", type=Path, default=RESULTS / "parked.json")
    add_run_options(parser)
    args = parser.parse_args(argv)
    wait_if_asked(args.max_load, args.max_wait)
    load_before = load_1m()
    with bench_stack(
        auto_approve_below_cents=AUTO_APPROVE_BELOW_CENTS,
        sandbox_state=args.sandbox_state,
        bytecode=args.bytecode,
        on_progress=lambda line: print(f"  stack: {line}", flush=True),
    ) as bench:
        total = args.n + args.reference
        print(f"seeding {total} standard purchases ...", flush=True)
        purchases, seed_s = seed_standard(bench.settings, total)
        print(f"seeded in {seed_s:.0f}s", flush=True)
        result = asyncio.run(
            run_parked(
                bench,
                purchases,
                n=args.n,
                reference=args.reference,
                concurrency=args.concurrency,
                approve_concurrency=args.approve_concurrency,
                idle_s=args.idle_s,
            )
        )
        result["seeding"] = {"purchases": total, "seconds": seed_s}
        result["sandbox_state"] = args.sandbox_state
        result["bytecode"] = args.bytecode
    return write_report(result, load_before=load_before, json_out=args.json_out)


if __name__ == "__main__":
    from refundsaga.temporal import run_and_exit

    run_and_exit(lambda: main())
