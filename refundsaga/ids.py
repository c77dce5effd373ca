"""Workflow ids: one saga per purchase, one batch per product or list, one restore per saga.

Temporal runs one execution per workflow id, so these rules are what keeps work single."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence


def workflow_id_for(purchase_id: int) -> str:
    """One saga per purchase at a time: the workflow id is derived from the purchase."""
    return f"refund-{purchase_id}"


def batch_id_for(*, product_id: int | None = None, purchase_ids: Sequence[int] = ()) -> str:
    """One batch per product (or per list of purchases) at a time: the id says which."""
    if product_id is not None:
        return f"batch-product-{product_id}"
    digest = hashlib.sha256(",".join(map(str, sorted(purchase_ids))).encode()).hexdigest()
    return f"batch-list-{digest[:12]}"


def restore_id_for(saga_workflow_id: str) -> str:
    """One restore per saga at a time."""
    return f"restore-{saga_workflow_id}"


def reconcile_id_for(purchase_id: int) -> str:
    """One reconciliation per purchase at a time, however many events report the money back."""
    return f"reconcile-{purchase_id}"


def failed_refund_id_for(refund_id: str) -> str:
    """One ops task per refund the processor failed after its saga completed."""
    return f"refund-failed-{refund_id}"
