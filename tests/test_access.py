"""Tests of the OASIS access rule over its whole truth table."""

from __future__ import annotations

import pytest

from refundsaga.access import decide_access
from refundsaga.models import AccessDecision, AccessReason, EntitlementSource

PROGRESS: AccessReason = "progress"
PURCHASE: AccessReason = "oasis_purchase"
AMS: AccessReason = "ams_entitlement"

# (progress_count, active_purchase, ams_entitled) -> reasons that grant access.
OASIS_TABLE: list[tuple[int, bool, bool | None, list[AccessReason]]] = [
    # The AMS has no say over an OASIS product, whatever it answers.
    (0, False, None, []),
    (0, False, False, []),
    (0, False, True, []),
    (0, True, None, [PURCHASE]),
    (0, True, False, [PURCHASE]),
    (0, True, True, [PURCHASE]),
    (2, False, None, [PROGRESS]),
    (2, False, False, [PROGRESS]),
    (2, False, True, [PROGRESS]),
    (2, True, None, [PROGRESS, PURCHASE]),
    (2, True, False, [PROGRESS, PURCHASE]),
    (2, True, True, [PROGRESS, PURCHASE]),
]
AMS_TABLE: list[tuple[int, bool, bool, list[AccessReason]]] = [
    # The AMS is the source of truth: an OASIS purchase alone does not entitle.
    (0, False, False, []),
    (0, True, False, []),
    (0, False, True, [AMS]),
    (0, True, True, [AMS]),
    (2, False, False, [PROGRESS]),
    (2, True, False, [PROGRESS]),
    (2, False, True, [PROGRESS, AMS]),
    (2, True, True, [PROGRESS, AMS]),
]
AMS_SOURCES: list[EntitlementSource] = ["ams", "ams_manual"]

CASES = [
    pytest.param("oasis", *row, id=f"oasis-progress{row[0]}-purchase{row[1]}-ams{row[2]}")
    for row in OASIS_TABLE
] + [
    pytest.param(source, *row, id=f"{source}-progress{row[0]}-purchase{row[1]}-ams{row[2]}")
    for source in AMS_SOURCES
    for row in AMS_TABLE
]


@pytest.mark.parametrize(
    ("entitlement_source", "progress_count", "active_purchase", "ams_entitled", "reasons"), CASES
)
def test_access_truth_table(
    entitlement_source: EntitlementSource,
    progress_count: int,
    active_purchase: bool,
    ams_entitled: bool | None,
    reasons: list[AccessReason],
) -> None:
    decision = decide_access(
        entitlement_source=entitlement_source,
        progress_count=progress_count,
        active_purchase=active_purchase,
        ams_entitled=ams_entitled,
    )

    assert decision == AccessDecision(has_access=bool(reasons), reasons=reasons)


@pytest.mark.parametrize("entitlement_source", AMS_SOURCES)
@pytest.mark.parametrize("progress_count", [0, 2])
@pytest.mark.parametrize("active_purchase", [False, True])
def test_unknown_ams_entitlement_is_refused_for_ams_products(
    entitlement_source: EntitlementSource, progress_count: int, active_purchase: bool
) -> None:
    with pytest.raises(ValueError, match="ams_entitled must be known"):
        decide_access(
            entitlement_source=entitlement_source,
            progress_count=progress_count,
            active_purchase=active_purchase,
            ams_entitled=None,
        )


def test_many_progress_rows_are_one_reason() -> None:
    decision = decide_access(
        entitlement_source="oasis", progress_count=1000, active_purchase=False, ams_entitled=None
    )

    assert decision.reasons == [PROGRESS]


def test_negative_progress_is_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        decide_access(
            entitlement_source="oasis", progress_count=-1, active_purchase=True, ams_entitled=None
        )
