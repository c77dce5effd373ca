"""Batch refunds and restore of a mistaken revoke: batch items, restore marker, purge index.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None

# Written out rather than imported from the ORM, as in 0001.
TIMESTAMP = sa.DateTime(timezone=True)


def upgrade() -> None:
    """Add the batch items, the archive's restore marker and the lookups both need."""
    op.create_table(
        "refund_batch_items",
        sa.Column("batch_id", sa.String(255), nullable=False),
        sa.Column("purchase_id", sa.Integer(), nullable=False),
        sa.Column("included", sa.Boolean(), nullable=False),
        sa.Column("skip_reason", sa.String(300), nullable=True),
        sa.Column("amount_cents", sa.Integer(), nullable=False),
        sa.Column("currency", sa.String(3), nullable=True),
        sa.Column("already_refunded", sa.Boolean(), nullable=False),
        sa.Column("progress_records", sa.Integer(), nullable=False),
        sa.Column("ams_action", sa.String(32), nullable=False),
        sa.Column("created_at", TIMESTAMP, server_default=sa.func.now(), nullable=False),
        # (batch_id, purchase_id) also serves the batch's paging by purchase id.
        sa.PrimaryKeyConstraint("batch_id", "purchase_id", name="pk_refund_batch_items"),
    )
    op.create_index("ix_purchases_product_id", "purchases", ["product_id"])
    op.add_column("progress_archive", sa.Column("restored_at", TIMESTAMP, nullable=True))
    op.add_column("progress_archive", sa.Column("restored_by", sa.String(255), nullable=True))
    op.create_index("ix_progress_archive_archived_at", "progress_archive", ["archived_at"])


def downgrade() -> None:
    """Drop what upgrade added (SQLite drops columns by recreating the table)."""
    op.drop_index("ix_progress_archive_archived_at", table_name="progress_archive")
    with op.batch_alter_table("progress_archive") as batch:
        batch.drop_column("restored_by")
        batch.drop_column("restored_at")
    op.drop_index("ix_purchases_product_id", table_name="purchases")
    op.drop_table("refund_batch_items")
