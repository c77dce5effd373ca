"""Saga throughput against its peers, side by side on an embedded stack of its own.

The scenarios: the saga as `refund start` starts it, the naive saga doing the same work the
way the samples would (`bench/naive.py`), and the no-op baselines of the saga's shape
(`bench/baseline.py`), run back to back in a rotating order; the stack, the measurements and
the report are the bench's library (`bench/lib/`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from temporalio.client import Client, WorkflowHandle
from temporalio.common import SearchAttributePair, TypedSearchAttributes

from bench.baseline import (
    BASELINE_SA_WORKFLOW,
    BASELINE_WORKFLOW,
    GO_SIGNAL,
    STANDARD_SAGA_ACTIVITIES,
    sandboxed_queue,
)
from bench.lib.measure import Wave, history_stats, load_1m, run_wave, wait_if_asked
from bench.lib.options import add_run_options
from bench.lib.processor_log import clear_processor_requests, processor_requests
from bench.lib.profiling import profile_summary, profiled
from bench.lib.report import RESULTS, build_report, print_table, write_json
from bench.lib.stack import (
    AUTO_APPROVE_ALL_CENTS,
    BASELINE_QUEUE,
    STACK_DYNAMIC_CONFIG,
    STACK_PRAGMAS,
    BenchStack,
    bench_stack,
    refund_request,
    seed_standard,
    with_overrides,
)
from bench.naive import NAIVE_WORKFLOW, POLL_S, naive_queue, poll_until_ended
from console.operations import start_refund
from console.seed import SeededPurchase
from refundsaga import search_attributes as sa
from refundsaga.contracts import SagaState, SagaStatus
from refundsaga.temporal import connect
from sandboxes.gateway import REQUEST_LOG_SIZE

VARIANTS = (
    "saga",
    "naive_saga",
    "baseline",
    "baseline_sa",
    "baseline_sandboxed",
)
DEFAULT_VARIANTS = "saga,naive_saga,baseline"
# The variants that refund seeded purchases (the others are no-ops).
REFUNDING = ("saga", "naive_saga")


def _saga_check(result: Any) -> str | None:
    if not isinstance(result, SagaStatus):
        return f"unexpected result {result!r}"
    if result.state != SagaState.COMPLETED:
        return f"{result.workflow_id} ended {result.state.value}: {result.error}"
    return None


def _naive_check(result: Any) -> str | None:
    return None if result == SagaState.COMPLETED.value else f"naive saga ended {result!r}"


def _baseline_check(steps: int) -> Callable[[Any], str | None]:
    def check(result: Any) -> str | None:
        return None if result == steps else f"baseline returned {result!r}"

    return check


_run_counter = 0


async def run_variant(
    client: Client,
    bench: BenchStack,
    variant: str,
    purchases: list[SeededPurchase],
    *,
    n: int,
    concurrency: int,
    baseline_steps: int,
    history_sample: int,
    profile: Path | None = None,
    py_spy: str = "py-spy",
    rate: float | None = None,
) -> Wave:
    """One wave of `variant`: the saga, the naive saga, or a baseline; for the refunding
    variants, the processor calls of the wave from the sandbox's log."""
    global _run_counter
    _run_counter += 1
    run = _run_counter
    starts: list[Callable[[], Awaitable[WorkflowHandle[Any, Any]]]]
    wait: Callable[[WorkflowHandle[Any, Any]], Awaitable[Any]] | None = None
    polls = [0]
    if variant in ("baseline", "baseline_sandboxed"):
        queue = BASELINE_QUEUE if variant == "baseline" else sandboxed_queue(BASELINE_QUEUE)

        def baseline(i: int) -> Callable[[], Awaitable[WorkflowHandle[Any, Any]]]:
            # Signal-with-start: one RPC like the saga's start, and the one signal the
            # baseline waits for arrives with it.
            return lambda: client.start_workflow(
                BASELINE_WORKFLOW,
                baseline_steps,
                id=f"{variant}-{run}-{i}",
                task_queue=queue,
                start_signal=GO_SIGNAL,
            )

        starts = [baseline(i) for i in range(n)]
        check = _baseline_check(baseline_steps)
    elif variant == "baseline_sa":
        attributes = TypedSearchAttributes(
            [
                SearchAttributePair(sa.REFUND_STATE, "STARTED"),
                SearchAttributePair(sa.WAITING_FOR, "none"),
                SearchAttributePair(sa.PURCHASE_ID, "0"),
                SearchAttributePair(sa.REQUESTED_BY, "bench"),
            ]
        )

        def baseline_sa(i: int) -> Callable[[], Awaitable[WorkflowHandle[Any, Any]]]:
            return lambda: client.start_workflow(
                BASELINE_SA_WORKFLOW,
                baseline_steps,
                id=f"baseline-sa-{run}-{i}",
                task_queue=BASELINE_QUEUE,
                start_signal=GO_SIGNAL,
                search_attributes=attributes,
            )

        starts = [baseline_sa(i) for i in range(n)]
        check = _baseline_check(baseline_steps)
    elif variant == "saga":
        saga_settings = bench.settings

        def saga(p: SeededPurchase) -> Callable[[], Awaitable[WorkflowHandle[Any, Any]]]:
            return lambda: start_refund(client, saga_settings, refund_request(p))

        starts = [saga(p) for p in purchases[:n]]
        check = _saga_check
    elif variant == "naive_saga":

        def naive(p: SeededPurchase) -> Callable[[], Awaitable[WorkflowHandle[Any, Any]]]:
            request = refund_request(p)
            # Listed from its start like the saga (sa.at_start); one id per purchase.
            return lambda: client.start_workflow(
                NAIVE_WORKFLOW,
                request,
                id=f"naive-refund-{p.purchase_id}",
                task_queue=naive_queue(BASELINE_QUEUE),
                search_attributes=sa.at_start(request),
            )

        starts = [naive(p) for p in purchases[:n]]
        check = _naive_check

        def poll(handle: WorkflowHandle[Any, Any]) -> Awaitable[Any]:
            # The caller polls the state instead of waiting on the result.
            return poll_until_ended(handle, polls)

        wait = poll

    else:
        raise ValueError(f"unknown variant {variant}")
    refunding = variant in REFUNDING
    if refunding:
        # Seeding and the waves before called the processor too: count this wave's calls.
        await asyncio.to_thread(clear_processor_requests, bench.settings)
    with profiled(bench.worker_pid(variant), profile, py_spy):
        wave = await run_wave(bench, variant, starts, concurrency, check, rate, wait)
    wave.queries = polls[0]
    if refunding:
        calls = await asyncio.to_thread(processor_requests, bench.settings)
        if len(calls) >= REQUEST_LOG_SIZE:
            raise RuntimeError(f"the processor's request log is full: use --n below {n}")
        wave.processor_calls = len(calls)
    if profile is not None and profile.exists():
        wave.profile = profile_summary(profile)
    wave.history = await history_stats(client, wave.workflow_ids, history_sample)
    return wave


def run_bench(
    *,
    n: int,
    concurrency: int,
    reps: int,
    variants: Sequence[str],
    pragmas: Sequence[str] = STACK_PRAGMAS,
    dynamic_config: Sequence[str] = STACK_DYNAMIC_CONFIG,
    history_sample: int = 50,
    baseline_steps: int = STANDARD_SAGA_ACTIVITIES,
    profile_dir: Path | None = None,
    py_spy: str = "py-spy",
    sandbox_state: str = "memory",
    bytecode: str = "inherit",
    rate: float | None = None,
    processor_calls_per_s: float = 0.0,
    on_progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Bring up a stack, run `reps` repetitions of every variant back to back, tear down.

    `processor_calls_per_s` is the processor queues' limit for the saga and the naive saga
    alike; 0 lifts it, so that the engine is measured and not the processor.
    """
    load_before = load_1m()
    sagas = [v for v in variants if v in REFUNDING]
    # Both workers copy os.environ (bench_stack).
    os.environ["REFUND_PROCESSOR_CALLS_PER_S"] = f"{processor_calls_per_s:g}"
    on_progress(
        f"processor limit: {processor_calls_per_s:g} calls/s for every variant"
        if processor_calls_per_s
        else "processor limit: none (0): the engine is measured, not the processor"
    )
    with bench_stack(
        auto_approve_below_cents=AUTO_APPROVE_ALL_CENTS,
        pragmas=pragmas,
        dynamic_config=dynamic_config,
        sandbox_state=sandbox_state,
        bytecode=bytecode,
        on_progress=lambda line: on_progress(f"  stack: {line}"),
    ) as bench:
        total = n * reps * len(sagas)
        on_progress(f"seeding {total} standard purchases ...")
        purchases, seed_s = seed_standard(bench.settings, total)
        on_progress(f"seeded {total} in {seed_s:.1f}s ({total / max(seed_s, 1e-9):.0f}/s)")
        pool = iter(purchases)

        async def measure() -> list[list[Wave]]:
            client = await connect(bench.settings)
            waves: list[list[Wave]] = []
            for rep in range(reps):
                # Rotate the order so that neither side always runs on a warmer server.
                order = list(variants[rep % len(variants) :]) + list(
                    variants[: rep % len(variants)]
                )
                rep_waves = []
                for variant in order:
                    batch = [next(pool) for _ in range(n)] if variant in sagas else []
                    wave = await run_variant(
                        client,
                        bench,
                        variant,
                        batch,
                        n=n,
                        concurrency=concurrency,
                        baseline_steps=baseline_steps,
                        history_sample=history_sample,
                        # The first repetition only: sampling costs the worker a little CPU.
                        profile=(
                            profile_dir / f"{variant}.raw.txt"
                            if profile_dir is not None and rep == 0
                            else None
                        ),
                        py_spy=py_spy,
                        rate=rate,
                    )
                    f = wave.figures()
                    on_progress(
                        f"rep {rep + 1}/{reps} {variant:<10} {f['per_s']:6.2f}/s "
                        f"p95 {f['p95_ms']:7.0f} ms  errors {wave.errors}  "
                        f"load {load_1m():.2f}"
                        + (f"  e.g. {wave.error_samples[0]}" if wave.error_samples else "")
                    )
                    rep_waves.append(wave)
                waves.append(rep_waves)
            return waves

        waves = asyncio.run(measure())
        processor_state = bench.data_dir / "processor.json"
        sandbox_state_mb = (
            processor_state.stat().st_size / 2**20 if processor_state.exists() else 0.0
        )
    config = {
        "n": n,
        "concurrency": concurrency,
        "rate_per_s": rate,
        "reps": reps,
        "variants": list(variants),
        "baseline_activities": baseline_steps,
        "baseline_signal": "signal-with-start",
        "temporal_sqlite_pragmas": list(pragmas),
        "temporal_dynamic_config": list(dynamic_config),
        "auto_approve_below_cents": AUTO_APPROVE_ALL_CENTS,
        "processor_calls_per_s": processor_calls_per_s,
        "naive_poll_s": POLL_S,
        "cpus": os.cpu_count(),
        "load_1m_before": load_before,
        "load_1m_after": load_1m(),
        "sandbox_state": sandbox_state,
        "bytecode": bytecode,
        "python_dont_write_bytecode": bool(os.environ.get("PYTHONDONTWRITEBYTECODE")),
        "processor_sandbox_state_mb": sandbox_state_mb,
        "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return build_report(waves, config, {"purchases": total, "seconds": seed_s})


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m bench.bench --n 500 [--concurrency C] [--reps 3] [--json-out PATH]`."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench",
        description="RefundSaga throughput, latency and cost against a naive saga and a no-op "
        "baseline, same stack.",
    )
    parser.add_argument("--n", type=int, default=500, help="workflows per variant and rep")
    parser.add_argument("--concurrency", type=int, default=20, help="workflows in flight")
    parser.add_argument(
        "--rate",
        type=float,
        default=None,
        help="open loop: start this many workflows a second (same offered load for every "
        "variant; --concurrency still caps those in flight); default: closed loop",
    )
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--variants",
        default=DEFAULT_VARIANTS,
        help=f"comma-separated, from {', '.join(VARIANTS)}",
    )
    parser.add_argument(
        "--processor-calls-per-s",
        type=float,
        default=0.0,
        help="REFUND_PROCESSOR_CALLS_PER_S for the saga's and the naive saga's processor queues "
        "(default 0: no limit, the engine is measured)",
    )
    parser.add_argument(
        "--sqlite-pragmas",
        default=",".join(STACK_PRAGMAS),
        help="the dev server's --sqlite-pragma values, comma-separated; '' for none",
    )
    parser.add_argument(
        "--dynamic-config",
        action="append",
        metavar="KEY=JSON",
        help="a --dynamic-config-value for the dev server (repeatable), e.g. "
        "system.enableActivityEagerExecution=true, on top of the stack's (one for a key the "
        "stack sets replaces the stack's value)",
    )
    parser.add_argument("--history-sample", type=int, default=50)
    parser.add_argument("--baseline-activities", type=int, default=STANDARD_SAGA_ACTIVITIES)
    parser.add_argument("--json-out", type=Path, default=RESULTS / "latest.json")
    parser.add_argument(
        "--profile-dir",
        type=Path,
        default=None,
        help="sample each variant's worker with py-spy in the first repetition, raw files here",
    )
    parser.add_argument("--py-spy", default=shutil.which("py-spy") or "py-spy")
    add_run_options(parser)
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - set(VARIANTS)
    if unknown or not variants:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    if args.processor_calls_per_s < 0:
        parser.error("--processor-calls-per-s must be 0 (no limit) or more")
    # Each wave's calls are counted from the sandbox's log, which keeps the last
    # REQUEST_LOG_SIZE: two calls per refund must fit.
    if set(variants) & set(REFUNDING) and 2 * args.n >= REQUEST_LOG_SIZE:
        parser.error(f"--n must be below {REQUEST_LOG_SIZE // 2} for the refunding variants")
    try:
        dynamic_config = with_overrides(STACK_DYNAMIC_CONFIG, args.dynamic_config or ())
    except ValueError as err:
        parser.error(str(err))
    wait_if_asked(args.max_load, args.max_wait)
    if load_1m() > 1.5:
        print(f"note: 1-minute load is {load_1m():.2f}; figures may be skewed", file=sys.stderr)
    pragmas = tuple(p.strip() for p in args.sqlite_pragmas.split(",") if p.strip())
    report = run_bench(
        n=args.n,
        concurrency=args.concurrency,
        reps=args.reps,
        variants=variants,
        pragmas=pragmas,
        dynamic_config=dynamic_config,
        history_sample=args.history_sample,
        baseline_steps=args.baseline_activities,
        profile_dir=args.profile_dir,
        py_spy=args.py_spy,
        sandbox_state=args.sandbox_state,
        bytecode=args.bytecode,
        rate=args.rate,
        processor_calls_per_s=args.processor_calls_per_s,
    )
    print_table(report)
    write_json(report, args.json_out)
    return 0 if report["errors"] == 0 else 1


if __name__ == "__main__":
    from refundsaga.temporal import run_and_exit

    run_and_exit(lambda: main())
