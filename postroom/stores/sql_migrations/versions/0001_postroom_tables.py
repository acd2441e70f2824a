"""postroom's inbox, run counts and outbox.

Revision ID: postroom_0001
Revises:
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "postroom_0001"
down_revision = None
branch_labels = ("postroom",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "postroom_inbox",
        sa.Column("owner", sa.String(200), primary_key=True),
        sa.Column("message_id", sa.String(64), primary_key=True),
        sa.Column("outcome", sa.JSON, nullable=False),
        sa.Column(
            "handled_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
    )
    op.create_table(
        "postroom_runs",
        sa.Column("owner", sa.String(200), primary_key=True),
        sa.Column("message_id", sa.String(64), primary_key=True),
        sa.Column("runs", sa.Integer, nullable=False),
    )
    op.create_table(
        "postroom_outbox",
        sa.Column("owner", sa.String(200), primary_key=True),
        sa.Column("message_id", sa.String(64), primary_key=True),
        sa.Column("entry", sa.Text, nullable=False),
        sa.Column("due_at", sa.Float, nullable=False),
    )
    op.create_index("ix_postroom_outbox_due_at", "postroom_outbox", ["due_at"])


def downgrade() -> None:
    op.drop_table("postroom_outbox")
    op.drop_table("postroom_runs")
    op.drop_table("postroom_inbox")
