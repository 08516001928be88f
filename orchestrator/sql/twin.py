"""prepare's statements: the preflight's reads; the twin's CREATE TABLE, partitions, primary
key, owner, indexes and foreign keys; the record of what was made, and its removal on rollback.

Pure functions returning ``psycopg.sql.Composed`` (fixed statements are constants);
``orchestrator.phases.prepare`` only executes them. Identifiers go through ``sql.Identifier``;
text the server rendered (a type's format_type, pg_get_constraintdef, quote_ident) is marked
where it is wrapped in ``SQL``.
"""

from __future__ import annotations

from psycopg import sql

from orchestrator.sql import QualifiedName, Shape, bound, fit_name
from orchestrator.sql.compose import SQL, Composed, col, cols, name
from orchestrator.sql.swap import owner_to

__all__ = ["owner_to"]  # the twin's and its partitions' ALTER TABLE .. OWNER TO, as the swap's

# --- preflight --------------------------------------------------------------------------

CURRENT_ROLE_BYPASSES_RLS = SQL("SELECT rolbypassrls FROM pg_catalog.pg_roles WHERE rolname = current_user")
ROLE_BYPASSES_RLS = SQL("SELECT rolbypassrls FROM pg_catalog.pg_roles WHERE rolname = %s")
# Parameters: the table's oid twice.
IN_INHERITANCE = SQL("SELECT count(*) FROM pg_inherits WHERE inhrelid = %s OR inhparent = %s")
RULES = SQL("SELECT count(*) FROM pg_rewrite WHERE ev_class = %s AND rulename <> '_RETURN'")
EXCLUSION_CONSTRAINTS = SQL("SELECT count(*) FROM pg_constraint WHERE conrelid = %s AND contype = 'x'")


def rows_outside(table: QualifiedName, key: str, key_type: str, bounded: bool) -> Composed:
    """How many rows the default partition takes: a NULL key, or (``bounded``) one outside
    [%s, %s). ``key_type`` is the key column's format_type text, rendered by the server."""
    k = col(key)
    where = SQL("{} IS NULL").format(k)
    if bounded:
        t = SQL(key_type)
        where = SQL("{k} IS NULL OR {k} < %s::{t} OR {k} >= %s::{t}").format(k=k, t=t)
    return SQL("SELECT count(*) FROM {} WHERE {}").format(name(table), where)


# --- the twin -------------------------------------------------------------------------------


def create_twin(src: QualifiedName, twin: QualifiedName, key: str) -> Composed:
    """The partitioned twin: same columns, defaults, NOT NULL, CHECKs, generated and identity
    columns, storage, comments and extended statistics. Indexes are added separately because
    a partitioned table's unique indexes must include the partition key."""
    return SQL(
        "CREATE TABLE {} (LIKE {} INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING GENERATED "
        "INCLUDING IDENTITY INCLUDING STORAGE INCLUDING COMMENTS INCLUDING COMPRESSION INCLUDING STATISTICS) "
        "PARTITION BY RANGE ({})").format(name(twin), name(src), col(key))


def twin_primary_key(twin: QualifiedName, shape: Shape) -> Composed:
    """PRIMARY KEY (pk..., key); with a nullable key a UNIQUE NULLS NOT DISTINCT constraint
    instead, because primary key columns cannot hold the NULL keys the default partition takes."""
    what = "UNIQUE NULLS NOT DISTINCT" if shape.key_nullable and shape.key not in shape.pk else "PRIMARY KEY"
    return SQL("ALTER TABLE {} ADD {} ({})").format(name(twin), SQL(what), cols(shape.twin_key))


def create_partition(part: QualifiedName, parent: QualifiedName, lo: str, hi: str | None, key_type: str) -> Composed:
    return SQL("CREATE TABLE {} PARTITION OF {} FOR VALUES FROM ({}) TO ({})").format(
        name(part), name(parent), bound(lo, key_type), bound(hi, key_type))


def create_default_partition(part: QualifiedName, parent: QualifiedName) -> Composed:
    return SQL("CREATE TABLE {} PARTITION OF {} DEFAULT").format(name(part), name(parent))


# --- the twin's indexes and foreign keys -------------------------------------------------

# Definitions are read with search_path = pg_catalog: every name in them comes qualified.
CATALOG_SEARCH_PATH = SQL("SET LOCAL search_path = pg_catalog")
# The index's name and its table as pg_get_indexdef renders them (quoted by the server).
INDEX_HEAD_NAMES = SQL("SELECT quote_ident(%s), %s::regclass::text")


def index_head(unique: bool, index: sql.Composable, table: sql.Composable) -> Composed:
    """``CREATE [UNIQUE] INDEX index ON table USING ``: the head of a pg_get_indexdef text.
    For the live table's head, ``index`` and ``table`` are the server's quoted text (wrapped
    in ``SQL``, from :data:`INDEX_HEAD_NAMES`); for the twin's, identifiers."""
    return SQL("CREATE {}INDEX {} ON {} USING ").format(SQL("UNIQUE " if unique else ""), index, table)


def add_foreign_key(table: QualifiedName, constraint: str, definition: str) -> Composed:
    """``definition`` is pg_get_constraintdef's text (rendered by the server, names qualified)."""
    return SQL("ALTER TABLE {} ADD CONSTRAINT {} {}").format(name(table), col(constraint), SQL(definition))


# Distributed: one connection per worker for the whole transaction (Citus refuses function
# commands after a parallel, multi-connection operation).
CITUS_SEQUENTIAL = SQL("SET LOCAL citus.multi_shard_modify_mode = 'sequential'")

# --- the record of what prepare made, and its removal ------------------------------------

REGCLASS_OID = SQL("SELECT %s::regclass::oid")
PARTITION_OIDS = SQL("SELECT inhrelid::oid FROM pg_catalog.pg_inherits WHERE inhparent = %s")
REGPROCEDURE_OID = SQL("SELECT %s::regprocedure::oid")
TO_REGCLASS_OID = SQL("SELECT pg_catalog.to_regclass(%s)::oid")


def drop_table_cascade(table: QualifiedName) -> Composed:
    return SQL("DROP TABLE {} CASCADE").format(name(table))


def drop_function(fn: QualifiedName, *arg_types: str) -> Composed:
    """``DROP FUNCTION IF EXISTS fn(types)``; the argument types are ours (``text``), never a user's."""
    return SQL("DROP FUNCTION IF EXISTS {}({})").format(name(fn), SQL(", ").join(SQL(a) for a in arg_types))


def twin_index_name(name: str) -> str:
    """The name the twin's copy of index ``name`` gets (unique in the schema, within 63 bytes)."""

    return fit_name(name, "_twin")
