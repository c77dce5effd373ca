"""A batch refund's plan: the purchases it considers, and the plan kept for its pages."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import Select, delete, insert, select

from refundsaga.models import PurchaseSnapshot, Record
from refundsaga.store.engine import Transactions, chunks
from refundsaga.store.purchases import PURCHASE_SNAPSHOTS
from refundsaga.store.schema import Purchase, RefundBatchItem, utcnow


class PlannedItem(Record):
    """One purchase of a batch refund as planned (identifiers and money only)."""

    purchase_id: int
    included: bool
    skip_reason: str | None
    amount_cents: int
    currency: str | None
    already_refunded: bool
    progress_records: int
    ams_action: str


class Batches:
    """Candidates for a batch refund, and its recorded plan."""

    def __init__(self, transactions: Transactions) -> None:
        self._transactions = transactions

    def batch_candidates(
        self, *, product_id: int | None = None, purchase_ids: Sequence[int] | None = None
    ) -> list[PurchaseSnapshot]:
        """Every purchase of a product, or the given purchases, as a refund would see them.

        Args:
            product_id: All purchases of this product (uses the product_id index).
            purchase_ids: Or exactly these purchases; ids with no purchase are left out.

        Returns:
            Snapshots ordered by purchase id.

        Raises:
            ValueError: Neither or both of product_id and purchase_ids given.
        """
        if (product_id is None) == (purchase_ids is None):
            raise ValueError("batch_candidates needs a product_id or purchase_ids")
        base = PURCHASE_SNAPSHOTS.order_by(Purchase.id)
        statements = (
            [base.where(Purchase.product_id == product_id)]
            if purchase_ids is None
            else [base.where(Purchase.id.in_(ids)) for ids in chunks(sorted(set(purchase_ids)))]
        )
        found: list[PurchaseSnapshot] = []
        with self._transactions.read() as session:
            for statement in statements:
                found.extend(
                    PurchaseSnapshot.model_validate(dict(row._mapping))
                    for row in session.execute(statement)
                )
        return sorted(found, key=lambda snapshot: snapshot.purchase_id)

    def save_batch_items(self, batch_id: str, items: Sequence[PlannedItem]) -> None:
        """Record a batch's plan, replacing any earlier plan of the same batch (retries).

        Args:
            batch_id: The batch's workflow id.
            items: One per purchase considered, included or skipped.
        """
        with self._transactions.write() as session:
            session.execute(delete(RefundBatchItem).where(RefundBatchItem.batch_id == batch_id))
            now = utcnow()
            rows = [
                {"batch_id": batch_id, "created_at": now, **item.model_dump()} for item in items
            ]
            for chunk in chunks(rows):
                session.execute(insert(RefundBatchItem), chunk)

    def batch_page(self, batch_id: str, *, after_purchase_id: int, limit: int) -> list[PlannedItem]:
        """The next included purchases of a batch, by purchase id.

        Args:
            batch_id: The batch's workflow id.
            after_purchase_id: The last purchase already handed out (0 at first).
            limit: At most this many.

        Returns:
            Planned items in increasing purchase id; empty when the batch has no more.
        """
        return self._batch_items(
            select(RefundBatchItem)
            .where(
                RefundBatchItem.batch_id == batch_id,
                RefundBatchItem.included.is_(True),
                RefundBatchItem.purchase_id > after_purchase_id,
            )
            .order_by(RefundBatchItem.purchase_id)
            .limit(limit)
        )

    def batch_items(self, batch_id: str) -> list[PlannedItem]:
        """A batch's whole plan as recorded, by purchase id."""
        return self._batch_items(
            select(RefundBatchItem)
            .where(RefundBatchItem.batch_id == batch_id)
            .order_by(RefundBatchItem.purchase_id)
        )

    def _batch_items(self, statement: Select[RefundBatchItem]) -> list[PlannedItem]:
        with self._transactions.read() as session:
            return [
                PlannedItem(
                    purchase_id=row.purchase_id,
                    included=row.included,
                    skip_reason=row.skip_reason,
                    amount_cents=row.amount_cents,
                    currency=row.currency,
                    already_refunded=row.already_refunded,
                    progress_records=row.progress_records,
                    ams_action=row.ams_action,
                )
                for row in session.scalars(statement)
            ]
