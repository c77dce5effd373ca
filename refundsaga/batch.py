"""Batch refunds: plan a batch from the store and the processor, and pace its children."""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

from sqlalchemy import func, select

from refundsaga.approval import required_approvals
from refundsaga.contracts import (
    ApprovalPolicy,
    BatchChildEnd,
    BatchItem,
    BatchPlan,
    BatchSummary,
    SagaState,
)
from refundsaga.models import PurchaseSnapshot
from refundsaga.planning import PlanRefusal, RefusalKind, plan_refund
from refundsaga.processor import (
    ChargeNotFound,
    ProcessorCharge,
    ProcessorClient,
    ProcessorError,
)
from refundsaga.store.schema import AuditEventRow
from refundsaga.store.store import OasisStore, PlannedItem

# Charges read at once while planning: enough to plan 1,000 purchases in seconds, few enough
# to stay far below a processor's read rate limit (Stripe allows about 100 requests a second).
PLAN_CONCURRENCY = 8
# A charge read that fails transiently is tried this often before planning gives up (the
# planning activity is then retried by Temporal).
PLAN_TRIES = 3

# The rate limit is a sliding window on workflow time: at most `rate` sagas start in any one
# second (for rates below one a second: one start per 1/rate seconds). A batch starts what the
# window allows in one workflow task, then sleeps on a durable timer until the oldest start
# leaves the window. Temporal fires timers of a second or more on time (and shorter ones after
# about a second), so the window costs the batch almost no throughput.
RATE_WINDOW_S = 1.0

SKIP_NOT_FOUND = "no such purchase"
SKIP_REFUNDED_IN_OASIS = "already fully refunded in OASIS"
SKIP_CHARGE_UNKNOWN = "the processor does not know the charge"
SKIP_PROCESSOR_SHORT = "the processor can refund less than OASIS expects: refund it on its own"
SKIP_NO_AMS_MEMBER = "the buyer has no AMS member id: the AMS entitlement cannot be removed"


# The batch counts its skips by reason, so a reason is a fixed phrase (the saga's refusals
# name the figures); it plans no amount or currency, so it meets no other refusal.
SKIP_REASONS: dict[RefusalKind, str] = {
    "purchase_not_found": SKIP_NOT_FOUND,
    "charge_unknown": SKIP_CHARGE_UNKNOWN,
    "refunded_in_oasis": SKIP_REFUNDED_IN_OASIS,
    "processor_short": SKIP_PROCESSOR_SHORT,
    "no_ams_member": SKIP_NO_AMS_MEMBER,
}


def plan_item(
    purchase_id: int,
    snapshot: PurchaseSnapshot | None,
    charge: ProcessorCharge | None,
) -> BatchItem:
    """What a batch does for one purchase: a full refund of the unrefunded rest, or a skip.

    Plans as the saga's preparation does, so that every included purchase is one its saga will
    accept: a charge the processor has fully refunded outside OASIS is included (no money
    moves, progress and entitlement still go); a purchase OASIS holds as fully refunded, and
    anything a saga would refuse, is skipped, with why.

    Args:
        purchase_id: The purchase asked for.
        snapshot: The purchase as the store holds it, or None when there is none.
        charge: The processor's charge, or None when the processor does not know it.
    """
    planned = plan_refund(purchase_id, snapshot, charge, refunded_everywhere="refuse")
    if snapshot is None:
        item = BatchItem(purchase_id=purchase_id)
    else:
        item = BatchItem(
            purchase_id=purchase_id,
            user_id=snapshot.user_id,
            product_id=snapshot.product_id,
            currency=snapshot.currency,
            purchase_amount_cents=snapshot.amount_cents,
        )
    if isinstance(planned, PlanRefusal):
        reason = SKIP_REASONS.get(planned.kind, planned.message)
        return item.model_copy(update={"skip_reason": reason})
    return item.model_copy(
        update={
            "amount_cents": planned.amount_cents,
            "already_refunded": planned.already_refunded,
            "progress_records": planned.progress_records,
            "ams_action": planned.ams_action,
        }
    )


def summarize(
    items: Sequence[BatchItem], *, policy: ApprovalPolicy, window: int, rate_per_s: float
) -> BatchSummary:
    """The batch in totals; the approval policy applies to the total money moved."""
    included = [i for i in items if i.included]
    totals: Counter[str] = Counter()
    for item in included:
        totals[item.currency or ""] += item.amount_cents
    total = sum(i.amount_cents for i in included)
    return BatchSummary(
        purchases=len(items),
        included=len(included),
        skipped=len(items) - len(included),
        already_refunded=sum(1 for i in included if i.already_refunded),
        total_cents=total,
        totals_by_currency=dict(sorted(totals.items())),
        progress_records=sum(i.progress_records for i in included),
        ams_actions=dict(sorted(Counter(i.ams_action for i in included).items())),
        skip_reasons=dict(
            sorted(Counter(i.skip_reason for i in items if i.skip_reason is not None).items())
        ),
        required_approvals=required_approvals(policy, total) if included else 0,
        policy=policy,
        window=window,
        rate_per_s=rate_per_s,
    )


def describe_summary(summary: BatchSummary) -> str:
    """The batch in one sentence, as approvers and the Temporal UI see it."""
    money = ", ".join(
        f"{cents / 100:,.2f} {cur.upper()}" for cur, cents in summary.totals_by_currency.items()
    )
    ams = ", ".join(f"{n} {action}" for action, n in summary.ams_actions.items()) or "none"
    return (
        f"refund {summary.included} purchase(s) ({money or 'nothing'}; "
        f"{summary.already_refunded} already refunded at the processor), delete "
        f"{summary.progress_records} progress record(s), entitlements: {ams}; skip "
        f"{summary.skipped}; {summary.required_approvals} approval(s) needed"
    )


def to_planned(item: BatchItem) -> PlannedItem:
    """The store's row for a planned item."""
    return PlannedItem(
        purchase_id=item.purchase_id,
        included=item.included,
        skip_reason=item.skip_reason,
        amount_cents=item.amount_cents,
        currency=item.currency,
        already_refunded=item.already_refunded,
        progress_records=item.progress_records,
        ams_action=item.ams_action,
    )


async def _read_charge(processor: ProcessorClient, charge_id: str) -> ProcessorCharge | None:
    for attempt in range(1, PLAN_TRIES + 1):
        try:
            return await processor.get_charge(charge_id)
        except ChargeNotFound:
            return None
        except ProcessorError as err:
            if not err.retryable or attempt == PLAN_TRIES:
                raise
            await asyncio.sleep(0.2 * attempt)
    raise AssertionError("unreachable")


async def plan_batch(
    store: OasisStore,
    processor: ProcessorClient,
    *,
    product_id: int | None = None,
    purchase_ids: Sequence[int] | None = None,
    policy: ApprovalPolicy,
    window: int,
    rate_per_s: float,
    on_progress: Callable[[int, int], None] = lambda _done, _total: None,
) -> BatchPlan:
    """Plan a batch: each purchase of the product (or each one given) with what will happen.

    Reads the store in one query and each charge at the processor (PLAN_CONCURRENCY at a
    time), changes nothing.

    Args:
        store: The OASIS store.
        processor: The processor client.
        product_id: Every purchase of this product, or
        purchase_ids: exactly these purchases (a CSV file), in the order given.
        policy: The approval policy that decides how many approvals the total needs.
        window: Children running at once.
        rate_per_s: Children started per second at most.
        on_progress: Called with (charges read, charges to read) as planning goes.

    Raises:
        ProcessorError: The processor failed for a charge PLAN_TRIES times, or refused us.
    """
    snapshots = await asyncio.to_thread(
        store.batch_candidates, product_id=product_id, purchase_ids=purchase_ids
    )
    by_id = {s.purchase_id: s for s in snapshots}
    wanted = list(purchase_ids) if purchase_ids is not None else sorted(by_id)
    charges: dict[int, ProcessorCharge | None] = {}
    gate = asyncio.Semaphore(PLAN_CONCURRENCY)
    done = 0

    async def read(snapshot: PurchaseSnapshot) -> None:
        nonlocal done
        async with gate:
            charges[snapshot.purchase_id] = await _read_charge(
                processor, snapshot.processor_charge_id
            )
        done += 1
        on_progress(done, len(snapshots))

    await asyncio.gather(*(read(s) for s in snapshots))
    items = [plan_item(pid, by_id.get(pid), charges.get(pid)) for pid in wanted]
    summary = summarize(items, policy=policy, window=window, rate_per_s=rate_per_s)
    return BatchPlan(summary=summary, items=items)


# --- pacing: the batch's rate limit, as pure arithmetic over workflow time ------------------


def rate_window(rate_per_s: float) -> tuple[timedelta, int]:
    """(window, starts allowed in it): `rate_per_s` as a whole number of starts per window.

    Rounded down, so that the limit is never exceeded: 2.5 a second is 2 in any second.
    """
    window_s = max(RATE_WINDOW_S, 1.0 / rate_per_s)
    return timedelta(seconds=window_s), max(1, math.floor(rate_per_s * window_s + 1e-9))


def starts_allowed(
    recent: Sequence[datetime], now: datetime, rate_per_s: float, wanted: int
) -> int:
    """How many of `wanted` starts the window allows at `now`, given the recent starts."""
    window, limit = rate_window(rate_per_s)
    in_window = sum(1 for t in recent if now - t < window)
    return max(0, min(wanted, limit - in_window))


def wait_for_start(recent: Sequence[datetime], now: datetime, rate_per_s: float) -> timedelta:
    """How long until the window allows one more start (zero when it does now)."""
    window, limit = rate_window(rate_per_s)
    in_window = sorted(t for t in recent if now - t < window)
    if len(in_window) < limit:
        return timedelta(0)
    # The start that must leave the window before one more fits.
    leaves = in_window[len(in_window) - limit] + window
    return max(leaves - now, timedelta(milliseconds=1))


def keep_recent(recent: Sequence[datetime], rate_per_s: float) -> list[datetime]:
    """The starts the window still needs to know about (at most its limit, newest last)."""
    _, limit = rate_window(rate_per_s)
    return sorted(recent)[-limit:]


def max_in_window(times: Sequence[float], window_s: float) -> int:
    """The most events in any window of `window_s` seconds (times in seconds, any order)."""
    ordered = sorted(times)
    best = 0
    start = 0
    for end, t in enumerate(ordered):
        while t - ordered[start] >= window_s:
            start += 1
        best = max(best, end - start + 1)
    return best


# --- a child's end, as the store recorded it -----------------------------------------------


def audit_mark(store: OasisStore) -> int:
    """The audit trail's last event id: whatever a saga started after this writes is above it."""
    with store.engine.connect() as connection:
        return int(connection.execute(select(func.max(AuditEventRow.id))).scalar() or 0)


def recorded_end(store: OasisStore, *, workflow_id: str, after_event_id: int) -> BatchChildEnd:
    """The end a saga wrote in the trail (`saga_ended`) after `after_event_id`, if any."""
    statement = (
        select(AuditEventRow.detail)
        .where(
            AuditEventRow.workflow_id == workflow_id,
            AuditEventRow.event == "saga_ended",
            AuditEventRow.id > after_event_id,
        )
        .order_by(AuditEventRow.id.desc())
        .limit(1)
    )
    with store.engine.connect() as connection:
        detail = connection.execute(statement).scalar()
    if detail is None:
        return BatchChildEnd(ended=False)
    state = SagaState(detail["state"])
    # Money the processor moved for this saga; an "already refunded" branch moved none.
    moved = state == SagaState.COMPLETED and detail.get("branch") == "refund"
    return BatchChildEnd(
        ended=True,
        state=state,
        refunded_cents=int(detail.get("refund_cents") or 0) if moved else 0,
        error=detail.get("error"),
    )
