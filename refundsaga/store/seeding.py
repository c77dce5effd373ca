"""Writers of the data the platform owns outside the saga (users, products, purchases,
progress), for demo data and tests; each is safe to run again."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from refundsaga.models import EntitlementSource
from refundsaga.store.engine import Transactions
from refundsaga.store.errors import StoreError
from refundsaga.store.schema import CourseProgress, Product, Purchase, User, utcnow


class SeedWriter:
    """Creating users, products, purchases and progress, or finding the ones made before."""

    def __init__(self, transactions: Transactions) -> None:
        self._transactions = transactions

    def create_user(self, *, name: str, email: str, ams_member_id: str | None = None) -> int:
        """Create a user, or return the id of the user with this email.

        Args:
            name: Display name (personal data).
            email: Email address (personal data), unique.
            ams_member_id: The user's member id in the AMS, if the AMS knows them.

        Returns:
            The user's id.
        """

        def existing(session: Session) -> int | None:
            return session.scalar(select(User.id).where(User.email == email))

        def create(session: Session) -> int:
            user = User(name=name, email=email, ams_member_id=ams_member_id)
            session.add(user)
            session.flush()
            return user.id

        return self._get_or_create(existing, create)

    def create_product(
        self, *, code: str, title: str, entitlement_source: EntitlementSource
    ) -> int:
        """Create a product, or return the id of the product with this code as it is.

        Args:
            code: The AMS product code, unique.
            title: The product's title.
            entitlement_source: Where entitlement to the product comes from.

        Returns:
            The product's id.
        """

        def existing(session: Session) -> int | None:
            return session.scalar(select(Product.id).where(Product.code == code))

        def create(session: Session) -> int:
            product = Product(code=code, title=title, entitlement_source=entitlement_source)
            session.add(product)
            session.flush()
            return product.id

        return self._get_or_create(existing, create)

    def create_purchase(
        self,
        *,
        user_id: int,
        product_id: int,
        amount_cents: int,
        currency: str,
        processor_charge_id: str,
    ) -> int:
        """Create an active purchase, or return the one already made with this charge.

        Args:
            user_id: The buyer.
            product_id: The product bought.
            amount_cents: The amount charged, in cents.
            currency: ISO currency code, lower case.
            processor_charge_id: The processor's charge id, unique.

        Returns:
            The purchase's id.

        Raises:
            StoreError: The charge is already recorded for a different purchase.
        """
        wanted = (user_id, product_id, amount_cents, currency)

        def existing(session: Session) -> int | None:
            purchase = session.scalar(
                select(Purchase).where(Purchase.processor_charge_id == processor_charge_id)
            )
            if purchase is None:
                return None
            held = (
                purchase.user_id,
                purchase.product_id,
                purchase.amount_cents,
                purchase.currency,
            )
            if held != wanted:
                raise StoreError(
                    f"charge {processor_charge_id} already belongs to purchase {purchase.id}"
                )
            return purchase.id

        def create(session: Session) -> int:
            purchase = Purchase(
                user_id=user_id,
                product_id=product_id,
                amount_cents=amount_cents,
                currency=currency,
                processor_charge_id=processor_charge_id,
                status="active",
                refunded_cents=0,
            )
            session.add(purchase)
            session.flush()
            return purchase.id

        return self._get_or_create(existing, create)

    def add_progress(self, *, user_id: int, product_id: int, items: int) -> int:
        """Give a user completed items ``module-1/lesson-1`` .. ``module-1/lesson-<items>``.

        Args:
            user_id: The user.
            product_id: The product.
            items: How many items the user has completed.

        Returns:
            How many rows were created (items the user already had are skipped).
        """
        keys = [f"module-1/lesson-{i}" for i in range(1, items + 1)]
        with self._transactions.write() as session:
            held = set(
                session.scalars(
                    select(CourseProgress.item_key).where(
                        CourseProgress.user_id == user_id, CourseProgress.product_id == product_id
                    )
                )
            )
            now = utcnow()
            new = [
                {
                    "user_id": user_id,
                    "product_id": product_id,
                    "item_key": key,
                    "percent": 100,
                    "completed_at": now,
                    "created_at": now,
                }
                for key in keys
                if key not in held
            ]
            if new:
                session.execute(insert(CourseProgress), new)
            return len(new)

    def _get_or_create(
        self,
        existing: Callable[[Session], int | None],
        create: Callable[[Session], int],
    ) -> int:
        with self._transactions.write() as session:
            found = existing(session)
            if found is not None:
                return found
            try:
                with session.begin_nested():
                    return create(session)
            except IntegrityError:
                # Lost a race with a concurrent creator (PostgreSQL): theirs is the row.
                found = existing(session)
                if found is None:
                    raise
                return found
