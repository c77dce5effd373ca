"""The OASIS store: SQLAlchemy models, migrations and the store the refund saga works through."""

from refundsaga.store.store import (
    AuditEvent,
    DatabaseUnavailable,
    OasisStore,
    PurchaseNotFound,
    StoreError,
)

__all__ = ["AuditEvent", "DatabaseUnavailable", "OasisStore", "PurchaseNotFound", "StoreError"]
