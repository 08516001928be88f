"""The owner boundary's statements: role checks, giving a function to the table owner, and the
owner's executor function (see :mod:`orchestrator.owner` for why each exists).

Security-critical text, kept exactly as it was: every catalog name is schema-qualified
(``pg_catalog.``), the executor pins ``search_path = pg_catalog, pg_temp`` and checks
``current_user`` itself. Pure functions; identifiers through ``sql.Identifier``, values as
query parameters or ``sql.Literal``.
"""

from __future__ import annotations

from psycopg import sql

from orchestrator.sql import QualifiedName
from orchestrator.sql.compose import SQL, Composed, Literal, name, with_body

__all__ = [
    "SEES_ALL_SESSIONS", "ACTING_MODE", "CURRENT_USER", "TABLE_OWNER_ROLE", "STATE_SCHEMA",
    "security_definer", "owner_to", "grant_create_on_state_schema", "revoke_create_on_state_schema",
    "revoke_from_public", "grant_execute_to_us", "executor_function", "call", "as_owner_sql", "bindable",
]

#: The state schema the owner-owned functions live in (the owner has no USAGE on it).
STATE_SCHEMA = "orchestrate"

# --------------------------------------------------------------------------- fixed statements

SEES_ALL_SESSIONS = SQL(
    "SELECT r.rolsuper OR pg_catalog.pg_has_role(current_user, 'pg_read_all_stats', 'USAGE') "
    "FROM pg_catalog.pg_roles r WHERE r.rolname = current_user")
#: Params: the owner, twice.
ACTING_MODE = SQL(
    "SELECT current_user = %s::name, r.rolsuper, pg_catalog.pg_has_role(current_user, %s::name, 'MEMBER') "
    "FROM pg_catalog.pg_roles r WHERE r.rolname = current_user")
CURRENT_USER = SQL("SELECT current_user::text")
#: Param: the table's oid.
TABLE_OWNER_ROLE = SQL(
    "SELECT relowner::int, pg_catalog.pg_get_userbyid(relowner)::text FROM pg_catalog.pg_class WHERE oid = %s")

# --------------------------------------------------------------------------- giving a function away
# ``signature`` is a function's regprocedure text, e.g. ``"orchestrate"."capture_7"()``: its
# name already quoted by the renderers (QualifiedName's str, sql.changelog.signature) and its
# argument list a fixed type list of ours, so it is embedded with SQL(...).


def security_definer(signature: sql.Composable) -> Composed:
    return SQL("ALTER FUNCTION {} SECURITY DEFINER").format(signature)


def owner_to(signature: sql.Composable, owner: str) -> Composed:
    return SQL("ALTER FUNCTION {} OWNER TO {}").format(signature, sql.Identifier(owner))


def grant_create_on_state_schema(owner: str) -> Composed:
    return SQL("GRANT CREATE ON SCHEMA {} TO {}").format(sql.Identifier(STATE_SCHEMA), sql.Identifier(owner))


def revoke_create_on_state_schema(owner: str) -> Composed:
    return SQL("REVOKE CREATE ON SCHEMA {} FROM {}").format(sql.Identifier(STATE_SCHEMA), sql.Identifier(owner))


def revoke_from_public(signature: sql.Composable) -> Composed:
    return SQL("REVOKE ALL ON FUNCTION {} FROM PUBLIC").format(signature)


def grant_execute_to_us(signature: sql.Composable) -> Composed:
    return SQL("GRANT EXECUTE ON FUNCTION {} TO CURRENT_USER").format(signature)


# --------------------------------------------------------------------------- the executor


def executor_function(fn: QualifiedName, owner: str) -> Composed:
    """``fn(q text) RETURNS bigint``: EXECUTE one statement as the owner, return its row count.

    ``row_security = off``: a query the owner's RLS policies would filter (FORCE ROW LEVEL
    SECURITY) raises instead of silently copying fewer rows. The ``%`` of RAISE is
    PL/pgSQL's; the statement is run without parameters, so psycopg leaves it alone."""
    return with_body(SQL("""CREATE OR REPLACE FUNCTION {fn}(q text) RETURNS bigint LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp SET row_security = off AS {q}
DECLARE n bigint;
BEGIN
  IF current_user OPERATOR(pg_catalog.<>) {owner}::pg_catalog.name THEN
    RAISE EXCEPTION 'orchestrate: % runs as %, not as the table owner', {label}, current_user;
  END IF;
  EXECUTE q;
  GET DIAGNOSTICS n = ROW_COUNT;
  RETURN n;
END
{q}"""), fn=name(fn), owner=Literal(owner), label=Literal(str(fn)))


def call(fn: QualifiedName) -> Composed:
    """The executor call as an expression (param: the rendered statement)."""
    return SQL("{}(%s::text)").format(name(fn))


def as_owner_sql(fn: QualifiedName) -> Composed:
    """The query that runs one rendered statement through the executor; returns its row count."""
    return SQL("SELECT {}").format(call(fn))


def bindable(statement: sql.Composable, context=None) -> sql.Composable:
    """``statement`` with the ``%`` of its identifiers and literals doubled, for psycopg's
    client-side binding, which reads every ``%`` of the query text as a placeholder (a table
    named ``100% orders`` failed with "the query has 1 placeholders but 0 parameters").
    The SQL(...) parts are ours and already write a literal % as %%; placeholders stay.
    ``context``: the connection or cursor the names are quoted for (None: standard quoting)."""
    if isinstance(statement, sql.Composed):
        return sql.Composed([bindable(part, context) for part in statement])
    if isinstance(statement, (sql.Identifier, sql.Literal)):
        rendered = statement.as_string(context)
        # Catalog-free quoted text, only its % doubled: SQL(...) is the way to embed it.
        return SQL(rendered.replace("%", "%%")) if "%" in rendered else statement
    return statement
