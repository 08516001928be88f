"""The cutover's statements: the swap, what it carries across, and the reads around it.

Pure functions of names and catalog facts, returning ``psycopg.sql.Composed`` (fixed
statements are module-level constants); ``orchestrator.phases.cutover`` only executes them,
in the order and under the locks it documents. Identifiers go through ``sql.Identifier``,
values through query parameters or ``sql.Literal``. A few pieces are text the server
rendered itself (view, trigger, constraint and policy definitions, row filters, storage
parameters): each is marked where it is wrapped in ``SQL``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from psycopg import sql

from orchestrator.sql import QualifiedName
from orchestrator.sql.compose import SQL, Composed, Literal, col, cols, name

# --- the lock and the renames ---------------------------------------------------------


def lock_table(table: QualifiedName) -> Composed:
    """ONLY: every access to a partitioned table goes through its parent's lock first, so the
    parent's ACCESS EXCLUSIVE already keeps everyone out; locking each partition too costs
    O(partitions) under the lock."""
    return SQL("LOCK TABLE ONLY {} IN ACCESS EXCLUSIVE MODE").format(name(table))


def rename(table: QualifiedName, new_name: str) -> Composed:
    return SQL("ALTER TABLE {} RENAME TO {}").format(name(table), col(new_name))


def renames(live: QualifiedName, incoming: QualifiedName, outgoing_name: str) -> list[Composed]:
    """The swap of names, in order: ``live`` becomes ``outgoing_name``, then ``incoming`` takes
    the live name (cutover: twin in, retired out; its rollback: retired in, twin out)."""
    return [rename(live, outgoing_name), rename(incoming, live.name)]


def drop_constraint(table: QualifiedName, constraint: str) -> Composed:
    return SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(name(table), col(constraint))


def add_foreign_key_not_valid(table: QualifiedName, constraint: str, definition: str) -> Composed:
    """NOT VALID: catalog only, under the lock; validated after the commit.
    ``definition`` is pg_get_constraintdef's text (saved in the facts at cutover): the server
    rendered it with its identifiers quoted."""
    return SQL("ALTER TABLE {} ADD CONSTRAINT {} {} NOT VALID").format(name(table), col(constraint), SQL(definition))


def validate_constraint(table: QualifiedName, constraint: str) -> Composed:
    """SHARE UPDATE EXCLUSIVE: writers go on."""
    return SQL("ALTER TABLE {} VALIDATE CONSTRAINT {}").format(name(table), col(constraint))


# --- what is carried onto the new table ---------------------------------------------------


def owner_to(table: QualifiedName, role: str) -> Composed:
    return SQL("ALTER TABLE {} OWNER TO {}").format(name(table), col(role))


def sequence_owned_by(seq: QualifiedName, table: QualifiedName, column: str) -> Composed:
    return SQL("ALTER SEQUENCE {} OWNED BY {}").format(name(seq), sql.Identifier(table.schema, table.name, column))


# Both tables' identity sequences for a column (the old one now under the retired name).
SERIAL_SEQUENCES = SQL("SELECT pg_catalog.pg_get_serial_sequence(%s::text, %s::text), "
                       "pg_catalog.pg_get_serial_sequence(%s::text, %s::text)")


def sequence_state(seq: QualifiedName) -> Composed:
    return SQL("SELECT last_value, is_called FROM {}").format(name(seq))


# Qualified, arguments cast: no setval(text, smallint, boolean) elsewhere can match.
SETVAL = SQL("SELECT pg_catalog.setval(%s::pg_catalog.regclass, %s::bigint, %s::boolean)")

_PRIVILEGE = re.compile(r"^[A-Z]+( [A-Z]+)*$")


def _grantee(role: str | None) -> sql.Composable:
    # None is PUBLIC; a role named "PUBLIC" is only a name.
    return SQL("PUBLIC") if role is None else col(role)


def _privilege(privilege: str) -> SQL:
    # aclexplode's privilege_type is a keyword (SELECT, INSERT, ...): refuse anything else.
    if not _PRIVILEGE.match(privilege):
        raise ValueError(f"not a privilege: {privilege!r}")
    return SQL(privilege)


def grant(privilege: str, table: QualifiedName, grantee: str | None, grantable: bool = False) -> Composed:
    return SQL("GRANT {} ON {} TO {}{}").format(_privilege(privilege), name(table), _grantee(grantee),
                                                SQL(" WITH GRANT OPTION" if grantable else ""))


def grant_column(privilege: str, column: str, table: QualifiedName, grantee: str | None) -> Composed:
    return SQL("GRANT {} ({}) ON {} TO {}").format(_privilege(privilege), col(column), name(table), _grantee(grantee))


def comment_on_table(table: QualifiedName, comment: str | None) -> Composed:
    """Utility statements take no bound parameters: the comment goes in as a literal (NULL drops it)."""
    return SQL("COMMENT ON TABLE {} IS {}").format(name(table), Literal(comment))


def set_statistics(table: QualifiedName, column: str, target: int) -> Composed:
    return SQL("ALTER TABLE {} ALTER COLUMN {} SET STATISTICS {}").format(name(table), col(column),
                                                                         Literal(int(target)))


def replace_view(view: QualifiedName, definition: str, options: Iterable[str] = ()) -> Composed:
    """``definition`` is pg_get_viewdef's text and ``options`` the view's reloptions
    (``security_barrier=true``): both rendered by the server, identifiers quoted."""
    options = list(options)
    opts = SQL(" WITH ({})").format(SQL(", ".join(options))) if options else SQL("")
    return SQL("CREATE OR REPLACE VIEW {}{} AS {}").format(name(view), opts, SQL(definition))


POLICY_NAMES = SQL("SELECT polname FROM pg_policy WHERE polrelid = %s::regclass")


_POLICY_COMMANDS = {"r": "SELECT", "a": "INSERT", "w": "UPDATE", "d": "DELETE", "*": "ALL"}


def create_policy(table: QualifiedName, policy: str, permissive: bool, command: str,
                  roles: Iterable[str] | None, using: str | None, check: str | None) -> Composed:
    """CREATE POLICY from pg_policy's parts (catalog.POLICIES). ``roles`` None is PUBLIC;
    ``using`` and ``check`` are the server's own deparse (pg_get_expr) of the expressions,
    taken as SQL whole: nothing is substituted inside them."""
    to = SQL("PUBLIC") if roles is None else cols(roles)
    return SQL("CREATE POLICY {} ON {} AS {} FOR {} TO {}{}{}").format(
        col(policy), name(table), SQL("PERMISSIVE" if permissive else "RESTRICTIVE"),
        SQL(_POLICY_COMMANDS[command]), to,
        SQL(" USING ({})").format(SQL(using)) if using is not None else SQL(""),
        SQL(" WITH CHECK ({})").format(SQL(check)) if check is not None else SQL(""))


def row_level_security(table: QualifiedName, force: bool = False) -> Composed:
    return SQL("ALTER TABLE {} {} ROW LEVEL SECURITY").format(name(table), SQL("FORCE" if force else "ENABLE"))


_TRIGGER_STATE = {"O": "ENABLE", "D": "DISABLE", "R": "ENABLE REPLICA", "A": "ENABLE ALWAYS"}


def trigger_state(table: QualifiedName, trigger: str, enabled: str) -> Composed:
    """The ALTER TABLE that gives a trigger its pg_trigger.tgenabled state (O, D, R, A)."""
    return SQL("ALTER TABLE {} {} TRIGGER {}").format(name(table), SQL(_TRIGGER_STATE[enabled]), col(trigger))


def drop_trigger(table: QualifiedName, trigger: str) -> Composed:
    return SQL("DROP TRIGGER IF EXISTS {} ON {}").format(col(trigger), name(table))


def create_trigger(definition: str) -> SQL:
    """pg_get_triggerdef's text, rendered by the server with quoted identifiers; it names the
    live table, which after the renames is the new one."""
    return SQL(definition)


_REPLICA_IDENTITY = {"f": "FULL", "n": "NOTHING"}


def replica_identity(table: QualifiedName, relreplident: str) -> Composed:
    """REPLICA IDENTITY FULL ('f') or NOTHING ('n'), as pg_class.relreplident names them."""
    return SQL("ALTER TABLE {} REPLICA IDENTITY {}").format(name(table), SQL(_REPLICA_IDENTITY[relreplident]))


def replica_identity_index(table: QualifiedName, index: str) -> Composed:
    return SQL("ALTER TABLE {} REPLICA IDENTITY USING INDEX {}").format(name(table), col(index))


# The retired table's replica identity index: (name, is it the primary key).
REPLICA_IDENTITY_INDEX = SQL("SELECT c.relname, i.indisprimary FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                             "WHERE i.indrelid = %s::regclass AND i.indisreplident")
PRIMARY_KEY_INDEX = SQL("SELECT indexrelid FROM pg_index WHERE indrelid = %s::regclass AND indisprimary")
# The schema goes in as a quoted identifier (regnamespace input), the index name as is.
INDEX_IN_SCHEMA = SQL("SELECT c.oid FROM pg_class c WHERE c.relnamespace = %s::regnamespace AND c.relname = %s")
RELNAME = SQL("SELECT relname FROM pg_class WHERE oid = %s")
# The partitions' indexes attached to a partitioned index, not yet their table's replica identity.
PARTITION_INDEXES_NOT_REPLIDENT = SQL(
    "SELECT n.nspname, t.relname, ic.relname FROM pg_inherits h JOIN pg_index i ON i.indexrelid = h.inhrelid "
    "JOIN pg_class ic ON ic.oid = i.indexrelid JOIN pg_class t ON t.oid = i.indrelid "
    "JOIN pg_namespace n ON n.oid = t.relnamespace WHERE h.inhparent = %s AND NOT i.indisreplident")

# Each publication's row filter and column list for a table (PostgreSQL 15+); the columns
# come back as names, to be quoted here.
PUBLICATION_FILTERS = SQL(
    "SELECT p.pubname, pg_get_expr(pr.prqual, pr.prrelid), "
    "  (SELECT array_agg(a.attname::text ORDER BY a.attnum) FROM pg_attribute a "
    "   WHERE a.attrelid = pr.prrelid AND a.attnum = ANY (pr.prattrs)) "
    "FROM pg_publication_rel pr JOIN pg_publication p ON p.oid = pr.prpubid WHERE pr.prrelid = %s::regclass")
PUBLISH_VIA_ROOT = SQL("SELECT pubviaroot FROM pg_publication WHERE pubname = %s")


def publish_via_partition_root(publication: str) -> Composed:
    return SQL("ALTER PUBLICATION {} SET (publish_via_partition_root = true)").format(col(publication))


def publication_drop_table(publication: str, table: QualifiedName) -> Composed:
    return SQL("ALTER PUBLICATION {} DROP TABLE {}").format(col(publication), name(table))


def publication_add_table(publication: str, table: QualifiedName, columns: Iterable[str] | None = None,
                          row_filter: str | None = None) -> Composed:
    """``row_filter`` is pg_get_expr's text (rendered by the server, identifiers quoted)."""
    columns = list(columns or [])
    return SQL("ALTER PUBLICATION {} ADD TABLE {}{}{}").format(
        col(publication), name(table), SQL(" ({})").format(cols(columns)) if columns else SQL(""),
        SQL(" WHERE ({})").format(SQL(row_filter)) if row_filter else SQL(""))


IS_PARTITIONED = SQL("SELECT relkind = 'p' FROM pg_class WHERE oid = %s::regclass")

# The partitions of a parent; with the owner's name, only those it does not own; with a
# relreplident, only those whose replica identity differs. Parameters: parent, owner twice,
# relreplident twice (NULL: no filter).
PARTITIONS = SQL(
    "SELECT n.nspname, c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
    "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE i.inhparent = %s::regclass "
    "AND (%s::text IS NULL OR c.relowner <> (SELECT oid FROM pg_roles WHERE rolname = %s)) "
    "AND (%s::text IS NULL OR c.relreplident <> %s)")


def set_storage_parameters(table: QualifiedName, options: Iterable[str]) -> Composed:
    """``options`` are the table's pg_class.reloptions (``fillfactor=70``), the server's text."""
    return SQL("ALTER TABLE {} SET ({})").format(name(table), SQL(", ".join(options)))


# --- reads around the lock --------------------------------------------------------------

REGCLASS_OID = SQL("SELECT %s::regclass::oid")
TO_REGCLASS = SQL("SELECT to_regclass(%s)")
CONSTRAINT_EXISTS = SQL("SELECT 1 FROM pg_constraint WHERE conrelid = %s::regclass AND conname = %s")

RELATION_OIDS = SQL("SELECT to_regclass(t)::oid FROM unnest(%s::text[]) t WHERE to_regclass(t) IS NOT NULL")

# Client sessions in a transaction holding a granted lock on any of the oids, oldest
# transaction first, the given backend pids (this process's own) left out.
LOCK_HOLDERS = SQL(
    """SELECT a.pid, coalesce(a.application_name, ''), coalesce(a.state, ''),
                  extract(epoch FROM clock_timestamp() - a.xact_start)::float8,
                  left(regexp_replace(coalesce(a.query, ''), '[[:space:]]+', ' ', 'g'), 200),
                  array_agg(DISTINCT l.mode::text), array_agg(DISTINCT l.relation::regclass::text)
           FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
           WHERE l.locktype = 'relation' AND l.granted AND l.relation = ANY (%s::oid[])
             AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
             AND a.pid <> pg_backend_pid() AND a.backend_type = 'client backend'
             AND a.xact_start IS NOT NULL AND a.pid <> ALL (%s::int[])
           GROUP BY 1, 2, 3, 4, 5 ORDER BY 4 DESC""")

# pg_cancel_backend for a running query, pg_terminate_backend for a session idle in transaction.
SIGNAL_BACKEND = {fn: SQL("SELECT pg_catalog.{}(%s)").format(SQL(fn))
                  for fn in ("pg_cancel_backend", "pg_terminate_backend")}

# Sessions of this database whose snapshot is older than the given xid (%% is a literal %).
OLD_SNAPSHOTS = SQL(
    "SELECT pid, coalesce(state, ''), extract(epoch FROM now() - xact_start)::bigint "
    "FROM pg_catalog.pg_stat_activity WHERE datname = pg_catalog.current_database() "
    "AND pid <> pg_catalog.pg_backend_pid() "
    "AND backend_type = 'client backend' AND application_name NOT LIKE 'orchestrate:%%' "
    "AND backend_xmin IS NOT NULL AND pg_catalog.age(backend_xmin) > pg_catalog.age(%s::xid) "
    "ORDER BY xact_start")
