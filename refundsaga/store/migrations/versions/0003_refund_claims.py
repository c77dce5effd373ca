"""Claims (one refund in flight per purchase), used nonces, and the run of each audit event.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None

TIMESTAMP = sa.DateTime(timezone=True)


def upgrade() -> None:
    """Add the claims (one row per purchase with a refund in flight) and the used nonces."""
    op.create_table(
        "refund_claims",
        sa.Column("purchase_id", sa.Integer(), nullable=False),
        sa.Column("request_id", sa.String(255), nullable=False),
        sa.Column("workflow_id", sa.String(255), nullable=False),
        sa.Column("claimed_at", TIMESTAMP, server_default=sa.func.now(), nullable=False),
        sa.ForeignKeyConstraint(
            ["purchase_id"], ["purchases.id"], name="fk_refund_claims_purchase_id_purchases"
        ),
        sa.PrimaryKeyConstraint("purchase_id", name="pk_refund_claims"),
    )
    op.create_table(
        "refund_request_nonces",
        sa.Column("nonce", sa.String(32), nullable=False),
        sa.Column("request_id", sa.String(255), nullable=False),
        sa.Column("used_at", TIMESTAMP, server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("nonce", name="pk_refund_request_nonces"),
    )
    op.add_column("audit_events", sa.Column("run_id", sa.String(64), nullable=True))


def downgrade() -> None:
    """Drop what upgrade added (SQLite drops a column by recreating the table)."""
    with op.batch_alter_table("audit_events") as batch:
        batch.drop_column("run_id")
    op.drop_table("refund_request_nonces")
    op.drop_table("refund_claims")
