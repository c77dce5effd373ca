"""What the store refuses: errors a retry will not fix, and the database being away."""

from __future__ import annotations


class StoreError(Exception):
    """The store refuses a request that contradicts what it holds; retrying will not help."""


class PurchaseNotFound(StoreError):
    """No purchase has the given id."""

    def __init__(self, purchase_id: int) -> None:
        # The id alone in args keeps the exception picklable and comparable.
        super().__init__(purchase_id)
        self.purchase_id = purchase_id

    def __str__(self) -> str:
        return f"purchase {self.purchase_id} not found"


class DatabaseUnavailable(StoreError):
    """The database did not accept connections in time."""


class PurchaseClaimed(StoreError):
    """Another refund request holds the purchase: one refund in flight per purchase."""

    def __init__(self, purchase_id: int, holder: str) -> None:
        super().__init__(purchase_id, holder)
        self.purchase_id = purchase_id
        self.holder = holder

    def __str__(self) -> str:
        return (
            f"purchase {self.purchase_id} already has a refund in flight (saga {self.holder}); "
            "one refund per purchase at a time, nothing changed"
        )


class RefundRefused(StoreError):
    """The ledger or the claim forbids sending this refund to the processor."""


class RequestReplayed(StoreError):
    """A signed request's nonce was already used by another saga."""
