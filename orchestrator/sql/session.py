"""The statements of orchestrate's own sessions: settings, the lock wait of a locked step,
the probes of the endpoint (orchestrator/db.py), a read-only snapshot (verify)."""

from __future__ import annotations

from orchestrator.sql.compose import SQL, Composed, Literal

__all__ = ["DISCARD_ALL", "SET_CONFIG", "SETTINGS_FROM_CLIENT", "BACKEND_PID", "READ_ONLY_SNAPSHOT", "lock_timeout"]

#: A session setting where the startup packet's ``options`` did not take. Params: name, value.
SET_CONFIG = SQL("SELECT pg_catalog.set_config(%s, %s, false)")
#: How many of the wanted settings came from the startup packet, and the TimeZone.
#: Param: the settings' names in lower case.
SETTINGS_FROM_CLIENT = SQL(
    "SELECT count(*), pg_catalog.current_setting('TimeZone') FROM pg_catalog.pg_settings "
    "WHERE lower(name) = ANY(%s) AND source = 'client'")
BACKEND_PID = SQL("SELECT pg_catalog.pg_backend_pid()")
#: What a pooled session of ours leaves behind: nothing (settings, prepared statements, locks).
DISCARD_ALL = SQL("DISCARD ALL")
#: Verify's snapshot: one consistent read, never a write.
READ_ONLY_SNAPSHOT = SQL("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")


def lock_timeout(seconds: float) -> Composed:
    """``SET LOCAL lock_timeout`` of a locked step's transaction, in whole milliseconds."""
    return SQL("SET LOCAL lock_timeout = {}").format(Literal(f"{int(seconds * 1000)}ms"))
