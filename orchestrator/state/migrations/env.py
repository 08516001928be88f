"""Alembic environment for orchestrate's own state schema.

Run in code by orchestrator.state.store.ensure_schema with a live connection; the
version table lives in the ``orchestrate`` schema so it never collides with the
application's own alembic_version.
"""

from alembic import context
from sqlalchemy import text

SCHEMA = "orchestrate"
connection = context.config.attributes["connection"]

# Two orchestrate processes may start at once: serialise the schema upgrade.
connection.execute(text("SELECT pg_advisory_xact_lock(hashtext('orchestrate:schema'))"))
connection.execute(text(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}"))
# Nobody else may use or create in it: owner-owned functions orchestrate calls live here.
connection.execute(text(f"REVOKE ALL ON SCHEMA {SCHEMA} FROM PUBLIC"))
context.configure(
    connection=connection,
    version_table="alembic_version",
    version_table_schema=SCHEMA,
    transactional_ddl=True,
)
with context.begin_transaction():
    context.run_migrations()
