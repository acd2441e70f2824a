"""The assets service's tables: assets, and which asset each device is bound to.

Revision ID: assets_0001
Revises:
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "assets_0001"
down_revision = None
branch_labels = ("assets",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "assets",
        sa.Column("asset_id", sa.Uuid, primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("description", sa.Text, nullable=True),
        sa.Column("attributes", sa.JSON, nullable=False),
        sa.Column("registered_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "asset_devices",
        sa.Column("device_id", sa.Uuid, primary_key=True),
        sa.Column("asset_id", sa.Uuid, sa.ForeignKey("assets.asset_id"), nullable=False),
    )
    op.create_index("ix_asset_devices_asset_id", "asset_devices", ["asset_id"])


def downgrade() -> None:
    op.drop_table("asset_devices")
    op.drop_table("assets")
