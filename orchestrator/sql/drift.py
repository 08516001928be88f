"""drift's statements: the twin follows the live table's schema changes; the column sentinel
and the opt-in DDL guard.

Pure functions; :mod:`orchestrator.drift` only executes what they return (locks and
transactions are its business). Identifiers pass through ``sql.Identifier``, values
through query parameters or ``sql.Literal``. Text PostgreSQL itself rendered from the
catalog is embedded with ``SQL(...)`` because it is already safely rendered SQL: a
column's ``format_type``, collation (``quote_ident``), default or generation expression
(``pg_get_expr``), a CHECK's ``pg_get_constraintdef`` and an index's ``pg_get_indexdef``.
"""

from __future__ import annotations

from collections.abc import Sequence

from orchestrator.sql import QualifiedName, rewrite_index
from orchestrator.sql.compose import SQL, Composed, Literal, col, cols, name, text, with_body

__all__ = [
    "ATTRIBUTE_COLLATIONS", "COLUMN_GUARD_COLUMNS", "TRIGGERS_USING_FUNCTION", "IS_SUPERUSER", "GUARD_EVENT_TRIGGERS",
    "REGPROC", "RANGES_PLANNED", "SEARCH_PATH_CATALOG", "INDEX_FACTS", "PARTITIONS_OF", "PARTITION_INDEX_ATTACHED",
    "COLUMNS", "GUARD_EVENTS", "no_arg_signature", "column_guard_function", "drop_trigger", "column_guard_trigger",
    "drop_function", "ddl_guard_function", "revoke_function", "drop_event_trigger", "create_event_trigger",
    "replace_check_not_valid", "twin_ddl", "validate_constraint", "index_definition_head", "create_parent_index",
    "create_partition_index", "drop_index", "attach_index",
]

# --------------------------------------------------------------------------- fixed statements

#: Param: the table's oid. A column's collation when it is not its type's (schema.name, quoted).
ATTRIBUTE_COLLATIONS = SQL(
    """SELECT a.attname, a.attnum,
                  CASE WHEN a.attcollation <> t.typcollation
                       THEN (SELECT quote_ident(n.nspname) || '.' || quote_ident(c.collname) FROM pg_collation c
                             JOIN pg_namespace n ON n.oid = c.collnamespace WHERE c.oid = a.attcollation) END
           FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
           WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped""")
#: Params: the table (regclass text), the guard trigger's name. The columns it names, sorted.
COLUMN_GUARD_COLUMNS = SQL(
    "SELECT array(SELECT a.attname::text FROM pg_catalog.unnest(t.tgattr::pg_catalog.int2[]) k "
    "JOIN pg_catalog.pg_attribute a ON a.attrelid = t.tgrelid AND a.attnum = k ORDER BY 1) "
    "FROM pg_catalog.pg_trigger t WHERE t.tgrelid = pg_catalog.to_regclass(%s) AND t.tgname = %s")
#: Param: the function's signature (:func:`no_arg_signature`).
TRIGGERS_USING_FUNCTION = SQL(
    "SELECT count(*) FROM pg_catalog.pg_trigger WHERE tgfoid = pg_catalog.to_regprocedure(%s)")
IS_SUPERUSER = SQL("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
#: Params: the two event triggers' names.
GUARD_EVENT_TRIGGERS = SQL("SELECT evtname FROM pg_event_trigger WHERE evtname IN (%s, %s)")
#: Param: a function's name as text.
REGPROC = SQL("SELECT to_regproc(%s)")
#: Param: the migration's id.
RANGES_PLANNED = SQL("SELECT count(*) FROM orchestrate.ranges WHERE migration_id = %s")
SEARCH_PATH_CATALOG = SQL("SET LOCAL search_path = pg_catalog")
#: Params: the table (regclass text), its schema (regnamespace text), the index's name. Run
#: with search_path = pg_catalog, so the names read as pg_get_indexdef prints them.
INDEX_FACTS = SQL(
    "SELECT quote_ident(c.relname), %s::regclass::text, i.indisunique, "
    "  ARRAY(SELECT a.attname FROM unnest(i.indkey) k(n) JOIN pg_attribute a "
    "        ON a.attrelid = i.indrelid AND a.attnum = k.n WHERE k.n > 0) "
    "FROM pg_class c JOIN pg_index i ON i.indexrelid = c.oid "
    "WHERE c.relnamespace = %s::regnamespace AND c.relname = %s")
#: Param: the partitioned table (regclass text).
PARTITIONS_OF = SQL(
    "SELECT n.nspname, c.relname FROM pg_inherits h JOIN pg_class c ON c.oid = h.inhrelid "
    "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE h.inhparent = %s::regclass ORDER BY 2")
#: Params: the parent index (regclass text), the partition index's name.
PARTITION_INDEX_ATTACHED = SQL(
    "SELECT 1 FROM pg_inherits h JOIN pg_class c ON c.oid = h.inhrelid "
    "WHERE h.inhparent = %s::regclass AND c.relname = %s")
#: Param: a table (regclass text). Its columns (name, type, collation, NOT NULL, generated,
#: identity, default) in order, one line each: compared between the table and the twin.
COLUMNS = SQL(
    """SELECT coalesce(string_agg(concat_ws(':', quote_ident(a.attname), format_type(a.atttypid, a.atttypmod),
        a.attcollation, a.attnotnull, a.attgenerated, a.attidentity, pg_get_expr(d.adbin, d.adrelid)), E'\\n'
        ORDER BY a.attnum), '')
  FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
 WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped""")

#: The DDL guard's event triggers: (event, name suffix).
GUARD_EVENTS = (("ddl_command_end", ""), ("sql_drop", "_drop"))


def no_arg_signature(fn: QualifiedName) -> str:
    """``schema.fn()`` as regprocedure input (a parameter value, quoted like an identifier)."""
    return text(name(fn)) + "()"


# --------------------------------------------------------------------------- the column sentinel


def column_guard_function(fn: QualifiedName) -> Composed:
    """The sentinel's function: never called (its trigger is WHEN (false))."""
    return with_body(SQL("""CREATE OR REPLACE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog AS {q} BEGIN RETURN NULL; END {q}"""), fn=name(fn))


def drop_trigger(table: QualifiedName, trigger: str) -> Composed:
    return SQL("DROP TRIGGER IF EXISTS {} ON {}").format(col(trigger), name(table))


def column_guard_trigger(table: QualifiedName, trigger: str, columns: Sequence[str], fn: QualifiedName) -> Composed:
    """Names every column in UPDATE OF (a dependency on each) and never fires."""
    return SQL("CREATE TRIGGER {} AFTER UPDATE OF {} ON {} FOR EACH ROW WHEN (false) EXECUTE FUNCTION {}()").format(
        col(trigger), cols(columns), name(table), name(fn))


def drop_function(fn: QualifiedName, if_exists: bool = True) -> Composed:
    """``DROP FUNCTION [IF EXISTS] fn()`` (a function without arguments)."""
    return SQL("DROP FUNCTION {}{}()").format(SQL("IF EXISTS ") if if_exists else SQL(""), name(fn))


# --------------------------------------------------------------------------- the DDL guard (event triggers)


def ddl_guard_function(fn: QualifiedName, table_oid: int, message: str) -> Composed:
    """The event trigger function refusing DDL on the table (oid) with ``message``, except
    from orchestrate's own sessions (application_name 'orchestrate:...')."""
    oid = Literal(int(table_oid))
    msg = Literal(message)
    return with_body(SQL("""CREATE OR REPLACE FUNCTION {fn}() RETURNS event_trigger LANGUAGE plpgsql
SET search_path = pg_catalog AS {q}
DECLARE r record;
BEGIN
  IF pg_catalog.current_setting('application_name') LIKE 'orchestrate:%' THEN
    RETURN;
  END IF;
  IF TG_EVENT = 'sql_drop' THEN
    FOR r IN SELECT objid, object_type FROM pg_catalog.pg_event_trigger_dropped_objects() LOOP
      IF r.objid = {oid}::oid THEN
        RAISE EXCEPTION {msg} USING ERRCODE = 'object_in_use';
      END IF;
    END LOOP;
    RETURN;
  END IF;
  FOR r IN SELECT classid, objid FROM pg_catalog.pg_event_trigger_ddl_commands() LOOP
    IF r.classid = 'pg_catalog.pg_class'::pg_catalog.regclass AND (r.objid = {oid}::oid OR EXISTS (
         SELECT 1 FROM pg_catalog.pg_index i WHERE i.indexrelid = r.objid AND i.indrelid = {oid}::oid))
    THEN
      RAISE EXCEPTION {msg} USING ERRCODE = 'object_in_use';
    END IF;
  END LOOP;
END {q}"""), fn=name(fn), oid=oid, msg=msg)


def revoke_function(fn: QualifiedName) -> Composed:
    return SQL("REVOKE ALL ON FUNCTION {}() FROM PUBLIC").format(name(fn))


def drop_event_trigger(trigger: str) -> Composed:
    return SQL("DROP EVENT TRIGGER IF EXISTS {}").format(col(trigger))


def create_event_trigger(trigger: str, event: str, fn: QualifiedName) -> Composed:
    if event not in dict(GUARD_EVENTS):
        raise ValueError(f"not an event the guard uses: {event!r}")
    return SQL("CREATE EVENT TRIGGER {} ON {} EXECUTE FUNCTION {}()").format(col(trigger), SQL(event), name(fn))


# --------------------------------------------------------------------------- carrying a change to the twin


def replace_check_not_valid(twin: QualifiedName, check: str, definition: str) -> Composed:
    """The CHECK added NOT VALID (no scan under the lock); ``definition`` is pg_get_constraintdef's."""
    c = col(check)
    return SQL("ALTER TABLE {} DROP CONSTRAINT IF EXISTS {}, ADD CONSTRAINT {} {} NOT VALID").format(
        name(twin), c, c, SQL(definition))


def twin_ddl(twin: QualifiedName, kind: str, column: str, detail: dict,
             index: QualifiedName | None = None) -> list[Composed]:
    """The catalog-only statements that carry one change (drift.Change's kind, name, detail)
    to the twin; ``index`` is the twin's index for a drop_index. The detail's type,
    collation, default and CHECK definition are the catalog's own text."""
    c = col(column)
    t = name(twin)
    d = detail
    if kind == "drop_column":
        return [SQL("ALTER TABLE {} DROP COLUMN IF EXISTS {}").format(t, c)]
    if kind == "rename_column":
        return [SQL("ALTER TABLE {} RENAME COLUMN {} TO {}").format(t, col(d["old"]), c)]
    if kind == "add_column":
        stmt = SQL("ALTER TABLE {} ADD COLUMN {} {}").format(t, c, SQL(d["type"]))
        if d["collation"]:
            stmt += SQL(" COLLATE ") + SQL(d["collation"])
        if d["generated"] == "s":
            stmt += SQL(" GENERATED ALWAYS AS ({}) STORED").format(SQL(d["default"]))
        elif d["default"] is not None:
            stmt += SQL(" DEFAULT ") + SQL(d["default"])
        if d["not_null"]:
            stmt += SQL(" NOT NULL")
        return [stmt]
    if kind == "default":
        if d["default"] is None:
            return [SQL("ALTER TABLE {} ALTER COLUMN {} DROP DEFAULT").format(t, c)]
        return [SQL("ALTER TABLE {} ALTER COLUMN {} SET DEFAULT {}").format(t, c, SQL(d["default"]))]
    if kind == "not_null":
        return [SQL("ALTER TABLE {} ALTER COLUMN {} {} NOT NULL").format(t, c, SQL("SET" if d["not_null"]
                                                                                   else "DROP"))]
    if kind == "drop_check":
        return [SQL("ALTER TABLE {} DROP CONSTRAINT IF EXISTS {}").format(t, c)]
    if kind == "add_check":
        definition = d["definition"]
        if not definition.endswith(" NOT VALID"):
            definition += " NOT VALID"  # validated after the lock is released
        return [SQL("ALTER TABLE {} ADD CONSTRAINT {} {}").format(t, c, SQL(definition))]
    if kind == "drop_index":
        assert index is not None, "a drop_index names the twin's index"
        return [drop_index(index)]
    raise ValueError(f"not a catalog-only change: {kind}")


def validate_constraint(table: QualifiedName, constraint: str) -> Composed:
    return SQL("ALTER TABLE {} VALIDATE CONSTRAINT {}").format(name(table), col(constraint))


# --------------------------------------------------------------------------- an index built on the twin


def index_definition_head(unique: bool, qname: str, qtable: str) -> str:
    """How pg_get_indexdef starts for the live index (INDEX_FACTS' quoted name and table):
    a text to match, never executed."""
    return f"CREATE {'UNIQUE ' if unique else ''}INDEX {qname} ON {qtable} USING "


def _head(unique: bool, how: str, index: str, only: str, table: QualifiedName) -> str:
    return text(SQL("CREATE {}INDEX {}{} ON {}{} USING ").format(
        SQL("UNIQUE " if unique else ""), SQL(how), col(index), SQL(only), name(table)))


def create_parent_index(definition: str, head: str, unique: bool, index: str, twin: QualifiedName,
                        add_key: str | None) -> Composed:
    """The live index's definition ON ONLY the twin (catalog only), named ``index``; the key
    appended when given. ``definition`` is pg_get_indexdef's text, starting with ``head``;
    rewrite_index refuses any other, so the result is as safely rendered as it was."""
    return SQL(rewrite_index(definition, head, _head(unique, "IF NOT EXISTS ", index, "ONLY ", twin), add_key))


def create_partition_index(definition: str, head: str, unique: bool, index: str, part: QualifiedName,
                           add_key: str | None) -> Composed:
    """The same index on one partition, CONCURRENTLY (writers go on while it builds)."""
    return SQL(rewrite_index(definition, head, _head(unique, "CONCURRENTLY ", index, "", part), add_key))


def drop_index(index: QualifiedName) -> Composed:
    return SQL("DROP INDEX IF EXISTS {}").format(name(index))


def attach_index(parent_index: QualifiedName, part_index: QualifiedName) -> Composed:
    return SQL("ALTER INDEX {} ATTACH PARTITION {}").format(name(parent_index), name(part_index))
