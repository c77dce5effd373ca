"""Where the saga's worker CPU goes, without the SDK in the way: three measurements.

1. **Activity bodies**: the standard saga's seven activities (prepare, refund, record, revoke,
   de-entitle, verify, close) called directly on the worker's `RefundActivities`, one saga at a
   time, against the bench's own stack (sandboxes in memory, the stack's SQLite store): CPU per
   step, the real work the baseline's no-op activities do not do.
2. **The HTTP client's floor**: one GET to the processor sandbox through httpx (as the clients
   send it) and the same request over a bare asyncio stream: what the client library costs per
   call on top of the socket.
3. **Workflow code**: one recorded saga history and one baseline history replayed many times
   (the SDK's `Replayer`, plain runner): the workflow's own Python per run, with the SDK's
   per-run cost in both.

Each figure is this process's CPU (`time.process_time`, all threads) per call, per round; the rounds
show the noise. No figure is asserted anywhere: this prints and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import httpx
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer, UnsandboxedWorkflowRunner

from bench.baseline import BASELINE_WORKFLOW, GO_SIGNAL, STANDARD_SAGA_ACTIVITIES, BenchBaseline
from bench.lib.measure import load_1m
from bench.lib.report import RESULTS, write_json
from bench.lib.stack import (
    AUTO_APPROVE_ALL_CENTS,
    BASELINE_QUEUE,
    bench_stack,
    refund_request,
    seed_standard,
)
from console.operations import start_refund
from console.seed import SeededPurchase
from refundsaga.contracts import (
    AmsRemovalInput,
    CloseInput,
    PrepareInput,
    ProcessorRefundInput,
    RecordRefundsInput,
    RevokeInput,
    SagaState,
    VerifyInput,
)
from refundsaga.models import LedgerEntry
from refundsaga.settings import Settings
from refundsaga.temporal import connect, payload_data_converter
from worker import saga_activities
from workflows.refund_saga import RefundSaga

STEPS = ("prepare", "refund", "record", "revoke", "deentitle", "verify", "close")
_T = TypeVar("_T")


async def activity_bodies(
    settings: Settings, purchases: Sequence[SeededPurchase]
) -> dict[str, float]:
    """CPU ms per step, mean over `purchases`, each saga's steps in the saga's order."""
    spent: dict[str, float] = defaultdict(float)

    async def timed(step: str, call: Awaitable[_T]) -> _T:
        started = time.process_time()
        result = await call
        spent[step] += time.process_time() - started
        return result

    async with saga_activities(settings) as act:
        for purchase in purchases:
            wf = f"bench-steps-{purchase.purchase_id}"
            plan = await timed(
                "prepare",
                act.prepare_refund(
                    PrepareInput(
                        request=refund_request(purchase), workflow_id=wf, request_id=f"{wf}/1"
                    )
                ),
            )
            refund = await timed(
                "refund",
                act.refund_at_processor(
                    ProcessorRefundInput(
                        workflow_id=wf,
                        purchase_id=plan.purchase_id,
                        charge_id=plan.charge_id,
                        amount_cents=plan.amount_cents,
                        currency=plan.currency,
                        idempotency_key=f"{wf}/1/refund",
                        request_id=f"{wf}/1",
                    )
                ),
            )
            entry = LedgerEntry(
                processor_refund_id=refund.refund_id,
                amount_cents=refund.amount_cents,
                currency=refund.currency,
                source="processor",
                status="succeeded",
            )
            await timed(
                "record",
                act.record_refunds(
                    RecordRefundsInput(
                        workflow_id=wf, purchase_id=plan.purchase_id, entries=[entry]
                    )
                ),
            )
            await timed(
                "revoke",
                act.revoke_progress(
                    RevokeInput(
                        workflow_id=wf,
                        purchase_id=plan.purchase_id,
                        user_id=plan.user_id,
                        product_id=plan.product_id,
                    )
                ),
            )
            await timed(
                "deentitle",
                act.remove_ams_entitlement(
                    AmsRemovalInput(
                        workflow_id=wf,
                        member_id=plan.ams_member_id or "",
                        product_code=plan.product_code,
                        idempotency_key=f"{wf}/deentitle",
                    )
                ),
            )
            await timed(
                "verify",
                act.verify_access(
                    VerifyInput(
                        user_id=plan.user_id,
                        product_id=plan.product_id,
                        entitlement_source=plan.entitlement_source,
                        ams_member_id=plan.ams_member_id,
                        product_code=plan.product_code,
                        ams_removal_confirmed=False,
                    )
                ),
            )
            await timed(
                "close",
                act.close_saga(
                    CloseInput(
                        workflow_id=wf,
                        purchase_id=plan.purchase_id,
                        state=SagaState.COMPLETED,
                        revoked=True,
                        detail={"branch": "refund"},
                    )
                ),
            )
    return {step: spent[step] / len(purchases) * 1000 for step in STEPS}


async def http_floor(settings: Settings, calls: int) -> dict[str, float]:
    """CPU us per GET of an unknown charge (a 404 the sandbox answers at once)."""
    path = "/v1/charges/ch_bench_missing"
    key = settings.processor_api_key.get_secret_value()
    headers = {"Authorization": f"Bearer {key}", "Accept": "application/json"}
    async with httpx.AsyncClient(
        base_url=settings.processor_url, headers=headers, timeout=httpx.Timeout(10.0)
    ) as client:

        async def with_httpx() -> None:
            (await client.get(path)).json()

        via_httpx = await _per_call_us(with_httpx, calls)
    url = httpx.URL(settings.processor_url)
    reader, writer = await asyncio.open_connection(url.host, url.port)
    head = (
        f"GET {path} HTTP/1.1\r\nHost: {url.host}:{url.port}\r\n"
        f"Authorization: Bearer {key}\r\nAccept: application/json\r\n\r\n"
    ).encode()

    async def bare() -> None:
        writer.write(head)
        await writer.drain()
        response_head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in response_head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        json.loads(await reader.readexactly(length))

    try:
        via_stream = await _per_call_us(bare, calls)
    finally:
        writer.close()
        await writer.wait_closed()
    return {"httpx_us": via_httpx, "asyncio_stream_us": via_stream}


async def _per_call_us(call: Callable[[], Awaitable[None]], calls: int) -> float:
    for _ in range(min(50, calls)):  # warm: connection, caches
        await call()
    started = time.process_time()
    for _ in range(calls):
        await call()
    return (time.process_time() - started) / calls * 1e6


async def record_histories(
    settings: Settings, purchase: SeededPurchase
) -> tuple[WorkflowHistory, WorkflowHistory]:
    """One standard saga and one baseline, run on the stack; their histories."""
    client = await connect(settings)
    saga = await start_refund(client, settings, refund_request(purchase))
    await saga.result()
    baseline = await client.start_workflow(
        BASELINE_WORKFLOW,
        STANDARD_SAGA_ACTIVITIES,
        id=f"bench-steps-baseline-{purchase.purchase_id}",
        task_queue=BASELINE_QUEUE,
        start_signal=GO_SIGNAL,
    )
    await baseline.result()
    return await saga.fetch_history(), await baseline.fetch_history()


async def replay_ms(workflow: type, history: WorkflowHistory, runs: int) -> float:
    """CPU ms per replay of `history`, `runs` times through one replayer."""
    replayer = Replayer(
        workflows=[workflow],
        data_converter=payload_data_converter,
        workflow_runner=UnsandboxedWorkflowRunner(),
    )

    async def histories() -> AsyncIterator[WorkflowHistory]:
        for i in range(runs):
            yield WorkflowHistory(f"{history.workflow_id}-{i}", history.events)

    started = time.process_time()
    results = await replayer.replay_workflows(histories(), raise_on_replay_failure=False)
    spent = time.process_time() - started
    if results.replay_failures:
        raise RuntimeError(f"replay failed: {next(iter(results.replay_failures.values()))}")
    return spent / runs * 1000


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.steps", description=__doc__)
    parser.add_argument("--n", type=int, default=300, help="sagas' activity bodies per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--http-calls", type=int, default=2000)
    parser.add_argument("--replays", type=int, default=300)
    parser.add_argument("--json-out", type=Path, default=RESULTS / "steps.json")
    args = parser.parse_args(argv)
    if min(args.n, args.rounds, args.http_calls, args.replays) < 1:
        parser.error("--n, --rounds, --http-calls and --replays must be at least 1")
    report: dict[str, Any] = {"load_1m_before": load_1m(), "rounds": []}
    with bench_stack(auto_approve_below_cents=AUTO_APPROVE_ALL_CENTS) as bench:
        settings = bench.settings
        purchases, _ = seed_standard(settings, args.n * args.rounds + 1)
        saga_history, baseline_history = asyncio.run(record_histories(settings, purchases[-1]))
        for index in range(args.rounds):
            batch = purchases[index * args.n : (index + 1) * args.n]
            steps = asyncio.run(activity_bodies(settings, batch))
            http = asyncio.run(http_floor(settings, args.http_calls))
            replays = {
                "saga_ms": asyncio.run(replay_ms(RefundSaga, saga_history, args.replays)),
                "baseline_ms": asyncio.run(
                    replay_ms(BenchBaseline, baseline_history, args.replays)
                ),
            }
            round_ = {"steps_ms": steps, "http": http, "replay": replays}
            report["rounds"].append(round_)
            cells = "  ".join(f"{step} {ms:.2f}" for step, ms in steps.items())
            print(f"round {index + 1}: activity bodies, CPU ms per step: {cells}")
            print(f"  the seven together: {sum(steps.values()):.2f} ms per saga")
            print(
                f"  one GET: httpx {http['httpx_us']:.0f} us, a bare asyncio stream "
                f"{http['asyncio_stream_us']:.0f} us of CPU"
            )
            print(
                f"  replay of a standard saga {replays['saga_ms']:.2f} ms, of the baseline "
                f"{replays['baseline_ms']:.2f} ms of CPU per run",
                flush=True,
            )
    report["load_1m_after"] = load_1m()
    report["summary"] = {
        "activity_bodies_ms_per_saga": statistics.median(
            sum(r["steps_ms"].values()) for r in report["rounds"]
        ),
        "httpx_us_per_get": statistics.median(r["http"]["httpx_us"] for r in report["rounds"]),
        "asyncio_stream_us_per_get": statistics.median(
            r["http"]["asyncio_stream_us"] for r in report["rounds"]
        ),
        "saga_replay_ms": statistics.median(r["replay"]["saga_ms"] for r in report["rounds"]),
        "baseline_replay_ms": statistics.median(
            r["replay"]["baseline_ms"] for r in report["rounds"]
        ),
    }
    write_json(report, args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
