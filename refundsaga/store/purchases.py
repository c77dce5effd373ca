"""Purchases as a refund sees them, and the claim one refund request holds on a purchase."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Row, bindparam, func, select

from refundsaga.models import PurchaseSnapshot
from refundsaga.store import claims
from refundsaga.store.audit import write_event
from refundsaga.store.engine import Db, Transactions
from refundsaga.store.errors import PurchaseNotFound
from refundsaga.store.schema import CourseProgress, Product, Purchase, User

# The saga's statements are built once with bound parameters, here and in the store's other
# modules. Building a statement and its cache key on every call cost more CPU than the
# database's own work on these one-row queries (docs/decisions/0009).
_PROGRESS_OF_PURCHASE = (
    select(func.count())
    .select_from(CourseProgress)
    .where(
        CourseProgress.user_id == Purchase.user_id,
        CourseProgress.product_id == Purchase.product_id,
    )
    .correlate(Purchase)
    .scalar_subquery()
)
# A purchase as a refund sees it (PurchaseSnapshot): one saga's, or a batch's many.
PURCHASE_SNAPSHOTS = (
    select(
        Purchase.id.label("purchase_id"),
        Purchase.user_id,
        Purchase.product_id,
        Product.code.label("product_code"),
        Product.entitlement_source,
        User.ams_member_id,
        Purchase.amount_cents,
        Purchase.currency,
        Purchase.refunded_cents,
        Purchase.status,
        Purchase.processor_charge_id,
        _PROGRESS_OF_PURCHASE.label("progress_count"),
    )
    .join(Product, Product.id == Purchase.product_id)
    .join(User, User.id == Purchase.user_id)
)
_LOAD_PURCHASE = PURCHASE_SNAPSHOTS.where(Purchase.id == bindparam("purchase_id"))
# FOR UPDATE serializes the saga's writes to one purchase on PostgreSQL (SQLite's BEGIN
# IMMEDIATE already serializes all writers).
_LOCK_PURCHASE = (
    select(Purchase.__table__).where(Purchase.id == bindparam("purchase_id")).with_for_update()
)


def locked_purchase(db: Db, purchase_id: int) -> Row[Any]:
    """The purchase's row, locked for the rest of the transaction.

    Raises:
        PurchaseNotFound: No such purchase.
    """
    purchase = db.execute(_LOCK_PURCHASE, {"purchase_id": purchase_id}).one_or_none()
    if purchase is None:
        raise PurchaseNotFound(purchase_id)
    return purchase


class Purchases:
    """Loading a purchase, and claiming it for one refund request at a time."""

    def __init__(self, transactions: Transactions) -> None:
        self._transactions = transactions

    def load_purchase(self, purchase_id: int) -> PurchaseSnapshot | None:
        """Load a purchase with its product, the buyer's AMS id and their progress count.

        Args:
            purchase_id: The purchase.

        Returns:
            The snapshot, or None if there is no such purchase.
        """
        with self._transactions.engine.begin() as connection:
            row = connection.execute(_LOAD_PURCHASE, {"purchase_id": purchase_id}).one_or_none()
        return None if row is None else PurchaseSnapshot.model_validate(dict(row._mapping))

    def claim_purchase(
        self, *, purchase_id: int, request_id: str, workflow_id: str, nonce: str | None = None
    ) -> str:
        """Claim a purchase for one refund request (see ``claims.claim``), and record the nonce
        of a signed request as used by it.

        Raises:
            PurchaseNotFound: No such purchase.
            PurchaseClaimed: Another saga holds it.
            RequestReplayed: Another saga used the signed request's nonce.
        """
        with self._transactions.write_rows() as db:
            locked_purchase(db, purchase_id)
            if nonce is not None:
                claims.use_nonce(db, nonce=nonce, request_id=request_id)
            outcome = claims.claim(
                db, purchase_id=purchase_id, request_id=request_id, workflow_id=workflow_id
            )
            if outcome == "taken_over":
                write_event(
                    db,
                    event="claim_taken_over",
                    workflow_id=workflow_id,
                    purchase_id=purchase_id,
                    detail={"request_id": request_id},
                )
            return outcome

    def check_refund(self, *, purchase_id: int, request_id: str, amount_cents: int) -> None:
        """Refuse a refund its claim or the ledger does not allow (see ``claims.check_refund``).

        Raises:
            PurchaseNotFound: No such purchase.
            RefundRefused: The request does not hold the claim or the ledger has less left.
        """
        with self._transactions.engine.begin() as db:
            claims.check_refund(
                db, purchase_id=purchase_id, request_id=request_id, amount_cents=amount_cents
            )
