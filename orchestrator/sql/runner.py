"""The runner's own statements: the privilege checks before a migration, finalize's drops,
and the reads ``status`` makes. Pure; ``orchestrator.runner`` only executes them."""

from __future__ import annotations

from orchestrator.sql import QualifiedName
from orchestrator.sql.compose import SQL, Composed, name
from orchestrator.sql.twin import drop_function

__all__ = ["drop_function"]  # finalize drops the owner's executor as prepare's rollback does

STATE_TABLES_EXIST = SQL("SELECT pg_catalog.to_regclass('orchestrate.migrations') IS NOT NULL")

# superuser?, CREATE on the database, CREATE on the table's schema (for us, for the owner),
# does the state schema exist? Parameters: schema, owner, schema.
PRIVILEGES = SQL(
    "SELECT r.rolsuper, pg_catalog.has_database_privilege(current_user, pg_catalog.current_database(), 'CREATE'), "
    "pg_catalog.has_schema_privilege(current_user, %s::text, 'CREATE'), "
    "pg_catalog.has_schema_privilege(%s::name, %s::text, 'CREATE'), "
    "pg_catalog.to_regnamespace('orchestrate') IS NOT NULL "
    "FROM pg_catalog.pg_roles r WHERE r.rolname = current_user")

# The first of the views (oids) whose owner the running role cannot act as.
VIEW_NOT_OURS = SQL(
    "SELECT c.oid::regclass::text FROM pg_catalog.pg_class c WHERE c.oid = ANY (%s::oid[]) "
    "AND NOT pg_catalog.pg_has_role(current_user, c.relowner, 'MEMBER') LIMIT 1")


def drop_table(table: QualifiedName) -> Composed:
    """finalize: the retired table goes (ACCESS EXCLUSIVE on it; nothing reads it any more)."""
    return SQL("DROP TABLE {}").format(name(table))


def replay_lag(fn: QualifiedName) -> Composed:
    """(changes waiting, age of the oldest) from the async capture's lag function."""
    return SQL("SELECT * FROM {}()").format(name(fn))
