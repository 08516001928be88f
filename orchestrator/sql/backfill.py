"""The backfill's statements besides the copy itself: the batch's session settings, the
repair's lock-and-delete, the reads that name a lock's holder, and the phase's own reads.

The copy, boundary and probe queries stay with the str renderers of ``orchestrator.sql``
(``backfill_copy``, ``backfill_boundary``, ``twin_rows_after``). Pure;
``orchestrator.phases.backfill`` only executes what these return. A range's WHERE clause is
``orchestrator.sql.range_predicate``'s text: rendered from quoted identifiers, it is wrapped
in ``SQL`` here as it is.
"""

from __future__ import annotations

from psycopg import sql

from orchestrator.sql import QualifiedName
from orchestrator.sql.compose import SQL, Composed, Literal, name


def synchronous_commit(value: str) -> Composed:
    """``SET LOCAL synchronous_commit``: 'on' or 'off' (plan backfill.synchronous_commit)."""
    if value not in ("on", "off"):
        raise ValueError(f"synchronous_commit {value!r}")
    return SQL("SET LOCAL synchronous_commit = {}").format(SQL(value))


def lock_timeout(ms: int) -> Composed:
    """``SET LOCAL lock_timeout`` in milliseconds (0: no limit)."""
    return SQL("SET LOCAL lock_timeout = {}").format(Literal(int(ms)))


def lock_range(table: QualifiedName, where: str) -> Composed:
    """FOR SHARE on the range's live rows; ``where`` is range_predicate's text (quoted identifiers)."""
    return SQL("SELECT 1 FROM {} WHERE {} FOR SHARE").format(name(table), SQL(where))


def delete_range(table: QualifiedName, where: str) -> Composed:
    """``where`` is range_predicate's text (quoted identifiers)."""
    return SQL("DELETE FROM {} WHERE {}").format(name(table), SQL(where))


DEADLOCK_TIMEOUT_MS = SQL("SELECT setting::int FROM pg_catalog.pg_settings WHERE name = 'deadlock_timeout'")


def tuple_xmax(table: QualifiedName) -> Composed:
    """The xmax of one tuple (its locker's xid or multixact); parameter: the ctid."""
    return SQL("SELECT xmax::text FROM {} WHERE ctid = %s::tid").format(name(table))


MULTIXACT_MEMBERS = SQL("SELECT xid::text FROM pg_catalog.pg_get_multixact_members(%s::xid)")

# Which session to name as a lock's holder: one holding any of the xids (parameter: text[]),
# or the oldest client holding row-level locks on the table (parameter: the table).
HOLDS_XID = SQL("a.pid IN (SELECT l.pid FROM pg_catalog.pg_locks l WHERE "
                "l.locktype = 'transactionid' AND l.granted AND l.transactionid::text = ANY(%s))")
HOLDS_ROW_LOCKS = SQL("a.backend_type = 'client backend' AND a.application_name NOT LIKE 'orchestrate:%%' "
                      "AND a.pid IN (SELECT l.pid FROM pg_catalog.pg_locks l WHERE l.relation = %s::regclass "
                      "AND l.granted AND l.mode IN ('RowShareLock', 'RowExclusiveLock'))")


def holder(where: sql.Composable) -> Composed:
    """The first other session matching ``where`` (:data:`HOLDS_XID` or :data:`HOLDS_ROW_LOCKS`),
    oldest transaction first: pid, state, seconds in it, seconds in the transaction, application."""
    if not isinstance(where, sql.Composable):  # a str would be formatted as a quoted literal
        raise TypeError(f"holder(): the condition must be SQL, not {type(where).__name__}")
    return SQL(
        "SELECT a.pid, coalesce(a.state, 'unknown'), extract(epoch FROM now() - a.state_change)::bigint, "
        "extract(epoch FROM now() - a.xact_start)::bigint, a.application_name "
        "FROM pg_catalog.pg_stat_activity a WHERE a.pid <> pg_catalog.pg_backend_pid() AND {}"
        " ORDER BY a.xact_start LIMIT 1").format(where)


# Is the owner's executor missing? Parameter: its regprocedure text, ``fn(text)``.
EXECUTOR_MISSING = SQL("SELECT pg_catalog.to_regprocedure(%s) IS NULL")
RANGES_LEFT = SQL("SELECT count(*) FROM orchestrate.ranges WHERE migration_id = %s AND state <> 'copied'")
# An xid newer than every batch, as the 32-bit xid pg_stat_activity's backend_xmin compares with.
# Run without parameters: the % is the operator.
CURRENT_XID = SQL("SELECT (pg_catalog.txid_current() % 4294967296)::text")
