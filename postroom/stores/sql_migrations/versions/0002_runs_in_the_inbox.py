"""A message's run count moves into its inbox row: one row per message, written by ``begin`` and
updated by the mark, instead of a run row inserted and deleted around every inbox row.

Revision ID: postroom_0002
Revises: postroom_0001
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import context, op
from sqlalchemy.dialects.postgresql import insert

revision = "postroom_0002"
down_revision = "postroom_0001"
branch_labels = None
depends_on = None


def _tables(schema: str | None) -> tuple[sa.TableClause, sa.TableClause]:
    inbox = sa.table(
        "postroom_inbox",
        sa.column("owner", sa.String),
        sa.column("message_id", sa.String),
        sa.column("outcome", sa.JSON),
        sa.column("runs", sa.Integer),
        schema=schema,
    )
    runs = sa.table(
        "postroom_runs",
        sa.column("owner", sa.String),
        sa.column("message_id", sa.String),
        sa.column("runs", sa.Integer),
        schema=schema,
    )
    return inbox, runs


def _schema() -> str | None:
    """The store's schema: Alembic's column operations name it themselves, unlike its tables."""
    schema: str | None = context.config.attributes.get("schema")
    return schema


def upgrade() -> None:
    schema = _schema()
    inbox, runs = _tables(schema)
    op.add_column(
        "postroom_inbox",
        sa.Column("runs", sa.Integer, nullable=False, server_default="0"),
        schema=schema,
    )
    op.alter_column(
        "postroom_inbox", "outcome", existing_type=sa.JSON, nullable=True, schema=schema
    )
    # runs in flight while the migration runs keep their count (a handled message has none)
    op.execute(
        insert(inbox)
        .from_select(["owner", "message_id", "runs"], sa.select(runs))
        .on_conflict_do_nothing(index_elements=["owner", "message_id"])
    )
    op.drop_table("postroom_runs", schema=schema)


def downgrade() -> None:
    schema = _schema()
    inbox, runs = _tables(schema)
    op.create_table(
        "postroom_runs",
        sa.Column("owner", sa.String(200), primary_key=True),
        sa.Column("message_id", sa.String(64), primary_key=True),
        sa.Column("runs", sa.Integer, nullable=False),
        schema=schema,
    )
    unhandled = inbox.c.outcome.is_(None)
    op.execute(
        sa.insert(runs).from_select(
            ["owner", "message_id", "runs"],
            sa.select(inbox.c.owner, inbox.c.message_id, inbox.c.runs).where(unhandled),
        )
    )
    op.execute(sa.delete(inbox).where(unhandled))
    op.alter_column(
        "postroom_inbox", "outcome", existing_type=sa.JSON, nullable=False, schema=schema
    )
    op.drop_column("postroom_inbox", "runs", schema=schema)
