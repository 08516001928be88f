"""Distributed mode's statements (Citus; see :mod:`orchestrator.distribute`): preflight's
catalog reads on the coordinator, the twin's distribution, and the statements of verify and
finalize that differ from one node's.

Pure functions; identifiers through ``sql.Identifier``, values as query parameters or
``sql.Literal``. The workers' lag query is :data:`orchestrator.sql.probes.WORKER_SIGNALS_SQL`.
"""

from __future__ import annotations

from orchestrator.sql import QualifiedName
from orchestrator.sql.compose import SQL, Composed, Literal, col, name

__all__ = [
    "CITUS_VERSION", "ACTIVE_WORKERS", "ON_WORKERS", "SHOW_WAL_LEVEL", "IS_COORDINATOR", "WAL_LEVEL",
    "HASHABLE_TYPE", "DEFERRABLE_UNIQUE_COUNT", "COLOCATION_TYPE", "SHARD_COUNT", "DDL_PROPAGATION",
    "DDL_PROPAGATION_OFF", "SET_DDL_PROPAGATION", "IS_DISTRIBUTED", "SHARD_ROWS",
    "create_distributed_table", "owned_by", "lock_timeout", "lock_share",
]

CITUS_VERSION = SQL("SELECT extversion FROM pg_catalog.pg_extension WHERE extname = 'citus'")
#: The active primary workers that take shards (pg_dist_node; the coordinator is group 0).
ACTIVE_WORKERS = SQL(
    "SELECT nodename, nodeport FROM pg_catalog.pg_dist_node WHERE noderole = 'primary' AND isactive "
    "AND shouldhaveshards AND groupid <> 0 ORDER BY nodeid")
#: Param: the command (text) each worker runs.
ON_WORKERS = SQL("SELECT nodename, nodeport, success, result FROM pg_catalog.run_command_on_workers(%s)")
#: A str, not SQL: the command ON_WORKERS passes to the workers as its parameter value.
SHOW_WAL_LEVEL = "SHOW wal_level"
SHOW_MAX_PREPARED = "SHOW max_prepared_transactions"
MAX_CONNECTIONS = SQL("SELECT pg_catalog.current_setting('max_connections')::int")
IS_COORDINATOR = SQL("SELECT pg_catalog.citus_is_coordinator()")
WAL_LEVEL = SQL("SELECT pg_catalog.current_setting('wal_level')")
#: Param: the type (regtype text, format_type's rendering).
HASHABLE_TYPE = SQL(
    "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_opclass oc JOIN pg_catalog.pg_am am ON am.oid = oc.opcmethod "
    "WHERE am.amname = 'hash' AND oc.opcdefault AND oc.opcintype = %s::pg_catalog.regtype)")
#: Param: the table's oid.
DEFERRABLE_UNIQUE_COUNT = SQL(
    "SELECT count(*) FROM pg_catalog.pg_constraint WHERE conrelid = %s AND contype = 'u' AND condeferrable")
#: The type of a hash-distributed table's distribution column. Param: the table (text).
COLOCATION_TYPE = SQL(
    "SELECT pg_catalog.format_type(a.atttypid, a.atttypmod) FROM pg_catalog.pg_dist_partition p "
    "JOIN pg_catalog.pg_attribute a ON a.attrelid = p.logicalrelid "
    "AND a.attname = pg_catalog.column_to_column_name(p.logicalrelid, p.partkey) "
    "WHERE p.logicalrelid = pg_catalog.to_regclass(%s) AND p.partmethod = 'h'")
SHARD_COUNT = SQL("SELECT pg_catalog.current_setting('citus.shard_count')")
#: NULL without Citus loaded.
DDL_PROPAGATION = SQL("SELECT pg_catalog.current_setting('citus.enable_ddl_propagation', true)")
DDL_PROPAGATION_OFF = SQL("SELECT pg_catalog.set_config('citus.enable_ddl_propagation', 'off', true)")
#: Param: the value it had.
SET_DDL_PROPAGATION = SQL("SELECT pg_catalog.set_config('citus.enable_ddl_propagation', %s, true)")
#: Param: the table (text).
IS_DISTRIBUTED = SQL(
    "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_dist_partition WHERE logicalrelid = pg_catalog.to_regclass(%s))")
#: Rows per placement of each partition of a distributed table. Param: the table (text). The
#: %%s is a literal %s, which run_command_on_placements replaces by each shard's name.
SHARD_ROWS = SQL(
    "SELECT p.nodename, p.nodeport, sum(p.result::bigint) FROM pg_catalog.pg_inherits i, "
    "LATERAL pg_catalog.run_command_on_placements(i.inhrelid::pg_catalog.regclass, "
    "'SELECT count(*) FROM %%s') p WHERE i.inhparent = pg_catalog.to_regclass(%s) AND p.success "
    "GROUP BY 1, 2 ORDER BY 1, 2")


def create_distributed_table(twin: QualifiedName, column: str, colocate_with: str | None,
                             shard_count: int | None) -> Composed:
    """``create_distributed_table`` for the (empty) twin; its arguments are values (the twin's
    name as regclass text, the column's name as text), so they are literals."""
    args = [SQL("{}::pg_catalog.regclass").format(Literal(str(twin))), Literal(column)]
    if colocate_with is not None:
        args.append(SQL("colocate_with => {}").format(Literal(colocate_with)))
    if shard_count is not None:
        args.append(SQL("shard_count => {}").format(Literal(int(shard_count))))
    return SQL("SELECT pg_catalog.create_distributed_table({})").format(SQL(", ").join(args))


def owned_by(sequence: QualifiedName, table: QualifiedName, column: str) -> Composed:
    return SQL("ALTER SEQUENCE {} OWNED BY {}.{}").format(name(sequence), name(table), col(column))


def lock_timeout(seconds: float) -> Composed:
    """``SET LOCAL lock_timeout`` in whole milliseconds, at least 1 (0 would mean no limit)."""
    return SQL("SET LOCAL lock_timeout = {}").format(Literal(f"{max(1, int(seconds * 1000))}ms"))


def lock_share(table: QualifiedName) -> Composed:
    """ONLY the coordinator's heap table: it stops its writers (and the capture trigger)."""
    return SQL("LOCK TABLE ONLY {} IN SHARE MODE").format(name(table))
