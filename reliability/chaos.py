"""Chaos run entry point: `python -m reliability.chaos --n N --seed S`; exit 1 on a breach.

A private stack comes up, the sagas are seeded and driven under chaos (`reliability.harness`),
what they left is collected (`reliability.collect`, `faults.fault_counts`,
`faults.webhook_counts`) and checked (`reliability.invariants`), and the report is printed
(`reliability.report`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import httpx
from temporalio.runtime import Runtime, TelemetryConfig, TelemetryFilter

from console import stack
from refundsaga.logs import core_logging
from refundsaga.temporal import run_and_exit
from reliability.collect import collect_facts, collect_temporal
from reliability.config import (
    SWEEP_EVERY_S,
    ChaosConfig,
    Reporter,
    chaos_settings,
    policy_environment,
)
from reliability.faults import FAULT_KINDS, fault_counts, webhook_counts
from reliability.harness import Harness
from reliability.invariants import (
    check_chaos,
    check_invariants,
    check_resets_and_prunes,
    check_restarts,
    processor_event_shortfalls,
)
from reliability.records import SEEDED_OUTSIDE
from reliability.report import build_report, format_table
from reliability.seeding import plan_choices, plan_processor_events, seed_all

__all__ = ["main", "parse_args", "run_chaos"]


def run_chaos(config: ChaosConfig, *, stream: TextIO = sys.stderr) -> dict[str, Any]:
    """Bring up a private stack, run the sagas under chaos, check, and always stop the stack.

    Returns:
        The report; `report["ok"]` says whether every invariant held.

    Raises:
        stack.StackError: The stack could not be brought up.
    """
    say = Reporter(stream)
    # The SDK's own log lines (every gRPC retry while Temporal restarts) would drown the
    # progress lines; the harness reports what matters itself.
    quiet = TelemetryFilter(core_level="ERROR", other_level="ERROR")
    Runtime.set_default(
        # Forwarded: what core does log (errors) goes through the masking logger, not stderr.
        Runtime(telemetry=TelemetryConfig(logging=core_logging(quiet))),
        error_if_already_set=False,
    )
    created = config.data_dir is None
    data_dir = config.data_dir or Path(tempfile.mkdtemp(prefix="refund-chaos-"))
    data_dir = data_dir.resolve()
    if not created and data_dir.exists() and any(data_dir.iterdir()):
        raise stack.StackError(f"{data_dir} is not empty: the harness needs a fresh data dir")
    settings = chaos_settings(data_dir, sweep_every_s=config.sweep_every_s)
    timings: dict[str, float] = {}
    say(
        f"chaos run n={config.n} seed={config.seed} in {data_dir} (Temporal "
        f"{settings.temporal_address}, processor {settings.processor_url}, AMS {settings.ams_url})"
    )
    try:
        with policy_environment():
            mark = time.monotonic()
            stack.up(settings, on_progress=lambda m: say(f"stack: {m}"), timeout_s=120)
            timings["stack_up"] = time.monotonic() - mark
            mark = time.monotonic()
            choices = plan_processor_events(
                plan_choices(config.n, random.Random(config.seed), config.reject_rate),
                random.Random(config.seed * 31 + 17),
                outside_share=config.outside_share,
                late_failures=config.planned_late_failures,
            )
            plans = seed_all(settings, choices, say)
            timings["seed"] = time.monotonic() - mark
            harness = Harness(config, settings, plans, say)
            record = asyncio.run(harness.run())
            timings["run"] = record.run_s
            mark = time.monotonic()
            faults = fault_counts(settings, record.windows)
            webhooks = webhook_counts(settings)
            temporal = asyncio.run(collect_temporal(settings))
            facts = collect_facts(settings, plans, harness.runs, temporal)
            invariants = [
                *check_invariants(list(zip(plans, facts, strict=True))),
                check_restarts(record.restarts),
                check_chaos(
                    kills=record.kills,
                    planned_kills=config.planned_kills,
                    temporal_restarts=record.temporal_restarts,
                    faults=sum(int(c[k]) for c in faults.values() for k in FAULT_KINDS),
                    outage=record.outage or config.outage_s <= 0,
                    errors=record.chaos_errors,
                    missing=[
                        *check_resets_and_prunes(
                            resets=record.resets,
                            planned_resets=config.planned_resets,
                            prunes=record.prunes,
                            planned_prunes=config.prunes,
                            end_runs={
                                p.workflow_id: r.end_run_id
                                for p, r in zip(plans, harness.runs, strict=True)
                            },
                        ),
                        *processor_event_shortfalls(
                            webhooks=webhooks if config.webhook_faults else None,
                            receiver_kills=record.receiver_kills,
                            planned_receiver_kills=config.receiver_kills,
                            money_back=record.money_back,
                            planned_money_back=sum(
                                1 for p in plans if p.reconciles and p.scenario != SEEDED_OUTSIDE
                            ),
                            late_failures=record.late_failures,
                            planned_late_failures=sum(1 for p in plans if p.fail_late),
                        ),
                    ],
                ),
            ]
            timings["check"] = time.monotonic() - mark
    finally:
        say("stopping the stack")
        with contextlib.suppress(stack.StackError):
            stack.down(settings, timeout_s=10)
        if created and not config.keep:
            shutil.rmtree(data_dir, ignore_errors=True)
        elif config.keep or not created:
            say(f"data dir kept: {data_dir}")
    timings["total"] = say.elapsed()
    return build_report(
        config=config,
        plans=plans,
        runs=harness.runs,
        record=record,
        faults=faults,
        webhooks=webhooks,
        sweeps=temporal.sweeps,
        run_states=temporal.run_states(),
        invariants=invariants,
        timings=timings,
    )


def parse_args(argv: Sequence[str] | None) -> tuple[ChaosConfig, bool]:
    parser = argparse.ArgumentParser(
        prog="python -m reliability.chaos",
        description="Run refund sagas on a private stack under faults, worker kills, a "
        "Temporal restart, resets and key pruning, with money going back outside OASIS under "
        "webhook faults, then check the invariants; exit 1 on any breach.",
        epilog="example: python -m reliability.chaos --n 30 --seed 1 --json",
    )
    parser.add_argument("--n", type=int, default=30, help="sagas to run (default 30)")
    parser.add_argument("--seed", type=int, default=1, help="seed of every random choice")
    parser.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    parser.add_argument("--data-dir", type=Path, help="fresh data dir (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the temp data dir")
    parser.add_argument("--concurrency", type=int, default=30, help="sagas driven at once")
    parser.add_argument("--kills", type=int, help="worker kills (default max(2, n/50))")
    parser.add_argument("--resets", type=int, help="sagas reset by ops (default max(2, n/20))")
    parser.add_argument(
        "--prunes", type=int, default=2, help="processor clock jumps past 24 h (default 2)"
    )
    parser.add_argument(
        "--outage-s", type=float, default=150.0, help="AMS outage length, 0 for none (default 150)"
    )
    parser.add_argument("--timeout-s", type=float, help="budget of the saga phase")
    parser.add_argument(
        "--webhook-faults",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="drop, duplicate and hold back the processor's webhook deliveries (default on)",
    )
    parser.add_argument(
        "--outside-share",
        type=float,
        default=0.1,
        help="share of purchases refunded in the dashboard or lost to a dispute instead of a "
        "saga by support (default 0.1)",
    )
    parser.add_argument(
        "--late-failures",
        type=int,
        help="refunds failed at the processor after their saga completed (default max(1, n/100))",
    )
    parser.add_argument(
        "--receiver-kills", type=int, default=1, help="webhook receiver kills (default 1)"
    )
    parser.add_argument(
        "--sweep-every-s",
        type=float,
        default=SWEEP_EVERY_S,
        help=f"interval of the reconciliation sweep (default {SWEEP_EVERY_S:g})",
    )
    args = parser.parse_args(argv)
    if args.n < 1 or args.concurrency < 1:
        parser.error("--n and --concurrency must be at least 1")
    if (args.resets is not None and args.resets < 0) or args.prunes < 0:
        parser.error("--resets and --prunes must not be negative")
    if (args.late_failures is not None and args.late_failures < 0) or args.receiver_kills < 0:
        parser.error("--late-failures and --receiver-kills must not be negative")
    if not 0 <= args.outside_share <= 1 or args.sweep_every_s <= 0:
        parser.error("--outside-share must be within 0 and 1, --sweep-every-s positive")
    config = ChaosConfig(
        n=args.n,
        seed=args.seed,
        concurrency=args.concurrency,
        kills=args.kills,
        resets=args.resets,
        prunes=args.prunes,
        outage_s=args.outage_s,
        timeout_s=args.timeout_s,
        data_dir=args.data_dir,
        keep=args.keep,
        webhook_faults=args.webhook_faults,
        outside_share=args.outside_share,
        late_failures=args.late_failures,
        receiver_kills=args.receiver_kills,
        sweep_every_s=args.sweep_every_s,
    )
    return config, args.json


def main(argv: Sequence[str] | None = None) -> int:
    config, as_json = parse_args(argv)
    try:
        report = run_chaos(config)
    except (stack.StackError, httpx.HTTPError, OSError) as err:
        print(f"chaos: {err}", file=sys.stderr)
        return 2
    table = format_table(report)
    if as_json:
        print(table, file=sys.stderr)
        print(json.dumps(report, indent=2))
    else:
        print(table)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    run_and_exit(main)
