"""Batch throughput: one cancelled event of N buyers, refunded with one command and one approval.

`python -m bench.batch --n 1000 [--rate 20] [--window 20] [--processor-calls-per-s 50]` brings
up a stack of its own (free ports, sandboxes in memory), seeds one event with N buyers, starts
the batch as `refund batch` does, approves it as `refund approve` does, waits until the batch
has ended, and reports: purchases per second from the approval to the end, every purchase's
end state (refunded once, no progress, no active entitlement), the processor's request log
(calls per second, the most in any 1 s and 10 s, against REFUND_PROCESSOR_CALLS_PER_S), and
the worker's and the dev server's CPU per purchase, and the history events of the sagas (a
sample) and of the batch's runs per purchase. No timing is asserted anywhere: this prints
figures and writes `bench/results/batch.json`.
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

import httpx
from temporalio.client import Client

from bench.lib.measure import cpu_seconds, history_stats, load_1m, wait_if_asked
from bench.lib.options import add_run_options
from bench.lib.report import RESULTS, write_report
from bench.lib.stack import BenchStack, bench_stack
from console import operations as ops
from console.seed import seed_buyers
from refundsaga.batch import max_in_window
from refundsaga.contracts import ApprovalDecision, BatchRefundInput, BatchState
from refundsaga.settings import Settings
from refundsaga.store import OasisStore
from refundsaga.temporal import connect

APPROVERS = ("bob", "carol")


def _processor_auth(settings: Settings) -> dict[str, str]:
    return {"Authorization": f"Bearer {settings.processor_api_key.get_secret_value()}"}


def _processor_calls(bench: BenchStack) -> list[tuple[float, str]]:
    log = httpx.get(
        f"{bench.settings.processor_url}/_sandbox/requests",
        headers=_processor_auth(bench.settings),
        timeout=60,
    ).json()
    return [
        (r["ts"], f"{r['method']} {r['path'].split('/')[2]}")
        for r in log
        if not r["path"].startswith("/_sandbox")
    ]


async def _events_of_every_run(client: Client, workflow_id: str, run_id: str | None) -> int:
    """History events of a workflow's first run and of every run it continued as new into."""
    events = 0
    while run_id:
        history = await client.get_workflow_handle(workflow_id, run_id=run_id).fetch_history()
        events += len(history.events)
        last = history.events[-1].workflow_execution_continued_as_new_event_attributes
        run_id = last.new_execution_run_id or None
    return events


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
    httpx.delete(
        f"{settings.processor_url}/_sandbox/requests", headers=_processor_auth(settings), timeout=60
    ).raise_for_status()
    cpu0 = {
        "worker": cpu_seconds(bench.pid("worker")),
        "server": cpu_seconds(bench.pid("temporal")),
    }
    began = time.perf_counter()
    for approver in APPROVERS[: status.summary.required_approvals]:
        await ops.decide(client, handle.id, ApprovalDecision(approver=approver))
    last = [0.0]

    def progress(s: Any) -> None:
        if time.perf_counter() - last[0] >= 10:
            last[0] = time.perf_counter()
            c = s.counts
            print(f"  {s.state.value}: done {c.done}/{n} running {c.running} failed {c.failed}")

    final = await ops.wait_batch(client, handle.id, timeout_s=3600, on_poll=progress)
    elapsed = time.perf_counter() - began
    cpu = {
        "worker": cpu_seconds(bench.pid("worker")) - cpu0["worker"],
        "server": cpu_seconds(bench.pid("temporal")) - cpu0["server"],
    }
    calls = _processor_calls(bench)
    times = [ts for ts, _ in calls]
    span = (max(times) - min(times)) if len(times) > 1 else 0.0
    sagas = await history_stats(client, [ops.workflow_id_for(pid) for pid in purchase_ids], 50)
    batch_events = await _events_of_every_run(client, handle.id, handle.result_run_id)
    ended = [store.load_purchase(pid) for pid in purchase_ids]
    wrong = [p for p in ended if p is None or p.status != "refunded" or p.progress_count]
    return {
        "batch_id": handle.id,
        "state": final.state.value,
        "purchases": n,
        "plan_s": plan_s,
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
        },
        "start_rate_per_s": rate,
        "window": window,
        "worker_cpu_s_per_purchase": cpu["worker"] / n,
        "server_cpu_s_per_purchase": cpu["server"] / n,
        "saga_history": sagas,
        "batch_events_per_purchase": batch_events / n,
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
        default=None,
        help="REFUND_PROCESSOR_CALLS_PER_S for the stack's worker (default: the setting's)",
    )
    parser.add_argument("--json-out", type=Path, default=RESULTS / "batch.json")
    add_run_options(parser, sandbox_state=False)
    args = parser.parse_args(argv)
    wait_if_asked(args.max_load, args.max_wait)
    if args.processor_calls_per_s is not None:
        # The stack's worker subprocess copies os.environ.
        os.environ["REFUND_PROCESSOR_CALLS_PER_S"] = f"{args.processor_calls_per_s:g}"
    load_before = load_1m()
    with bench_stack(
        auto_approve_below_cents=0,
        bytecode=args.bytecode,
        on_progress=lambda line: print(f"  stack: {line}", flush=True),
    ) as bench:
        limit = (
            args.processor_calls_per_s
            if args.processor_calls_per_s is not None
            else bench.settings.processor_calls_per_s
        )
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
