"""The chaos run's sagas: seeded choices of scenario and decisions, and their seeded purchases."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import httpx
from sqlalchemy import text

from console.seed import SCENARIOS, Scenario, SeededPurchase, seed_purchase
from refundsaga.settings import Settings
from refundsaga.store import OasisStore
from reliability.config import APPROVERS, Reporter
from reliability.records import SagaPlan

__all__ = ["Choice", "plan_choices", "seed_all"]


@dataclass(frozen=True)
class Choice:
    scenario: Scenario
    reject: bool
    partial_cents: int | None
    approvers: tuple[str, ...]


def plan_choices(n: int, rng: random.Random, reject_rate: float) -> list[Choice]:
    """Scenarios evenly mixed and shuffled, some rejections, partial amounts, approver order."""
    scenarios = [cast(Scenario, SCENARIOS[i % len(SCENARIOS)]) for i in range(n)]
    rng.shuffle(scenarios)
    rejects = max(1, round(n * reject_rate)) if n >= 2 else 0
    rejected = set(rng.sample(range(n), rejects))
    choices = []
    for i, scenario in enumerate(scenarios):
        # Below the partial product's price (249.00), in whole dollars.
        partial = rng.randrange(5, 240) * 100 if scenario == "partial" else None
        approvers = tuple(rng.sample(APPROVERS, len(APPROVERS)))
        choices.append(Choice(scenario, i in rejected, partial, approvers))
    return choices


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
                    )
                )
    finally:
        store.close()
    say(f"seeded {len(plans)} purchases: {dict(Counter(p.scenario for p in plans))}")
    return plans
