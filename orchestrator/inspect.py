"""Catalog reads: what the live table looks like and what depends on it. Never writes.

Everything the phases need to know about the table is gathered once into a
:class:`TableInfo`, so planning, prepare and cutover reason about the same facts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING

import psycopg

from orchestrator.errors import PreflightError
from orchestrator.sql import QualifiedName, ident
from orchestrator.sql import catalog as catalog_sql

if TYPE_CHECKING:
    from orchestrator.plan import Plan

KEY_TYPES = ("timestamp with time zone", "timestamp without time zone", "date")


@dataclass(frozen=True)
class Column:
    name: str
    type: str  # format_type()
    not_null: bool
    default: str | None
    generated: str  # '' | 's' (stored) | 'v' (virtual, PG18)
    identity: str  # '' | 'a' (ALWAYS) | 'd' (BY DEFAULT)
    stattarget: int | None

    @property
    def writable(self) -> bool:
        """Can an INSERT name this column? (generated columns are computed by the twin)."""
        return not self.generated


@dataclass(frozen=True)
class Index:
    name: str
    definition: str  # pg_get_indexdef, fully qualified (search_path = pg_catalog)
    unique: bool
    primary: bool
    constraint: str | None  # name of the constraint it backs (pk/unique/exclusion)
    columns: tuple[str, ...]  # plain column names, empty for expression-only
    has_expressions: bool


@dataclass(frozen=True)
class Dependent:
    """A relation that depends on the table (view or materialized view)."""

    oid: int
    name: QualifiedName
    kind: str  # 'v' | 'm'
    definition: str
    options: tuple[str, ...]


@dataclass(frozen=True)
class Trigger:
    name: str
    definition: str
    enabled: str


@dataclass(frozen=True)
class ForeignKey:
    name: str
    table: QualifiedName  # the table that holds the constraint
    definition: str
    columns: tuple[str, ...] = ()


@dataclass(frozen=True)
class OwnedSequence:
    name: QualifiedName
    column: str
    identity: bool


@dataclass(frozen=True)
class Policy:
    """One row-level security policy, in pg_policy's terms (roles None: PUBLIC)."""

    name: str
    permissive: bool
    command: str  # polcmd: r, a, w, d or *
    roles: tuple[str, ...] | None
    using: str | None
    check: str | None


@dataclass
class TableInfo:
    """Everything the orchestrator knows about one live table."""

    name: QualifiedName
    oid: int
    relkind: str
    owner: str
    comment: str | None
    acl: list[tuple[str | None, str, bool]]  # (grantee, None for PUBLIC; privilege, grantable)
    columns: list[Column]
    primary_key: list[str]
    indexes: list[Index]
    checks: list[tuple[str, str]]
    outgoing_fks: list[ForeignKey]
    incoming_fks: list[ForeignKey]
    dependents: list[Dependent]
    triggers: list[Trigger]
    sequences: list[OwnedSequence]
    replica_identity: str
    replica_identity_index: str | None
    rls_enabled: bool
    rls_forced: bool
    policies: list[Policy]
    publications: list[str]
    reloptions: list[str]
    estimated_rows: int
    total_bytes: int
    column_acl: list[tuple[str, str | None, str]] = field(default_factory=list)  # (column, grantee, privilege)
    # column -> its type's btree equality operator, schema-qualified (OPERATOR(public.=)), for
    # columns whose type lives outside pg_catalog (citext, ltree): functions pinned to
    # search_path pg_catalog would not find it, or would find a cast to text's instead.
    # '' when the type has no default btree operator class.
    eq_ops: dict[str, str] = field(default_factory=dict)

    def column(self, name: str) -> Column | None:
        return next((c for c in self.columns if c.name == name), None)

    @property
    def writable_columns(self) -> list[str]:
        return [c.name for c in self.columns if c.writable]

    @property
    def all_columns(self) -> list[str]:
        return [c.name for c in self.columns]

    @property
    def has_identity_always(self) -> bool:
        return any(c.identity == "a" for c in self.columns)


def resolve(cur: psycopg.Cursor, name: QualifiedName) -> tuple[int, str] | None:
    cur.execute(catalog_sql.RELATION_BY_NAME, (name.schema, name.name))
    row = cur.fetchone()
    return (row[0], row[1]) if row else None


def exists(cur: psycopg.Cursor, name: QualifiedName) -> bool:
    return resolve(cur, name) is not None


def _case_hint(cur: psycopg.Cursor, name: QualifiedName) -> str:
    cur.execute(catalog_sql.TABLE_BY_NAME_ANY_CASE, (name.schema, name.name))
    row = cur.fetchone()
    if row:
        return f" (did you mean {QualifiedName(row[0], row[1])}? quote mixed-case names in the plan)"
    return ""


def inspect_table(conn: psycopg.Connection, name: QualifiedName, allow_partitioned: bool = False) -> TableInfo:
    """Read the table's catalog entry and dependents; PreflightError if it is not a table."""
    # One transaction: a consistent read, and SET LOCAL renders every definition fully
    # qualified (search_path = pg_catalog), whatever the caller's search_path.
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(catalog_sql.CATALOG_SEARCH_PATH)
        found = resolve(cur, name)
        if found is None:
            raise PreflightError(f"table {name} does not exist{_case_hint(cur, name)}")
        oid, relkind = found
        if relkind == "p" and not allow_partitioned:
            raise PreflightError(f"table {name} is already partitioned")
        if relkind not in ("r", "p"):
            raise PreflightError(f"{name} is not an ordinary table (relkind {relkind!r})")
        cur.execute(catalog_sql.TABLE_ROW, (oid,))
        owner, comment, replident, rls, rls_forced, reloptions, reltuples, total_bytes, persistence = cur.fetchone()
        if persistence == "t":
            raise PreflightError(f"{name} is a temporary table")
        cur.execute(catalog_sql.COLUMNS, (oid,))
        columns = [Column(r[0], r[1], r[2], r[3], r[4] or "", r[5] or "", r[6]) for r in cur.fetchall()]
        cur.execute(catalog_sql.INDEXES, (oid,))
        indexes = [Index(r[7], r[1], r[2], r[3], r[4], tuple(r[5]), r[6]) for r in cur.fetchall()]
        pk = next((list(i.columns) for i in indexes if i.primary), [])
        cur.execute(catalog_sql.CHECKS, (oid,))
        checks = [(r[0], r[1]) for r in cur.fetchall()]
        cur.execute(catalog_sql.OUTGOING_FKS, (oid,))
        outgoing = [ForeignKey(r[0], name, r[1]) for r in cur.fetchall()]
        cur.execute(catalog_sql.INCOMING_FKS, (oid,))
        incoming = [ForeignKey(r[0], QualifiedName(r[1], r[2]), r[3], tuple(r[4])) for r in cur.fetchall()]
        cur.execute(catalog_sql.DEPENDENTS, (oid, oid))
        dependents = [Dependent(r[0], QualifiedName(r[1], r[2]), r[3], r[4], tuple(r[5])) for r in cur.fetchall()]
        cur.execute(catalog_sql.TRIGGERS, (oid,))
        triggers = [Trigger(*r) for r in cur.fetchall()]
        cur.execute(catalog_sql.OWNED_SEQUENCES, (oid,))
        sequences = [OwnedSequence(QualifiedName(r[0], r[1]), r[2], r[3]) for r in cur.fetchall()]
        cur.execute(catalog_sql.TABLE_ACL, (oid,))
        acl = [(r[0], r[1], r[2]) for r in cur.fetchall()]
        cur.execute(catalog_sql.COLUMN_ACL, (oid,))
        column_acl = [(r[0], r[1], r[2]) for r in cur.fetchall()]
        cur.execute(catalog_sql.REPLIDENT_INDEX, (oid,))
        row = cur.fetchone()
        replident_index = row[0] if row else None
        cur.execute(catalog_sql.POLICIES, (oid,))
        policies = [Policy(r[0], r[1], r[2], None if r[3] is None else tuple(r[3]), r[4], r[5])
                    for r in cur.fetchall()]
        cur.execute(catalog_sql.PUBLICATIONS, (oid,))
        publications = [r[0] for r in cur.fetchall()]
        cur.execute(catalog_sql.EQ_OPS, (oid,))
        eq_ops = {r[0]: r[1] or "" for r in cur.fetchall()}
    return TableInfo(
        name=name, oid=oid, relkind=relkind, owner=owner, comment=comment, acl=acl, columns=columns,
        primary_key=pk, indexes=indexes, checks=checks, outgoing_fks=outgoing, incoming_fks=incoming,
        dependents=dependents, triggers=triggers, sequences=sequences, replica_identity=replident,
        replica_identity_index=replident_index, rls_enabled=rls, rls_forced=rls_forced, policies=policies,
        publications=publications, reloptions=list(reloptions), estimated_rows=int(reltuples),
        total_bytes=int(total_bytes), column_acl=column_acl, eq_ops=eq_ops,
    )


def key_bounds(conn: psycopg.Connection, table: QualifiedName, key: str) -> tuple[datetime | None, datetime | None]:
    """min and max of the finite keys (two index probes when the key is indexed).

    'infinity' / '-infinity' keys are left out: no partition can hold them (they go to the
    default partition with NULLs and far-out keys) and Python's datetime cannot either."""
    with conn.cursor() as cur:
        cur.execute(catalog_sql.key_bounds(table, key))
        lo, hi = cur.fetchone()
    return lo, hi


def base_type(type_name: str) -> str:
    """A format_type() name without its typmod: 'timestamp(3) with time zone' -> 'timestamp with time zone'."""
    return re.sub(r"\(\d+\)", "", type_name)


def has_index_on(info: TableInfo, column: str) -> bool:
    return any(i.columns and i.columns[0] == column for i in info.indexes)


def catalog_fingerprint(conn: psycopg.Connection, oid: int) -> str:
    """One cheap query whose answer changes when anything inspect_table reads changes.

    The cutover inspects the table before it asks for the lock (a dozen catalog queries
    would otherwise be paid while every application query waits) and, once it holds the
    lock, re-inspects only if this fingerprint moved. Read the fingerprint BEFORE the
    inspection: a change that lands during it then shows up as a different fingerprint.
    """
    row = conn.execute(catalog_sql.CATALOG_FINGERPRINT, {"o": oid}).fetchone()
    return row[0]


# --- partitioned tables (maintain, the horizon) ------------------------------------------
_PART_KEY_TYPES = ("date", "timestamp without time zone", "timestamp with time zone")


def naive_utc(t: datetime | None) -> datetime | None:
    """An aware datetime converted to naive UTC; a naive one is taken as UTC."""
    if t is None:
        return None
    if t.tzinfo is not None:
        t = t.astimezone(timezone.utc).replace(tzinfo=None)
    return t


def parse_bound(text: str) -> datetime | None:
    """One bound of pg_get_expr(relpartbound): a quoted literal, MINVALUE or MAXVALUE (None)."""
    text = text.strip()
    if text.upper() in ("MINVALUE", "MAXVALUE"):
        return None
    if text.startswith("'") and text.endswith("'"):
        text = text[1:-1]
    if text in ("infinity", "-infinity"):
        return None
    try:
        return naive_utc(datetime.fromisoformat(text))
    except ValueError:
        return None


_BOUND = re.compile(r"^FOR VALUES FROM \((.*)\) TO \((.*)\)$", re.DOTALL)


def parse_partbound(expr: str) -> tuple[datetime | None, datetime | None, bool] | None:
    """(lo, hi, is_default) from a partition bound expression; None if not a one-column range."""
    if expr.strip() == "DEFAULT":
        return None, None, True
    m = _BOUND.match(expr.strip())
    if not m:
        return None
    return parse_bound(m.group(1)), parse_bound(m.group(2)), False


@dataclass
class Part:
    """One partition of the parent: its name and [lo, hi) (None = MINVALUE/MAXVALUE)."""

    name: QualifiedName
    lo: datetime | None
    hi: datetime | None
    is_default: bool = False
    detach_pending: bool = False


@dataclass
class Facts:
    parent: QualifiedName
    oid: int
    key: str
    key_type: str
    pk: list[str]
    pk_types: list[str]
    writable: list[str]
    columns: list[str]
    parts: list[Part]
    default: QualifiedName | None
    server_version: int


def partitioned_facts(conn: psycopg.Connection, plan: Plan) -> Facts:
    """The partition layout of the plan's (range-partitioned) table: key, columns, partitions."""
    parent = plan.table_name
    key = plan.partition_by.column
    with conn.cursor() as cur:
        cur.execute(catalog_sql.PARTITIONED_TABLE, (parent.schema, parent.name))
        row = cur.fetchone()
        if row is None:
            raise PreflightError(f"table {parent} does not exist")
        oid, relkind, strat, natts, attrs, defid = row
        if relkind != "p" or strat != "r" or natts != 1:
            raise PreflightError(
                f"{parent} is not partitioned by RANGE on one column (run `orchestrate apply` first); "
                "maintain only manages range-partitioned tables"
            )
        cur.execute(catalog_sql.PART_KEY_COLUMN, (oid, attrs[0]))
        kname, ktype = cur.fetchone()
        if kname != key:
            raise PreflightError(f"{parent} is partitioned by {ident(kname)}, the plan says {ident(key)}")
        if re.sub(r"\(\d+\)", "", ktype) not in _PART_KEY_TYPES:  # timestamp(3) is a time key too
            raise PreflightError(
                f"{parent} is partitioned by {ident(kname)} of type {ktype}; maintain needs a time key")
        cur.execute(catalog_sql.PART_COLUMNS, (oid,))
        cols = cur.fetchall()
        cur.execute(catalog_sql.PART_PRIMARY_KEY, (oid,))
        pk = cur.fetchall()
        cur.execute(catalog_sql.PARTITIONS, (oid,))
        parts: list[Part] = []
        default = None
        for nsp, rel, expr, pending in cur.fetchall():
            name = QualifiedName(nsp, rel)
            parsed = parse_partbound(expr or "")
            if parsed is None:
                raise PreflightError(f"cannot read the bounds of partition {name}: {expr}")
            lo, hi, is_default = parsed
            if is_default:
                default = name
            parts.append(Part(name, lo, hi, is_default, bool(pending)))
    parts.sort(key=lambda p: (p.is_default, p.lo or datetime.min))
    return Facts(parent, oid, key, ktype, [r[0] for r in pk], [r[1] for r in pk],
                 [c for c, g in cols if g == ""], [c for c, _ in cols], parts, default,
                 conn.info.server_version // 10000)
