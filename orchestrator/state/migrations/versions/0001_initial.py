"""orchestrate state: migrations, phases, ranges, events, controls, heartbeat

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None
S = "orchestrate"


def upgrade() -> None:
    op.create_table(
        "migrations",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("table_name", sa.Text, nullable=False),
        sa.Column("plan_hash", sa.Text, nullable=False),
        sa.Column("plan", JSONB, nullable=False),
        sa.Column("status", sa.Text, nullable=False, server_default="running"),
        sa.Column("phase", sa.Text),
        sa.Column("key_lo", sa.Text),
        sa.Column("key_hi", sa.Text),
        sa.Column("facts", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("error", sa.Text),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.CheckConstraint("status IN ('running','cut_over','rolled_back','finalized')", name="status_known"),
        schema=S,
    )
    # The database, not Python, guarantees one live migration per table.
    op.create_index(
        "one_live_migration_per_table", "migrations", ["table_name"], unique=True, schema=S,
        postgresql_where=sa.text("status IN ('running','cut_over')"),
    )
    op.create_table(
        "phases",
        sa.Column("migration_id", sa.BigInteger, sa.ForeignKey(f"{S}.migrations.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("state", sa.Text, nullable=False, server_default="pending"),
        sa.Column("started_at", sa.DateTime(timezone=True)),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
        sa.Column("seconds", sa.Float, nullable=False, server_default="0"),
        sa.Column("detail", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        schema=S,
    )
    op.create_table(
        "ranges",
        sa.Column("migration_id", sa.BigInteger, sa.ForeignKey(f"{S}.migrations.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("idx", sa.Integer, primary_key=True),
        sa.Column("label", sa.Text, nullable=False),
        sa.Column("lo", sa.Text),
        sa.Column("hi", sa.Text),
        sa.Column("is_null", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("state", sa.Text, nullable=False, server_default="pending"),
        sa.Column("cursor", JSONB),
        sa.Column("rows_copied", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("batches", sa.Integer, nullable=False, server_default="0"),
        sa.Column("copied_at", sa.DateTime(timezone=True)),
        sa.Column("verify_state", sa.Text, nullable=False, server_default="pending"),
        sa.Column("verify_detail", JSONB),
        sa.Column("verified_at", sa.DateTime(timezone=True)),
        schema=S,
    )
    op.create_table(
        "events",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("migration_id", sa.BigInteger, sa.ForeignKey(f"{S}.migrations.id", ondelete="CASCADE")),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("data", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        schema=S,
    )
    op.create_index("events_by_migration", "events", ["migration_id", "id"], schema=S)
    # Runtime controls an operator changes from another terminal (pause, batch size, ...).
    op.create_table(
        "controls",
        sa.Column("table_name", sa.Text, primary_key=True),
        sa.Column("settings", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        schema=S,
    )
    # Written by the running backfill, read on replicas: lag that stays exact when idle.
    op.create_table(
        "heartbeat",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
        schema=S,
    )


def downgrade() -> None:
    for t in ("heartbeat", "controls", "events", "ranges", "phases", "migrations"):
        op.drop_table(t, schema=S)
