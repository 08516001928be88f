"""The backfill's statements: a range's WHERE clause, the window's boundary, the probe of the
twin, the copy itself, the batch's session settings, the repair's lock-and-delete, the
reads that name a lock's holder, and the phase's own reads.

Pure functions returning ``psycopg.sql.Composed``; ``orchestrator.phases.backfill`` only
executes what they return. Values that vary per batch (range bounds, cursors, the offset)
are ``%s`` parameters; a column's type (format_type) and ``Shape.cmp``'s operators are the
server's text, embedded as it wrote them.
"""

from __future__ import annotations

from psycopg import sql

from orchestrator.sql import QualifiedName, Shape
from orchestrator.sql.compose import SQL, Composed, Literal, col, cols, composable, name


def range_predicate(shape: Shape, lo: str | None, hi: str | None, is_null: bool) -> tuple[Composed, list[str]]:
    """WHERE clause and parameters selecting one key range (NULL keys are their own range)."""
    k = col(shape.key)
    if is_null:
        return SQL("{} IS NULL").format(k), []
    parts, params = [], []
    t = SQL(shape.key_type)
    if lo is not None:
        parts.append(SQL("{} >= %s::{}").format(k, t))
        params.append(lo)
    if hi is not None:
        parts.append(SQL("{} < %s::{}").format(k, t))
        params.append(hi)
    if not parts:
        parts.append(SQL("{} IS NOT NULL").format(k))
    return SQL(" AND ").join(parts), params


def cursor_columns(shape: Shape, is_null: bool) -> tuple[list[str], list[str]]:
    """The columns a window's cursor holds, and their types: (key, pk...), the pk alone
    in the NULL-key range."""
    columns = list(shape.order_columns)
    types = list(shape.order_types)
    if is_null:  # the key is NULL throughout: order by the primary key alone
        columns, types = columns[1:], types[1:]
        if not columns:
            raise ValueError("a NULL-key range needs a primary key apart from the key")
    return columns, types


def _param(t: str) -> Composed:
    return SQL("%s::") + SQL(t)  # t: format_type's text


def tuple_cmp(columns: list[str], types: list[str], op: str, shape: Shape | None = None) -> Composed:
    """(columns) > (cursor) or (columns) <= (cursor), in the cursor columns' own order.

    A row comparison resolves ``>`` through the search_path, which is pinned to pg_catalog:
    for a column of an extension type (ltree: no such operator; citext: text's, with another
    order than the index) it is written out column by column with the type's operators, and
    then needs the cursor values several times: :func:`cursor_params` lays them out."""
    if shape is None or all(shape.cmp(c, ">") == ">" for c in columns):
        right = SQL(", ").join(_param(t) for t in types)
        return SQL("({}) {} ({})").format(cols(columns), SQL(op), right)
    assert op in (">", "<=")
    terms = []
    for i, c in enumerate(columns):
        eqs = [SQL("{} {} {}").format(col(columns[j]), shape.eq_sql(columns[j]), _param(types[j])) for j in range(i)]
        last = SQL("{} {} {}").format(col(c), SQL(shape.cmp(c, ">")), _param(types[i]))
        terms.append(SQL("(") + SQL(" AND ").join([*eqs, last]) + SQL(")"))
    after = SQL("(") + SQL(" OR ").join(terms) + SQL(")")
    # The leading bound on the first column lets the planner use the index on the key.
    first = SQL("{} {} {}").format(col(columns[0]), SQL(shape.cmp(columns[0], ">=" if op == ">" else "<=")),
                                   _param(types[0]))
    return SQL("({} AND {}{})").format(first, SQL("" if op == ">" else "NOT "), after)


def cursor_params(shape: Shape, is_null: bool, values: list | tuple) -> list:
    """The parameters of one tuple_cmp for the cursor ``values`` (one per cursor column)."""
    columns, _types = cursor_columns(shape, is_null)
    values = list(values)
    if all(shape.cmp(c, ">") == ">" for c in columns):
        return values
    out = [values[0]]
    for i in range(len(columns)):
        out += values[: i + 1]
    return out


def _window(shape: Shape, where: sql.Composable, after: bool, upto: bool, is_null: bool) -> Composed:
    """The range's WHERE, past the cursor (after) and up to the window's bound (upto)."""
    columns, types = cursor_columns(shape, is_null)
    cond = [composable(where)]
    if after:
        cond.append(tuple_cmp(columns, types, ">", shape))
    if upto:
        cond.append(tuple_cmp(columns, types, "<=", shape))
    return SQL(" AND ").join(cond)


def backfill_boundary(src: QualifiedName, shape: Shape, where: sql.Composable, after: bool, is_null: bool) -> Composed:
    """Find the end of the next window: the (key, pk) tuple `batch` rows ahead of the cursor.

    Read without locks: it only chooses where the window ends. Params: where-params,
    cursor values (if after), then the offset.
    """
    columns, _types = cursor_columns(shape, is_null)
    # ORDER BY names the table's columns (s.), never the select list's: an unqualified name
    # there would sort by the output column of the same name, the ::text (ids '10' < '9',
    # citext by bytes), so windows would not follow the order the cursor compares in.
    texts = SQL(", ").join(col(c, "s") + SQL("::text") for c in columns)
    return SQL("SELECT {} FROM {} AS s WHERE {} ORDER BY {} OFFSET %s LIMIT 1").format(
        texts, name(src), _window(shape, where, after, False, is_null), cols(columns, "s"))


def rows_up_to(src: QualifiedName, where: sql.Composable) -> Composed:
    """How many rows the range holds, counted up to a limit (param after the where-params):
    it names no column outside ``where``, so the key's index can answer it alone."""
    return SQL("SELECT pg_catalog.count(*) FROM (SELECT 1 FROM {} WHERE {} LIMIT %s) AS w").format(
        name(src), composable(where))


def twin_rows_after(dst: QualifiedName, shape: Shape, where: sql.Composable, after: bool, is_null: bool) -> Composed:
    """Does the twin hold any row in the rest of a range (after the cursor)? One index probe.

    When it does not, the next window cannot conflict with a row the twin held when this
    ran, and the copy may skip ON CONFLICT (see backfill_copy). Params: where-params, cursor
    values (if after).
    """
    return SQL("SELECT EXISTS (SELECT 1 FROM {} WHERE {})").format(
        name(dst), _window(shape, where, after, False, is_null))


def backfill_copy(src: QualifiedName, dst: QualifiedName, shape: Shape, where: sql.Composable, after: bool,
                  upto: bool, is_null: bool, on_conflict: bool = True) -> Composed:
    """Copy one window of rows, locking them at the source.

    Why FOR SHARE: it closes the resurrection race. A row is copied only once no
    transaction is changing it, and the lock then holds off any UPDATE or DELETE of it
    until this batch commits; the dual-write trigger of that later change finds the copied
    row in the twin. Without the lock, a DELETE that commits between this statement's
    snapshot and its insert deletes nothing in the twin, and the stale copy comes back.
    ON CONFLICT DO NOTHING: the trigger already wrote rows inserted or moved since capture.
    It makes every insert speculative (an extra index probe and WAL record per row, about a
    fifth of the copy's cost), so the backfill drops it (``on_conflict=False``) for a window
    whose twin part was empty at the probe (twin_rows_after). A row the trigger writes into
    that window meanwhile then makes the batch fail with a unique violation, never a wrong
    row, and the batch is redone with ON CONFLICT.
    The window is bounded by values, not by LIMIT, so a row whose key moves while locked is
    rechecked against fixed bounds and can never be skipped by a cursor computed from it.
    Params: where-params, cursor (if after), upper bound (if upto).
    """
    c = cols(shape.columns)
    return SQL("INSERT INTO {} ({}) OVERRIDING SYSTEM VALUE SELECT {} FROM {} WHERE {} FOR SHARE{}").format(
        name(dst), c, c, name(src), _window(shape, where, after, upto, is_null),
        SQL(" ON CONFLICT DO NOTHING" if on_conflict else ""))


def synchronous_commit(value: str) -> Composed:
    """``SET LOCAL synchronous_commit``: 'on' or 'off' (plan backfill.synchronous_commit)."""
    if value not in ("on", "off"):
        raise ValueError(f"synchronous_commit {value!r}")
    return SQL("SET LOCAL synchronous_commit = {}").format(SQL(value))


def lock_timeout(ms: int) -> Composed:
    """``SET LOCAL lock_timeout`` in milliseconds (0: no limit)."""
    return SQL("SET LOCAL lock_timeout = {}").format(Literal(int(ms)))


def lock_range(table: QualifiedName, where: sql.Composable) -> Composed:
    """FOR SHARE on the range's live rows; ``where``: range_predicate's."""
    return SQL("SELECT 1 FROM {} WHERE {} FOR SHARE").format(name(table), composable(where))


def delete_range(table: QualifiedName, where: sql.Composable) -> Composed:
    """``where``: range_predicate's."""
    return SQL("DELETE FROM {} WHERE {}").format(name(table), composable(where))


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
    return SQL(
        "SELECT a.pid, coalesce(a.state, 'unknown'), extract(epoch FROM now() - a.state_change)::bigint, "
        "extract(epoch FROM now() - a.xact_start)::bigint, a.application_name "
        "FROM pg_catalog.pg_stat_activity a WHERE a.pid <> pg_catalog.pg_backend_pid() AND {}"
        " ORDER BY a.xact_start LIMIT 1").format(composable(where, "holder()'s condition"))


# Is the owner's executor missing? Parameter: its regprocedure text, ``fn(text)``.
EXECUTOR_MISSING = SQL("SELECT pg_catalog.to_regprocedure(%s) IS NULL")
RANGES_LEFT = SQL("SELECT count(*) FROM orchestrate.ranges WHERE migration_id = %s AND state <> 'copied'")
# An xid newer than every batch, as the 32-bit xid pg_stat_activity's backend_xmin compares with.
# Run without parameters: the % is the operator.
CURRENT_XID = SQL("SELECT (pg_catalog.txid_current() % 4294967296)::text")
