"""Async capture's statements: the change log, its capture trigger functions, replay and lag.

Pure functions; :mod:`orchestrator.changelog` only executes what they return (why each
function does what it does is explained there). Identifiers pass through
``sql.Identifier``; PL/pgSQL's record names (``NEW``, ``OLD``) and ``EXCLUDED`` stay bare
keywords in front of them. ``Shape.eq`` (``=`` or a schema-qualified ``OPERATOR(...)``
read from the catalog) is embedded with ``SQL(...)`` as the server rendered it. A function
body is dollar-quoted by ``compose.with_body``, with a tag no column name holds.
"""

from __future__ import annotations

from collections.abc import Sequence

from psycopg import sql as pgsql

from orchestrator.sql import QualifiedName, Shape
from orchestrator.sql.compose import SQL, Composed, Literal, col, cols, name, text, with_body
from orchestrator.sql.sync import fields, key_changed

SEQ = "orchestrate_seq"
TRUNCATE = "orchestrate_truncate"
AT = "orchestrate_at"
GONE = "orchestrate_gone"

__all__ = [
    "SEQ", "TRUNCATE", "AT", "GONE", "REGCLASS", "REGCLASS_OID", "REGPROCEDURE_EXISTS", "signature", "create_log",
    "log_function", "truncate_log_function", "replay_function", "lag_function", "pending_filter", "grant_select",
    "drop_table", "drop_function", "replay_call", "lag_query", "pending_truncate",
]

#: Param: a relation's name (text). NULL when it does not exist.
REGCLASS = SQL("SELECT pg_catalog.to_regclass(%s)")
REGCLASS_OID = SQL("SELECT pg_catalog.to_regclass(%s)::oid")
#: Param: a function's signature (:func:`signature`).
REGPROCEDURE_EXISTS = SQL("SELECT pg_catalog.to_regprocedure(%s) IS NOT NULL")


def signature(fn: QualifiedName, args: str = "") -> str:
    """``schema.fn(args)`` as regprocedure input and for ALTER FUNCTION (args: a fixed type list)."""
    return text(name(fn)) + f"({args})"


def _match(shape: Shape, columns: Sequence[str], left, right) -> Composed:
    """``left.c = right.c AND ...``; left and right are aliases (str) or a table (QualifiedName)."""
    def ref(owner, c: str):
        return col(c, owner) if isinstance(owner, str) else col_of(owner, c)

    return SQL(" AND ").join(SQL("{} {} {}").format(ref(left, c), shape.eq_sql(c), ref(right, c)) for c in columns)


def col_of(table: QualifiedName, column: str) -> pgsql.Identifier:
    """``schema.table.column``: a column of a table named in full (a correlated reference)."""
    return pgsql.Identifier(table.schema, table.name, column)


# --------------------------------------------------------------------------- the log and its trigger


def create_log(log: QualifiedName, src: QualifiedName, shape: Shape) -> list[Composed]:
    """The log (its key columns made from the table itself), its bookkeeping columns, its index."""
    return [
        SQL("CREATE TABLE {} AS SELECT {} FROM ONLY {} WITH NO DATA").format(name(log), cols(shape.twin_key),
                                                                           name(src)),
        SQL("ALTER TABLE {} ADD COLUMN {} bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, "
            "ADD COLUMN {} boolean NOT NULL DEFAULT false, "
            "ADD COLUMN {} boolean NOT NULL DEFAULT false, "
            "ADD COLUMN {} timestamptz NOT NULL DEFAULT pg_catalog.statement_timestamp()").format(
            name(log), col(SEQ), col(TRUNCATE), col(GONE), col(AT)),
        # Replay and verify read the log by key; an index keeps the anti-join cheap when it grows.
        SQL("CREATE INDEX ON {} ({})").format(name(log), cols(shape.pk)),
    ]


def log_function(fn: QualifiedName, log: QualifiedName, shape: Shape) -> Composed:
    """The row trigger: one narrow INSERT of the changed row's twin key (OLD and NEW on a move)."""
    c = cols(shape.twin_key)
    gc = cols((*shape.twin_key, GONE))
    new, old = fields("NEW", shape.twin_key), fields("OLD", shape.twin_key)
    return with_body(SQL("""CREATE OR REPLACE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS {q}
BEGIN
  IF TG_OP = 'INSERT' THEN
    INSERT INTO {log} ({cols}) VALUES ({new});
  ELSIF TG_OP = 'DELETE' THEN
    INSERT INTO {log} ({gcols}) VALUES ({old}, true);
  ELSIF {changed} THEN
    INSERT INTO {log} ({gcols}) VALUES ({old}, true), ({new}, false);
  ELSE
    INSERT INTO {log} ({cols}) VALUES ({new});
  END IF;
  RETURN NULL;
END
{q}"""), fn=name(fn), log=name(log), cols=c, gcols=gc, new=new, old=old, changed=key_changed(shape))


def truncate_log_function(fn: QualifiedName, log: QualifiedName) -> Composed:
    return with_body(SQL("""CREATE OR REPLACE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS {q}
BEGIN
  INSERT INTO {log} ({truncate}) VALUES (true);
  RETURN NULL;
END
{q}"""), fn=name(fn), log=name(log), truncate=col(TRUNCATE))


# --------------------------------------------------------------------------- replay


def replay_function(fn: QualifiedName, src: QualifiedName, twin: QualifiedName, log: QualifiedName,
                    shape: Shape, owner: str) -> Composed:
    """``fn(n integer) RETURNS bigint``: replay up to n log rows (the steps: changelog.replay_function)."""
    pk, key = shape.pk, shape.key
    tk = shape.twin_key
    lg = name(log)
    batch = SQL("{} OPERATOR(pg_catalog.=) ANY (s) AND NOT {}").format(col(SEQ, "l"), col(TRUNCATE, "l"))
    gone = batch + SQL(" AND ") + col(GONE, "l")

    def values(c: str, where: Composed = batch) -> Composed:
        # An initplan: evaluated once, then an index condition (and partition pruning for the key).
        return SQL("ARRAY(SELECT DISTINCT {} FROM {} l WHERE {})").format(col(c, "l"), lg, where)

    def in_batch(alias: str, where: Composed = batch) -> Composed:
        conds = [SQL("{} {} ANY ({})").format(col(c, alias), shape.eq_sql(c), values(c, where))
                 for c in pk if c != key]
        if len(pk) > 1 or not conds:
            # The arrays drive the index scan; the exact key tuple comes from the batch itself.
            conds.append(SQL("EXISTS (SELECT 1 FROM {} l WHERE {} AND {})").format(
                lg, where, _match(shape, tuple(pk), alias, "l")))
        return SQL(" AND ").join(conds)

    def still_there() -> Composed:
        # The live row with this twin row's (pk..., key), if any: then the row stays.
        conds = [SQL("{} {} {}").format(col(c, "s"), shape.eq_sql(c), col(c, "t"))
                 for c in tk if c != key or not shape.key_nullable]
        if shape.key_nullable:
            sk, tk_ = col(key, "s"), col(key, "t")
            conds.append(SQL("({} = {} OR ({} IS NULL AND {} IS NULL))").format(sk, tk_, sk, tk_))
        return SQL("EXISTS (SELECT 1 FROM ONLY {} s WHERE {})").format(name(src), SQL(" AND ").join(conds))

    tkey = col(key, "t")
    key_cond = SQL("({} = ANY ({})").format(tkey, values(key, gone))
    if shape.key_nullable:
        key_cond += SQL(" OR (has_null AND {} IS NULL)").format(tkey)
    key_cond += SQL(")")
    rest = [c for c in shape.columns if c not in tk]
    sets = SQL(", ").join(SQL("{} = EXCLUDED.").format(col(c)) + col(c) for c in rest)
    conflict = SQL("DO UPDATE SET {}").format(sets) if rest else SQL("DO NOTHING")
    return with_body(SQL("""CREATE OR REPLACE FUNCTION {fn}(n integer) RETURNS bigint LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp SET row_security = off AS {q}
DECLARE
  s bigint[];
  trunc boolean;
  has_null boolean;
  any_gone boolean;
  has_rows boolean;
BEGIN
  IF current_user OPERATOR(pg_catalog.<>) {owner}::pg_catalog.name THEN
    RAISE EXCEPTION 'orchestrate: % runs as %, not as the table owner', {fn_text}, current_user;
  END IF;
  SELECT pg_catalog.array_agg({b_seq}), pg_catalog.bool_or({b_trunc}) INTO s, trunc
    FROM (SELECT {seq}, {trunc} FROM {log} ORDER BY {seq} LIMIT n) b;
  IF s IS NULL THEN
    RETURN 0;
  END IF;
  IF trunc THEN
    DELETE FROM {twin};
  END IF;
  SELECT pg_catalog.count(*) > 0, pg_catalog.bool_or({l_gone}), pg_catalog.bool_or({l_gone} AND
         {l_key} IS NULL) INTO STRICT has_rows, any_gone, has_null
    FROM {log} l WHERE {batch};
  IF any_gone THEN
    DELETE FROM {twin} t WHERE {key_cond} AND {gone_rows} AND NOT {still_there};
  END IF;
  IF has_rows THEN
    INSERT INTO {twin} ({cols}) OVERRIDING SYSTEM VALUE
      SELECT {cols} FROM ONLY {src} t WHERE {batch_rows}
      ON CONFLICT ({twin_key}) {conflict};
  END IF;
  DELETE FROM {log} WHERE {seq} OPERATOR(pg_catalog.=) ANY (s);
  RETURN pg_catalog.cardinality(s);
END
{q}"""),
        fn=name(fn), owner=Literal(owner), fn_text=Literal(str(fn)), b_seq=col(SEQ, "b"), b_trunc=col(TRUNCATE, "b"),
        seq=col(SEQ), trunc=col(TRUNCATE), log=lg, twin=name(twin), l_gone=col(GONE, "l"), l_key=col(key, "l"),
        batch=batch, key_cond=key_cond, gone_rows=in_batch("t", gone), still_there=still_there(),
        cols=cols(shape.columns), src=name(src), batch_rows=in_batch("t"), twin_key=cols(tk), conflict=conflict)


#: Below this distance between the log's lowest and highest sequence numbers the lag
#: function counts the log exactly (a scan of at most this many narrow rows).
LAG_EXACT_SPAN = 100_000


def lag_function(fn: QualifiedName, log: QualifiedName) -> Composed:
    """``fn() -> (pending bigint, oldest_s float8)``: log rows waiting, and the age of the next
    one to replay (the lowest sequence number). Read every half second by the throttle and
    status, so it never scans a large log: the bounds come from the sequence's index, and the
    exact count (through the same index: a log emptied by replay keeps its heap until vacuum)
    only when they are less than LAG_EXACT_SPAN apart (beyond, their distance: an
    upper bound, since rolled-back writers and out-of-order commits leave gaps)."""
    seq = col(SEQ)
    return with_body(SQL("""CREATE OR REPLACE FUNCTION {fn}(OUT pending bigint, OUT oldest_s double precision)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS {q}
SELECT CASE WHEN b.lo IS NULL THEN 0
            WHEN b.hi OPERATOR(pg_catalog.-) b.lo OPERATOR(pg_catalog.<) {span}
            THEN (SELECT pg_catalog.count(*) FROM {log} c WHERE c.{seq} OPERATOR(pg_catalog.>=) b.lo
                  AND c.{seq} OPERATOR(pg_catalog.<=) b.hi)
            ELSE b.hi OPERATOR(pg_catalog.-) b.lo OPERATOR(pg_catalog.+) 1 END,
       coalesce(extract(epoch FROM pg_catalog.clock_timestamp() OPERATOR(pg_catalog.-)
       (SELECT {at} FROM {log} ORDER BY {seq} LIMIT 1))::double precision, 0)
  FROM (SELECT pg_catalog.min({seq}) AS lo, pg_catalog.max({seq}) AS hi FROM {log}) b
{q}"""), fn=name(fn), at=col(AT), seq=seq, log=name(log), span=Literal(LAG_EXACT_SPAN))


def pending_filter(shape: Shape, log: QualifiedName, table: QualifiedName) -> Composed:
    """A condition on ``table``'s rows: not pending in the log (verify's consistent point)."""
    return SQL("NOT EXISTS (SELECT 1 FROM {} l WHERE NOT {} AND {})").format(
        name(log), col(TRUNCATE, "l"), _match(shape, tuple(shape.pk), "l", table))


# --------------------------------------------------------------------------- acting on it


def grant_select(log: QualifiedName, role: str) -> Composed:
    return SQL("GRANT SELECT ON {} TO {}").format(name(log), col(role))


def drop_table(log: QualifiedName) -> Composed:
    return SQL("DROP TABLE {}").format(name(log))


def drop_function(fn: QualifiedName, args: str = "") -> Composed:
    """``DROP FUNCTION IF EXISTS fn(args)``; args a fixed type list ('' or 'integer')."""
    if args not in ("", "integer"):
        raise ValueError(f"unexpected argument list: {args!r}")
    return SQL("DROP FUNCTION IF EXISTS {}({})").format(name(fn), SQL(args))


def replay_call(fn: QualifiedName) -> Composed:
    """Param: the batch size."""
    return SQL("SELECT {}(%s)").format(name(fn))


def lag_query(fn: QualifiedName) -> Composed:
    return SQL("SELECT * FROM {}()").format(name(fn))


def pending_truncate(log: QualifiedName) -> Composed:
    return SQL("SELECT EXISTS (SELECT 1 FROM {} WHERE {})").format(name(log), col(TRUNCATE))
