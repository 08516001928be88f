"""The reads of ``orchestrator.statements``: where pg_stat_statements lives, the table's
unique constraints, and the application's ON CONFLICT statements that mention the table.

Pure; ``orchestrator.statements`` only executes them. pg_stat_statements' view is in the
schema the extension was created in, named through ``sql.Identifier`` (search_path is
pinned to ``pg_catalog, pg_temp``: unqualified, it would not be found).
"""

from __future__ import annotations

from orchestrator.sql import QualifiedName
from orchestrator.sql.compose import SQL, Composed, name

__all__ = ["EXTENSION_SCHEMA", "UNIQUE_CONSTRAINTS", "on_conflict_statements"]

# The schema pg_stat_statements is installed in; no row without the extension.
EXTENSION_SCHEMA = SQL("SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace "
                       "WHERE e.extname = 'pg_stat_statements'")

# The names of the table's primary key and unique constraints. Parameter: the table's oid.
UNIQUE_CONSTRAINTS = SQL("SELECT conname FROM pg_constraint WHERE conrelid = %s AND contype IN ('p', 'u')")


def on_conflict_statements(schema: str) -> Composed:
    """(queryid, calls, query) of this database's statements with an ON CONFLICT whose text
    mentions the table, most called first. Parameter: an ILIKE pattern of the table's name."""
    return SQL("SELECT queryid::text, calls, query FROM {} "
               "WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) "
               "AND query ~* 'on[[:space:]]+conflict' AND query ILIKE %s ORDER BY calls DESC"
               ).format(name(QualifiedName(schema, "pg_stat_statements")))
