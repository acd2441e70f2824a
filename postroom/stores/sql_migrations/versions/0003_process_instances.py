"""Process managers' instances (postroom.processes): one row per instance, its document written
with the handling that changed it, under a version that guards against a lost update.

Revision ID: postroom_0003
Revises: postroom_0002
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = "postroom_0003"
down_revision = "postroom_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "postroom_process",
        sa.Column("process", sa.String(200), primary_key=True),
        sa.Column("key", sa.String(200), primary_key=True),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("document", sa.Text, nullable=False),
    )
    op.create_index(
        "ix_postroom_process_status", "postroom_process", ["process", "status", "updated_at"]
    )


def downgrade() -> None:
    op.drop_table("postroom_process")
