"""The OASIS store: SQLAlchemy models, migrations and the store the refund saga works through."""

from refundsaga.store.errors import (
    DatabaseUnavailable,
    PurchaseClaimed,
    PurchaseNotFound,
    RefundRefused,
    RequestReplayed,
    StoreError,
)
from refundsaga.store.store import AuditEvent, OasisStore

__all__ = [
    "AuditEvent",
    "DatabaseUnavailable",
    "OasisStore",
    "PurchaseClaimed",
    "PurchaseNotFound",
    "RefundRefused",
    "RequestReplayed",
    "StoreError",
]
