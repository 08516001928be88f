"""capture's statements around the sync triggers: the reads that find what is installed,
the drop of the migration's functions, and the replication catalog reads for warnings.

The trigger functions and triggers themselves are rendered by ``orchestrator.sql``
(``sync_function``, ``create_sync_triggers``, ...). Pure; ``orchestrator.phases.capture``
only executes what these return.
"""

from __future__ import annotations

from orchestrator.sql.compose import SQL
from orchestrator.sql.twin import drop_function

__all__ = ["drop_function"]  # the capture and reverse functions go as prepare's rollback drops them

TO_REGCLASS_OID = SQL("SELECT pg_catalog.to_regclass(%s)::oid")
TO_REGCLASS = SQL("SELECT to_regclass(%s)")

# Is the reverse trigger staged (a WHEN clause: the switch) on the table? Parameters: table, trigger.
STAGED_TRIGGER = SQL("SELECT count(*) FROM pg_catalog.pg_trigger WHERE tgrelid = pg_catalog.to_regclass(%s) "
                     "AND tgname = %s AND NOT tgisinternal AND tgqual IS NOT NULL")

# The publications that publish a table (listed, FOR TABLES IN SCHEMA, FOR ALL TABLES).
# Parameters: schema, table.
PUBLICATIONS_OF = SQL(
    "SELECT DISTINCT p.pubname, p.puballtables, p.pubviaroot FROM pg_catalog.pg_publication p "
    "JOIN pg_catalog.pg_publication_tables t ON t.pubname = p.pubname "
    "WHERE t.schemaname = %s AND t.tablename = %s ORDER BY 1")

# The subscriptions of this database that write into a table.
SUBSCRIPTIONS_INTO = SQL(
    "SELECT s.subname, s.subenabled FROM pg_catalog.pg_subscription_rel r "
    "JOIN pg_catalog.pg_subscription s ON s.oid = r.srsubid WHERE r.srrelid = %s::regclass ORDER BY 1")
