"""One refund request in flight per purchase: claim, check before paying, release.

The claim is what stops a second saga, however it was started (another workflow id, a raw
start), from moving money for a purchase another saga is refunding.
"""

from __future__ import annotations

from sqlalchemy import Connection, bindparam, delete, insert, select, update

from refundsaga.store.errors import (
    PurchaseClaimed,
    PurchaseNotFound,
    RefundRefused,
    RequestReplayed,
)
from refundsaga.store.schema import Purchase, RefundClaim, RefundRequestNonce

_HOLDER = select(RefundClaim.request_id, RefundClaim.workflow_id).where(
    RefundClaim.purchase_id == bindparam("purchase_id")
)
_INSERT = insert(RefundClaim)
_NONCE_USER = select(RefundRequestNonce.request_id).where(
    RefundRequestNonce.nonce == bindparam("nonce")
)
_INSERT_NONCE = insert(RefundRequestNonce)
_TAKE_OVER = (
    update(RefundClaim)
    .where(RefundClaim.purchase_id == bindparam("claimed_purchase"))
    .values(request_id=bindparam("new_request"), workflow_id=bindparam("new_workflow"))
)
_RELEASE = delete(RefundClaim).where(
    RefundClaim.purchase_id == bindparam("purchase_id"),
    RefundClaim.request_id == bindparam("request_id"),
)
_REST = (
    select(Purchase.amount_cents, Purchase.refunded_cents, RefundClaim.request_id)
    .outerjoin(RefundClaim, RefundClaim.purchase_id == Purchase.id)
    .where(Purchase.id == bindparam("purchase_id"))
)


def use_nonce(db: Connection, *, nonce: str, request_id: str) -> None:
    """Record that this request used a signed request's nonce; any other request is refused.

    Raises:
        RequestReplayed: Another saga used the nonce: the signed request is being replayed.
    """
    user = db.execute(_NONCE_USER, {"nonce": nonce}).scalar_one_or_none()
    if user is None:
        db.execute(_INSERT_NONCE, {"nonce": nonce, "request_id": request_id})
    elif user != request_id:
        raise RequestReplayed(
            f"this signed request already started saga {user.split('/')[0]}; "
            "a new refund needs a newly signed request"
        )


def claim(db: Connection, *, purchase_id: int, request_id: str, workflow_id: str) -> str:
    """Claim the purchase for a refund request; the caller holds the purchase's row lock.

    Returns:
        ``"claimed"``, ``"held"`` (this request held it already: a retry, a reset run) or
        ``"taken_over"``: the holder had the same workflow id under another request, so its
        run has closed (Temporal runs one execution per workflow id) without releasing.

    Raises:
        PurchaseClaimed: Another saga holds the purchase.
    """
    params = {"purchase_id": purchase_id, "request_id": request_id, "workflow_id": workflow_id}
    holder = db.execute(_HOLDER, params).one_or_none()
    if holder is None:
        db.execute(_INSERT, params)
        return "claimed"
    if holder.request_id == request_id:
        return "held"
    if holder.workflow_id == workflow_id:
        db.execute(
            _TAKE_OVER,
            {
                "claimed_purchase": purchase_id,
                "new_request": request_id,
                "new_workflow": workflow_id,
            },
        )
        return "taken_over"
    raise PurchaseClaimed(purchase_id, holder.workflow_id)


def check_refund(db: Connection, *, purchase_id: int, request_id: str, amount_cents: int) -> None:
    """Refuse a refund the claim or the ledger does not allow, before it is sent.

    Raises:
        PurchaseNotFound: No such purchase.
        RefundRefused: The request does not hold the claim, or the amount exceeds what the
            ledger says is left to refund.
    """
    row = db.execute(_REST, {"purchase_id": purchase_id}).one_or_none()
    if row is None:
        raise PurchaseNotFound(purchase_id)
    if row.request_id != request_id:
        raise RefundRefused(
            f"refund request {request_id} does not hold purchase {purchase_id}'s claim; "
            "no money moved"
        )
    rest = row.amount_cents - row.refunded_cents
    if amount_cents > rest:
        raise RefundRefused(
            f"amount {amount_cents} exceeds the {rest} the ledger has left to refund on "
            f"purchase {purchase_id}; no money moved"
        )


def release(db: Connection, *, purchase_id: int, request_id: str) -> None:
    """Release the purchase if this request holds it (a refused saga releases nothing)."""
    db.execute(_RELEASE, {"purchase_id": purchase_id, "request_id": request_id})
