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


@dataclass
class TableInfo:
    """Everything the orchestrator knows about one live table."""

    name: QualifiedName
    oid: int
    relkind: str
    owner: str
    comment: str | None
    acl: list[tuple[str, str, bool]]  # (grantee or PUBLIC, privilege, grantable)
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
    policies: list[tuple[str, str]]  # (name, CREATE POLICY with a {table} placeholder)
    publications: list[str]
    reloptions: list[str]
    estimated_rows: int
    total_bytes: int
    column_acl: list[tuple[str, str, str]] = field(default_factory=list)  # (column, grantee, privilege)
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
    cur.execute(
        "SELECT c.oid, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relname = %s",
        (name.schema, name.name),
    )
    row = cur.fetchone()
    return (row[0], row[1]) if row else None


def exists(cur: psycopg.Cursor, name: QualifiedName) -> bool:
    return resolve(cur, name) is not None


def _case_hint(cur: psycopg.Cursor, name: QualifiedName) -> str:
    cur.execute(
        "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE lower(n.nspname) = lower(%s) AND lower(c.relname) = lower(%s) AND c.relkind IN ('r','p') LIMIT 1",
        (name.schema, name.name),
    )
    row = cur.fetchone()
    if row:
        return f" (did you mean {QualifiedName(row[0], row[1])}? quote mixed-case names in the plan)"
    return ""


def inspect_table(conn: psycopg.Connection, name: QualifiedName, allow_partitioned: bool = False) -> TableInfo:
    """Read the table's catalog entry and dependents; PreflightError if it is not a table."""
    # One transaction: a consistent read, and SET LOCAL renders every definition fully
    # qualified (search_path = pg_catalog), whatever the caller's search_path.
    with conn.transaction(), conn.cursor() as cur:
        cur.execute("SET LOCAL search_path = pg_catalog")
        found = resolve(cur, name)
        if found is None:
            raise PreflightError(f"table {name} does not exist{_case_hint(cur, name)}")
        oid, relkind = found
        if relkind == "p" and not allow_partitioned:
            raise PreflightError(f"table {name} is already partitioned")
        if relkind not in ("r", "p"):
            raise PreflightError(f"{name} is not an ordinary table (relkind {relkind!r})")
        cur.execute(
            """SELECT pg_get_userbyid(c.relowner), obj_description(c.oid, 'pg_class'), c.relreplident,
                      c.relrowsecurity, c.relforcerowsecurity, coalesce(c.reloptions, '{}'),
                      greatest(c.reltuples, 0)::bigint, pg_total_relation_size(c.oid), c.relpersistence
               FROM pg_class c WHERE c.oid = %s""",
            (oid,),
        )
        owner, comment, replident, rls, rls_forced, reloptions, reltuples, total_bytes, persistence = cur.fetchone()
        if persistence == "t":
            raise PreflightError(f"{name} is a temporary table")
        cur.execute(
            """SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
                      pg_get_expr(d.adbin, d.adrelid), a.attgenerated::text, a.attidentity::text,
                      CASE WHEN a.attstattarget >= 0 THEN a.attstattarget END
               FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
               WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum""",
            (oid,),
        )
        columns = [Column(r[0], r[1], r[2], r[3], r[4] or "", r[5] or "", r[6]) for r in cur.fetchall()]
        cur.execute(
            """SELECT i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid), i.indisunique, i.indisprimary,
                      con.conname,
                      ARRAY(SELECT a.attname FROM unnest(i.indkey) WITH ORDINALITY k(n, o)
                            JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.n
                            WHERE k.n > 0 ORDER BY k.o),
                      0 = ANY (i.indkey::int2[]) OR i.indexprs IS NOT NULL, c2.relname
               FROM pg_index i JOIN pg_class c2 ON c2.oid = i.indexrelid
               LEFT JOIN pg_constraint con ON con.conindid = i.indexrelid AND con.conrelid = i.indrelid
               WHERE i.indrelid = %s ORDER BY c2.relname""",
            (oid,),
        )
        indexes = [Index(r[7], r[1], r[2], r[3], r[4], tuple(r[5]), r[6]) for r in cur.fetchall()]
        pk = next((list(i.columns) for i in indexes if i.primary), [])
        cur.execute(
            "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = %s AND contype = 'c' "
            "ORDER BY conname",
            (oid,),
        )
        checks = [(r[0], r[1]) for r in cur.fetchall()]
        cur.execute(
            """SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint
               WHERE conrelid = %s AND contype = 'f' ORDER BY conname""",
            (oid,),
        )
        outgoing = [ForeignKey(r[0], name, r[1]) for r in cur.fetchall()]
        cur.execute(
            """SELECT con.conname, n.nspname, c.relname, pg_get_constraintdef(con.oid),
                      ARRAY(SELECT a.attname FROM unnest(con.conkey) k(n)
                            JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.n)
               FROM pg_constraint con JOIN pg_class c ON c.oid = con.conrelid
               JOIN pg_namespace n ON n.oid = c.relnamespace
               WHERE con.confrelid = %s AND con.contype = 'f' AND con.conrelid <> con.confrelid
               ORDER BY 1""",
            (oid,),
        )
        incoming = [ForeignKey(r[0], QualifiedName(r[1], r[2]), r[3], tuple(r[4])) for r in cur.fetchall()]
        cur.execute(
            """SELECT DISTINCT v.oid, n.nspname, v.relname, v.relkind, pg_get_viewdef(v.oid),
                      coalesce(v.reloptions, '{}')
               FROM pg_depend d JOIN pg_rewrite r ON r.oid = d.objid AND d.classid = 'pg_rewrite'::regclass
               JOIN pg_class v ON v.oid = r.ev_class JOIN pg_namespace n ON n.oid = v.relnamespace
               WHERE d.refobjid = %s AND d.refclassid = 'pg_class'::regclass AND v.oid <> %s
               ORDER BY v.oid""",
            (oid, oid),
        )
        dependents = [Dependent(r[0], QualifiedName(r[1], r[2]), r[3], r[4], tuple(r[5])) for r in cur.fetchall()]
        cur.execute(
            """SELECT tgname, pg_get_triggerdef(oid), tgenabled::text FROM pg_trigger
               WHERE tgrelid = %s AND NOT tgisinternal AND tgname NOT LIKE 'orchestrate\\_%%' ORDER BY tgname""",
            (oid,),
        )
        triggers = [Trigger(*r) for r in cur.fetchall()]
        cur.execute(
            """SELECT n.nspname, s.relname, a.attname, d.deptype = 'i'
               FROM pg_depend d JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S'
               JOIN pg_namespace n ON n.oid = s.relnamespace
               JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
               WHERE d.refobjid = %s AND d.classid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')""",
            (oid,),
        )
        sequences = [OwnedSequence(QualifiedName(r[0], r[1]), r[2], r[3]) for r in cur.fetchall()]
        cur.execute(
            """SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(a.grantee) END,
                      a.privilege_type, a.is_grantable
               FROM pg_class c, aclexplode(c.relacl) a WHERE c.oid = %s AND a.grantee <> c.relowner""",
            (oid,),
        )
        acl = [(r[0], r[1], r[2]) for r in cur.fetchall()]
        cur.execute(
            """SELECT att.attname, CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(a.grantee) END,
                      a.privilege_type
               FROM pg_attribute att, aclexplode(att.attacl) a
               WHERE att.attrelid = %s AND att.attacl IS NOT NULL AND NOT att.attisdropped""",
            (oid,),
        )
        column_acl = [(r[0], r[1], r[2]) for r in cur.fetchall()]
        cur.execute(
            "SELECT i.indexrelid::regclass::text FROM pg_index i WHERE i.indrelid = %s AND i.indisreplident", (oid,)
        )
        row = cur.fetchone()
        replident_index = row[0] if row else None
        cur.execute(
            """SELECT polname, format('CREATE POLICY %%I ON %%s AS %%s FOR %%s TO %%s%%s%%s', polname, '{table}',
                      CASE WHEN polpermissive THEN 'PERMISSIVE' ELSE 'RESTRICTIVE' END,
                      CASE polcmd WHEN 'r' THEN 'SELECT' WHEN 'a' THEN 'INSERT' WHEN 'w' THEN 'UPDATE'
                                  WHEN 'd' THEN 'DELETE' ELSE 'ALL' END,
                      CASE WHEN polroles = '{0}' THEN 'PUBLIC'
                           ELSE (SELECT string_agg(quote_ident(rolname), ', ') FROM pg_roles
                                 WHERE oid = ANY (polroles)) END,
                      CASE WHEN polqual IS NOT NULL
                           THEN ' USING (' || pg_get_expr(polqual, polrelid) || ')' ELSE '' END,
                      CASE WHEN polwithcheck IS NOT NULL
                           THEN ' WITH CHECK (' || pg_get_expr(polwithcheck, polrelid) || ')' ELSE '' END)
               FROM pg_policy WHERE polrelid = %s ORDER BY polname""",
            (oid,),
        )
        policies = [(r[0], r[1]) for r in cur.fetchall()]
        cur.execute(
            """SELECT p.pubname FROM pg_publication_rel pr JOIN pg_publication p ON p.oid = pr.prpubid
               WHERE pr.prrelid = %s ORDER BY 1""",
            (oid,),
        )
        publications = [r[0] for r in cur.fetchall()]
        cur.execute(
            """SELECT a.attname,
                      (SELECT format('OPERATOR(%%s.=)', quote_ident(o.oprnamespace::regnamespace::text))
                       FROM pg_opclass oc JOIN pg_am am ON am.oid = oc.opcmethod AND am.amname = 'btree'
                       JOIN pg_amop ao ON ao.amopfamily = oc.opcfamily AND ao.amopstrategy = 3
                            AND ao.amoplefttype = oc.opcintype AND ao.amoprighttype = oc.opcintype
                       JOIN pg_operator o ON o.oid = ao.amopopr
                       WHERE oc.opcdefault AND oc.opcintype = t.oid)
               FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
               WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped
                 AND t.typnamespace <> 'pg_catalog'::regnamespace""",
            (oid,),
        )
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
    k = ident(key)
    with conn.cursor() as cur:
        cur.execute(f"SELECT (SELECT {k}::timestamp FROM {table} WHERE {k} IS NOT NULL AND isfinite({k}) "
                    f"ORDER BY {k} LIMIT 1), (SELECT {k}::timestamp FROM {table} WHERE {k} IS NOT NULL AND "
                    f"isfinite({k}) ORDER BY {k} DESC LIMIT 1)")
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
    row = conn.execute(
        """SELECT md5(concat_ws('|',
             (SELECT xmin::text FROM pg_class WHERE oid = %(o)s),
             (SELECT string_agg(xmin::text, ',' ORDER BY attnum) FROM pg_attribute WHERE attrelid = %(o)s),
             (SELECT string_agg(xmin::text || ':' || objid::text, ',' ORDER BY objid, objsubid)
                FROM pg_depend WHERE refobjid = %(o)s AND refclassid = 'pg_class'::regclass),
             (SELECT string_agg(xmin::text, ',' ORDER BY oid) FROM pg_trigger WHERE tgrelid = %(o)s),
             (SELECT string_agg(xmin::text, ',' ORDER BY oid) FROM pg_policy WHERE polrelid = %(o)s),
             (SELECT string_agg(xmin::text, ',' ORDER BY objsubid) FROM pg_description
                WHERE objoid = %(o)s AND classoid = 'pg_class'::regclass),
             (SELECT string_agg(xmin::text, ',' ORDER BY oid) FROM pg_publication_rel WHERE prrelid = %(o)s),
             (SELECT string_agg(xmin::text, ',' ORDER BY oid) FROM pg_constraint
                WHERE conrelid = %(o)s OR confrelid = %(o)s),
             (SELECT string_agg(xmin::text, ',' ORDER BY indexrelid) FROM pg_index WHERE indrelid = %(o)s)))""",
        {"o": oid},
    ).fetchone()
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
        cur.execute(
            "SELECT c.oid, c.relkind, pt.partstrat, pt.partnatts, pt.partattrs::int2[], pt.partdefid "
            "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "LEFT JOIN pg_partitioned_table pt ON pt.partrelid = c.oid WHERE n.nspname = %s AND c.relname = %s",
            (parent.schema, parent.name),
        )
        row = cur.fetchone()
        if row is None:
            raise PreflightError(f"table {parent} does not exist")
        oid, relkind, strat, natts, attrs, defid = row
        if relkind != "p" or strat != "r" or natts != 1:
            raise PreflightError(
                f"{parent} is not partitioned by RANGE on one column (run `orchestrate apply` first); "
                "maintain only manages range-partitioned tables"
            )
        cur.execute(
            "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = %s AND attnum = %s",
            (oid, attrs[0]),
        )
        kname, ktype = cur.fetchone()
        if kname != key:
            raise PreflightError(f"{parent} is partitioned by {ident(kname)}, the plan says {ident(key)}")
        if re.sub(r"\(\d+\)", "", ktype) not in _PART_KEY_TYPES:  # timestamp(3) is a time key too
            raise PreflightError(
                f"{parent} is partitioned by {ident(kname)} of type {ktype}; maintain needs a time key")
        cur.execute(
            "SELECT attname, attgenerated::text FROM pg_attribute WHERE attrelid = %s AND attnum > 0 "
            "AND NOT attisdropped ORDER BY attnum",
            (oid,),
        )
        cols = cur.fetchall()
        cur.execute(
            """SELECT a.attname, format_type(a.atttypid, a.atttypmod)
               FROM pg_index i CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
               JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
               WHERE i.indrelid = %s AND i.indisprimary ORDER BY k.ord""",
            (oid,),
        )
        pk = cur.fetchall()
        cur.execute(
            """SELECT n.nspname, c.relname, pg_get_expr(c.relpartbound, c.oid), i.inhdetachpending
               FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
               JOIN pg_namespace n ON n.oid = c.relnamespace WHERE i.inhparent = %s""",
            (oid,),
        )
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
