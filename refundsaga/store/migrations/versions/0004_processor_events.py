"""Processor events acted on (webhooks and the sweep), and the sweep's high-water marks.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None

TIMESTAMP = sa.DateTime(timezone=True)


def upgrade() -> None:
    """Add the inbox of processor events and the sweep's marks."""
    op.create_table(
        "processor_events",
        sa.Column("event_id", sa.String(255), nullable=False),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("received_at", TIMESTAMP, server_default=sa.func.now(), nullable=False),
        sa.Column("outcome", sa.String(64), nullable=False),
        sa.CheckConstraint("source IN ('webhook', 'sweep')", name="ck_processor_events_source"),
        sa.PrimaryKeyConstraint("event_id", name="pk_processor_events"),
    )
    op.create_table(
        "processor_sweep_marks",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("created", sa.BigInteger(), nullable=False),
        sa.Column("last_object_id", sa.String(255), nullable=True),
        sa.Column("updated_at", TIMESTAMP, server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_processor_sweep_marks"),
    )


def downgrade() -> None:
    """Drop what upgrade added."""
    op.drop_table("processor_sweep_marks")
    op.drop_table("processor_events")
