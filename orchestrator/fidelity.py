"""Table shapes the twin must reproduce exactly: checks made at preflight (plan and apply
share them), and the statements that keep a constraint's properties on the twin.

Role: reads the catalog and renders SQL; never writes. Covered here:
- DEFERRABLE unique constraints stay DEFERRABLE (and INITIALLY DEFERRED) on the twin; a
  DEFERRABLE primary key is refused: the backfill's ON CONFLICT needs an immediate one.
- NOT VALID CHECKs stay NOT VALID (``CREATE TABLE ... LIKE`` copies them as validated, and
  legacy rows would then fail the backfill).
- NOT VALID foreign keys: PostgreSQL before 18 cannot add one to a partitioned table; the
  twin goes without it and plan/apply warn.
- Key columns of extension types (citext, ltree): matched with their own btree operator
  (see sql.Shape.eq); a type without a default btree operator class is refused.
"""

from __future__ import annotations

import psycopg

from orchestrator.errors import PreflightError
from orchestrator.inspect import TableInfo
from orchestrator.sql import QualifiedName, ident
from orchestrator.sql import fidelity as fidelity_sql
from orchestrator.sql.compose import Composed


def check(conn: psycopg.Connection, info: TableInfo, version: int) -> list[str]:
    """Refuse (PreflightError) what the twin cannot reproduce; return warnings for the rest."""
    warnings: list[str] = []
    row = conn.execute(fidelity_sql.DEFERRABLE_PRIMARY_KEY, (info.oid,)).fetchone()
    if row:
        raise PreflightError(
            f"the primary key {row[0]} of {info.name} is DEFERRABLE: the backfill's ON CONFLICT needs an immediate "
            "primary key on the twin, which would change how the table behaves; make it NOT DEFERRABLE first")
    for c in info.primary_key:
        if info.eq_ops.get(c) == "":
            col = info.column(c)
            raise PreflightError(
                f"primary key column {ident(c)} of {info.name} is of type {col.type if col else '?'}, which has no "
                "default btree operator class: rows cannot be matched between the tables")
    warnings += publication_warnings(conn, info)
    if version < 18:
        for fk in info.outgoing_fks:
            if fk.definition.endswith(" NOT VALID"):
                warnings.append(
                    f"foreign key {fk.name} is NOT VALID: PostgreSQL {version} cannot add a NOT VALID foreign key to "
                    "a partitioned table, so the new table will not have it; add and validate it after cutover "
                    "once the old rows satisfy it")
    return warnings


def skip_foreign_key(definition: str, version: int) -> bool:
    """NOT VALID foreign keys stay off the twin during the copy: like a CHECK, even a NOT VALID
    one applies to every row the backfill inserts, and legacy rows may violate it. On
    PostgreSQL 18+ it is added NOT VALID before the cutover (:func:`add_not_valid_checks`);
    before 18 a partitioned table cannot have one at all (warned by :func:`check`)."""
    return definition.endswith(" NOT VALID")


def not_valid_checks(info: TableInfo, twin: QualifiedName) -> list[tuple[str, Composed]]:
    """(action, SQL) taking the twin's copies of NOT VALID CHECKs off until the cutover.

    ``LIKE ... INCLUDING CONSTRAINTS`` copies them as validated, and even a NOT VALID CHECK
    applies to every row inserted: the backfill's copies of legacy rows would fail. The
    trigger's writes satisfy them anyway (the live table checks every new row version), so
    they are added back, NOT VALID, just before the cutover (:func:`add_not_valid_checks`)."""
    return [(f"CHECK {name} is NOT VALID: added back NOT VALID before the cutover",
             fidelity_sql.drop_constraint(twin, name))
            for name, definition in info.checks if definition.endswith(" NOT VALID")]


def add_not_valid_checks(ctx) -> list[str]:
    """Before the cutover lock: the live table's NOT VALID CHECKs (and, PostgreSQL 18+, foreign
    keys) onto the twin, NOT VALID
    (catalog only; ACCESS EXCLUSIVE on the twin for milliseconds, capped and retried).
    Idempotent: a CHECK the twin has by that name is left alone."""
    from orchestrator.db import with_lock_retry

    plan = ctx.plan
    rows = ctx.conn.execute(fidelity_sql.NOT_VALID_CHECKS_MISSING, (str(plan.table_name), str(plan.twin))).fetchall()
    if ctx.conn.info.server_version >= 180000:
        rows += ctx.conn.execute(fidelity_sql.NOT_VALID_FKS_MISSING,
                                 (str(plan.table_name), str(plan.twin))).fetchall()
    if not rows:
        return []

    def body(cur: psycopg.Cursor) -> None:
        for name, definition in rows:
            # definition: pg_get_constraintdef's text, embedded as SQL by add_constraint.
            cur.execute(fidelity_sql.add_constraint(plan.twin, name, definition))

    with_lock_retry(ctx.conn, body, what="NOT VALID checks on the twin", policy=plan.locks)
    return [r[0] for r in rows]


def deferrable_uniques(cur: psycopg.Cursor, oid: int) -> dict[str, str]:
    """conname -> pg_get_constraintdef of the table's DEFERRABLE unique constraints."""
    cur.execute(fidelity_sql.DEFERRABLE_UNIQUES, (oid,))
    return {r[0]: r[1] for r in cur.fetchall()}


def unique_constraint(twin: QualifiedName, name: str, definition: str, add_key: str | None) -> Composed:
    """The twin's copy of a unique constraint, keeping DEFERRABLE / INITIALLY DEFERRED: a slot
    swap that is legal on the table (checked at commit) stays legal on the twin."""
    return fidelity_sql.unique_constraint(twin, name, definition, add_key)


def publication_warnings(conn: psycopg.Connection, info: TableInfo) -> list[str]:
    """What the cutover does to publications of the table, and what it cannot fix."""
    out = []
    rows = conn.execute(fidelity_sql.PUBLICATIONS_OF, (info.oid,)).fetchall()
    if conn.info.server_version >= 150000:
        rows += conn.execute(fidelity_sql.SCHEMA_PUBLICATIONS_OF, (info.oid,)).fetchall()
    for name, viaroot, alltables, other_partitioned in rows:
        if name not in info.publications:
            out.append(
                f"publication {name} publishes {'every table' if alltables else 'the schema'}: the twin's partitions "
                "(and after cutover the retired table) are published too, and a subscriber without those tables "
                "stops with 'target relation does not exist'; publish the table explicitly instead")
        elif not viaroot:
            more = (" (it also lists other partitioned tables, which subscribers will then receive under their "
                    "root's name too)" if other_partitioned else "")
            out.append(f"publication {name}: publish_via_partition_root is set to true at cutover, so its "
                       f"subscribers keep receiving {info.name} under its own name{more}")
    return out
