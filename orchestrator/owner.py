"""Acting as the table's owner: the boundary for every write into the owner's tables.

Code the table owner controls (CHECK functions, defaults, generated columns, index
expressions, triggers and rules on the owner's tables, RLS policies) runs with the rights
of whoever writes those tables. So orchestrate never writes them as itself: the sync
trigger functions and one executor function per migration (``orchestrate.as_owner_<id>``)
are SECURITY DEFINER functions owned by the table owner. Inside a SECURITY DEFINER
function PostgreSQL refuses SET ROLE / RESET ROLE / SET SESSION AUTHORIZATION, so owner
code reached from there cannot climb back to the running role (unlike ``SET ROLE owner``,
which the owner's code could simply RESET).

The functions live in the state schema, which the owner has no USAGE on: an owner cannot
look them up by name, so cannot ALTER them (SECURITY INVOKER, a new body). The executor
also checks ``current_user`` itself before it runs anything.

Three ways to run (README "Security model"): as the owner itself (nothing is borrowed),
as a superuser (ALTER FUNCTION ... OWNER TO owner), or as a non-superuser member of the
owner role (the owner gets CREATE on the state schema for the ALTER only, revoked in the
same transaction, so it is never visible to the owner).
"""

from __future__ import annotations

import psycopg
from psycopg import sql

from orchestrator.errors import PreflightError
from orchestrator.sql import QualifiedName, ident
from orchestrator.sql import owner as owner_sql
from orchestrator.sql.compose import SQL, text

EXECUTOR = "as_owner"
MONITOR_HINT = "the role running orchestrate needs pg_monitor (or pg_read_all_stats): GRANT pg_monitor TO it"


def sees_all_sessions(conn: psycopg.Connection) -> bool:
    """Can this session see every role's xact_start and backend_xmin (superuser, or
    pg_read_all_stats, which pg_monitor includes)? Checks that need them fail closed if not."""
    return bool(conn.execute(owner_sql.SEES_ALL_SESSIONS).fetchone()[0])


def acting_mode(cur: psycopg.Cursor, owner: str) -> str:
    """'owner', 'superuser' or 'member': how this session can act as ``owner``.

    Raises PreflightError (exit 3) when it cannot act as the owner at all."""
    cur.execute(owner_sql.ACTING_MODE, (owner, owner))
    is_owner, is_super, member = cur.fetchone()
    if is_owner:
        return "owner"
    if is_super:
        return "superuser"
    if member:
        return "member"
    raise PreflightError(
        f"the role running orchestrate ({_current(cur)}) is neither the table's owner ({owner}), a member of it, "
        "nor a superuser: it cannot create the twin and the functions as the owner. Run as the owner "
        f"(or GRANT {ident(owner)} TO {ident(_current(cur))})")


def _current(cur: psycopg.Cursor) -> str:
    return cur.execute(owner_sql.CURRENT_USER).fetchone()[0]


def give_to_owner(cur: psycopg.Cursor, signature: str, owner: str, *, executable_by_us: bool = False) -> None:
    """Make the function ``signature`` (e.g. ``orchestrate.capture_7()``) the owner's,
    SECURITY DEFINER, not executable by PUBLIC (triggers need no EXECUTE to fire).

    Warning: in 'member' mode this grants the owner CREATE on the state schema for one
    statement; call it inside the transaction that created the function, so the grant
    never commits."""
    mode = acting_mode(cur, owner)
    # The signature is regprocedure text with its name already quoted (QualifiedName's str,
    # sql.changelog.signature), so it is embedded as SQL (see orchestrator.sql.owner).
    fn = SQL(signature)
    cur.execute(owner_sql.security_definer(fn))
    if mode == "superuser":
        cur.execute(owner_sql.owner_to(fn, owner))
    elif mode == "member":
        # A non-superuser may give an object away only to a role with CREATE on its schema.
        cur.execute(owner_sql.grant_create_on_state_schema(owner))
        cur.execute(owner_sql.owner_to(fn, owner))
        cur.execute(owner_sql.revoke_create_on_state_schema(owner))
    cur.execute(owner_sql.revoke_from_public(fn))
    if executable_by_us and mode != "owner":
        cur.execute(owner_sql.grant_execute_to_us(fn))


executor_function = owner_sql.executor_function  # the statement lives in orchestrator.sql.owner


def install_executor(cur: psycopg.Cursor, fn: QualifiedName, owner: str) -> None:
    """Create the executor, owned by the table owner, callable by the running role only."""
    cur.execute(executor_function(fn, owner))
    give_to_owner(cur, f"{fn}(text)", owner, executable_by_us=True)


def render(cur: psycopg.Cursor, query: str | sql.Composable, params: list | tuple) -> str:
    """The statement with its parameters inlined as quoted literals (psycopg's own quoting),
    for the executor, which takes one text argument (so a str, not a Composed).

    psycopg's client-side binding reads every ``%`` of the query text as a placeholder, also
    one inside a quoted name (``"100% orders"``): a Composed has the ``%`` of its identifiers
    and literals doubled first (owner_sql.bindable), so the name comes out as it was. A str
    query (the older renderers') is bound as before: its author wrote %% for a literal %."""
    if isinstance(query, sql.Composable):
        query = owner_sql.bindable(query, cur)
    return psycopg.ClientCursor(cur.connection).mogrify(query, params)


def call(fn: QualifiedName) -> str:
    """The executor call as an expression (param: the rendered statement). A str, rendered
    from owner_sql.call: the state store formats it into its own batch statement's text."""
    return text(owner_sql.call(fn))


as_owner_sql = owner_sql.as_owner_sql  # runs one rendered statement through the executor


def table_executor(conn: psycopg.Connection, table_oid: int) -> tuple[QualifiedName, str]:
    """(executor, owner) for work outside a migration (maintain): one executor per owner role,
    ``orchestrate.as_owner_r<role oid>``, (re)created here, so it is always current.

    Needs the state schema (created if missing, refused if another role controls it)."""
    from orchestrator.state.store import ensure_schema

    ensure_schema(conn)
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(owner_sql.TABLE_OWNER_ROLE, (table_oid,))
        owner_oid, owner = cur.fetchone()
        fn = QualifiedName("orchestrate", f"{EXECUTOR}_r{owner_oid}")
        install_executor(cur, fn, owner)
    return fn, owner
