"""maintain's statements: partitions made ahead, the swap out of the default, retention, pg_partman.

Pure functions of names and bounds; :mod:`orchestrator.maintain` only executes what they
return (the lock order and the transactions are its business, explained there). Every
identifier passes through ``sql.Identifier``; values are query parameters (``%s``) or
``sql.Literal`` (partition bounds: :func:`orchestrator.sql.bound`). Type names are embedded
with ``SQL(...)`` as PostgreSQL's ``format_type`` printed them (Facts.pk_types).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from psycopg import sql

from orchestrator.sql import QualifiedName, timestamp_text
from orchestrator.sql import bound as bound_value
from orchestrator.sql.compose import SQL, Composed, Literal, col, cols, name

__all__ = [
    "LOCK_MODES", "LIKE_OPTIONS", "EVENTS_TABLE_EXISTS", "LOCK_HOLDER_WHERE", "RELATION_BY_NAME", "TABLE_OWNER",
    "NEWEST_PARTITION_STORAGE", "REPLIDENT_INDEX_OF", "DETACH_PENDING", "DISTRIBUTE_COLOCATED", "CITUS_SEQUENTIAL",
    "ENABLED_TRIGGER", "PARTMAN_EXTENSION", "PARTMAN_AVAILABLE", "PARTMAN_CREATE_PARENT_ARGS",
    "lock_table", "bound", "key_range", "default_by_day", "count_where", "count_rows", "drop_table", "create_like",
    "stage_bounds", "comment_on_table", "owner_to", "set_reloptions", "replica_identity",
    "replica_identity_index", "delete_stale_copies", "insert_missing", "insert_where", "set_trigger",
    "delete_where", "attach_partition", "drop_constraint", "copy_where", "copy_window", "copy_batch",
    "detach_partition", "create_schema", "set_schema", "rename_to", "insert_through_parent", "partman_registered",
    "partman_create_parent", "partman_retention", "partman_config",
]

LOCK_MODES = frozenset({"ACCESS SHARE", "ROW SHARE", "ROW EXCLUSIVE", "SHARE UPDATE EXCLUSIVE", "SHARE",
                        "SHARE ROW EXCLUSIVE", "EXCLUSIVE", "ACCESS EXCLUSIVE"})

# LIKE options, most complete first; the next is tried when PostgreSQL refuses one
# (e.g. COMPRESSION before PG 14). IDENTITY is excluded: a partition made with
# PARTITION OF has no identity sequence of its own, and neither should ours.
LIKE_OPTIONS = (
    "INCLUDING ALL EXCLUDING IDENTITY",
    "INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING GENERATED INCLUDING INDEXES INCLUDING STORAGE "
    "INCLUDING COMMENTS INCLUDING STATISTICS",
    "INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING GENERATED INCLUDING INDEXES",
)

# --------------------------------------------------------------------------- fixed statements

EVENTS_TABLE_EXISTS = SQL("SELECT pg_catalog.to_regclass('orchestrate.events') IS NOT NULL")
#: The condition db.lock_holder() composes into its query (sql.backfill.holder): SQL, never a
#: str (psycopg's format() would quote a str as a literal). Param: the locked relations as
#: regclass texts.
LOCK_HOLDER_WHERE = SQL("a.pid IN (SELECT l.pid FROM pg_catalog.pg_locks l WHERE l.granted AND "
                        "l.relation = ANY(%s::regclass[]))")
#: Params: schema, relname.
RELATION_BY_NAME = SQL(
    "SELECT c.relkind, c.relispartition, obj_description(c.oid, 'pg_class') FROM pg_class c "
    "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s")
#: Param: the table's oid.
TABLE_OWNER = SQL("SELECT pg_get_userbyid(relowner) FROM pg_class WHERE oid = %s")
#: Param: the newest partition (regclass text).
NEWEST_PARTITION_STORAGE = SQL(
    "SELECT coalesce(c.reloptions, '{}'), c.relreplident::text, "
    "  (SELECT h.inhparent FROM pg_index i JOIN pg_inherits h ON h.inhrelid = i.indexrelid "
    "   WHERE i.indrelid = c.oid AND i.indisreplident) "
    "FROM pg_class c WHERE c.oid = %s::regclass")
#: Params: the parent index's oid, the partition (regclass text).
REPLIDENT_INDEX_OF = SQL(
    "SELECT c.relname FROM pg_inherits h JOIN pg_index i ON i.indexrelid = h.inhrelid "
    "JOIN pg_class c ON c.oid = i.indexrelid WHERE h.inhparent = %s AND i.indrelid = %s::regclass")
#: Params: schema, relname.
DETACH_PENDING = SQL(
    "SELECT i.inhdetachpending FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
    "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s")
#: Params: the staging table, the distribution column, the parent (regclass texts but the column).
DISTRIBUTE_COLOCATED = SQL(
    "SELECT pg_catalog.create_distributed_table(%s::pg_catalog.regclass, %s, colocate_with => %s)")
CITUS_SEQUENTIAL = SQL("SET LOCAL citus.multi_shard_modify_mode = 'sequential'")
#: Params: the default partition (regclass text), the trigger's name.
ENABLED_TRIGGER = SQL(
    "SELECT tgname, tgenabled FROM pg_catalog.pg_trigger WHERE tgrelid = %s::regclass "
    "AND tgname = %s AND tgenabled <> 'D'")
PARTMAN_EXTENSION = SQL(
    "SELECT e.extversion, n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace "
    "WHERE e.extname = 'pg_partman'")
PARTMAN_AVAILABLE = SQL("SELECT count(*) FROM pg_available_extensions WHERE name = 'pg_partman'")
#: Param: pg_partman's schema.
PARTMAN_CREATE_PARENT_ARGS = SQL(
    "SELECT p.proargnames FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
    "WHERE n.nspname = %s AND p.proname = 'create_parent'")


# --------------------------------------------------------------------------- fragments


def lock_table(rel: QualifiedName, mode: str) -> Composed:
    if mode not in LOCK_MODES:
        raise ValueError(f"not a lock mode: {mode!r}")
    return SQL("LOCK TABLE {} IN {} MODE").format(name(rel), SQL(mode))


def bound(t: datetime, key_type: str) -> sql.Composable:
    """A partition bound of the key's type."""
    return bound_value(timestamp_text(t), key_type)


def key_range(key: str, key_type: str, lo: datetime, hi: datetime, alias: str | None = None) -> Composed:
    """``key >= lo AND key < hi`` (the key qualified by alias when given)."""
    k = col(key, alias)
    return SQL("{} >= {} AND {} < {}").format(k, bound(lo, key_type), k, bound(hi, key_type))


def _pk_eq(pk: Sequence[str]) -> Composed:
    return SQL(" AND ").join(SQL("{} = {}").format(col(c, "d"), col(c, "n")) for c in pk)


def _row_text(columns: Sequence[str], alias: str) -> Composed:
    return SQL("ROW({})::text").format(cols(columns, alias))


def _typed_params(types: Sequence[str]) -> Composed:
    """``%s::t1, %s::t2``: the types as format_type printed them (already quoted)."""
    return SQL(", ").join(SQL("%s::" + t) for t in types)


# --------------------------------------------------------------------------- reading the default


def default_by_day(default: QualifiedName, key: str) -> Composed:
    """The default partition's rows per day of the key (NULL for a NULL or infinite key)."""
    k = col(key)
    return SQL("SELECT CASE WHEN {} IS NOT NULL AND isfinite({}) THEN date_trunc('day', {})::timestamp END AS d, "
               "count(*) FROM {} GROUP BY 1 ORDER BY 1 NULLS FIRST").format(k, k, k, name(default))


def count_where(table: QualifiedName, where: Composed) -> Composed:
    return SQL("SELECT count(*) FROM {} WHERE {}").format(name(table), where)


def count_rows(table: QualifiedName) -> Composed:
    return SQL("SELECT count(*) FROM {}").format(name(table))


# --------------------------------------------------------------------------- staging a partition


def drop_table(table: QualifiedName) -> Composed:
    return SQL("DROP TABLE {}").format(name(table))


def create_like(table: QualifiedName, parent: QualifiedName, options: str) -> Composed:
    """``CREATE TABLE t (LIKE parent <options>)``; options one of LIKE_OPTIONS."""
    if options not in LIKE_OPTIONS:
        raise ValueError(f"not one of the LIKE options: {options!r}")
    return SQL("CREATE TABLE {} (LIKE {} {})").format(name(table), name(parent), SQL(options))


def stage_bounds(table: QualifiedName, key: str, check: str, rng: Composed) -> Composed:
    """The key NOT NULL and CHECK (rng): what lets ATTACH skip scanning the new table."""
    return SQL("ALTER TABLE {} ALTER COLUMN {} SET NOT NULL, ADD CONSTRAINT {} CHECK ({})").format(
        name(table), col(key), col(check), rng)


def comment_on_table(table: QualifiedName, comment: str | None) -> Composed:
    return SQL("COMMENT ON TABLE {} IS {}").format(name(table), Literal(comment) if comment is not None
                                                   else SQL("NULL"))


def owner_to(table: QualifiedName, owner: str) -> Composed:
    return SQL("ALTER TABLE {} OWNER TO {}").format(name(table), col(owner))


def set_reloptions(table: QualifiedName, reloptions: Sequence[str]) -> Composed:
    """``ALTER TABLE t SET (opt = 'value', ...)`` from pg_class.reloptions' ``opt=value`` texts:
    the name as an identifier (``ns.opt`` as two), the value as a literal (PostgreSQL takes
    any reloption value as a string)."""
    items = []
    for opt in reloptions:
        key, _, value = opt.partition("=")
        items.append(SQL("{} = {}").format(SQL(".").join(col(part) for part in key.split(".")), Literal(value)))
    return SQL("ALTER TABLE {} SET ({})").format(name(table), SQL(", ").join(items))


def replica_identity(table: QualifiedName, replident: str) -> Composed:
    """REPLICA IDENTITY FULL ('f') or NOTHING ('n')."""
    mode = {"f": "FULL", "n": "NOTHING"}[replident]
    return SQL("ALTER TABLE {} REPLICA IDENTITY {}").format(name(table), SQL(mode))


def replica_identity_index(table: QualifiedName, index: str) -> Composed:
    return SQL("ALTER TABLE {} REPLICA IDENTITY USING INDEX {}").format(name(table), col(index))


# --------------------------------------------------------------------------- the swap out of the default


def delete_stale_copies(new: QualifiedName, default: QualifiedName, pk: Sequence[str], columns: Sequence[str],
                        rng_d: Composed) -> Composed:
    """Copies in ``new`` (alias n) with no identical row (same pk, same ROW()::text) in the
    default's range (alias d, ``rng_d``)."""
    return SQL("DELETE FROM {} AS n WHERE NOT EXISTS (SELECT 1 FROM {} AS d WHERE {} AND {} AND {} = {})").format(
        name(new), name(default), _pk_eq(pk), rng_d, _row_text(columns, "d"), _row_text(columns, "n"))


def insert_missing(new: QualifiedName, default: QualifiedName, pk: Sequence[str], writable: Sequence[str],
                   rng_d: Composed) -> Composed:
    """Rows of the default's range (alias d) whose pk is not in ``new`` (alias n) yet."""
    w = cols(writable)
    return SQL("INSERT INTO {} ({}) OVERRIDING SYSTEM VALUE SELECT {} FROM {} AS d WHERE {} AND NOT EXISTS "
               "(SELECT 1 FROM {} AS n WHERE {})").format(name(new), w, w, name(default), rng_d, name(new),
                                                         _pk_eq(pk))


def insert_where(new: QualifiedName, source: QualifiedName, writable: Sequence[str], where: Composed,
                 on_conflict_do_nothing: bool = False) -> Composed:
    """Copy the rows of ``source`` matching ``where`` into ``new``."""
    w = cols(writable)
    q = SQL("INSERT INTO {} ({}) OVERRIDING SYSTEM VALUE SELECT {} FROM {} WHERE {}").format(
        name(new), w, w, name(source), where)
    return q + SQL(" ON CONFLICT DO NOTHING") if on_conflict_do_nothing else q


_TRIGGER_VERBS = frozenset({"DISABLE", "ENABLE", "ENABLE REPLICA", "ENABLE ALWAYS"})


def set_trigger(table: QualifiedName, trigger: str, verb: str) -> Composed:
    """``ALTER TABLE t {DISABLE|ENABLE|ENABLE REPLICA|ENABLE ALWAYS} TRIGGER tg``."""
    if verb not in _TRIGGER_VERBS:
        raise ValueError(f"not a trigger state: {verb!r}")
    return SQL("ALTER TABLE {} {} TRIGGER {}").format(name(table), SQL(verb), col(trigger))


def delete_where(table: QualifiedName, where: Composed) -> Composed:
    return SQL("DELETE FROM {} WHERE {}").format(name(table), where)


def attach_partition(parent: QualifiedName, part: QualifiedName, key_type: str, lo: datetime,
                     hi: datetime) -> Composed:
    return SQL("ALTER TABLE {} ATTACH PARTITION {} FOR VALUES FROM ({}) TO ({})").format(
        name(parent), name(part), bound(lo, key_type), bound(hi, key_type))


def drop_constraint(table: QualifiedName, constraint: str) -> Composed:
    return SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(name(table), col(constraint))


# --------------------------------------------------------------------------- copying ahead in batches


def _after(pk: Sequence[str], pk_types: Sequence[str], op: str) -> Composed:
    return SQL("({}) " + op + " ({})").format(cols(pk), _typed_params(pk_types))


def copy_where(rng: Composed, pk: Sequence[str], pk_types: Sequence[str], after: bool) -> Composed:
    """The batch's rows: the range, after the previous batch's last pk (params: that pk)."""
    return rng + SQL(" AND ") + _after(pk, pk_types, ">") if after else rng


def copy_window(default: QualifiedName, pk: Sequence[str], where: Composed) -> Composed:
    """The next batch: its row count and its last pk (as text). Params: the ``where``'s, then
    the batch size."""
    p = cols(pk)
    return SQL("WITH b AS MATERIALIZED (SELECT {} FROM {} WHERE {} ORDER BY {} LIMIT %s) "
               "SELECT (SELECT count(*) FROM b), {} FROM b ORDER BY {} LIMIT 1").format(
        p, name(default), where, p, SQL(", ").join(SQL("{}::text").format(col(c)) for c in pk),
        SQL(", ").join(SQL("{} DESC").format(col(c)) for c in pk))


def copy_batch(new: QualifiedName, default: QualifiedName, writable: Sequence[str], pk: Sequence[str],
               pk_types: Sequence[str], where: Composed) -> Composed:
    """Copy the batch's rows up to its last pk. Params: the ``where``'s, then that last pk."""
    return insert_where(new, default, writable, where + SQL(" AND ") + _after(pk, pk_types, "<="),
                        on_conflict_do_nothing=True)


# --------------------------------------------------------------------------- retention


def detach_partition(parent: QualifiedName, part: QualifiedName, how: str | None = None) -> Composed:
    """``ALTER TABLE parent DETACH PARTITION part [CONCURRENTLY | FINALIZE]``."""
    q = SQL("ALTER TABLE {} DETACH PARTITION {}").format(name(parent), name(part))
    if how is None:
        return q
    if how not in ("CONCURRENTLY", "FINALIZE"):
        raise ValueError(f"not a DETACH option: {how!r}")
    return q + SQL(" " + how)


def create_schema(schema: str) -> Composed:
    return SQL("CREATE SCHEMA IF NOT EXISTS {}").format(col(schema))


def set_schema(table: QualifiedName, schema: str) -> Composed:
    return SQL("ALTER TABLE {} SET SCHEMA {}").format(name(table), col(schema))


# --------------------------------------------------------------------------- pg_partman handover


def rename_to(table: QualifiedName, new_name: str) -> Composed:
    return SQL("ALTER TABLE {} RENAME TO {}").format(name(table), col(new_name))


def insert_through_parent(parent: QualifiedName, source: QualifiedName, writable: Sequence[str]) -> Composed:
    w = cols(writable)
    return SQL("INSERT INTO {} ({}) OVERRIDING SYSTEM VALUE SELECT {} FROM {}").format(
        name(parent), w, w, name(source))


def partman_registered(schema: str) -> Composed:
    """Param: the parent as pg_partman spells it (``schema.name``)."""
    return SQL("SELECT count(*) FROM {} WHERE parent_table = %s").format(name(QualifiedName(schema, "part_config")))


def partman_create_parent(schema: str, no_default_table: bool) -> Composed:
    """Params: parent, control column, type, interval, premake."""
    fn = name(QualifiedName(schema, "create_parent"))
    return SQL("SELECT {}(p_parent_table := %s::text, p_control := %s::text, p_type := %s::text, "
               "p_interval := %s::text, p_premake := %s::int" + (", p_default_table := false" if no_default_table
                                                                  else "") + ")").format(fn)


def partman_retention(schema: str) -> Composed:
    """Params: retention, retention_keep_table, retention_schema, parent."""
    return SQL("UPDATE {} SET retention = %s, retention_keep_table = %s, "
               "retention_schema = %s WHERE parent_table = %s").format(name(QualifiedName(schema, "part_config")))


def partman_config(schema: str) -> Composed:
    """Param: parent."""
    return SQL("SELECT parent_table, control, partition_interval, premake, retention, retention_keep_table "
               "FROM {} WHERE parent_table = %s").format(name(QualifiedName(schema, "part_config")))
