"""Batch throughput: one cancelled event of N buyers, refunded with one command and one approval.

`python -m bench.batch --n 1000 [--rate 20] [--window 20] [--processor-calls-per-s 20]` brings
up a stack of its own (free ports, sandboxes in memory), seeds one event with N buyers, starts
the batch as `refund batch` does, approves it as `refund approve` does, waits until the batch
has ended, and reports: the time from the approval to the last refund at the processor against
the processor-bound time (every call of the batch at the limit), purchases per second, every
purchase's end state (refunded once, no progress, no active entitlement), the processor's
request log (calls per second, the most in any 1 s and 10 s, against the limit), the CPU per
purchase of the worker, the dev server and the sandboxes and how busy the machine was, and the
history events and billable Actions of the sagas (a sample) and of the batch's runs per
purchase. No timing is asserted anywhere: this prints figures and writes
`bench/results/batch.json`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from temporalio.client import Client

from bench.lib.actions import actions_from_history
from bench.lib.measure import (
    cpu_seconds,
    history_stats,
    load_1m,
    machine_busy_seconds,
    wait_if_asked,
)
from bench.lib.options import add_run_options
from bench.lib.processor_log import RequestLogTail, clear_processor_requests
from bench.lib.report import RESULTS, write_report
from bench.lib.stack import BenchStack, bench_stack
from console import operations as ops
from console.seed import seed_buyers
from refundsaga.batch import max_in_window
from refundsaga.contracts import ApprovalDecision, BatchRefundInput, BatchState
from refundsaga.store import OasisStore
from refundsaga.temporal import connect

APPROVERS = ("bob", "carol")


# The processor limit bench.batch runs at unless told: the setting's default, which a cancelled
# event meets in production (issue 22).
DEFAULT_PROCESSOR_CALLS_PER_S = 20.0


async def _every_run(
    client: Client, workflow_id: str, run_id: str | None
) -> tuple[int, Counter[str]]:
    """History events and billable Actions (by kind) of a workflow's first run and of every
    run it continued as new into."""
    events = 0
    actions: Counter[str] = Counter()
    while run_id:
        history = await client.get_workflow_handle(workflow_id, run_id=run_id).fetch_history()
        events += len(history.events)
        actions += actions_from_history(history)
        last = history.events[-1].workflow_execution_continued_as_new_event_attributes
        run_id = last.new_execution_run_id or None
    return events, actions


def processor_bound(calls: int, limit: float | None) -> float | None:
    """The least time the processor's limit allows for `calls` calls; None without a limit."""
    return calls / limit if limit else None


def _cpu(bench: BenchStack) -> dict[str, float]:
    return {
        "worker": cpu_seconds(bench.pid("worker")),
        "server": cpu_seconds(bench.pid("temporal")),
        "sandboxes": cpu_seconds(bench.pid("processor")) + cpu_seconds(bench.pid("ams")),
        "machine": machine_busy_seconds(),
    }


async def run_batch(
    bench: BenchStack,
    store: OasisStore,
    *,
    product_id: int,
    purchase_ids: list[int],
    rate: float,
    window: int,
    limit: float | None,
) -> dict[str, Any]:
    """Start, approve and wait for one batch; the figures."""
    settings = bench.settings
    n = len(purchase_ids)
    client = await connect(settings)
    handle = await ops.start_batch(
        client,
        settings,
        BatchRefundInput(
            product_id=product_id,
            reason="bench: event cancelled",
            requested_by="sam",
            window=window,
            rate_per_s=rate,
        ),
    )
    planned_at = time.perf_counter()
    status = await ops.batch_status(client, handle.id)
    while status.state == BatchState.PLANNING:
        await asyncio.sleep(0.5)
        status = await ops.batch_status(client, handle.id)
    plan_s = time.perf_counter() - planned_at
    if status.state != BatchState.AWAITING_APPROVAL or status.summary is None:
        raise RuntimeError(f"batch {handle.id} is {status.state.value}, not awaiting approval")
    # Planning read every charge; from here on, the sagas' calls.
    await asyncio.to_thread(clear_processor_requests, settings)
    cpu0 = _cpu(bench)
    began = time.perf_counter()
    # The processor's log stamps requests with the wall clock.
    approved_at = time.time()
    for approver in APPROVERS[: status.summary.required_approvals]:
        await ops.decide(client, handle.id, ApprovalDecision(approver=approver))
    last = [0.0]

    def progress(s: Any) -> None:
        if time.perf_counter() - last[0] >= 10:
            last[0] = time.perf_counter()
            c = s.counts
            print(f"  {s.state.value}: done {c.done}/{n} running {c.running} failed {c.failed}")

    # The log keeps the last 10,000 calls: a large batch is read as it goes.
    async with RequestLogTail(settings).running() as log:
        final = await ops.wait_batch(client, handle.id, timeout_s=3600, on_poll=progress)
        elapsed = time.perf_counter() - began
        cpu1 = _cpu(bench)
    cpu = {name: cpu1[name] - cpu0[name] for name in cpu0}
    calls = [(r["ts"], f"{r['method']} {r['path'].split('/')[2]}") for r in log.requests]
    times = [ts for ts, _ in calls]
    span = (max(times) - min(times)) if len(times) > 1 else 0.0
    refunds_at = [ts for ts, kind in calls if kind == "POST refunds"]
    # Approval to the last refund the processor received: what its limit bounds.
    batch_s = (max(refunds_at) - approved_at) if refunds_at else float("nan")
    bound_s = processor_bound(len(calls), limit)
    sagas = await history_stats(client, [ops.workflow_id_for(pid) for pid in purchase_ids], 50)
    batch_events, batch_actions = await _every_run(client, handle.id, handle.result_run_id)
    ended = [store.load_purchase(pid) for pid in purchase_ids]
    wrong = [p for p in ended if p is None or p.status != "refunded" or p.progress_count]
    return {
        "batch_purchases_per_s": n / batch_s if batch_s > 0 else float("nan"),
        "processor_bound_s": bound_s,
        "batch_s": batch_s,
        "bound_ratio": batch_s / bound_s if bound_s else None,
        "processor_calls_per_purchase": len(calls) / n,
        "actions_per_refund": sagas.get("actions"),
        "batch_id": handle.id,
        "state": final.state.value,
        "purchases": n,
        "plan_s": plan_s,
        # Approval to the batch's end (its last saga closed, the batch reported).
        "seconds": elapsed,
        "batch_per_s": n / elapsed,
        "counts": final.counts.model_dump(),
        "runs": final.runs,
        "not_refunded": len(wrong),
        "processor": {
            "calls": len(calls),
            "by_kind": dict(Counter(kind for _, kind in calls)),
            "calls_per_s": (len(times) - 1) / span if span else None,
            "max_in_1s": max_in_window(times, 1.0),
            "max_in_10s": max_in_window(times, 10.0),
            "limit_per_s": limit,
            "log_overflowed": log.overflowed,
        },
        "start_rate_per_s": rate,
        "window": window,
        "worker_cpu_s_per_purchase": cpu["worker"] / n,
        "server_cpu_s_per_purchase": cpu["server"] / n,
        "sandboxes_cpu_s_per_purchase": cpu["sandboxes"] / n,
        # Of all cores, approval to the end: near 1, the machine and not the processor binds.
        "machine_busy_share": cpu["machine"] / (elapsed * (os.cpu_count() or 1)),
        "saga_history": sagas,
        "batch_events_per_purchase": batch_events / n,
        "batch_actions_per_purchase": sum(batch_actions.values()) / n,
        "batch_actions_by_kind": dict(sorted(batch_actions.items())),
        "errors": final.counts.failed + final.counts.needs_attention + len(wrong),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m bench.batch --n 1000`: one batch of N buyers, its throughput and pace."""
    parser = argparse.ArgumentParser(prog="python -m bench.batch", description=__doc__)
    parser.add_argument("--n", type=int, default=1000, help="buyers of the cancelled event")
    parser.add_argument("--rate", type=float, default=20.0, help="saga starts per second")
    parser.add_argument("--window", type=int, default=20, help="sagas running at once")
    parser.add_argument(
        "--processor-calls-per-s",
        type=float,
        default=DEFAULT_PROCESSOR_CALLS_PER_S,
        help="REFUND_PROCESSOR_CALLS_PER_S for the stack's worker (default "
        f"{DEFAULT_PROCESSOR_CALLS_PER_S:g}; 0: no limit)",
    )
    parser.add_argument("--json-out", type=Path, default=RESULTS / "batch.json")
    add_run_options(parser, sandbox_state=False)
    args = parser.parse_args(argv)
    wait_if_asked(args.max_load, args.max_wait)
    if args.processor_calls_per_s < 0:
        parser.error("--processor-calls-per-s must be 0 (no limit) or more")
    # The stack's worker subprocess copies os.environ.
    os.environ["REFUND_PROCESSOR_CALLS_PER_S"] = f"{args.processor_calls_per_s:g}"
    load_before = load_1m()
    with bench_stack(
        auto_approve_below_cents=0,
        bytecode=args.bytecode,
        on_progress=lambda line: print(f"  stack: {line}", flush=True),
    ) as bench:
        limit = args.processor_calls_per_s
        store = OasisStore.from_url(bench.settings.resolved_database_url)
        try:
            print(f"seeding one event with {args.n} buyers ...", flush=True)
            seeded = time.perf_counter()
            product_id, buyers = seed_buyers(
                store,
                processor_url=bench.settings.processor_url,
                ams_url=bench.settings.ams_url,
                processor_api_key=bench.settings.processor_api_key.get_secret_value(),
                ams_api_key=bench.settings.ams_api_key.get_secret_value(),
                count=args.n,
            )
            seed_s = time.perf_counter() - seeded
            print(f"seeded in {seed_s:.0f}s; batch of {args.n} ...", flush=True)
            result = asyncio.run(
                run_batch(
                    bench,
                    store,
                    product_id=product_id,
                    purchase_ids=[b.purchase_id for b in buyers],
                    rate=args.rate,
                    window=args.window,
                    limit=limit or None,
                )
            )
        finally:
            store.close()
        result["seeding_s"] = seed_s
    return write_report(result, load_before=load_before, json_out=args.json_out)


if __name__ == "__main__":
    from refundsaga.temporal import run_and_exit

    run_and_exit(lambda: main())
