"""A concurrent write workload with a golden record, for tests, the demo and benchmarks.

:class:`Workload` runs N client threads against any table (found by name in the
catalog, so it keeps working when a migration renames another relation into that
name) and mirrors every committed change into a *golden* copy of the table, in the
same transaction, server side. After the migration, :meth:`Workload.compare` checks
the live table against the golden copy with ``EXCEPT ALL`` both ways: a migration that
loses, duplicates, resurrects or alters a row is caught.

How the golden write stays exact: every write is one statement whose data-modifying
CTE changes the live table and ``RETURNING`` the full new row (explicit column list,
in golden order, so defaults, identity values, stored generated columns and trigger
effects are all captured as PostgreSQL computed them); the outer statement applies that
row to the golden table (INSERT / UPDATE ... FROM / DELETE ... USING). Both commit or
roll back together, and a write whose golden half depends on what its snapshot sees
checks that both halves changed as many rows (on Citus they can differ: see
:func:`skew_function`). Clients own disjoint sets of primary keys (hash of the key text
modulo the number of clients), so the workload never contends with itself: any lock
wait, deadlock or serialization failure is the migration's doing.

The *app* profile (``Workload(..., profile="app")``, tuned by :class:`AppMix`) runs
clients that behave like applications instead, next to the simple ones, so rows are
shared and the workload contends with itself on purpose (the kinds are in
:data:`KINDS`): multi-row, multi-statement transactions at READ COMMITTED, REPEATABLE
READ and SERIALIZABLE over a small set of *hot* rows shared by those clients, taken in
ascending order by some clients and descending by others (so deadlocks happen);
upserts; bulk UPDATE/DELETE of a key range; COPY ingestion; sessions that hold row
locks idle in transaction for seconds; and writers with ``session_replication_role =
replica``. The golden write stays in the same statement as every live write, so the
golden record stays exact whoever wins a lock. Application rules: a serialization
failure (40001) is retried the way applications do (the whole transaction, golden
writes included), and so is a deadlock (40P01) whose cycle holds only workload
clients; every retry is counted per client kind. A deadlock with any other session
(the migration's above all) and every other error is a failure, reported with its
SQLSTATE. Row sets are laid out so that a long wait of a simple writer can only be the
migration's doing: lock holders touch only rows they own, which no other client
writes; bulk statements touch only rows of the simple writers; the hot rows are never
deleted and their keys never move, so an upsert's conflict target stays valid.

Primary-key values travel as text and are cast back to the column type in SQL, which is
what keeps the workload type-generic. Everything is prepared server side
(``prepare_threshold = 0``) so a cutover that renames tables under the running clients
exercises plan invalidation.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import threading
import time
from array import array
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timedelta, timezone
from typing import Any

import psycopg
from loguru import logger

from orchestrator.sql import MAX_IDENT, QualifiedName, ident, parse_qualified

GOLDEN_SCHEMA = "orchestrate_golden"
DEFAULT_MIX = {"insert": 30, "update": 35, "update_null": 10, "move_key": 10, "delete": 10, "read": 5}
WRITE_OPS = ("insert", "update", "update_null", "move_key", "delete")
OPS = WRITE_OPS + ("read",)

#: Client kinds of the app profile. ``simple``: the single-row operations above on rows
#: the client owns; ``replica_role``: the same with ``session_replication_role =
#: replica`` (how logical replication apply workers and bulk loaders write);
#: ``txn_rc`` / ``txn_rr`` / ``txn_ser``: multi-row, multi-statement transactions at
#: READ COMMITTED / REPEATABLE READ / SERIALIZABLE over the shared hot rows (updates,
#: NULLing updates, upserts), then a key range of the client's own rows (UPDATE or
#: DELETE in one statement) and one or two more of them (insert, update, key move,
#: delete, new-row upsert); ``bulk``: one UPDATE or DELETE of every simple
#: writer's row in a key range; ``copy``: COPY of a batch of new rows; ``holder``:
#: UPDATE a few own rows, then sit idle in transaction for seconds, then COMMIT.
KINDS = ("simple", "replica_role", "txn_rc", "txn_rr", "txn_ser", "bulk", "copy", "holder")
APP_KINDS = ("simple", "simple", "replica_role", "txn_rc", "txn_rr", "txn_ser", "bulk", "copy", "holder")
#: Operations counted in ``WorkloadReport.ops`` by the app profile's clients (one per
#: committed transaction); inner statements are counted per kind.
APP_OPS = ("txn", "bulk_update", "bulk_delete", "copy", "hold")
#: SQLSTATEs an application retries: serialization failure, deadlock.
RETRYABLE = ("40001", "40P01")
_ISOLATION = {
    "txn_rc": psycopg.IsolationLevel.READ_COMMITTED,
    "txn_rr": psycopg.IsolationLevel.REPEATABLE_READ,
    "txn_ser": psycopg.IsolationLevel.SERIALIZABLE,
}
_SIMPLE_KINDS = ("simple", "replica_role")
_DEADLOCK_PID = re.compile(r"\b[Pp]rocess (\d+)")

# Types without an equality operator: EXCEPT ALL needs one, so compare their text form.
_NO_EQUALITY = frozenset({"json", "xml", "point", "line", "lseg", "box", "path", "polygon", "circle"})
_TIME_KINDS = {"timestamptz": "tstz", "timestamp": "ts", "date": "date"}
_NUM_KINDS = {"int2": "int", "int4": "int", "int8": "int", "numeric": "num", "float4": "num", "float8": "num"}
_INT_LIMITS = {"int2": 2**15 - 1, "int4": 2**31 - 1, "int8": 2**53}
_TWENTY_YEARS_S = 20 * 365.25 * 86400

#: Text written by the workload: quotes, backslashes, non-ASCII, emoji.
TEXTS = [
    "it's",
    'say "hi"',
    "back\\slash \\N",
    "é è ê ç",
    "日本語のテキスト",
    "emoji 🚀🔥",
    "tab\there",
    "line\nbreak",
    "O'Reilly \"quoted\" \\",
    "Ωμέγα Привет",
    "%s %(x)s {} $1",
    "",
]


# ----------------------------------------------------------------------------- results


@dataclass
class WorkloadReport:
    """What a run did. ``ops`` counts committed transactions per operation."""

    ops: dict[str, int]
    errors: int
    error_samples: list[str]
    latency_ms: dict[str, float]
    duration_s: float
    max_latency_at: datetime | None
    writes: int
    reconnects: int = 0
    clients: int = 0
    #: Retried transactions by SQLSTATE (40001, 40P01), and "skew" for the workload's own
    #: check that a statement's live and golden halves agree (see skew_function); never
    #: counted in ``errors``.
    retries: dict[str, int] = field(default_factory=dict)
    #: Failures by SQLSTATE ("" for errors without one, e.g. a lost connection).
    error_codes: dict[str, int] = field(default_factory=dict)
    #: Per client kind (app profile): clients, transactions, rows, statements, retries,
    #: errors, error_codes, max_wait_ms (the longest single statement, commit included;
    #: a holder's idle time is not a wait), blocked (holders: application_name of each
    #: session seen waiting for a holder's row locks, counted once per hold).
    kinds: dict[str, dict[str, Any]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["max_latency_at"] = self.max_latency_at.isoformat() if self.max_latency_at else None
        return d


@dataclass
class AppMix:
    """Shape of the app profile: which clients run and how hard they contend.

    ``kinds`` lists one client kind (see :data:`KINDS`) per client. ``hot_rows`` is the
    size of the row set the transaction clients share (smaller: more deadlocks and
    serialization failures); ``txn_range_rows`` the size of the key range of its own
    rows a transaction updates (or deletes) in one statement. ``txn_pause_s`` is the idle time between a transaction's
    first read (its snapshot, at REPEATABLE READ) and its writes, ``step_pause_s`` the
    one between its statements. ``hold_s`` is how long a holder sits idle in
    transaction with ``hold_rows`` rows locked; ``hold_gap_s`` how long it waits between
    holds. ``bulk_rows`` / ``copy_rows`` size the bulk statements and COPY batches.
    ``upsert_target`` names the conflict target's columns; by default the primary key
    plus the partition key when a unique index on exactly those exists (it does after
    cutover, and before it when the application created one), else ``ON CONFLICT DO
    NOTHING``: the upsert an application can run on both shapes of the table.
    """

    kinds: tuple[str, ...] = APP_KINDS
    hot_rows: int = 40
    txn_range_rows: int = 15
    txn_pause_s: tuple[float, float] = (0.02, 0.3)
    step_pause_s: tuple[float, float] = (0.0, 0.02)
    hold_s: tuple[float, float] = (2.0, 5.0)
    hold_rows: int = 4
    hold_gap_s: tuple[float, float] = (0.5, 1.5)
    bulk_rows: int = 60
    copy_rows: int = 30
    # Retries of one transaction before the client counts it as an error. Six clients on six
    # hot rows in both orders can starve one REPEATABLE READ client for 30 tries (seen once in a
    # fresh-clone run); an application that retries gives up much later than that.
    max_retries: int = 200
    upsert_target: tuple[str, ...] | None = None
    #: Pause after each transaction, per kind (the bulk and COPY clients would otherwise
    #: rewrite or grow a small table several times over during a test).
    think_s: dict[str, float] = field(default_factory=lambda: {"bulk": 0.2, "copy": 0.2})


@dataclass
class Comparison:
    """Live table versus golden copy. Samples are primary keys in text form."""

    table: str
    golden: str
    missing: int = 0
    extra: int = 0
    differing: int = 0
    missing_sample: list[str] = field(default_factory=list)
    extra_sample: list[str] = field(default_factory=list)
    differing_sample: list[str] = field(default_factory=list)
    golden_rows: int = 0
    live_rows: int = 0

    @property
    def ok(self) -> bool:
        return self.missing == 0 and self.extra == 0 and self.differing == 0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        return d

    def __str__(self) -> str:
        if self.ok:
            return f"{self.table} matches {self.golden} ({self.live_rows} rows)"
        return (
            f"{self.table} differs from {self.golden}: {self.missing} missing {self.missing_sample}, "
            f"{self.extra} extra {self.extra_sample}, {self.differing} differing {self.differing_sample}"
        )


# ----------------------------------------------------------------------------- catalog


@dataclass
class _Column:
    name: str
    type: str  # format_type(), usable in casts
    typname: str  # base type name (domains resolved, arrays: element name)
    notnull: bool
    identity: str  # '', 'a', 'd'
    generated: str  # '', 's'
    default: str | None
    in_check: bool
    in_fk: bool
    unique: bool  # part of a unique index other than the primary key
    is_domain: bool
    category: str  # pg_type.typcategory of the base type
    is_array: bool

    @property
    def writable(self) -> bool:
        return self.generated == "" and self.identity != "a"

    @property
    def sequence_default(self) -> bool:
        return self.identity != "" or (self.default is not None and "nextval(" in self.default)

    @property
    def text_like(self) -> bool:
        """Values may be invented as text (no CHECK, FK or domain can refuse them)."""
        return (
            not self.is_array
            and not self.is_domain
            and not self.in_check
            and not self.in_fk
            and (self.category == "S" or self.typname in ("json", "jsonb"))
        )


@dataclass
class _Meta:
    table: QualifiedName
    columns: list[_Column]
    pk: list[str]
    key: _Column
    key_kind: str | None  # tstz, ts, date, int, num, or None (key copied from rows)

    def col(self, name: str) -> _Column:
        return next(c for c in self.columns if c.name == name)


_COLUMNS_SQL = """
SELECT a.attname, format_type(a.atttypid, a.atttypmod),
       coalesce(el.typname, bt.typname, t.typname),
       a.attnotnull, a.attidentity::text, a.attgenerated::text,
       pg_get_expr(d.adbin, d.adrelid),
       EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conrelid = a.attrelid AND k.contype = 'c'
               AND a.attnum = ANY (k.conkey)),
       EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conrelid = a.attrelid AND k.contype = 'f'
               AND a.attnum = ANY (k.conkey)),
       EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = a.attrelid AND i.indisunique
               AND NOT i.indisprimary AND a.attnum = ANY (i.indkey)),
       t.typtype = 'd',
       coalesce(el.typcategory, bt.typcategory, t.typcategory)::text,
       t.typcategory = 'A' OR coalesce(bt.typcategory, '') = 'A'
FROM pg_attribute a
JOIN pg_type t ON t.oid = a.atttypid
LEFT JOIN pg_type bt ON t.typtype = 'd' AND bt.oid = t.typbasetype
LEFT JOIN pg_type el ON el.oid = CASE WHEN t.typcategory = 'A' THEN t.typelem
                                      WHEN bt.typcategory = 'A' THEN bt.typelem END
LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""

# The primary key, else the first unique index on NOT NULL plain columns.
_PK_SQL = """
SELECT array_agg(a.attname ORDER BY k.ord)
FROM pg_index i
CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
WHERE i.indrelid = %s AND i.indisunique AND i.indpred IS NULL AND i.indexprs IS NULL
  AND k.ord <= i.indnkeyatts
GROUP BY i.indexrelid, i.indisprimary
HAVING bool_and(a.attnotnull)
ORDER BY i.indisprimary DESC, i.indexrelid
LIMIT 1
"""


#: The message of the serialization failure the skew function raises (see skew_function).
SKEW_MESSAGE = "workload golden skew"


def skew_function_name() -> str:
    return f"{ident(GOLDEN_SCHEMA)}.skew"


def skew_function() -> str:
    """The function every golden write that depends on what its snapshot sees ends with.

    A statement changes the live table in a CTE and the golden copy by what the CTE
    returned, so on one server both read the same snapshot and change as many rows. On
    Citus they do not: the coordinator's snapshot (the golden copy is a local table there)
    is taken before the workers' (where the distributed table is), and a single-shard
    transaction commits on its worker before the coordinator. So a statement can delete a
    row on a worker whose golden row its coordinator snapshot does not see yet, and the
    golden copy keeps a row the application deleted. Citus has no distributed snapshot;
    an application that cares checks the row count, as this one does: a statement whose
    two halves changed different numbers of rows raises a serialization failure (40001),
    and the transaction is retried whole. On one server it is rare: a READ COMMITTED
    statement whose live half follows a row's update chain to a version with a new primary
    key (a concurrent key move) that the golden half's snapshot cannot match; or the live
    table holds a row the golden copy lacks (a resurrected row), which the retry leaves in
    place for :meth:`Workload.compare` to find.
    """
    return (
        f"CREATE OR REPLACE FUNCTION {skew_function_name()}(live bigint, golden bigint) RETURNS boolean "
        "LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $f$ BEGIN "
        "IF live IS DISTINCT FROM golden THEN "
        f"RAISE EXCEPTION '{SKEW_MESSAGE}: % rows changed in the live table, % in the golden copy', live, golden "
        "USING ERRCODE = 'serialization_failure'; END IF; RETURN true; END $f$"
    )


def _is_skew(e: BaseException) -> bool:
    return isinstance(e, psycopg.Error) and e.sqlstate == "40001" and bool(e.diag.message_primary) \
        and e.diag.message_primary.startswith(SKEW_MESSAGE)


def _golden_name(table: QualifiedName) -> QualifiedName:
    name = f"{table.schema}__{table.name}"
    if len(name.encode()) > MAX_IDENT:
        digest = hashlib.md5(name.encode()).hexdigest()[:8]
        name = name.encode()[: MAX_IDENT - 9].decode(errors="ignore") + "_" + digest
    return QualifiedName(GOLDEN_SCHEMA, name)


def _introspect(conn: psycopg.Connection, table: QualifiedName, key_column: str) -> _Meta:
    row = conn.execute(
        "SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p')",
        (table.schema, table.name),
    ).fetchone()
    if row is None:
        raise ValueError(f"table {table} not found")
    oid = row[0]
    cols = [_Column(*r) for r in conn.execute(_COLUMNS_SQL, (oid,)).fetchall()]
    pk_row = conn.execute(_PK_SQL, (oid,)).fetchone()
    if pk_row is None:
        raise ValueError(f"table {table} has no primary key (or unique index on NOT NULL columns)")
    names = {c.name for c in cols}
    if key_column not in names:
        raise ValueError(f"table {table} has no column {key_column!r}")
    key = next(c for c in cols if c.name == key_column)
    kind = _TIME_KINDS.get(key.typname) or _NUM_KINDS.get(key.typname)
    if key.is_array or key.is_domain or not key.writable:
        kind = None
    return _Meta(table, cols, list(pk_row[0]), key, kind)


# ----------------------------------------------------------------------------- SQL


class _Statements:
    """All the SQL of one table, built once from the catalog (explicit column lists)."""

    def __init__(self, meta: _Meta, golden: QualifiedName, clients: int, buckets: int | None = None):
        self.meta = meta
        self.golden = golden
        t, g = str(meta.table), str(golden)
        cols = meta.columns
        self.all = [c.name for c in cols]
        pkc = [meta.col(n) for n in meta.pk]
        self.pk_cols = pkc

        def pk_tuple(alias: str) -> str:
            return "(" + ", ".join(f"{alias}.{ident(c.name)}" for c in pkc) + ")"

        def pk_text(alias: str) -> str:
            if len(pkc) == 1:
                return f"{alias}.{ident(pkc[0].name)}::text"
            return f"ROW({', '.join(f'{alias}.{ident(c.name)}' for c in pkc)})::text"

        self.pk_text = pk_text

        def agreed(live: str, gold: str) -> str:
            # The rows the live write changed and the rows the golden write changed must be
            # as many, or the transaction is retried (see skew_function). A one-time filter:
            # evaluated once, also when the golden write changed nothing.
            return (f" WHERE (SELECT {skew_function_name()}((SELECT count(*) FROM {live}), "
                    f"(SELECT count(*) FROM {gold})))")

        self.agreed = agreed
        pk_params = "(" + ", ".join(f"%s::text::{c.type}" for c in pkc) + ")"
        self.npk = len(pkc)
        # Row ownership: the hash of the pk text modulo the number of buckets (one per
        # client; the app profile adds one more bucket: the hot rows, shared).
        self.buckets = buckets or clients

        def owner_of(alias: str) -> str:
            # Each key column's text, not ROW(...)::text: record_out is STABLE, and Citus
            # refuses a STABLE function over columns in an UPDATE's WHERE (the bulk update).
            text = " || '|' || ".join(f"{alias}.{ident(c.name)}::text" for c in pkc)
            return f"(hashtext({text}) & 2147483647) %% {self.buckets}"

        def pk_list(alias: str) -> str:
            return ", ".join(f"{alias}.{ident(c.name)}" for c in pkc)

        # A golden write returns the key columns only, and the key's text is computed over
        # them in an outer SELECT: Citus refuses a non-IMMUTABLE function (record_out) in a
        # modification's RETURNING once the live table is distributed, the golden one too.
        self.pk_list = pk_list

        self.owner_of = owner_of
        self.pk_tuple = pk_tuple
        self.pk_params = pk_params
        ret_all = ", ".join(f"x.{ident(n)}" for n in self.all)
        gset = ", ".join(f"{ident(n)} = u.{ident(n)}" for n in self.all)
        order = ", ".join(f"s.{ident(c.name)}" for c in pkc)

        def source_row(exprs: str) -> str:
            # The first row at or after a given key, else the first row: always one row
            # as long as the table is not empty, whatever was deleted meanwhile.
            return (
                f"(SELECT {exprs} FROM {t} AS s WHERE {pk_tuple('s')} >= {pk_params} "
                f"ORDER BY {order} LIMIT 1) UNION ALL "
                f"(SELECT {exprs} FROM {t} AS s ORDER BY {order} LIMIT 1) LIMIT 1"
            )

        self.source_row_of = source_row
        self.key_expr = self._key_expr(meta)

        # --- insert: pk from its default when it has one, else generated per client.
        any_pk_default = any(c.default is not None or c.identity for c in pkc)
        self.insert_plan: list[tuple[str, str]] = []  # (column, how): copy|gen|key|pk
        names, exprs = [], []
        for c in cols:
            if not c.writable:
                continue
            if c.name in meta.pk and (c.default is not None or c.identity):
                continue  # its default/identity/serial assigns it
            if c.name not in meta.pk and c.sequence_default:
                continue
            names.append(ident(c.name))
            if c.name == meta.key.name and meta.key_kind:
                exprs.append(self.key_expr)
                self.insert_plan.append((c.name, "key"))
            elif c.name in meta.pk and not any_pk_default and self._pk_generatable(c):
                exprs.append(f"%s::text::{c.type}")
                self.insert_plan.append((c.name, "pk"))
            elif c.unique and c.name not in meta.pk:
                # Copying another row's value would break uniqueness: invent one.
                if c.text_like or (
                    self._pk_generatable(c) and not (c.in_check or c.in_fk or c.is_domain)
                ):
                    exprs.append(f"%s::text::{c.type}")
                    self.insert_plan.append((c.name, "ugen" if c.text_like else "pk"))
                elif not c.notnull:
                    exprs.append("NULL")
                    self.insert_plan.append((c.name, "null"))
                else:
                    exprs.append(f"src.{ident(c.name)}")  # will collide: see the limits
                    self.insert_plan.append((c.name, "copy"))
            elif c.text_like and c.name not in meta.pk:
                exprs.append(f"CASE WHEN %s::bool THEN src.{ident(c.name)} ELSE %s::text::{c.type} END")
                self.insert_plan.append((c.name, "gen"))
            else:
                exprs.append(f"src.{ident(c.name)}")
                self.insert_plan.append((c.name, "copy"))
        src_cols = ", ".join(f"s.{ident(n)}" for n, how in self.insert_plan if how in ("copy", "gen")) or "1"
        self.insert = (
            f"WITH src AS ({source_row(src_cols)}), "
            f"ins AS (INSERT INTO {t} AS x ({', '.join(names)}) SELECT {', '.join(exprs)} FROM src "
            f"RETURNING {ret_all}), "
            f"gw AS (INSERT INTO {g} AS g ({', '.join(ident(n) for n in self.all)}) "
            f"SELECT {', '.join(ident(n) for n in self.all)} FROM ins "
            f"RETURNING {pk_list('g')}) "
            f"SELECT {pk_text('gw')}, {owner_of('gw')} FROM gw"
        )

        def write_update(set_clause: str) -> str:
            return (
                f"WITH u AS (UPDATE {t} AS x SET {set_clause} WHERE {pk_tuple('x')} = {pk_params} "
                f"RETURNING {ret_all}), "
                f"gw AS (UPDATE {g} AS g SET {gset} FROM u WHERE {pk_tuple('g')} = {pk_params} "
                f"RETURNING {pk_list('g')}) "
                f"SELECT {pk_text('gw')} FROM gw{agreed('u', 'gw')}"
            )

        # --- updates of ordinary columns: (sql, generatable)
        ordinary = [
            c
            for c in cols
            if c.writable and c.name not in meta.pk and c.name != meta.key.name and not c.sequence_default
        ]
        self.updates: dict[str, tuple[str, bool]] = {}
        for c in ordinary:
            if c.unique and not c.text_like:
                continue  # copying another row's value would break uniqueness
            other = f"COALESCE(({source_row('s.' + ident(c.name))}), x.{ident(c.name)})"
            if c.text_like:
                if c.unique:
                    expr = f"%s::text::{c.type}"
                else:
                    expr = f"CASE WHEN %s::bool THEN {other} ELSE %s::text::{c.type} END"
                self.updates[c.name] = (write_update(f"{ident(c.name)} = {expr}"), True)
            else:
                self.updates[c.name] = (write_update(f"{ident(c.name)} = {other}"), False)
        self.nullables = {
            c.name: write_update(f"{ident(c.name)} = NULL")
            for c in ordinary
            if not c.notnull and not c.in_check and not c.is_domain
        }
        self.move_key = (
            write_update(f"{ident(meta.key.name)} = {self.key_expr}") if meta.key_kind else None
        )
        self.delete = (
            f"WITH d AS (DELETE FROM {t} AS x WHERE {pk_tuple('x')} = {pk_params} "
            f"RETURNING {', '.join('x.' + ident(c.name) for c in pkc)}), "
            f"gw AS (DELETE FROM {g} AS g USING d WHERE {pk_tuple('g')} = {pk_params} RETURNING 1) "
            f"SELECT 1 FROM gw{agreed('d', 'gw')}"
        )
        self.read_pk = (
            f"SELECT {', '.join(ident(n) for n in self.all)} FROM {t} AS x "
            f"WHERE {pk_tuple('x')} = {pk_params}"
        )
        k = ident(meta.key.name)
        self.read_range = (
            f"SELECT count(*) FROM {t} WHERE {k} >= {self.key_expr} AND {k} < {self.key_expr}"
            if meta.key_kind
            else None
        )
        self.sample = (
            f"SELECT {pk_text('g')} FROM {g} AS g TABLESAMPLE SYSTEM (%s::float4) REPEATABLE (%s::int) "
            f"WHERE {owner_of('g')} = %s::int"
        )

    def build_app(self, golden_pk: list[str], upsert_target: list[str] | None) -> None:
        """The app profile's SQL: hot-row sample, upserts, bulk statements, COPY.

        Every statement writes the golden copy in the same statement as the live table,
        like the simple operations; COPY, which cannot, copies its rows from the live
        table into the golden copy in the same transaction (found by the primary keys
        the client chose). A statement the table's shape cannot support is None and the
        clients fall back to what it can.
        """
        meta, g, t = self.meta, str(self.golden), str(self.meta.table)
        cols, pkc, pk_tuple, pk_params = meta.columns, self.pk_cols, self.pk_tuple, self.pk_params
        allc = ", ".join(ident(n) for n in self.all)
        ret_all = ", ".join(f"x.{ident(n)}" for n in self.all)
        gpk = ", ".join(ident(n) for n in golden_pk)
        order = ", ".join(f"g.{ident(c.name)}" for c in pkc)
        self.hot_sample = (
            f"SELECT {self.pk_text('g')} FROM {g} AS g WHERE {self.owner_of('g')} = %s::int "
            f"ORDER BY {order} LIMIT %s::int"
        )
        # The column upserts and bulk updates set: an ordinary text-like column.
        self.app_col = next(
            (c for c in cols if c.name in self.updates and c.text_like and not c.unique), None
        )
        k = ident(meta.key.name)

        # --- upsert of an existing row: the row read back and inserted again, so it
        # conflicts; DO UPDATE sets the column. The golden side upserts the returned row.
        insertable = [c for c in cols if c.generated == ""]
        overriding = " OVERRIDING SYSTEM VALUE" if any(c.identity == "a" for c in insertable) else ""
        gset_ex = ", ".join(f"{ident(n)} = EXCLUDED.{ident(n)}" for n in self.all)
        self.upsert = self.upsert_new = None
        self.upsert_target = upsert_target
        if self.app_col is not None:
            ac = self.app_col
            if upsert_target:
                conflict = (f"ON CONFLICT ({', '.join(ident(n) for n in upsert_target)}) "
                            f"DO UPDATE SET {ident(ac.name)} = EXCLUDED.{ident(ac.name)}")
            else:
                conflict = "ON CONFLICT DO NOTHING"
            sel = ", ".join(f"%s::text::{c.type}" if c.name == ac.name else f"s.{ident(c.name)}" for c in insertable)
            self.upsert = (
                f"WITH ins AS (INSERT INTO {t} AS x ({', '.join(ident(c.name) for c in insertable)}){overriding} "
                f"SELECT {sel} FROM {t} AS s WHERE {pk_tuple('s')} = {pk_params} {conflict} RETURNING {ret_all}), "
                f"gw AS (INSERT INTO {g} AS g ({allc}) SELECT {allc} FROM ins "
                f"ON CONFLICT ({gpk}) DO UPDATE SET {gset_ex} RETURNING {self.pk_list('g')}) "
                f"SELECT {self.pk_text('gw')} FROM gw"
            )
            # --- upsert of a new row: the simple insert with the same ON CONFLICT clause.
            self.upsert_new = self.insert.replace(" RETURNING ", f" {conflict} RETURNING ", 1)

        # --- bulk UPDATE / DELETE of a key range, only rows of the given owners.
        self.bulk_update = self.bulk_delete = None
        if meta.key_kind:
            cond = (f"x.{k} >= {self.key_expr} AND x.{k} < {self.key_expr} "
                    f"AND {self.owner_of('x')} = ANY (%s::int[])")
            if self.app_col is not None:
                setc = f"{ident(self.app_col.name)} = %s::text::{self.app_col.type}"
            else:
                setc = f"{k} = x.{k}"
            gset = ", ".join(f"{ident(n)} = u.{ident(n)}" for n in self.all)
            self.bulk_update = (
                f"WITH u AS (UPDATE {t} AS x SET {setc} WHERE {cond} RETURNING {ret_all}), "
                f"gw AS (UPDATE {g} AS g SET {gset} FROM u WHERE {pk_tuple('g')} = {pk_tuple('u')} RETURNING 1) "
                f"SELECT 1 FROM gw{self.agreed('u', 'gw')}"
            )
            self.bulk_delete = (
                f"WITH d AS (DELETE FROM {t} AS x WHERE {cond} "
                f"RETURNING {', '.join('x.' + ident(c.name) for c in pkc)}), "
                f"gw AS (DELETE FROM {g} AS g USING d WHERE {pk_tuple('g')} = {pk_tuple('d')} RETURNING 1) "
                f"SELECT 1 FROM gw{self.agreed('d', 'gw')}"
            )

        # --- COPY of new rows: (column, how) in COPY order; None if the shape does not allow it.
        plan: list[tuple[str, str]] = []
        seq_pk = any(c.sequence_default for c in pkc)
        for c in cols:
            if c.generated:
                continue
            if c.name in meta.pk:
                if c.name == meta.key.name and meta.key_kind:
                    plan.append((c.name, "key"))
                elif c.sequence_default:
                    plan.append((c.name, "seq"))  # COPY writes given values, identity ALWAYS too
                elif seq_pk and c.default is None:
                    plan.append((c.name, "copy"))  # the sequence makes the key unique, as for inserts
                elif c.default is None and self._pk_generatable(c):
                    plan.append((c.name, "pk"))
                else:
                    plan = []
                    break
            elif c.identity == "a" or c.sequence_default:
                continue
            elif c.name == meta.key.name and meta.key_kind:
                plan.append((c.name, "key"))
            elif c.unique:
                if c.text_like:
                    plan.append((c.name, "ugen"))
                elif not c.notnull:
                    plan.append((c.name, "null"))
                else:
                    plan = []
                    break
            elif c.text_like and c.type in ("text", "jsonb", "json", "character varying"):
                # COPY input is not cast: a value for a length-limited type could be too long.
                plan.append((c.name, "gen"))
            else:
                plan.append((c.name, "copy"))
        self.copy_plan = plan
        self.copy = self.copy_source = self.copy_golden = None
        if plan and meta.key_kind:
            self.copy = f"COPY {t} ({', '.join(ident(n) for n, _ in plan)}) FROM STDIN"
            srcs = [n for n, how in plan if how in ("copy", "gen")]
            self.copy_source = self.source_row_of(", ".join(f"s.{ident(n)}::text" for n in srcs) or "1")
            self.copy_source_cols = srcs
            arrays = ", ".join("%s::text[]" for _ in pkc)
            knames = ", ".join(f"k{i}" for i in range(len(pkc)))
            casts = ", ".join(f"k.k{i}::{c.type}" for i, c in enumerate(pkc))
            self.copy_golden = (
                f"INSERT INTO {g} ({allc}) SELECT {ret_all} FROM {t} AS x "
                f"JOIN unnest({arrays}) AS k({knames}) ON {pk_tuple('x')} = ({casts}) RETURNING 1"
            )
        self.serial_sequence = "SELECT nextval(pg_get_serial_sequence(%s, %s)) FROM generate_series(1, %s::int)"

    @staticmethod
    def _pk_generatable(c: _Column) -> bool:
        return not c.is_array and (c.typname in _NUM_KINDS or c.category == "S" or c.typname == "uuid")

    @staticmethod
    def _key_expr(meta: _Meta) -> str:
        kind, typ = meta.key_kind, meta.key.type
        if kind == "tstz":
            return f"to_timestamp(%s::float8)::{typ}"
        if kind == "ts":
            return f"(to_timestamp(%s::float8) AT TIME ZONE 'UTC')::{typ}"
        if kind == "date":
            return f"(to_timestamp(%s::float8) AT TIME ZONE 'UTC')::date::{typ}"
        if kind == "int":
            return f"round(%s::float8)::{typ}"
        if kind == "num":
            return f"%s::float8::{typ}"
        return "src." + ident(meta.key.name)


# ----------------------------------------------------------------------------- clients


def _text(rng: random.Random, tag: str) -> str:
    return f"{tag} {rng.choice(TEXTS)} {rng.choice(TEXTS)}"


def _json(rng: random.Random, tag: str) -> str:
    return json.dumps(
        {"wl": tag, "n": rng.randint(0, 10**6), "s": rng.choice(TEXTS), "ok": rng.random() < 0.5,
         "nested": {"a": [1, 2.5, None, "日本"]}},
        ensure_ascii=False,
    )


class _Client(threading.Thread):
    def __init__(self, wl: Workload, index: int):
        super().__init__(name=f"workload-{index}", daemon=True)
        self.wl = wl
        self.index = index
        self.rng = random.Random(f"{wl.seed}:{index}:{wl._run}")
        self.kind = wl.kinds[index]
        self.counts = dict.fromkeys(OPS + (APP_OPS if wl.app else ()), 0)
        self.retries: Counter[str] = Counter()
        self.error_codes: Counter[str] = Counter()
        self.statements: Counter[str] = Counter()
        self.transactions = 0
        self.rows = 0
        self.max_wait_ms = 0.0
        self.hot: list[str] = []
        self.pid = 0
        self.watch: psycopg.Connection | None = None
        self.blocked: Counter[str] = Counter()  # holder: sessions seen waiting for its locks, per hold
        self.latencies = array("d")
        self.worst = (0.0, None)
        self.errors: list[tuple[datetime, str, str]] = []
        self.nerrors = 0
        self.reconnects = 0
        self.sample: list[str] = []
        self.sample_at = 0.0
        self.ops_since_sample = 0
        self.serial = 0
        self.values = 0
        self.conn: psycopg.Connection | None = None

    # -- connection
    def _connect(self) -> None:
        self.conn = psycopg.connect(
            self.wl.dsn, autocommit=False, application_name=f"orchestrate-workload-{self.index}"
        )
        self.conn.prepare_threshold = 0
        self.pid = self.conn.info.backend_pid
        self.wl._pids.add(self.pid)
        if self.kind in _ISOLATION:
            self.conn.isolation_level = _ISOLATION[self.kind]
        if self.kind == "replica_role":
            # Triggers that are not ENABLE ALWAYS (or REPLICA) do not fire for this session:
            # a logical replication apply worker or a bulk loader writes this way.
            self.conn.execute("SET session_replication_role = replica")
            self.conn.commit()

    def _reconnect(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            except Exception:  # noqa: BLE001
                pass
        while not self.wl._stop.is_set():
            try:
                self._connect()
                return
            except Exception as e:  # noqa: BLE001
                self._error("connect", e)
                self.wl._stop.wait(0.2)

    def _error(self, op: str, e: BaseException, why: str = "") -> None:
        self.nerrors += 1
        code = getattr(e, "sqlstate", None) or ""
        self.error_codes[code] += 1
        msg = " ".join(str(e).split()) or type(e).__name__
        head = (f"[{self.kind}] " if self.wl.app else "") + (f"SQLSTATE {code} " if code else "")
        self.errors.append((datetime.now(timezone.utc), op, f"{head}{type(e).__name__}: {msg}{why}"))
        del self.errors[20:]
        logger.debug("workload client {} {} failed: {}", self.index, op, msg)

    # -- values
    def _key_value(self, allow_null: bool) -> float | None:
        wl, r = self.wl, self.rng.random()
        if allow_null and not wl._meta.key.notnull and r < 0.03:
            return None
        lo, hi = wl._key_range
        if r > 0.97:
            far = _TWENTY_YEARS_S if wl._meta.key_kind in ("tstz", "ts", "date") else 20 * max(hi - lo, 1.0)
            v = hi + far * self.rng.uniform(0.5, 1.0) if r > 0.985 else lo - far * self.rng.uniform(0.5, 1.0)
        else:
            v = self.rng.uniform(lo, hi)
        return wl._clamp_key(v)

    def _pk(self) -> list[str] | None:
        if not self.sample:
            return None
        return self.wl._split_pk(self.rng.choice(self.sample))

    def _src_pk(self) -> list[str]:
        return self._pk() or self.wl._first_pk

    def _refresh_sample(self) -> None:
        wl = self.wl
        assert self.conn is not None
        pct = min(100.0, 100.0 * 4000.0 * wl.clients / max(wl._golden_rows, 1))
        rows = self.conn.execute(
            wl._sql.sample, (pct, self.rng.randrange(2**31 - 1), self.index), prepare=True
        ).fetchall()
        self.conn.commit()
        keys = [r[0] for r in rows]
        self.rng.shuffle(keys)
        self.sample = sorted(keys[:500])
        self.rng.shuffle(self.sample)
        self.sample_at = time.monotonic()
        self.ops_since_sample = 0

    # -- operations: one statement each; the caller commits and times it
    def _op(self, op: str) -> None:
        wl, st, cur = self.wl, self.wl._sql, self.conn
        assert cur is not None
        if op in ("insert", "upsert_new"):
            params: list[Any] = list(self._src_pk())
            for name, how in st.insert_plan:
                if how == "key":
                    params.append(self._key_value(allow_null=True))
                elif how == "pk":
                    params.append(wl._new_pk_value(name, self.index, self.serial))
                elif how == "ugen":
                    params.append(self._value(wl._meta.col(name)))
                elif how == "gen":
                    col = wl._meta.col(name)
                    if self.rng.random() < 0.5:
                        params += [True, None]
                    elif not col.notnull and self.rng.random() < 0.1:
                        params += [False, None]
                    else:
                        params += [False, self._value(col)]
            self.serial += 1
            row = cur.execute(st.insert if op == "insert" else st.upsert_new, params, prepare=True).fetchone()
            if row is not None and row[1] == self.index:
                self.sample.append(row[0])
            return
        if op == "read":
            pk = self._pk()
            if pk is not None:
                cur.execute(st.read_pk, pk, prepare=True).fetchall()
            if st.read_range is not None:
                lo, hi = wl._key_range
                a = self.rng.uniform(lo, hi)
                cur.execute(st.read_range, (a, a + max(hi - lo, 1.0) / 1000.0), prepare=True).fetchall()
            return
        pk = self._pk()
        if pk is None:
            return
        if op == "delete":
            if cur.execute(st.delete, pk + pk, prepare=True).fetchone() is not None:
                self._forget(pk)
            return
        if op == "move_key":
            params = [self._key_value(allow_null=True)] + pk + pk
            row = cur.execute(st.move_key, params, prepare=True).fetchone()
            if row is not None and wl._split_pk(row[0]) != pk:
                self._forget(pk)  # the key is part of the primary key: the row is a new pk now
            return
        if op == "update_null":
            name = self.rng.choice(sorted(st.nullables))
            cur.execute(st.nullables[name], pk + pk, prepare=True).fetchall()
            return
        # update
        name = self.rng.choice(sorted(st.updates))
        sql, generatable = st.updates[name]
        col = wl._meta.col(name)
        if not generatable:
            params = self._src_pk() + pk + pk
        elif col.unique:
            params = [self._value(col)] + pk + pk
        elif self.rng.random() < 0.5:
            params = [True] + self._src_pk() + [None] + pk + pk
        else:
            params = [False] + self._src_pk() + [self._value(col)] + pk + pk
        cur.execute(sql, params, prepare=True).fetchall()

    def _forget(self, pk: list[str]) -> None:
        text = self.wl._join_pk(pk)
        try:
            self.sample.remove(text)
        except ValueError:
            pass

    def _value(self, col: _Column) -> str:
        # Unique across clients, runs and values; first, so varchar(n) keeps it.
        self.values += 1
        tag = f"{self.wl._pk_token}.{self.index}.{self.values}"
        if col.typname in ("json", "jsonb"):
            return _json(self.rng, tag)
        return _text(self.rng, tag)

    def _pick(self) -> str:
        """An operation by weight; one the table cannot do falls through to the next."""
        st = self.wl._sql
        op = self.rng.choices(self.wl._ops, self.wl._weights)[0]
        if op == "update" and not st.updates:
            op = "update_null"
        if op == "update_null" and not st.nullables:
            op = "move_key"
        if op == "move_key" and st.move_key is None:
            op = "read"
        return op

    def _waited(self, ms: float) -> None:
        self.latencies.append(ms)
        if ms > self.worst[0]:
            self.worst = (ms, datetime.now(timezone.utc))
        self.max_wait_ms = max(self.max_wait_ms, ms)

    def run(self) -> None:
        if self.kind not in _SIMPLE_KINDS:
            self._run_app()
            return
        wl = self.wl
        self._reconnect()
        while not wl._stop.is_set():
            assert self.conn is not None
            op = "sample"
            try:
                if (
                    not self.sample
                    or self.ops_since_sample >= 300
                    or time.monotonic() - self.sample_at > 2.0
                ):
                    self._refresh_sample()
                op = self._pick()
                t0 = time.perf_counter()
                self._op(op)
                self.conn.commit()
                ms = (time.perf_counter() - t0) * 1000.0
                self._waited(ms)
                self.counts[op] += 1
                self.statements[op] += 1
                self.transactions += 1
                self.ops_since_sample += 1
            except Exception as e:  # noqa: BLE001 - every failure is an error, then go on
                if _is_skew(e):
                    self.retries["skew"] += 1  # not the migration's doing: see skew_function
                else:
                    self._error(op, e)
                if self.conn.broken or self.conn.closed:
                    self.reconnects += 1
                    self._reconnect()
                else:
                    try:
                        self.conn.rollback()
                    except Exception as e2:  # noqa: BLE001
                        self._error("rollback", e2)
                        self.reconnects += 1
                        self._reconnect()
            if wl.think_time_s:
                wl._stop.wait(wl.think_time_s)
        if self.conn is not None:
            try:
                self.conn.rollback()
                self.conn.close()
            except Exception:  # noqa: BLE001
                pass


    # -- app profile: transactions retried the way applications retry them
    def _run_app(self) -> None:
        wl = self.wl
        step = {"txn_rc": self._txn, "txn_rr": self._txn, "txn_ser": self._txn, "bulk": self._bulk,
                "copy": self._copy, "holder": self._hold}[self.kind]
        self._reconnect()
        while not wl._stop.is_set():
            try:
                if self.kind != "bulk" and (not self.sample or time.monotonic() - self.sample_at > 2.0):
                    self._refresh_sample()
                    if self.kind.startswith("txn"):
                        self.hot = [r[0] for r in self.conn.execute(
                            wl._sql.hot_sample, (wl._sql.buckets - 1, wl.app.hot_rows), prepare=True).fetchall()]
                        self.conn.commit()
            except Exception as e:  # noqa: BLE001 - every failure is an error, then go on
                self._failed("sample", e)
                continue
            self._transaction(self.kind, step)
            if self.kind == "holder":
                self._pause(wl.app.hold_gap_s)  # let the cutover find a moment without this lock
                continue
            pause = wl.app.think_s.get(self.kind, 0.0) or wl.think_time_s
            if pause:
                wl._stop.wait(pause)
        for c in (self.conn, self.watch):
            if c is not None:
                try:
                    c.rollback()
                    c.close()
                except Exception:  # noqa: BLE001
                    pass

    def _failed(self, op: str, e: BaseException, why: str = "") -> None:
        """Count a failure and get the connection usable again."""
        self._error(op, e, why)
        if self.conn is None or self.conn.broken or self.conn.closed:
            self.reconnects += 1
            self._reconnect()
            return
        try:
            self.conn.rollback()
        except Exception as e2:  # noqa: BLE001
            self._error("rollback", e2)
            self.reconnects += 1
            self._reconnect()

    def _transaction(self, name: str, body: Callable[[Counter], str | None]) -> None:
        """Run ``body`` as one transaction and commit; retry it whole on 40001 and 40P01.

        ``body`` executes its statements (golden writes included) and adds what it wrote
        to the counter it is given; it returns the operation name to count, or None when
        it found nothing to do. What a failed attempt counted is thrown away with it.
        """
        wl = self.wl
        attempt = 0
        while True:
            done: Counter[str] = Counter()
            try:
                op = body(done)
                t0 = time.perf_counter()
                self.conn.commit()  # SERIALIZABLE may fail here
                self._waited((time.perf_counter() - t0) * 1000.0)
            except psycopg.Error as e:
                code = e.sqlstate or ""
                broken = self.conn.broken or self.conn.closed
                if code in RETRYABLE and not broken:
                    if _is_skew(e):
                        code = "skew"  # the workload's own 40001: see skew_function
                    try:
                        self.conn.rollback()
                        partner = self._deadlock_partner(e) if code == "40P01" else None
                    except Exception as e2:  # noqa: BLE001
                        self._failed(name, e2)
                        return
                    if partner is not None:
                        # Two application sessions may deadlock (and retry); a deadlock with
                        # anyone else, the migration above all, is a failure we must see.
                        self._error(name, e, f" (deadlock with {partner})")
                        return
                    self.retries[code] += 1
                    attempt += 1
                    if attempt > wl.app.max_retries:
                        self._error(name, e, f" (gave up after {attempt - 1} retries)")
                        return
                    if wl._stop.is_set():
                        return  # not committed, not an error: the run ends
                    wl._stop.wait(self.rng.uniform(0, min(0.2, 0.005 * 2**attempt)))
                    continue
                self._failed(name, e)
                return
            except Exception as e:  # noqa: BLE001
                self._failed(name, e)
                return
            if op is not None:
                self.counts[op] += 1
                self.transactions += 1
                self.rows += done.pop("_rows", 0)
                self.statements.update(done)
            return

    def _deadlock_partner(self, e: psycopg.Error) -> str | None:
        """The first session in the deadlock cycle that is not a workload client, else None."""
        detail = (e.diag.message_detail or "") if e.diag else ""
        pids = {int(p) for p in _DEADLOCK_PID.findall(detail)} - {self.pid}
        if not pids:
            return "an unknown session (no pids in the error)"
        # The server aborted this transaction (and released its locks) when it raised the
        # error, so a partner may be gone by now: decide by this workload's own sessions.
        others = sorted(pids - self.wl._pids)
        if not others:
            return None
        try:
            names = dict(self._side().execute(
                "SELECT pid, application_name FROM pg_stat_activity WHERE pid = ANY (%s)", (others,)
            ).fetchall())
        except psycopg.Error:
            names = {}
        return ", ".join(f"pid {pid} ({names.get(pid) or 'gone'})" for pid in others)

    def _side(self) -> psycopg.Connection:
        """A second, autocommit session of this client for looking at the server."""
        if self.watch is None or self.watch.closed or self.watch.broken:
            self.watch = psycopg.connect(self.wl.dsn, autocommit=True,
                                         application_name=f"orchestrate-workload-{self.index}-watch")
        return self.watch

    def _x(self, done: Counter, name: str, sql: str, params: list, rows: bool = True) -> list:
        """Execute one statement of a transaction, timed; count it and its rows."""
        t0 = time.perf_counter()
        out = self.conn.execute(sql, params, prepare=True).fetchall() if rows else []
        self._waited((time.perf_counter() - t0) * 1000.0)
        done[name] += 1
        done["_rows"] += len(out)
        return out

    def _pause(self, span: tuple[float, float]) -> None:
        lo, hi = span
        if hi > 0:
            self.wl._stop.wait(self.rng.uniform(lo, hi))

    def _txn(self, done: Counter) -> str | None:
        """Several hot rows in this client's order, then one or two of its own rows.

        The first statement reads (at REPEATABLE READ it takes the snapshot), the writes
        come after a pause: a snapshot older than the rows it writes is what applications
        do and what capture must get right. Own rows last, so a transaction that waits for
        a hot row holds no row another kind of client could be waiting for.
        """
        wl, st, app = self.wl, self.wl._sql, self.wl.app
        if not self.hot:
            return None
        rows = self.rng.sample(self.hot, min(len(self.hot), self.rng.choice((2, 2, 3))))
        rows.sort(key=_pk_sort_key, reverse=self.index % 2 == 1)  # A then B here, B then A there
        first = wl._split_pk(rows[0])
        self._x(done, "read", st.read_pk, first)
        self._pause(app.txn_pause_s)
        for text in rows:
            pk = wl._split_pk(text)
            r = self.rng.random()
            if r < 0.4 and st.upsert is not None:
                self._x(done, "upsert", st.upsert, [self._value(st.app_col)] + pk)
            elif r < 0.85 or not st.nullables:
                name = self.rng.choice(sorted(st.updates)) if st.updates else None
                if name is None:
                    continue
                self._x(done, "update", *self._update_params(name, pk))
            else:
                name = self.rng.choice(sorted(st.nullables))
                self._x(done, "update_null", st.nullables[name], pk + pk)
            self._pause(app.step_pause_s)
        if st.bulk_update is not None and self.rng.random() < 0.7:
            # A range of the client's own rows in one statement: many rows written late in
            # an old snapshot, where a capture that misses rows copied meanwhile shows.
            lo, hi = wl._key_range
            width = max(hi - lo, 1.0) * app.txn_range_rows * st.buckets / max(wl._golden_rows, 1)
            a = self.rng.uniform(lo, hi)
            if self.rng.random() < 0.2:
                self._x(done, "range_delete", st.bulk_delete, [a, a + width, [self.index]])
            else:
                params: list[Any] = [self._value(st.app_col)] if st.app_col is not None else []
                self._x(done, "range_update", st.bulk_update, params + [a, a + width, [self.index]])
        for _ in range(self.rng.choice((1, 2))):
            op = self.rng.choices(("insert", "upsert_new", "update", "move_key", "delete"), (3, 2, 3, 2, 1))[0]
            if op == "upsert_new" and st.upsert_new is None:
                op = "insert"
            if op == "move_key" and st.move_key is None:
                op = "update"
            t0 = time.perf_counter()
            self._op(op)
            self._waited((time.perf_counter() - t0) * 1000.0)
            done[op] += 1
            done["_rows"] += 1
        return "txn"

    def _update_params(self, name: str, pk: list[str]) -> tuple[str, list]:
        """The simple ``update`` of column ``name`` of row ``pk``: (sql, params)."""
        wl, st = self.wl, self.wl._sql
        sql, generatable = st.updates[name]
        col = wl._meta.col(name)
        if not generatable:
            return sql, self._src_pk() + pk + pk
        if col.unique:
            return sql, [self._value(col)] + pk + pk
        if self.rng.random() < 0.5:
            return sql, [True] + self._src_pk() + [None] + pk + pk
        return sql, [False] + self._src_pk() + [self._value(col)] + pk + pk

    def _bulk(self, done: Counter) -> str | None:
        """One UPDATE (or, a quarter of the time, DELETE) of the simple writers' rows in a key range."""
        wl, st = self.wl, self.wl._sql
        if st.bulk_update is None:
            return None
        lo, hi = wl._key_range
        delete = self.rng.random() < 0.25
        want = wl.app.bulk_rows / (3 if delete else 1)
        owners = [i for i, k in enumerate(wl.kinds) if k in _SIMPLE_KINDS]
        share = max(len(owners), 1) / wl._sql.buckets
        width = max(hi - lo, 1.0) * want / max(wl._golden_rows * share, 1.0)
        a = self.rng.uniform(lo, hi)
        if delete:
            self._x(done, "bulk_delete", st.bulk_delete, [a, a + width, owners])
            return "bulk_delete"
        params: list[Any] = [self._value(st.app_col)] if st.app_col is not None else []
        self._x(done, "bulk_update", st.bulk_update, params + [a, a + width, owners])
        return "bulk_update"

    def _copy(self, done: Counter) -> str | None:
        """COPY a batch of new rows into the table; then the same rows into the golden copy."""
        wl, st = self.wl, self.wl._sql
        if st.copy is None:
            return None
        n = self.rng.randint(max(1, wl.app.copy_rows // 2), wl.app.copy_rows)
        src = self.conn.execute(st.copy_source, self._src_pk(), prepare=True).fetchone()
        if src is None:
            return None
        source = dict(zip(st.copy_source_cols, src, strict=False))
        seqs = {
            name: [str(v[0]) for v in self.conn.execute(st.serial_sequence, (str(wl._meta.table), name, n))]
            for name, how in st.copy_plan if how == "seq"
        }
        rows = []
        for i in range(n):
            row = []
            for name, how in st.copy_plan:
                if how == "seq":
                    row.append(seqs[name][i])
                elif how == "pk":
                    row.append(wl._new_pk_value(name, self.index, self.serial))
                elif how == "key":
                    row.append(self._key_text(self._key_value(allow_null=name not in wl._meta.pk)))
                elif how == "ugen":
                    row.append(self._value(wl._meta.col(name)))
                elif how == "null":
                    row.append(None)
                elif how == "gen" and self.rng.random() < 0.5:
                    col = wl._meta.col(name)
                    row.append(None if not col.notnull and self.rng.random() < 0.2 else self._value(col))
                else:
                    row.append(source[name])
            self.serial += 1
            rows.append(row)
        t0 = time.perf_counter()
        with self.conn.cursor().copy(st.copy) as cp:
            for row in rows:
                cp.write_row(row)
        self._waited((time.perf_counter() - t0) * 1000.0)
        pkpos = [next(i for i, (n_, _) in enumerate(st.copy_plan) if n_ == c.name) for c in st.pk_cols]
        keys = [[row[p] for row in rows] for p in pkpos]
        got = self._x(done, "copy", st.copy_golden, keys)
        if len(got) != n:
            raise RuntimeError(f"COPY wrote {n} rows but {len(got)} were found again by primary key")
        return "copy"

    def _key_text(self, v: float | None) -> str | None:
        """A key value as COPY text (the server parses it with the column's type)."""
        kind = self.wl._meta.key_kind
        if v is None:
            return None
        if kind in ("tstz", "ts", "date"):
            v = min(max(v, -6.0e10), 2.5e11)  # years 68 .. 9900: what Python's datetime can hold
            d = datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(seconds=v)
            if kind == "tstz":
                return d.isoformat()
            if kind == "ts":
                return d.replace(tzinfo=None).isoformat()
            return date(d.year, d.month, d.day).isoformat()
        if kind == "int":
            return str(int(v))
        return repr(float(v))

    def _hold(self, done: Counter) -> str | None:
        """UPDATE a few own rows, sit idle in transaction for seconds, COMMIT.

        The rows are this client's: nobody else writes them, so a writer that waits
        seconds while this one holds them waits for someone in between (a backfill batch
        holding the rows before them), never for this client itself.
        """
        wl, st = self.wl, self.wl._sql
        if not self.sample or not st.updates:
            return None
        picked = self.rng.sample(self.sample, min(len(self.sample), wl.app.hold_rows))
        for text in picked:  # in random order, like an application
            pk = wl._split_pk(text)
            self._x(done, "update", *self._update_params(self.rng.choice(sorted(st.updates)), pk))
        # Idle in transaction; meanwhile a second session notes who waits for these locks
        # (the report's ``blocked``: proof that the backfill really met a held row).
        until = time.monotonic() + self.rng.uniform(*wl.app.hold_s)
        seen: set[str] = set()
        while not wl._stop.is_set() and time.monotonic() < until:
            try:
                seen.update(r[0] for r in self._side().execute(
                    "SELECT application_name FROM pg_stat_activity WHERE %s = ANY (pg_blocking_pids(pid))",
                    (self.pid,)).fetchall())
            except psycopg.Error:
                self.watch = None
            wl._stop.wait(min(0.1, max(0.0, until - time.monotonic())))
        self.blocked.update(seen)
        return "hold"


def _pk_sort_key(text: str) -> tuple:
    """Order pk texts numerically when they are numbers (the order locks are taken in)."""
    try:
        return (0, float(text), text)
    except ValueError:
        return (1, 0.0, text)


# ----------------------------------------------------------------------------- workload


class Workload:
    """Concurrent writes on ``table`` mirrored into a golden copy. See the module doc.

    ``key_column`` is the (future) partition key; ``mix`` maps operations (insert,
    update, update_null, move_key, delete, read) to weights. ``profile="app"`` (or an
    ``app`` :class:`AppMix`) runs the application-like clients of ``app.kinds`` instead
    of ``clients`` simple ones; the report then also counts retries and failures per
    kind (``WorkloadReport.kinds``).
    """

    def __init__(
        self,
        dsn: str,
        table: str,
        key_column: str,
        clients: int = 4,
        seed: int = 0,
        mix: dict | None = None,
        think_time_s: float = 0.0,
        profile: str = "simple",
        app: AppMix | None = None,
    ):
        if profile not in ("simple", "app"):
            raise ValueError(f"unknown workload profile {profile!r}; known: simple, app")
        if profile == "app" or app is not None:
            app = app or AppMix()
            unknown_kinds = sorted(set(app.kinds) - set(KINDS))
            if unknown_kinds or not app.kinds:
                raise ValueError(f"unknown client kinds {unknown_kinds}; known: {list(KINDS)}")
            clients = len(app.kinds)
        if clients < 1:
            raise ValueError("clients must be >= 1")
        mix = dict(DEFAULT_MIX if mix is None else mix)
        unknown = set(mix) - set(OPS)
        if unknown:
            raise ValueError(f"unknown workload operations {sorted(unknown)}; known: {list(OPS)}")
        if not any(w > 0 for w in mix.values()):
            raise ValueError("the workload mix has no positive weight")
        self.dsn = dsn
        self.table = parse_qualified(table)
        self.key_column = key_column
        self.clients = clients
        self.seed = seed
        self.mix = mix
        self.think_time_s = think_time_s
        self.app = app
        self.profile = "app" if app is not None else "simple"
        self.kinds: tuple[str, ...] = tuple(app.kinds) if app is not None else ("simple",) * clients
        self.golden = _golden_name(self.table)
        self.report: WorkloadReport | None = None
        self._ops = [o for o in OPS if mix.get(o, 0) > 0]
        self._weights = [mix[o] for o in self._ops]
        self._stop = threading.Event()
        self._threads: list[_Client] = []
        self._meta: _Meta | None = None
        self._sql: _Statements | None = None
        self._run = 0
        self._started = 0.0
        self._setup_done = False
        self._pids: set[int] = set()  # backend pids of the clients' sessions, ever

    # -- lifecycle
    def setup(self) -> None:
        """(Re)create the golden copy of the table's current rows. No writes may run."""
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            meta = _introspect(conn, self.table, self.key_column)
            cols = ", ".join(ident(c.name) for c in meta.columns)
            g = str(self.golden)
            with conn.transaction():
                conn.execute(f"CREATE SCHEMA IF NOT EXISTS {ident(GOLDEN_SCHEMA)}")
                conn.execute(skew_function())
                conn.execute(f"DROP TABLE IF EXISTS {g}")
                conn.execute(f"CREATE TABLE {g} AS SELECT {cols} FROM {self.table}")
                pkl = ", ".join(ident(c) for c in meta.pk)
                conn.execute(f"CREATE UNIQUE INDEX ON {g} ({pkl})")
                # CTAS drops NOT NULL; put it back on the key so the copy has a usable pk.
                conn.execute(
                    f"ALTER TABLE {g} " + ", ".join(f"ALTER COLUMN {ident(c)} SET NOT NULL" for c in meta.pk)
                )
            conn.execute(f"ANALYZE {g}")
        self._meta = meta
        self._setup_done = True
        logger.debug("workload golden copy {} of {} created", self.golden, self.table)

    def start(self) -> None:
        """Start the client threads (runs :meth:`setup` first if it was not called)."""
        if self._threads:
            raise RuntimeError("workload already running")
        if not self._setup_done:
            self.setup()
        self._run += 1
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            self._prepare(conn)
        self._stop.clear()
        self._threads = [_Client(self, i) for i in range(self.clients)]
        self._started = time.monotonic()
        for t in self._threads:
            t.start()
        logger.debug("workload on {} started: {} clients, mix {}", self.table, self.clients, self.mix)

    def stop(self) -> WorkloadReport:
        """Stop the clients and report what they did."""
        self._stop.set()
        deadline = time.monotonic() + 30
        for t in self._threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
            if t.is_alive() and t.conn is not None:
                try:
                    t.conn.cancel()  # stuck behind a lock: cancel the query, then wait
                except Exception:  # noqa: BLE001
                    pass
                t.join(timeout=10)
        duration = time.monotonic() - self._started if self._started else 0.0
        threads, self._threads = self._threads, []
        ops = dict.fromkeys(OPS + (APP_OPS if self.app else ()), 0)
        lat = array("d")
        worst: tuple[float, datetime | None] = (0.0, None)
        samples: list[tuple[datetime, str, str]] = []
        errors = reconnects = 0
        retries: Counter[str] = Counter()
        codes: Counter[str] = Counter()
        kinds: dict[str, dict[str, Any]] = {}
        for t in threads:
            retries.update(t.retries)
            codes.update(t.error_codes)
            if self.app is not None:
                k = kinds.setdefault(t.kind, {"clients": 0, "transactions": 0, "rows": 0, "statements": {},
                                              "retries": {}, "errors": 0, "error_codes": {}, "max_wait_ms": 0.0,
                                              "blocked": {}})
                k["clients"] += 1
                k["transactions"] += t.transactions
                k["rows"] += t.rows if t.kind not in _SIMPLE_KINDS else t.transactions
                k["statements"] = dict(Counter(k["statements"]) + t.statements)
                k["retries"] = dict(Counter(k["retries"]) + t.retries)
                k["errors"] += t.nerrors
                k["error_codes"] = dict(Counter(k["error_codes"]) + t.error_codes)
                k["max_wait_ms"] = round(max(k["max_wait_ms"], t.max_wait_ms), 3)
                k["blocked"] = dict(Counter(k["blocked"]) + t.blocked)
            for k, v in t.counts.items():
                ops[k] += v
            lat.extend(t.latencies)
            if t.worst[0] > worst[0]:
                worst = t.worst
            samples += t.errors
            errors += t.nerrors
            reconnects += t.reconnects
        samples.sort()
        self.report = WorkloadReport(
            ops=ops,
            errors=errors,
            error_samples=[f"{ts.isoformat()} {op}: {msg}" for ts, op, msg in samples[:20]],
            latency_ms=_percentiles(lat),
            duration_s=round(duration, 3),
            max_latency_at=worst[1],
            writes=sum(ops[o] for o in WRITE_OPS + (APP_OPS if self.app else ())),
            reconnects=reconnects,
            clients=self.clients,
            retries=dict(retries),
            error_codes=dict(codes),
            kinds=kinds,
        )
        logger.debug("workload on {} stopped: {}", self.table, self.report.as_dict())
        return self.report

    def committed(self) -> int:
        """Transactions the running clients have committed so far (a live count)."""
        return sum(t.transactions for t in self._threads)

    def run_for(self, seconds: float) -> WorkloadReport:
        self.start()
        try:
            self._stop.wait(seconds)
        finally:
            report = self.stop()
        return report

    def __enter__(self) -> Workload:
        self.setup()
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._threads:
            self.stop()

    # -- verification
    def compare(self, dsn: str | None = None, table: str | None = None) -> Comparison:
        """Golden copy versus the live table (or ``table``), server side with EXCEPT ALL.

        A row whose primary key is only in the golden copy is *missing*, only in the
        live table *extra* (also an extra copy of a duplicated row), in both with other
        values *differing*. Columns are those of the golden copy, by name.
        """
        target = parse_qualified(table) if table else self.table
        with psycopg.connect(dsn or self.dsn, autocommit=True) as conn:
            gmeta = _introspect(conn, self.golden, self.key_column)
            pk = gmeta.pk
            sel = ", ".join(
                f"{ident(c.name)}::text AS {ident(c.name)}" if c.typname in _NO_EQUALITY else ident(c.name)
                for c in gmeta.columns
            )
            if len(pk) == 1:
                k = f"{ident(pk[0])}::text"
            else:
                k = f"ROW({', '.join(ident(c) for c in pk)})::text"
            g, t = str(self.golden), str(target)
            row = conn.execute(
                f"""
WITH gx AS MATERIALIZED (SELECT {k} AS k FROM (SELECT {sel} FROM {g} EXCEPT ALL SELECT {sel} FROM {t}) AS x),
     lx AS MATERIALIZED (SELECT {k} AS k FROM (SELECT {sel} FROM {t} EXCEPT ALL SELECT {sel} FROM {g}) AS x),
     missing AS (SELECT k FROM gx WHERE NOT EXISTS (SELECT 1 FROM lx WHERE lx.k = gx.k)),
     extra AS (SELECT k FROM lx WHERE NOT EXISTS (SELECT 1 FROM gx WHERE gx.k = lx.k)),
     differing AS (SELECT DISTINCT k FROM gx WHERE EXISTS (SELECT 1 FROM lx WHERE lx.k = gx.k))
SELECT (SELECT count(*) FROM missing), array(SELECT DISTINCT k FROM missing ORDER BY k LIMIT 5),
       (SELECT count(*) FROM extra), array(SELECT DISTINCT k FROM extra ORDER BY k LIMIT 5),
       (SELECT count(*) FROM differing), array(SELECT k FROM differing ORDER BY k LIMIT 5),
       (SELECT count(*) FROM {g}), (SELECT count(*) FROM {t})
"""
            ).fetchone()
        cmp = Comparison(
            table=str(target),
            golden=str(self.golden),
            missing=row[0],
            missing_sample=list(row[1]),
            extra=row[2],
            extra_sample=list(row[3]),
            differing=row[4],
            differing_sample=list(row[5]),
            golden_rows=row[6],
            live_rows=row[7],
        )
        logger.debug("workload compare: {}", cmp)
        return cmp

    # -- internals
    def _prepare(self, conn: psycopg.Connection) -> None:
        """Introspect, build the SQL and the value ranges the clients draw from."""
        self._meta = _introspect(conn, self.table, self.key_column)
        g = str(self.golden)
        meta = self._meta
        if self.app is None:
            self._sql = _Statements(meta, self.golden, self.clients)
        else:
            # One bucket per client plus the shared hot rows (the last bucket).
            self._sql = _Statements(meta, self.golden, self.clients, buckets=self.clients + 1)
            golden_pk = _introspect(conn, self.golden, self.key_column).pk
            self._sql.build_app(golden_pk, self._upsert_target(conn))
        self._golden_rows = conn.execute(f"SELECT count(*) FROM {g}").fetchone()[0]
        first = conn.execute(
            f"SELECT {self._sql.pk_text('g')} FROM {g} AS g ORDER BY "
            + ", ".join(ident(c) for c in meta.pk)
            + " LIMIT 1"
        ).fetchone()
        if first is None:
            logger.warning("workload: {} is empty; inserts copy from existing rows and will do nothing", self.table)
            self._first_pk = [""] * len(meta.pk)
        else:
            self._first_pk = self._split_pk(first[0])
        # The key range, as seconds since the epoch (time keys) or numbers.
        k = ident(meta.key.name)
        lo = hi = None
        if meta.key_kind in ("tstz", "ts", "date"):
            lo, hi = conn.execute(
                f"SELECT extract(epoch FROM min({k}))::float8, extract(epoch FROM max({k}))::float8 "
                f"FROM {g} WHERE isfinite({k})"
            ).fetchone()
        elif meta.key_kind:
            lo, hi = conn.execute(
                f"SELECT min({k})::float8, max({k})::float8 FROM {g} WHERE {k}::float8 "
                "BETWEEN '-1e300' AND '1e300'"
            ).fetchone()
        if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
            now = time.time()
            lo, hi = (now - 30 * 86400, now) if meta.key_kind in ("tstz", "ts", "date") else (0.0, 1e6)
        self._key_range = (float(lo), float(hi))
        # Primary-key columns the clients generate: numbers above the current maximum
        # (interleaved per client), text and uuids from the seed.
        self._pk_base: dict[str, int] = {}
        for name, how in self._sql.insert_plan:
            if how == "pk" and meta.col(name).typname in _NUM_KINDS:
                m = conn.execute(f"SELECT coalesce(max({ident(name)})::float8, 0) FROM {g}").fetchone()[0]
                self._pk_base[name] = int(m) + 1
        self._pk_token = hashlib.md5(
            f"{self.seed}:{self._golden_rows}:{self._run}:{self._key_range}".encode()
        ).hexdigest()[:8]

    def _upsert_target(self, conn: psycopg.Connection) -> list[str] | None:
        """The app's ON CONFLICT target: AppMix.upsert_target, else pk + key if a unique index has exactly those."""
        meta = self._meta
        if self.app.upsert_target:
            return list(self.app.upsert_target)
        want = sorted(set(meta.pk) | {meta.key.name})
        for (cols,) in conn.execute(
            "SELECT array_agg(a.attname::text) FROM pg_index i "
            "CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord) "
            "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum "
            "WHERE i.indrelid = %s::regclass AND i.indisunique AND i.indpred IS NULL AND i.indexprs IS NULL "
            "AND k.ord <= i.indnkeyatts GROUP BY i.indexrelid",
            (str(meta.table),),
        ).fetchall():
            if sorted(cols) == want:
                return [c for c in meta.pk] + ([meta.key.name] if meta.key.name not in meta.pk else [])
        return None

    def _new_pk_value(self, name: str, client: int, serial: int) -> str:
        col = self._meta.col(name)
        if name in self._pk_base:
            return str(self._pk_base[name] + serial * self.clients + client)
        if col.typname == "uuid":
            h = hashlib.md5(f"{self._pk_token}:{client}:{serial}".encode()).hexdigest()
            return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-8{h[17:20]}-{h[20:32]}"
        return f"wl-{self._pk_token}-{client}-{serial}"

    def _clamp_key(self, v: float) -> float:
        meta = self._meta
        if meta.key_kind in ("tstz", "ts", "date"):
            return min(max(v, -2.0e11), 2.0e11)  # years -4700 .. 8300: valid everywhere
        limit = _INT_LIMITS.get(meta.key.typname)
        if limit is not None:
            return float(min(max(round(v), -limit), limit))
        return v

    def _split_pk(self, text: str) -> list[str]:
        """A pk in text form back to one text per column (composite keys are ROW text)."""
        if len(self._meta.pk) == 1:
            return [text]
        return _parse_record(text)

    def _join_pk(self, parts: list[str]) -> str:
        if len(parts) == 1:
            return parts[0]
        return _record_text(parts)


def _percentiles(values: array) -> dict[str, float]:
    if not values:
        return {"p50": 0.0, "p95": 0.0, "p99": 0.0, "max": 0.0}
    s = sorted(values)

    def pct(p: float) -> float:
        return round(s[min(len(s) - 1, int(math.ceil(p * len(s))) - 1)], 3)

    return {"p50": pct(0.50), "p95": pct(0.95), "p99": pct(0.99), "max": round(s[-1], 3)}


def _parse_record(text: str) -> list[str]:
    """Parse PostgreSQL's record output ``(a,"b c",)`` into fields (NULL never occurs: pk)."""
    if not (text.startswith("(") and text.endswith(")")):
        raise ValueError(f"not a record: {text!r}")
    body, out, i = text[1:-1], [], 0
    while True:
        if i < len(body) and body[i] == '"':
            i += 1
            buf = []
            while True:
                ch = body[i]
                if ch == '"':
                    if i + 1 < len(body) and body[i + 1] == '"':
                        buf.append('"')
                        i += 2
                        continue
                    i += 1
                    break
                if ch == "\\":
                    buf.append(body[i + 1])
                    i += 2
                    continue
                buf.append(ch)
                i += 1
            out.append("".join(buf))
        else:
            j = body.find(",", i)
            j = len(body) if j == -1 else j
            out.append(body[i:j])
            i = j
        if i >= len(body):
            return out
        i += 1  # the comma


def _record_text(parts: list[str]) -> str:
    """Inverse of :func:`_parse_record`, matching record_out's quoting."""
    out = []
    for p in parts:
        if p == "" or any(ch in p for ch in '(),"\\ \t\n\r\v\f'):
            out.append('"' + p.replace("\\", "\\\\").replace('"', '""') + '"')
        else:
            out.append(p)
    return "(" + ",".join(out) + ")"
