"""Pure SQL rendering: every identifier and literal the orchestrator emits passes here.

Nothing in this module talks to a database, so the unit tests can read the SQL it
renders. Identifiers are quoted by :func:`ident` only; values travel as query
parameters wherever PostgreSQL allows it, and as :func:`literal` where it does not
(DDL such as partition bounds).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_PLAIN = re.compile(r"^[a-z_][a-z0-9_$]*$")
# Words that must be quoted even when they look plain (reserved in PostgreSQL).
_RESERVED = frozenset(
    """all analyse analyze and any array as asc asymmetric both case cast check collate column
    constraint create current_catalog current_date current_role current_time current_timestamp
    current_user default deferrable desc distinct do else end except false fetch for foreign
    from grant group having in initially intersect into lateral leading limit localtime
    localtimestamp not null offset on only or order placing primary references returning
    select session_user some symmetric system_user table then to trailing true union unique
    user using variadic when where window with authorization binary collation concurrently
    cross current_schema freeze full ilike inner is isnull join left like natural notnull
    outer overlaps right similar tablesample verbose""".split()
)
MAX_IDENT = 63


def ident(name: str) -> str:
    """Quote one identifier the way PostgreSQL's quote_ident does."""
    if not name:
        raise ValueError("empty identifier")
    if "\x00" in name:
        raise ValueError("identifier contains a NUL byte")
    if _PLAIN.match(name) and name not in _RESERVED:
        return name
    return '"' + name.replace('"', '""') + '"'


def fit_name(base: str, suffix: str) -> str:
    """``base + suffix`` within PostgreSQL's 63 bytes, unique per base: when too long, the base
    is cut and a hash of the whole base is put before the suffix, so two long names that
    share their first 50 bytes never truncate to the same identifier."""
    name = base + suffix
    if len(name.encode()) <= MAX_IDENT:
        return name
    import hashlib

    h = "_" + hashlib.sha1(base.encode()).hexdigest()[:8]
    room = MAX_IDENT - len(h.encode()) - len(suffix.encode())
    return base.encode()[:room].decode(errors="ignore") + h + suffix


def literal(value: str) -> str:
    """Quote a string literal (standard_conforming_strings on, E'' never used)."""
    if "\x00" in value:
        raise ValueError("literal contains a NUL byte")
    return "'" + value.replace("'", "''") + "'"


@dataclass(frozen=True, order=True)
class QualifiedName:
    """A schema-qualified relation name, stored unquoted (as in pg_class)."""

    schema: str
    name: str

    def __str__(self) -> str:
        return f"{ident(self.schema)}.{ident(self.name)}"

    @property
    def display(self) -> str:
        return str(self)

    def with_name(self, name: str) -> QualifiedName:
        return QualifiedName(self.schema, name)


_IDENT_TOKEN = re.compile(r'"((?:[^"]|"")+)"|([A-Za-z_][A-Za-z0-9_$]*)')


def parse_qualified(text: str, default_schema: str = "public") -> QualifiedName:
    """Parse ``schema.table`` with PostgreSQL's rules: unquoted parts fold to lower case,
    double-quoted parts keep their case. Anything else (spaces, semicolons, extra parts)
    is refused with ValueError, so SQL can never ride in on a table name."""
    parts: list[str] = []
    pos = 0
    text = text.strip()
    while True:
        m = _IDENT_TOKEN.match(text, pos)
        if not m:
            raise ValueError(f"{text!r} is not a table name (expected schema.table)")
        parts.append(m.group(1).replace('""', '"') if m.group(1) is not None else m.group(2).lower())
        pos = m.end()
        if pos == len(text):
            break
        if text[pos] != ".":
            raise ValueError(f"{text!r} is not a table name (unexpected {text[pos]!r} at position {pos})")
        pos += 1
    if len(parts) > 2:
        raise ValueError(f"{text!r} is not a table name (too many dots)")
    for p in parts:
        if len(p.encode()) > MAX_IDENT:
            raise ValueError(f"{p!r} is longer than PostgreSQL's {MAX_IDENT}-byte identifier limit")
    if len(parts) == 1:
        return QualifiedName(default_schema, parts[0])
    return QualifiedName(parts[0], parts[1])


def column_list(columns: list[str], prefix: str = "") -> str:
    """``a, "B", c`` or with a prefix ``NEW.a, NEW."B"``."""
    return ", ".join(prefix + ident(c) for c in columns)


# --------------------------------------------------------------------------------------
# Rendering for the phases. A Shape holds what every statement needs to know about the
# table pair; functions below turn it into SQL text. Values that vary per call (range
# bounds, cursors) are left as %s placeholders for psycopg.
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """The columns and keys shared by the live table and its twin."""

    columns: tuple[str, ...]  # writable columns (generated ones excluded), in table order
    all_columns: tuple[str, ...]  # every column, generated ones included (for hashing)
    pk: tuple[str, ...]  # the live table's primary key columns
    key: str  # partition key column
    key_type: str  # format_type of the key
    key_nullable: bool
    pk_types: tuple[str, ...] = ()
    eq_ops: tuple[tuple[str, str], ...] = ()  # (column, qualified equality operator) for extension types
    dist: str | None = None  # Citus distribution column (distributed mode), part of the twin's key

    def eq(self, column: str) -> str:
        """The equality operator to match ``column`` with: ``=``, or the type's own btree
        operator schema-qualified (search_path is pinned to pg_catalog in our functions)."""
        return dict(self.eq_ops).get(column) or "="

    def cmp(self, column: str, op: str) -> str:
        """The ordering operator ``op`` (``<``, ``>``, ...) for ``column``, from the same btree
        operator family as :meth:`eq` (``OPERATOR(public.>)`` for ltree or citext), so a
        comparison orders exactly as ORDER BY and the key's index do."""
        eq = dict(self.eq_ops).get(column)
        return f"{eq[:-2]}{op})" if eq else op

    @property
    def order_columns(self) -> tuple[str, ...]:
        """(key, pk...) without repeating the key when it is part of the primary key."""
        return (self.key, *[c for c in self.pk if c != self.key])

    @property
    def order_types(self) -> tuple[str, ...]:
        types = dict(zip(self.pk, self.pk_types, strict=False))
        return (self.key_type, *[types[c] for c in self.pk if c != self.key])

    @property
    def twin_key(self) -> tuple[str, ...]:
        """The twin's primary key: the live key plus the partition key (and, distributed, the
        distribution column: Citus enforces a unique key only if it holds that column)."""
        key = self.pk if self.key in self.pk else (*self.pk, self.key)
        return key if self.dist is None or self.dist in key else (*key, self.dist)


def timestamp_text(t) -> str:
    """A naive timestamp as the text of a bound or a label ('2026-01-01 00:00:00')."""
    return t.strftime("%Y-%m-%d %H:%M:%S")


def bound_literal(value: str | None, key_type: str) -> str:
    """A partition bound literal; value is 'YYYY-MM-DD HH:MM:SS' meaning UTC."""
    if value is None:
        return "MAXVALUE"
    if key_type == "date":
        return literal(value[:10])
    if re.sub(r"\(\d+\)", "", key_type).startswith("timestamp with time zone"):  # timestamp(3) too
        return literal(value + "+00")
    return literal(value)


def create_twin(src: QualifiedName, twin: QualifiedName, key: str) -> str:
    """The partitioned twin: same columns, defaults, NOT NULL, CHECKs, generated and identity
    columns, storage, comments and extended statistics. Indexes are added separately because
    a partitioned table's unique indexes must include the partition key."""
    return (
        f"CREATE TABLE {twin} (LIKE {src} INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING GENERATED "
        f"INCLUDING IDENTITY INCLUDING STORAGE INCLUDING COMMENTS INCLUDING COMPRESSION INCLUDING STATISTICS) "
        f"PARTITION BY RANGE ({ident(key)})"
    )


def twin_primary_key(twin: QualifiedName, shape: Shape) -> str:
    """PRIMARY KEY (pk..., key); with a nullable key a UNIQUE NULLS NOT DISTINCT constraint
    instead, because primary key columns cannot hold the NULL keys the default partition takes."""
    cols = column_list(list(shape.twin_key))
    if shape.key_nullable and shape.key not in shape.pk:
        return f"ALTER TABLE {twin} ADD UNIQUE NULLS NOT DISTINCT ({cols})"
    return f"ALTER TABLE {twin} ADD PRIMARY KEY ({cols})"


def rewrite_index(definition: str, prefix: str, new_prefix: str, add_key: str | None = None) -> str:
    """Point an index definition at another table (and optionally append the key column).

    ``prefix`` is the exact head PostgreSQL rendered (``CREATE INDEX name ON tbl USING ``);
    refusing anything else keeps this from ever guessing at SQL it did not render.
    """
    if not definition.startswith(prefix):
        raise ValueError(f"unexpected index definition: {definition}")
    rest = definition[len(prefix):]
    if add_key is not None:
        # rest = "btree (a, b) INCLUDE (c) WHERE ...": insert the key before the first
        # top-level closing parenthesis of the key list.
        depth, in_quote = 0, False
        for i, ch in enumerate(rest):
            if ch == '"':
                in_quote = not in_quote
            elif not in_quote and ch == "(":
                depth += 1
            elif not in_quote and ch == ")":
                depth -= 1
                if depth == 0:
                    rest = rest[:i] + ", " + ident(add_key) + rest[i:]
                    break
        else:
            raise ValueError(f"cannot find the key list in: {definition}")
    return new_prefix + rest


def create_partition(part: QualifiedName, parent: QualifiedName, lo: str, hi: str, key_type: str) -> str:
    return (
        f"CREATE TABLE {part} PARTITION OF {parent} FOR VALUES FROM ({bound_literal(lo, key_type)}) "
        f"TO ({bound_literal(hi, key_type)})"
    )


def create_default_partition(part: QualifiedName, parent: QualifiedName) -> str:
    return f"CREATE TABLE {part} PARTITION OF {parent} DEFAULT"


def _key_match(shape: Shape, rec: str) -> str:
    """WHERE clause that finds rec's row in the other table by (pk..., key).

    The key is part of the match so the planner prunes to one partition. A NULL key needs
    IS NULL (= never matches NULL); the caller branches on it so both forms stay indexable.
    """
    return " AND ".join(f"{ident(c)} {shape.eq(c)} {rec}.{ident(c)}" for c in shape.twin_key)


def _key_match_null(shape: Shape, rec: str) -> str:
    parts = [f"{ident(c)} {shape.eq(c)} {rec}.{ident(c)}" for c in shape.pk if c != shape.key]
    parts.append(f"{ident(shape.key)} IS NULL")
    return " AND ".join(parts)


def _key_changed(shape: Shape) -> str:
    """Did this UPDATE change (pk, key)? A row IS DISTINCT FROM resolves ``=`` through the
    search_path; a key of an extension type (ltree, citext) needs its own operator, named."""
    if not any(shape.eq(c) != "=" for c in shape.twin_key):
        return ("(" + ", ".join(f"NEW.{ident(c)}" for c in shape.twin_key) + ") IS DISTINCT FROM ("
                + ", ".join(f"OLD.{ident(c)}" for c in shape.twin_key) + ")")
    def one(c: str) -> str:
        n, o = f"NEW.{ident(c)}", f"OLD.{ident(c)}"
        return f"NOT coalesce({n} {shape.eq(c)} {o}, ({n} IS NULL) = ({o} IS NULL))"

    return "(" + " OR ".join(one(c) for c in shape.twin_key) + ")"


def sync_function(fn: QualifiedName, dst: QualifiedName, shape: Shape, dst_key: tuple[str, ...] | None = None,
                  probe: bool = True, recheck: bool = False) -> str:
    """The dual-write trigger function: applies each row change of one table to the other.

    - INSERT: a plain INSERT (no upsert: a new row cannot be in the twin yet, and a
      conflict here would mean the tables already diverged, which must fail loudly).
    - UPDATE keeping (pk, key): UPDATE by (pk, key).
    - UPDATE changing pk or key: DELETE the old (pk, key) and INSERT the new row; this moves
      it across partitions.
    - DELETE: by (pk, key).
    Every column is written, NULLs included; generated columns are computed by the twin.

    ``dst_key``: the columns of dst's own primary key (or NULLS NOT DISTINCT unique key),
    the arbiter of the probe below; the twin's (pk..., key) by default, the live primary key
    when dst is the retired heap table (the reverse trigger).

    Why the probe (``probe=False`` only renders the old behaviour for the tests' control
    runs): the UPDATE and DELETE by OLD key run in the writer's snapshot. When they touch
    no row, either the row is not in dst yet (READ COMMITTED, or any level before the
    backfill reached it: the backfill copies with FOR SHARE, so it will copy the version
    this transaction commits), or, at REPEATABLE READ / SERIALIZABLE, dst got the row after
    the writer's snapshot was taken and it is invisible: then doing nothing would lose the
    update, resurrect the deleted row or duplicate a moved one. The probe inserts the row
    (NEW for an update, OLD for a delete, which is deleted again right away) with
    ``ON CONFLICT (dst_key) DO NOTHING``: PostgreSQL raises 40001 (serialization failure)
    when the conflicting row is not visible to a REPEATABLE READ or SERIALIZABLE snapshot,
    so the application gets a retryable error and nothing changes; otherwise the insert
    is the exact effect (the row was not there). A visible conflict after a by-key miss
    means the tables already diverged: it fails loudly. The probe runs only when the
    by-key statement found nothing, so the common path costs what it did.

    ``recheck`` (distributed mode): dst is a Citus table, each statement on it runs in the
    worker's own snapshot, and a row the backfill committed can become visible between the
    by-key statement and the probe (seen under the workload). A visible conflict is then
    not a divergence: the by-key statement runs once more, in a newer snapshot, and only if
    it still finds nothing do the tables differ.
    """
    cols = column_list(list(shape.columns))
    new_vals = column_list(list(shape.columns), "NEW.")
    old_vals = column_list(list(shape.columns), "OLD.")
    insert = f"INSERT INTO {dst} ({cols}) OVERRIDING SYSTEM VALUE VALUES ({new_vals});"
    sets = ", ".join(f"{ident(c)} = NEW.{ident(c)}" for c in shape.columns if c not in shape.twin_key)
    if not sets:  # every column is part of the key: an update that keeps the key is a no-op
        sets = f"{ident(shape.key)} = NEW.{ident(shape.key)}"
    changed = _key_changed(shape)
    arbiter = column_list(list(dst_key or shape.twin_key))

    def by_old(stmt: str) -> str:
        if shape.key_nullable:
            return (
                f"IF OLD.{ident(shape.key)} IS NULL THEN {stmt} WHERE {_key_match_null(shape, 'OLD')}; "
                f"ELSE {stmt} WHERE {_key_match(shape, 'OLD')}; END IF;"
            )
        return f"{stmt} WHERE {_key_match(shape, 'OLD')};"

    def probe_insert(vals: str, again: str = "") -> str:
        differ = ("RAISE EXCEPTION 'orchestrate: % of a row of %: no row with its key in %, but one "
                  f"conflicts with it (the tables differ)', TG_OP, TG_TABLE_NAME, {literal(str(dst))};")
        if recheck and again:
            differ = f"{again} IF NOT FOUND THEN {differ} END IF;"
        return (
            f"INSERT INTO {dst} ({cols}) OVERRIDING SYSTEM VALUE VALUES ({vals}) ON CONFLICT ({arbiter}) DO NOTHING; "
            f"IF NOT FOUND THEN {differ} END IF;"
        )

    delete_old = by_old(f"DELETE FROM {dst}")
    update_old = by_old(f"UPDATE {dst} SET {sets}")
    if probe:
        # OLD is inserted and deleted again: a no-op when the row is not in dst yet, a
        # 40001 when dst holds a version this snapshot cannot see.
        delete_old += f"\n      IF NOT FOUND THEN {probe_insert(old_vals, delete_old)} {delete_old} END IF;"
        update_old += f"\n      IF NOT FOUND THEN {probe_insert(new_vals, update_old)} END IF;"
    return f"""CREATE OR REPLACE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $orchestrate$
BEGIN
  IF TG_OP = 'INSERT' THEN
    {insert}
  ELSIF TG_OP = 'UPDATE' THEN
    IF {changed} THEN
      {delete_old}
      {insert}
    ELSE
      {update_old}
    END IF;
  ELSIF TG_OP = 'DELETE' THEN
    {delete_old}
  END IF;
  RETURN NULL;
END
$orchestrate$"""


def truncate_function(fn: QualifiedName, dst: QualifiedName) -> str:
    return f"""CREATE OR REPLACE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $orchestrate$
BEGIN
  TRUNCATE {dst};
  RETURN NULL;
END
$orchestrate$"""


def create_sync_triggers(table: QualifiedName, trigger: str, fn: QualifiedName,
                         truncate_fn: QualifiedName, switch: QualifiedName | None = None) -> list[str]:
    """Row trigger for I/U/D plus a statement trigger that mirrors TRUNCATE, both ENABLE ALWAYS.

    Why ALWAYS: a trigger created plainly does not fire for sessions with
    ``session_replication_role = replica`` (logical replication apply workers,
    ``pg_restore --disable-triggers``, bulk loaders); their writes would be missing from
    the other table without a word. ENABLE ALWAYS takes the same SHARE ROW EXCLUSIVE lock
    as CREATE TRIGGER and runs in the same transaction, so no write slips in between.

    With ``switch`` (see :func:`sync_switch`), both fire only while that function returns
    true: the trigger can be created long before it is needed and turned on in O(1).

    Warning: CREATE TRIGGER takes SHARE ROW EXCLUSIVE on the table: it waits for writers in
    flight and blocks new ones while it waits. Run it under a short lock_timeout with retries.
    On a partitioned table it is cloned onto every partition: O(partitions).
    """
    when = f"WHEN ({switch}()) " if switch is not None else ""
    return [
        f"CREATE TRIGGER {ident(trigger)} AFTER INSERT OR UPDATE OR DELETE ON {table} "
        f"FOR EACH ROW {when}EXECUTE FUNCTION {fn}()",
        f"CREATE TRIGGER {ident(trigger + '_truncate')} AFTER TRUNCATE ON {table} "
        f"FOR EACH STATEMENT {when}EXECUTE FUNCTION {truncate_fn}()",
        f"ALTER TABLE {table} ENABLE ALWAYS TRIGGER {ident(trigger)}",
        f"ALTER TABLE {table} ENABLE ALWAYS TRIGGER {ident(trigger + '_truncate')}",
    ]


def sync_switch(fn: QualifiedName, on: bool) -> str:
    """The function a staged trigger's WHEN clause calls: true once the trigger is to fire.

    A one-line STABLE SQL function with no SET clause is inlined into the WHEN clause when a
    statement starts, so while it says false the trigger costs nothing per row (no call, no
    queued event), and replacing it is one catalog row, whatever the number of partitions the
    trigger was cloned onto. Its body names nothing, so search_path cannot reach it.
    """
    return (f"CREATE OR REPLACE FUNCTION {fn}() RETURNS boolean LANGUAGE sql STABLE PARALLEL SAFE "
            f"AS $orchestrate$SELECT {'true' if on else 'false'}$orchestrate$")


def drop_sync_triggers(table: QualifiedName, trigger: str) -> list[str]:
    return [
        f"DROP TRIGGER IF EXISTS {ident(trigger)} ON {table}",
        f"DROP TRIGGER IF EXISTS {ident(trigger + '_truncate')} ON {table}",
    ]


def range_predicate(shape: Shape, lo: str | None, hi: str | None, is_null: bool) -> tuple[str, list[str]]:
    """WHERE clause and parameters selecting one key range (NULL keys are their own range)."""
    k = ident(shape.key)
    if is_null:
        return f"{k} IS NULL", []
    parts, params = [], []
    if lo is not None:
        parts.append(f"{k} >= %s::{shape.key_type}")
        params.append(lo)
    if hi is not None:
        parts.append(f"{k} < %s::{shape.key_type}")
        params.append(hi)
    if not parts:
        parts.append(f"{k} IS NOT NULL")
    return " AND ".join(parts), params


def _cursor_columns(shape: Shape, is_null: bool) -> tuple[list[str], list[str]]:
    cols = list(shape.order_columns)
    types = list(shape.order_types)
    if is_null:  # the key is NULL throughout: order by the primary key alone
        cols, types = cols[1:], types[1:]
        if not cols:
            raise ValueError("a NULL-key range needs a primary key apart from the key")
    return cols, types


def _tuple_cmp(cols: list[str], types: list[str], op: str, shape: Shape | None = None) -> str:
    """(cols) > (cursor) or (cols) <= (cursor), in the cursor columns' own order.

    A row comparison resolves ``>`` through the search_path, which is pinned to pg_catalog:
    for a column of an extension type (ltree: no such operator; citext: text's, with another
    order than the index) it is written out column by column with the type's operators, and
    then needs the cursor values several times: :func:`cursor_params` lays them out."""
    if shape is None or all(shape.cmp(c, ">") == ">" for c in cols):
        left = "(" + column_list(cols) + ")"
        right = "(" + ", ".join(f"%s::{t}" for t in types) + ")"
        return f"{left} {op} {right}"
    assert op in (">", "<=")
    terms = []
    for i, c in enumerate(cols):
        eqs = [f"{ident(cols[j])} {shape.eq(cols[j])} %s::{types[j]}" for j in range(i)]
        terms.append("(" + " AND ".join([*eqs, f"{ident(c)} {shape.cmp(c, '>')} %s::{types[i]}"]) + ")")
    after = "(" + " OR ".join(terms) + ")"
    # The leading bound on the first column lets the planner use the index on the key.
    first = f"{ident(cols[0])} {shape.cmp(cols[0], '>=' if op == '>' else '<=')} %s::{types[0]}"
    return f"({first} AND {after if op == '>' else 'NOT ' + after})"


def cursor_params(shape: Shape, is_null: bool, values: list | tuple) -> list:
    """The parameters of one _tuple_cmp for the cursor ``values`` (one per cursor column)."""
    cols, _types = _cursor_columns(shape, is_null)
    values = list(values)
    if all(shape.cmp(c, ">") == ">" for c in cols):
        return values
    out = [values[0]]
    for i in range(len(cols)):
        out += values[: i + 1]
    return out


def backfill_boundary(src: QualifiedName, shape: Shape, where: str, after: bool, is_null: bool) -> str:
    """Find the end of the next window: the (key, pk) tuple `batch` rows ahead of the cursor.

    Read without locks: it only chooses where the window ends. Params: where-params,
    cursor values (if after), then the offset.
    """
    cols, types = _cursor_columns(shape, is_null)
    cond = where + (f" AND {_tuple_cmp(cols, types, '>', shape)}" if after else "")
    # ORDER BY names the table's columns (s.), never the select list's: an unqualified name
    # there would sort by the output column of the same name, the ::text (ids '10' < '9',
    # citext by bytes), so windows would not follow the order the cursor compares in.
    return (
        f"SELECT {', '.join(f's.{ident(c)}::text' for c in cols)} FROM {src} AS s WHERE {cond} "
        f"ORDER BY {', '.join(f's.{ident(c)}' for c in cols)} OFFSET %s LIMIT 1"
    )


def twin_rows_after(dst: QualifiedName, shape: Shape, where: str, after: bool, is_null: bool) -> str:
    """Does the twin hold any row in the rest of a range (after the cursor)? One index probe.

    When it does not, the next window cannot conflict with a row the twin held when this
    ran, and the copy may skip ON CONFLICT (see backfill_copy). Params: where-params, cursor
    values (if after).
    """
    cols, types = _cursor_columns(shape, is_null)
    cond = where + (f" AND {_tuple_cmp(cols, types, '>', shape)}" if after else "")
    return f"SELECT EXISTS (SELECT 1 FROM {dst} WHERE {cond})"


def backfill_copy(src: QualifiedName, dst: QualifiedName, shape: Shape, where: str, after: bool, upto: bool,
                  is_null: bool, on_conflict: bool = True) -> str:
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
    cols, types = _cursor_columns(shape, is_null)
    cond = where
    if after:
        cond += f" AND {_tuple_cmp(cols, types, '>', shape)}"
    if upto:
        cond += f" AND {_tuple_cmp(cols, types, '<=', shape)}"
    c = column_list(list(shape.columns))
    return (
        f"INSERT INTO {dst} ({c}) OVERRIDING SYSTEM VALUE "
        f"SELECT {c} FROM {src} WHERE {cond} FOR SHARE" + (" ON CONFLICT DO NOTHING" if on_conflict else "")
    )


def range_digest(table: QualifiedName, shape: Shape, where: str, mode: str,
                 by_type: frozenset[str] = frozenset()) -> str:
    """Count and an order-independent content hash of every column of the rows in a range.

    Each row is hashed with ``hash_record_extended`` over all its columns. A column in
    ``by_type`` (see :func:`exact_hash_columns`) goes in as itself, hashed by its type's own
    hash function: a type whose equal values are bit-for-bit identical ("equal image") loses
    nothing that way and skips the costly text output. Every other column (numeric, where
    1.0 = 1.00; float, where -0 = 0; citext; jsonb; arrays; domains ...) goes in as its text,
    so a difference a person could see is a difference in the hash. The per-row hashes are
    summed as bigints (exact: int128 accumulation), which is order-independent. Text fields
    are hashed under the "C" collation: byte for byte.
    """
    if mode == "count":
        return f"SELECT pg_catalog.count(*), 0::pg_catalog.numeric FROM {table} WHERE {where}"
    # COLLATE "C": a text field hashes with its expression's collation, and a column under a
    # nondeterministic (case-insensitive) collation would hash 'A' and 'a' alike.
    fields = ", ".join(ident(c) if c in by_type else f'{ident(c)}::pg_catalog.text COLLATE pg_catalog."C"'
                       for c in shape.all_columns)
    return (
        "SELECT pg_catalog.count(*), "
        f"coalesce(pg_catalog.sum(pg_catalog.hash_record_extended(ROW({fields}), 0::pg_catalog.int8)), 0) "
        f"FROM {table} WHERE {where}"
    )


# Columns whose type hashes exactly: a default hash opclass with an extended (seeded) hash
# function, and a default btree opclass whose "equal image" support function says that equal
# values are identical images (btequalimage; for text-like types btvarstrequalimage, true
# only under a deterministic collation). Parameter: the table (regclass text).
EXACT_HASH_COLUMNS = """SELECT a.attname FROM pg_catalog.pg_attribute a
WHERE a.attrelid = %s::pg_catalog.regclass AND a.attnum > 0 AND NOT a.attisdropped
  AND EXISTS (SELECT 1 FROM pg_catalog.pg_opclass oc
              JOIN pg_catalog.pg_am am ON am.oid = oc.opcmethod AND am.amname = 'hash'
              JOIN pg_catalog.pg_amproc p ON p.amprocfamily = oc.opcfamily AND p.amprocnum = 2
               AND p.amproclefttype = oc.opcintype AND p.amprocrighttype = oc.opcintype
              WHERE oc.opcdefault AND oc.opcintype = a.atttypid)
  AND EXISTS (SELECT 1 FROM pg_catalog.pg_opclass oc
              JOIN pg_catalog.pg_am am ON am.oid = oc.opcmethod AND am.amname = 'btree'
              JOIN pg_catalog.pg_amproc p ON p.amprocfamily = oc.opcfamily AND p.amprocnum = 4
               AND p.amproclefttype = oc.opcintype AND p.amprocrighttype = oc.opcintype
              WHERE oc.opcdefault AND oc.opcintype = a.atttypid
                AND (p.amproc = 'pg_catalog.btequalimage'::pg_catalog.regproc
                     OR (p.amproc = 'pg_catalog.btvarstrequalimage'::pg_catalog.regproc
                         AND (a.attcollation = 0 OR (SELECT c.collisdeterministic FROM pg_catalog.pg_collation c
                                                     WHERE c.oid = a.attcollation)))))"""
