"""The chaos run's sagas: seeded choices of scenario and decisions, and their seeded purchases.

Most purchases get a saga from support. A share gets its money back outside OASIS instead (a
dashboard refund, whole or in part, or a lost dispute) and its saga is the reconciliation the
processor's events start. The `already_refunded` scenario was refunded before anyone listened:
support's saga finds it.
A few sagas' refunds fail at the processor after the saga completed.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal, cast

import httpx
from sqlalchemy import text

from console.seed import SCENARIOS, Scenario, SeededPurchase, seed_purchase
from refundsaga.settings import Settings
from refundsaga.store import OasisStore
from reliability.config import APPROVERS, Reporter
from reliability.records import SEEDED_OUTSIDE, SagaPlan

__all__ = [
    "LATE_FAILURE_SCENARIOS",
    "Choice",
    "MoneyBack",
    "money_back_cents",
    "plan_choices",
    "plan_processor_events",
    "seed_all",
]

MoneyBack = Literal["refund", "partial_refund", "dispute"]
# Sagas whose refund may fail late: a plain refund that succeeded at once.
LATE_FAILURE_SCENARIOS = ("standard", "oasis_entitled")


@dataclass(frozen=True)
class Choice:
    scenario: Scenario
    reject: bool
    partial_cents: int | None
    approvers: tuple[str, ...]
    money_back: MoneyBack | None = None
    money_back_share: float = 1.0
    """The part of the price a partial dashboard refund returns."""
    fail_late: bool = False


def plan_choices(n: int, rng: random.Random, reject_rate: float) -> list[Choice]:
    """Scenarios evenly mixed and shuffled, some rejections, partial amounts, approver order."""
    scenarios = [cast(Scenario, SCENARIOS[i % len(SCENARIOS)]) for i in range(n)]
    rng.shuffle(scenarios)
    rejects = min(n, max(1, round(n * reject_rate))) if n >= 2 else 0
    rejected = set(rng.sample(range(n), rejects))
    choices = []
    for i, scenario in enumerate(scenarios):
        # Below the partial product's price (249.00), in whole dollars.
        partial = rng.randrange(5, 240) * 100 if scenario == "partial" else None
        approvers = tuple(rng.sample(APPROVERS, len(APPROVERS)))
        choices.append(Choice(scenario, i in rejected, partial, approvers))
    return choices


def plan_processor_events(
    choices: Sequence[Choice], rng: random.Random, *, outside_share: float, late_failures: int
) -> list[Choice]:
    """Turn a share of the planned sagas into money back outside OASIS, and pick the sagas
    whose refund fails late.

    Of the purchases whose money goes back outside (none planned as a rejection), one in five
    is a lost dispute and one in five a partial dashboard refund, the rest full dashboard
    refunds; from ten purchases on there are at least two, a full refund and a dispute.
    """
    planned = list(choices)
    eligible = [i for i, c in enumerate(planned) if c.scenario != SEEDED_OUTSIDE and not c.reject]
    count = round(len(planned) * outside_share)
    if outside_share > 0 and len(planned) >= 10:
        count = max(2, count)
    picked = rng.sample(eligible, min(count, len(eligible)))
    for position, index in enumerate(picked):
        kind: MoneyBack = (
            "dispute" if position % 5 == 1 else "partial_refund" if position % 5 == 3 else "refund"
        )
        share = round(rng.uniform(0.2, 0.8), 3) if kind == "partial_refund" else 1.0
        planned[index] = replace(
            planned[index], money_back=kind, money_back_share=share, partial_cents=None
        )
    candidates = [
        i
        for i, c in enumerate(planned)
        if c.scenario in LATE_FAILURE_SCENARIOS and not c.reject and c.money_back is None
    ]
    for index in rng.sample(candidates, min(late_failures, len(candidates))):
        planned[index] = replace(planned[index], fail_late=True)
    return planned


def _money_back_kind(choice: Choice) -> str | None:
    """The plan's kind: a partial refund is a refund, its amount says how much."""
    if choice.money_back is None:
        return None
    return "dispute" if choice.money_back == "dispute" else "refund"


def money_back_cents(choice: Choice, price_cents: int) -> int:
    """The money a planned outside refund or dispute returns: whole dollars, below the price
    when partial; 0 when none is planned."""
    if choice.money_back is None:
        return 0
    if choice.money_back != "partial_refund":
        return price_cents
    whole_dollars = int(round(price_cents * choice.money_back_share, -2))
    return max(100, min(price_cents - 100, whole_dollars))


def seed_all(settings: Settings, choices: Sequence[Choice], say: Reporter) -> list[SagaPlan]:
    """Seed one purchase per planned saga in the store and both sandboxes."""
    plans: list[SagaPlan] = []
    store = OasisStore.from_url(settings.resolved_database_url)
    try:
        with httpx.Client(timeout=10.0, trust_env=False) as http:
            for index, choice in enumerate(choices):
                seeded: SeededPurchase = seed_purchase(
                    store,
                    http,
                    processor_url=settings.processor_url,
                    ams_url=settings.ams_url,
                    processor_api_key=settings.processor_api_key.get_secret_value(),
                    ams_api_key=settings.ams_api_key.get_secret_value(),
                    scenario=choice.scenario,
                )
                with store.engine.connect() as db:
                    row = db.execute(
                        text(
                            "SELECT p.entitlement_source, "
                            "(SELECT count(*) FROM course_progress c "
                            " WHERE c.user_id = :user AND c.product_id = :product) "
                            "FROM products p WHERE p.id = :product"
                        ),
                        {"user": seeded.user_id, "product": seeded.product_id},
                    ).one()
                plans.append(
                    SagaPlan(
                        index=index,
                        scenario=choice.scenario,
                        purchase_id=seeded.purchase_id,
                        user_id=seeded.user_id,
                        product_id=seeded.product_id,
                        charge_id=seeded.charge_id,
                        purchase_cents=seeded.amount_cents,
                        partial_cents=choice.partial_cents,
                        reject=choice.reject,
                        approvers=choice.approvers,
                        entitlement_source=str(row[0]),
                        ams_member_id=seeded.ams_member_id,
                        ams_product_code=seeded.ams_product_code,
                        progress_seeded=int(row[1]),
                        money_back=_money_back_kind(choice),
                        money_back_cents=money_back_cents(choice, seeded.amount_cents),
                        fail_late=choice.fail_late,
                    )
                )
    finally:
        store.close()
    say(f"seeded {len(plans)} purchases: {dict(Counter(p.scenario for p in plans))}")
    outside = Counter(f"{c.money_back}" for c in choices if c.money_back)
    late = sum(1 for c in choices if c.fail_late)
    say(f"money back outside OASIS planned: {dict(outside)}; refunds failing late: {late}")
    return plans
