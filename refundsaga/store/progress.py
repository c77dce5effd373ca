"""Course progress and access: revoking a buyer's progress into the archive, and the facts
the access rule is decided on."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import bindparam, delete, exists, func, insert, select

from refundsaga.models import AccessFacts, EntitlementSource, PurchaseStatus, Record, RevokeResult
from refundsaga.store.audit import has_event, write_event
from refundsaga.store.engine import Transactions, chunks
from refundsaga.store.errors import StoreError
from refundsaga.store.purchases import locked_purchase
from refundsaga.store.runs import current_run
from refundsaga.store.schema import (
    CourseProgress,
    Product,
    ProgressArchive,
    Purchase,
    User,
    utcnow,
)

# Statuses under which a purchase still entitles its buyer to the product.
ENTITLING_STATUSES: tuple[PurchaseStatus, ...] = ("active", "partially_refunded")

_ACCESS_FACTS = select(
    select(func.count())
    .select_from(CourseProgress)
    .where(
        CourseProgress.user_id == bindparam("user_id"),
        CourseProgress.product_id == bindparam("product_id"),
    )
    .scalar_subquery(),
    exists().where(
        Purchase.user_id == bindparam("user_id"),
        Purchase.product_id == bindparam("product_id"),
        Purchase.status.in_(ENTITLING_STATUSES),
    ),
)
_PROGRESS_ROWS = (
    select(CourseProgress.__table__)
    .where(
        CourseProgress.user_id == bindparam("user_id"),
        CourseProgress.product_id == bindparam("product_id"),
    )
    .order_by(CourseProgress.id)
    .with_for_update()
)
_DELETE_PROGRESS = delete(CourseProgress).where(
    CourseProgress.id.in_(bindparam("ids", expanding=True))
)


class AccessSubject(Record):
    """Who and what an access check is about, as identifiers."""

    entitlement_source: EntitlementSource
    product_code: str
    ams_member_id: str | None


def _jsonable(value: object) -> object:
    return value.isoformat() if isinstance(value, datetime) else value


class Progress:
    """A buyer's progress in a product: revoked with the refund, archived for a restore."""

    def __init__(self, transactions: Transactions) -> None:
        self._transactions = transactions

    def revoke_progress(
        self, *, purchase_id: int, user_id: int, product_id: int, workflow_id: str
    ) -> RevokeResult:
        """Archive, then delete, all of a user's progress in a product, in one transaction.

        Deleting progress is what removes access granted by progress, and cannot be undone in
        OASIS; the archive keeps each row as it was. A second run finds nothing left and
        returns zeros.

        Args:
            purchase_id: The refunded purchase, which must be the user's, of the product.
            user_id: The buyer.
            product_id: The product.
            workflow_id: The refund saga, recorded with each archived row.

        Returns:
            How many rows were archived and deleted (always equal).

        Raises:
            PurchaseNotFound: No such purchase.
            StoreError: The purchase is not this user's purchase of this product.
        """
        with self._transactions.write_rows() as db:
            purchase = locked_purchase(db, purchase_id)
            if (purchase.user_id, purchase.product_id) != (user_id, product_id):
                raise StoreError(
                    f"purchase {purchase_id} is not user {user_id}'s purchase of "
                    f"product {product_id}"
                )
            rows = db.execute(_PROGRESS_ROWS, {"user_id": user_id, "product_id": product_id}).all()
            archived_at = utcnow()
            if rows:
                db.execute(
                    insert(ProgressArchive),
                    [
                        {
                            "original_progress_id": row.id,
                            "user_id": row.user_id,
                            "product_id": row.product_id,
                            "item_key": row.item_key,
                            "payload": {k: _jsonable(v) for k, v in row._mapping.items()},
                            "archived_at": archived_at,
                            "workflow_id": workflow_id,
                            "purchase_id": purchase_id,
                        }
                        for row in rows
                    ],
                )
            # Delete exactly the rows archived: progress written meanwhile is not lost unseen,
            # the saga's access check will find it.
            deleted = 0
            for ids in chunks([row.id for row in rows]):
                result = db.execute(_DELETE_PROGRESS, {"ids": list(ids)})
                deleted += result.rowcount
            if deleted != len(rows):
                # Raising rolls the archive back too: nothing is half done.
                raise StoreError(
                    f"progress of user {user_id} in product {product_id} changed while "
                    "revoking; nothing was deleted"
                )
            if deleted or not has_event(
                db, workflow_id=workflow_id, event="progress_revoked", run_id=current_run()
            ):
                write_event(
                    db,
                    event="progress_revoked",
                    workflow_id=workflow_id,
                    purchase_id=purchase_id,
                    detail={
                        "user_id": user_id,
                        "product_id": product_id,
                        "archived": len(rows),
                        "deleted": deleted,
                    },
                )
            return RevokeResult(deleted=deleted, archived=len(rows))

    def access_facts(self, user_id: int, product_id: int) -> AccessFacts:
        """What OASIS knows about a user's access: progress, and an entitling purchase.

        Args:
            user_id: The user.
            product_id: The product.

        Returns:
            The progress count and whether a purchase of the product is active or only
            partially refunded.
        """
        params = {"user_id": user_id, "product_id": product_id}
        with self._transactions.engine.begin() as connection:
            row = connection.execute(_ACCESS_FACTS, params).one()
        return AccessFacts(progress_count=int(row[0]), active_purchase=bool(row[1]))

    def access_subject(self, user_id: int, product_id: int) -> AccessSubject | None:
        """The identifiers the access rule needs besides the facts: where entitlement comes
        from for the product, and the user's AMS member id. None when either is unknown."""
        statement = select(Product.entitlement_source, Product.code, User.ams_member_id).where(
            Product.id == product_id, User.id == user_id
        )
        with self._transactions.read() as session:
            row = session.execute(statement).one_or_none()
        if row is None:
            return None
        return AccessSubject(entitlement_source=row[0], product_code=row[1], ams_member_id=row[2])

    def archived_progress(self, *, workflow_id: str) -> int:
        """Count the progress rows a refund saga archived.

        Args:
            workflow_id: The refund saga.

        Returns:
            The number of archived rows.
        """
        with self._transactions.read() as session:
            count = session.scalar(
                select(func.count())
                .select_from(ProgressArchive)
                .where(ProgressArchive.workflow_id == workflow_id)
            )
        return int(count or 0)
