"""The orders service's table: one row per order, its status as the flow moves it on.

Revision ID: orders_0001
Revises:
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = "orders_0001"
down_revision = None
branch_labels = ("orders",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "orders",
        sa.Column("order_id", sa.Uuid, primary_key=True),
        sa.Column("customer", sa.String(200), nullable=False),
        sa.Column("vendor", sa.String(100), nullable=False),
        sa.Column("amount_cents", sa.Integer, nullable=False),
        sa.Column("confirm_within", sa.Float, nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("payment_request", sa.String(64), nullable=False, unique=True),
        sa.Column("payment_id", sa.Uuid, nullable=True),
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column("placed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("orders")
