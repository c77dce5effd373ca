"""Demo data: purchases for each refund scenario, consistent in the store and both sandboxes.

Talks to the sandboxes' `/_sandbox/` admin API, which exists only on the sandboxes: seeding
is for laptops, tests and staging, never for a real processor or AMS. The admin API takes the
same bearer key as the sandbox's `/v1` API.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Literal, get_args

import httpx
from pydantic import BaseModel
from sqlalchemy import insert, select

from refundsaga.models import EntitlementSource
from refundsaga.store import OasisStore
from refundsaga.store.schema import CourseProgress, Purchase, User, utcnow

Scenario = Literal[
    "standard", "already_refunded", "partial", "manual_ams", "oasis_entitled", "pending_refund"
]
SCENARIOS: tuple[str, ...] = get_args(Scenario)

# product code, title, entitlement source, price in cents, progress records per buyer
_PRODUCTS: dict[str, tuple[str, str, EntitlementSource, int, int]] = {
    "standard": ("CE-ETHICS-2026", "Ethics in Practice (CE)", "ams", 9_995, 6),
    "already_refunded": ("CE-ETHICS-2026", "Ethics in Practice (CE)", "ams", 9_995, 3),
    "partial": ("WEB-GOVERNANCE", "Board Governance Webinar", "ams", 24_900, 4),
    "manual_ams": ("CONF-2026-PASS", "Annual Conference 2026 Recording", "ams_manual", 59_900, 2),
    "oasis_entitled": ("SELF-PACED-101", "Self-paced Onboarding", "oasis", 4_900, 5),
    "pending_refund": ("CE-ETHICS-2026", "Ethics in Practice (CE)", "ams", 9_995, 2),
}


class SeededPurchase(BaseModel):
    """One demo purchase, as `refund seed --json` prints it (identifiers only)."""

    purchase_id: int
    user_id: int
    product_id: int
    charge_id: str
    amount_cents: int
    currency: str
    scenario: Scenario
    ams_member_id: str | None
    ams_product_code: str | None


class SeedError(RuntimeError):
    """A sandbox refused or could not be reached while seeding."""


def _auth(api_key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"}


def _admin(
    client: httpx.Client, method: str, url: str, body: dict[str, object], *, api_key: str
) -> dict[str, object]:
    try:
        response = client.request(method, url, json=body, headers=_auth(api_key))
    except httpx.HTTPError as err:
        raise SeedError(f"cannot reach the sandbox at {url}: {err}; is the stack up?") from err
    if response.status_code >= 400:
        raise SeedError(f"sandbox refused {method} {url}: {response.status_code} {response.text}")
    result: dict[str, object] = response.json()
    return result


def seed_purchase(
    store: OasisStore,
    http: httpx.Client,
    *,
    processor_url: str,
    ams_url: str,
    scenario: Scenario,
    processor_api_key: str,
    ams_api_key: str,
) -> SeededPurchase:
    """Create one purchase of a scenario in the processor sandbox, the AMS sandbox and the store."""
    code, title, source, price, progress = _PRODUCTS[scenario]
    tag = secrets.token_hex(4)
    member_id = f"M-{tag.upper()}" if source != "oasis" else None
    behavior = "pending" if scenario == "pending_refund" else "succeed"
    charge = _admin(
        http,
        "POST",
        f"{processor_url}/_sandbox/charges",
        {
            "amount": price,
            "currency": "usd",
            "refund_behavior": behavior,
            "settle_after_polls": 2,
            # A pending refund settles a few seconds later, announced by webhook.
            "settle_after_s": 3 if behavior == "pending" else None,
        },
        api_key=processor_api_key,
    )
    charge_id = str(charge["id"])
    if scenario == "already_refunded":
        # Refunded in the dashboard a month ago, before anyone listened for the processor's
        # events: support finds it by starting a saga (the seed's "already refunded" case).
        _admin(
            http,
            "POST",
            f"{processor_url}/_sandbox/charges/{charge_id}/refund_outside",
            {"ago_s": 30 * 86_400},
            api_key=processor_api_key,
        )
    if member_id:
        _admin(
            http,
            "POST",
            f"{ams_url}/_sandbox/entitlements",
            {"member_id": member_id, "product_code": code},
            api_key=ams_api_key,
        )
    # Demo people only: synthetic names and example.org addresses.
    user_id = store.create_user(
        name=f"Demo Learner {tag}", email=f"learner-{tag}@example.org", ams_member_id=member_id
    )
    product_id = store.create_product(code=code, title=title, entitlement_source=source)
    purchase_id = store.create_purchase(
        user_id=user_id,
        product_id=product_id,
        amount_cents=price,
        currency="usd",
        processor_charge_id=charge_id,
    )
    store.add_progress(user_id=user_id, product_id=product_id, items=progress)
    return SeededPurchase(
        purchase_id=purchase_id,
        user_id=user_id,
        product_id=product_id,
        charge_id=charge_id,
        amount_cents=price,
        currency="usd",
        scenario=scenario,
        ams_member_id=member_id,
        ams_product_code=code if member_id else None,
    )


def seed(
    store: OasisStore,
    *,
    processor_url: str,
    ams_url: str,
    scenarios: list[Scenario],
    processor_api_key: str,
    ams_api_key: str,
    count: int = 1,
) -> list[SeededPurchase]:
    """`count` purchases of each scenario."""
    with httpx.Client(timeout=10.0) as http:
        return [
            seed_purchase(
                store,
                http,
                processor_url=processor_url,
                ams_url=ams_url,
                scenario=scenario,
                processor_api_key=processor_api_key,
                ams_api_key=ams_api_key,
            )
            for scenario in scenarios
            for _ in range(count)
        ]


@dataclass(frozen=True)
class Buyer:
    """One purchase of an event, seeded in the store and both sandboxes (identifiers only)."""

    purchase_id: int
    user_id: int
    product_id: int
    charge_id: str
    amount_cents: int
    ams_member_id: str | None


def seed_buyers(
    store: OasisStore,
    *,
    processor_url: str,
    ams_url: str,
    count: int,
    processor_api_key: str,
    ams_api_key: str,
    source: EntitlementSource = "ams",
    price_cents: int = 9_995,
    progress: int = 3,
    http: httpx.Client | None = None,
) -> tuple[int, list[Buyer]]:
    """A new product and `count` buyers of it, fast: one bulk insert per table.

    Charges (and AMS entitlements) go through the sandboxes' admin APIs, one request each, so
    the processor and the AMS hold exactly what the store says.

    Returns:
        The product id and the buyers, by purchase id.
    """
    tag = secrets.token_hex(4)
    code = f"EVT-{tag.upper()}"
    product_id = store.create_product(
        code=code, title=f"Cancelled event {tag}", entitlement_source=source
    )
    own = http is None
    client = http or httpx.Client(timeout=30.0)
    try:
        charges: list[str] = []
        members: list[str | None] = []
        for n in range(count):
            response = client.post(
                f"{processor_url}/_sandbox/charges",
                json={"amount": price_cents, "currency": "usd"},
                headers=_auth(processor_api_key),
            )
            response.raise_for_status()
            charges.append(str(response.json()["id"]))
            member = f"M-{tag.upper()}-{n}" if source != "oasis" else None
            if member:
                client.post(
                    f"{ams_url}/_sandbox/entitlements",
                    json={"member_id": member, "product_code": code},
                    headers=_auth(ams_api_key),
                ).raise_for_status()
            members.append(member)
    finally:
        if own:
            client.close()
    now = utcnow()
    with store.engine.begin() as connection:
        connection.execute(
            insert(User),
            [
                {
                    "name": f"Event Buyer {tag} {n}",
                    "email": f"buyer-{tag}-{n}@example.org",
                    "ams_member_id": members[n],
                    "created_at": now,
                }
                for n in range(count)
            ],
        )
        by_email = {
            email: user_id
            for email, user_id in connection.execute(
                select(User.email, User.id).where(User.email.like(f"buyer-{tag}-%"))
            )
        }
        user_ids = [by_email[f"buyer-{tag}-{n}@example.org"] for n in range(count)]
        connection.execute(
            insert(Purchase),
            [
                {
                    "user_id": user_ids[n],
                    "product_id": product_id,
                    "amount_cents": price_cents,
                    "currency": "usd",
                    "processor_charge_id": charges[n],
                    "status": "active",
                    "refunded_cents": 0,
                    "created_at": now,
                    "updated_at": now,
                }
                for n in range(count)
            ],
        )
        purchase_of = {
            charge_id: purchase_id
            for charge_id, purchase_id in connection.execute(
                select(Purchase.processor_charge_id, Purchase.id).where(
                    Purchase.product_id == product_id
                )
            )
        }
        if progress:
            connection.execute(
                insert(CourseProgress),
                [
                    {
                        "user_id": user_ids[n],
                        "product_id": product_id,
                        "item_key": f"module-1/lesson-{i}",
                        "percent": 100,
                        "completed_at": now,
                        "created_at": now,
                    }
                    for n in range(count)
                    for i in range(1, progress + 1)
                ],
            )
    buyers = [
        Buyer(
            purchase_id=purchase_of[charges[n]],
            user_id=user_ids[n],
            product_id=product_id,
            charge_id=charges[n],
            amount_cents=price_cents,
            ams_member_id=members[n],
        )
        for n in range(count)
    ]
    return product_id, sorted(buyers, key=lambda b: b.purchase_id)
