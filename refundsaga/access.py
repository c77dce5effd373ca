"""The OASIS access rule (the "chart"): progress, or an entitlement, grants access."""

from __future__ import annotations

from refundsaga.models import AccessDecision, AccessReason, EntitlementSource


def decide_access(
    *,
    entitlement_source: EntitlementSource,
    progress_count: int,
    active_purchase: bool,
    ams_entitled: bool | None,
) -> AccessDecision:
    """Decide whether OASIS gives a user access to a product, and why.

    Any progress grants access, whatever else is true: that is why a refund must revoke it.
    Otherwise entitlement does: for ``oasis`` products an active OASIS purchase; for ``ams``
    and ``ams_manual`` products an active AMS entitlement only, because the AMS is the source
    of truth and an OASIS purchase does not entitle on its own.

    Args:
        entitlement_source: Where the product's entitlement comes from.
        progress_count: The user's progress rows in the product.
        active_purchase: Whether an OASIS purchase of the product is active or only partially
            refunded.
        ams_entitled: Whether the AMS entitles the user; None when not asked, which is only
            valid for ``oasis`` products (whose access it does not affect).

    Returns:
        The decision, with every reason that grants access in a stable order:
        ``progress``, ``oasis_purchase``, ``ams_entitlement``.

    Raises:
        ValueError: ``progress_count`` is negative, or ``ams_entitled`` is None for an
            AMS-driven product.
    """
    if progress_count < 0:
        raise ValueError(f"progress_count cannot be negative, got {progress_count}")
    reasons: list[AccessReason] = []
    if progress_count > 0:
        reasons.append("progress")
    if entitlement_source == "oasis":
        if active_purchase:
            reasons.append("oasis_purchase")
    else:
        if ams_entitled is None:
            raise ValueError(
                f"ams_entitled must be known for {entitlement_source!r} products: "
                "the AMS decides their entitlement"
            )
        if ams_entitled:
            reasons.append("ams_entitlement")
    return AccessDecision(has_access=bool(reasons), reasons=reasons)
