"""DDL drift: the application changes the table while it is being migrated.

Role: keeps the twin's shape equal to the live table's while a migration runs. The shape
the twin has (in the live table's terms) is recorded in the migration's facts (``shape``)
at prepare and after every carried change; it is compared with the live table on every
``apply``, at every phase boundary, from the backfill's coordinator loop, after a phase
failed, and (columns only, one query) under the cutover lock.

- Compatible changes are carried to the twin online, in one short transaction under
  ``lock_timeout`` with retries (:func:`carry`), and the trigger functions are regenerated
  with the new column list: ADD COLUMN (any default, NOT NULL with a default), DROP COLUMN,
  RENAME COLUMN, SET/DROP DEFAULT, SET/DROP NOT NULL, a new or dropped CHECK (NOT VALID
  kept NOT VALID; a validated one is added NOT VALID under the lock and validated after
  it), a new or dropped index (built on the twin's partitions CONCURRENTLY; a unique one
  gains the key column as prepare does).
- An added column may have been written by the application before the trigger knew it:
  every range is then re-copied (the backfill's repair path) and verified again.
- Incompatible changes stop the run with :class:`DriftRefused` (exit 8), naming the change;
  nothing is changed: a column's type or collation, the primary key, the partition key
  column, a generated or identity property.

What an application sees while capture runs (see README "Table shapes"):
- ADD COLUMN, defaults, CHECKs, indexes: nothing; carried at the next check.
- DROP COLUMN and ALTER COLUMN TYPE of a captured column: PostgreSQL refuses the DDL itself
  ("other objects depend on it: trigger orchestrate_capture_columns"), because the sentinel
  trigger installed with the capture names every captured column in ``UPDATE OF``; the
  application's writes never fail. ``DROP COLUMN ... CASCADE`` overrides that: then
  INSERTs and UPDATEs fail in the capture trigger until the next check regenerates it
  (within a second during the backfill). ``guard_ddl: true`` (superuser) refuses any
  ALTER TABLE / CREATE INDEX / DROP on the table with orchestrate's own message instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from loguru import logger

from orchestrator import sql
from orchestrator.context import FORWARD_TRIGGER, REVERSE_TRIGGER
from orchestrator.db import is_connection_error, lock_both, with_lock_retry
from orchestrator.errors import ConnectionFailed, StateConflict
from orchestrator.inspect import TableInfo, catalog_fingerprint, inspect_table
from orchestrator.sql import QualifiedName
from orchestrator.sql import drift as dsql
from orchestrator.sql.compose import Composed
from orchestrator.sql.twin import twin_index_name


class DriftRefused(StateConflict):
    """The application changed the table in a way the twin cannot follow (exit 8)."""


class ShapeChanged(Exception):  # noqa: N818 - a signal to the runner, not an error
    """Raised inside a phase when the live table's shape moved: the runner carries the
    change (:func:`check`) and runs the phase again. Never reaches the user."""


@dataclass(frozen=True)
class Change:
    """One difference between the recorded shape and the live table."""

    kind: str  # add_column, drop_column, rename_column, default, not_null, add_check, drop_check,
    #            validate_check, add_index, drop_index
    name: str
    detail: dict
    text: str  # one line for logs and events


# --- the recorded shape --------------------------------------------------------------------


def snapshot(conn: psycopg.Connection, info: TableInfo, key: str) -> dict:
    """The shape of ``info`` as JSON-able data: columns (by attnum, with type, typmod,
    collation, default, NOT NULL, generated, identity), primary key, key column, CHECKs
    (pg_get_constraintdef, which ends in NOT VALID for unvalidated ones) and indexes."""
    rows = conn.execute(dsql.ATTRIBUTE_COLLATIONS, (info.oid,)).fetchall()
    extra = {r[0]: (r[1], r[2]) for r in rows}
    return {
        "columns": [{"name": c.name, "attnum": extra[c.name][0], "type": c.type, "collation": extra[c.name][1],
                     "not_null": c.not_null, "default": c.default, "generated": c.generated,
                     "identity": c.identity} for c in info.columns],
        "pk": list(info.primary_key),
        "key": key,
        "checks": {name: definition for name, definition in info.checks},
        "indexes": {i.name: i.definition for i in info.indexes if not i.primary},
    }


def diff(old: dict, new: dict) -> tuple[list[Change], list[str]]:
    """(compatible changes in the order to apply them, incompatible ones as one-line texts)."""
    carried: list[Change] = []
    refused: list[str] = []
    key = old["key"]
    by_num_old = {c["attnum"]: c for c in old["columns"]}
    by_num_new = {c["attnum"]: c for c in new["columns"]}
    for num, c in by_num_old.items():
        if num not in by_num_new:
            if c["name"] == key or c["name"] in old["pk"]:
                part = "partition key" if c["name"] == key else "primary key"
                refused.append(f"column {c['name']} (part of the {part}) was dropped")
            else:
                carried.append(Change("drop_column", c["name"], c, f"column {c['name']} dropped"))
    for num, n in by_num_new.items():
        o = by_num_old.get(num)
        if o is None:
            if n["identity"]:
                refused.append(f"identity column {n['name']} was added")
            else:
                carried.append(Change("add_column", n["name"], n, f"column {n['name']} {n['type']} added"))
            continue
        name = o["name"]
        if n["name"] != name:
            if name == key:
                refused.append(f"the partition key column {name} was renamed to {n['name']}")
                continue
            carried.append(Change("rename_column", n["name"], {"old": name}, f"column {name} renamed to {n['name']}"))
        if (n["type"], n["collation"]) != (o["type"], o["collation"]):
            what = f"type {o['type']} -> {n['type']}" if n["type"] != o["type"] else \
                f"collation {o['collation'] or 'default'} -> {n['collation'] or 'default'}"
            refused.append(f"column {n['name']} changed {what}")
        if (n["generated"], n["identity"]) != (o["generated"], o["identity"]):
            refused.append(f"column {n['name']} changed its generated/identity property")
        if n["default"] != o["default"] and not n["generated"]:
            carried.append(Change("default", n["name"], n, f"column {n['name']} default "
                                  f"{o['default'] or 'none'} -> {n['default'] or 'none'}"))
        if n["not_null"] != o["not_null"]:
            if name == key:
                refused.append(f"the partition key column {key} changed NOT NULL "
                               f"{'on' if n['not_null'] else 'off'}")
            else:
                carried.append(Change("not_null", n["name"], n, f"column {n['name']} "
                                      f"{'SET' if n['not_null'] else 'DROP'} NOT NULL"))
    pk_nums_old = [next(c["attnum"] for c in old["columns"] if c["name"] == p) for p in old["pk"]]
    pk_nums_new = [next((c["attnum"] for c in new["columns"] if c["name"] == p), None) for p in new["pk"]]
    if pk_nums_old != pk_nums_new:
        was, now = ", ".join(old["pk"]) or "none", ", ".join(new["pk"]) or "none"
        refused.append(f"the primary key changed ({was}) -> ({now})")
    for cname, definition in old["checks"].items():
        nd = new["checks"].get(cname)
        if nd is None or (nd != definition and _not_valid(definition) != nd):
            carried.append(Change("drop_check", cname, {}, f"CHECK {cname} dropped"))
    for cname, definition in new["checks"].items():
        od = old["checks"].get(cname)
        if od == definition:
            continue
        if od is not None and _not_valid(od) == definition:
            carried.append(Change("validate_check", cname, {"definition": definition}, f"CHECK {cname} validated"))
        else:
            carried.append(Change("add_check", cname, {"definition": definition}, f"CHECK {cname} added"))
    for iname, definition in old["indexes"].items():
        if new["indexes"].get(iname) != definition:
            carried.append(Change("drop_index", iname, {}, f"index {iname} dropped"))
    for iname, definition in new["indexes"].items():
        if old["indexes"].get(iname) != definition:
            carried.append(Change("add_index", iname, {"definition": definition}, f"index {iname} added"))
    return carried, refused


def _not_valid(definition: str) -> str:
    """A CHECK definition without its NOT VALID suffix (how the validated one reads)."""
    return definition.removesuffix(" NOT VALID")


# --- the sentinel: DROP COLUMN / ALTER TYPE refused by PostgreSQL's own dependency check -----


def install_column_guard(cur: psycopg.Cursor, table: QualifiedName, trigger: str, columns: list[str],
                         fn: QualifiedName) -> None:
    """A trigger that never fires (WHEN (false)) but names every captured column in
    ``UPDATE OF``: PostgreSQL records a dependency on each, so a plain DROP COLUMN or ALTER
    COLUMN TYPE of one of them is refused in the application's own DDL statement, instead
    of every later write failing in the sync trigger. Costs nothing per row.

    Warning: DROP/CREATE TRIGGER lock the table (ACCESS EXCLUSIVE); call under the lock."""
    cur.execute(dsql.column_guard_function(fn))
    name = trigger + "_columns"
    cur.execute(dsql.drop_trigger(table, name))
    if columns:
        cur.execute(dsql.column_guard_trigger(table, name, columns, fn))


def column_guard_matches(cur: psycopg.Cursor, table: QualifiedName, trigger: str, columns: list[str]) -> bool:
    """Does ``table`` carry the column guard of ``trigger`` naming exactly ``columns``?

    The reverse side's guard is staged on the twin at prepare (creating it on a partitioned
    table clones it onto every partition, which the cutover must not do under its lock);
    the cutover re-makes it only when a column was carried to the twin since."""
    cur.execute(dsql.COLUMN_GUARD_COLUMNS, (str(table), trigger + "_columns"))
    row = cur.fetchone()
    return row is not None and list(row[0]) == sorted(columns)


def drop_column_guard(cur: psycopg.Cursor, table: QualifiedName | None, trigger: str, fn: QualifiedName) -> None:
    """Idempotent; ``table`` None when it no longer exists."""
    if table is not None:
        cur.execute(dsql.drop_trigger(table, trigger + "_columns"))
    # Each side has a function of its own (capture_columns / reverse_columns); it goes only
    # when no guard trigger uses it any more.
    cur.execute(dsql.TRIGGERS_USING_FUNCTION, (dsql.no_arg_signature(fn),))
    if cur.fetchone()[0] == 0:
        cur.execute(dsql.drop_function(fn))


# --- the opt-in guard: an event trigger (superuser) -------------------------------------------


def can_guard_ddl(conn: psycopg.Connection) -> tuple[bool, str]:
    """Event triggers need superuser (PostgreSQL 15: no other role may create one)."""
    row = conn.execute(dsql.IS_SUPERUSER).fetchone()
    if row and row[0]:
        return True, ""
    return False, ("guard_ddl: the role is not a superuser and cannot create an event trigger; the table is "
                   "not guarded (DROP COLUMN and ALTER COLUMN TYPE are still refused by the capture's sentinel "
                   "trigger; other changes are carried or refused at the next check)")


def guard_name(mid: int) -> str:
    return f"orchestrate_ddl_guard_{mid}"


def install_ddl_guard(cur: psycopg.Cursor, mid: int, table_oid: int, table: QualifiedName) -> None:
    """ddl_command_end + sql_drop event triggers refusing ALTER TABLE, CREATE/DROP INDEX and
    DROP on the table while it is migrated (orchestrate's own sessions excepted).

    Warning: superuser only; the trigger runs the function for every DDL in the database
    (a catalog lookup per command, nothing per row)."""
    fn = QualifiedName("orchestrate", guard_name(mid))
    msg = (f"{table} is being migrated by orchestrate (migration {mid}); schema changes are refused "
           "until cutover (guard_ddl: true). Roll back or finish the migration first")
    cur.execute(dsql.ddl_guard_function(fn, table_oid, msg))
    cur.execute(dsql.revoke_function(fn))
    for event, suffix in dsql.GUARD_EVENTS:
        name = guard_name(mid) + suffix
        cur.execute(dsql.drop_event_trigger(name))
        cur.execute(dsql.create_event_trigger(name, event, fn))


def drop_ddl_guard(cur: psycopg.Cursor, mid: int) -> None:
    """Idempotent; a no-op when no guard was installed (any role may run it then)."""
    cur.execute(dsql.GUARD_EVENT_TRIGGERS, (guard_name(mid), guard_name(mid) + "_drop"))
    for (name,) in cur.fetchall():
        cur.execute(dsql.drop_event_trigger(name))
    if cur.execute(dsql.REGPROC, (f"orchestrate.{guard_name(mid)}",)).fetchone()[0] is not None:
        cur.execute(dsql.drop_function(QualifiedName("orchestrate", guard_name(mid)), if_exists=False))


# --- comparing and carrying ---------------------------------------------------------------


def recorded(ctx) -> dict | None:
    return ctx.facts.get("shape")


def live_shape(ctx) -> tuple[TableInfo, dict]:
    info = inspect_table(ctx.conn, ctx.plan.table_name)
    return info, snapshot(ctx.conn, info, ctx.plan.partition_by.column)


def moved(ctx) -> bool:
    """Does the live table differ from the recorded shape? (Reads only.)"""
    ctx.refresh()
    old = recorded(ctx)
    if old is None or ctx.migration is None or ctx.migration.status != "running":
        return False
    try:
        _info, new = live_shape(ctx)
    except Exception:  # noqa: BLE001 - a table that vanished is reported by the phase itself
        return False
    carried, refused = diff(old, new)
    return bool(carried or refused)


def assert_unchanged(ctx, info: TableInfo) -> None:
    """ShapeChanged when ``info`` (the table as the cutover inspected it) differs from the
    recorded shape in anything the twin follows: columns, defaults, CHECKs, indexes, keys."""
    old = recorded(ctx)
    if old is None:
        return
    carried, refused = diff(old, snapshot(ctx.conn, info, ctx.plan.partition_by.column))
    if carried or refused:
        raise ShapeChanged("; ".join([c.text for c in carried] + refused))


class Watch:
    """For a phase's coordinator loop: True once the table's catalog entry moved and its shape
    differs from the recorded one. One cheap fingerprint query per call; the full comparison
    only when the fingerprint moved."""

    def __init__(self, ctx, min_interval_s: float = 1.0):

        self.ctx = ctx
        self._fp = catalog_fingerprint
        self.oid = ctx.facts.get("table_oid")
        self.last = self._fp(ctx.conn, self.oid) if self.oid else None
        self.min_interval_s = min_interval_s
        self._next = 0.0

    def __call__(self) -> bool:
        import time

        if self.oid is None or time.monotonic() < self._next:
            return False
        self._next = time.monotonic() + self.min_interval_s
        fp = self._fp(self.ctx.conn, self.oid)
        if fp == self.last:
            return False
        self.last = fp
        return moved(self.ctx)


def check(ctx, install_capture: Callable[[psycopg.Cursor, Any], None]) -> bool:
    """Compare the live table with the recorded shape; carry compatible changes, refuse the
    others (DriftRefused, exit 8, nothing changed). True when something was carried.

    ``install_capture(cur, ctx)``: the capture phase's (re)install of the forward capture for
    the new shape, passed in by the runner: drift sits below the phases.

    Before the shape is recorded (a migration prepared by an older version) it is recorded
    now: the twin was built from the table as it is."""
    ctx.refresh()
    m = ctx.migration
    if m is None or m.status != "running" or not m.done("prepare"):
        return False
    old = recorded(ctx)
    if old is None:
        info, new = live_shape(ctx)
        with ctx.conn.transaction(), ctx.conn.cursor() as cur:
            ctx.store.set_facts(cur, ctx.mid, shape=new)
        ctx.refresh()
        return False
    info, new = live_shape(ctx)
    carried, refused = diff(old, new)
    if refused:
        raise DriftRefused(
            f"{ctx.plan.table_name} was changed while it is being migrated: {'; '.join(refused)}. The twin "
            "cannot follow this change; nothing was changed. Revert the change, or `orchestrate rollback` "
            "and start again")
    if not carried:
        return False
    try:
        carry(ctx, install_capture)
    except psycopg.Error as e:

        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if is_connection_error(e):
            raise ConnectionFailed(f"lost the database connection while carrying a schema change ({msg}); "
                                   "run apply again") from None
        # The twin refused the change (an index the data do not satisfy, say): a known
        # condition, not a bug. The carry's transaction rolled back; the next apply retries.
        raise DriftRefused(f"{ctx.plan.table_name} was changed ({'; '.join(c.text for c in carried)}) and the "
                           f"change could not be carried to the twin: {msg}") from None
    return True


def carry(ctx, install_capture: Callable[[psycopg.Cursor, Any], None]) -> None:
    """Carry the compatible changes: under ACCESS EXCLUSIVE on the table and the twin (taken in
    the writers' order, each wait capped by lock_timeout, retried), re-read the shape, change
    the twin, regenerate the sync functions and the sentinel, record the new shape, and
    schedule a re-copy when a column was added. Indexes are built and CHECKs validated
    afterwards, without blocking writers."""
    plan = ctx.plan
    later: list[Change] = []
    texts: list[str] = []

    def body(cur: psycopg.Cursor) -> None:
        later.clear()
        texts.clear()
        lock_both(cur, plan.table_name, plan.twin)
        info, new = live_shape(ctx)
        old = recorded(ctx)
        changes, refused = diff(old, new)
        if refused:
            raise DriftRefused(f"{plan.table_name} was changed while it is being migrated: {'; '.join(refused)}; "
                               "nothing was changed")
        shape = dict(new)
        # What the twin will have once this transaction commits: indexes built later are
        # recorded when they exist; a CHECK added NOT VALID here is recorded NOT VALID.
        shape["indexes"] = {k: v for k, v in old["indexes"].items() if new["indexes"].get(k) == v}
        shape["checks"] = dict(new["checks"])
        added = False
        # The reverse side's column guard, staged on the twin at prepare, names every column:
        # a column carried to the twin takes it off and puts it back with the new list.
        columns_changed = any(ch.kind in ("add_column", "drop_column") for ch in changes)
        if columns_changed:
            drop_column_guard(cur, plan.twin, REVERSE_TRIGGER, ctx.function("reverse_columns"))
        for ch in changes:
            texts.append(ch.text)
            if ch.kind == "add_index":
                later.append(ch)
                continue
            if ch.kind in ("add_check", "validate_check"):
                definition = ch.detail["definition"]
                if definition.endswith(" NOT VALID"):
                    # Legacy rows may violate it, and a CHECK applies to every row the backfill
                    # inserts: added NOT VALID just before the cutover (fidelity.add_not_valid_checks).
                    continue
                # Added NOT VALID under the lock (no scan), validated after it; recorded NOT
                # VALID until then.
                shape["checks"][ch.name] = definition + " NOT VALID"
                cur.execute(dsql.replace_check_not_valid(plan.twin, ch.name, definition))
                later.append(Change("validate_check", ch.name, ch.detail, ch.text))
                continue
            for stmt in twin_ddl(plan.twin, ch, plan.partition_by.column):
                cur.execute(stmt)
            added = added or ch.kind == "add_column"
        ctx.info = info
        if columns_changed:
            install_column_guard(cur, plan.twin, REVERSE_TRIGGER, info.writable_columns,
                                 ctx.function("reverse_columns"))
        m = ctx.migration
        if m.done("capture"):
            install_capture(cur, ctx)
            install_column_guard(cur, plan.table_name, FORWARD_TRIGGER, info.writable_columns,
                                 ctx.function("capture_columns"))
        ctx.store.set_facts(cur, ctx.mid, shape=shape)
        if added and m.done("capture"):
            _schedule_recopy(cur, ctx)

    with_lock_retry(ctx.conn, body, what="carry the table's schema change to the twin",
                    policy=plan.locks)
    msg = "schema change carried to the twin: " + "; ".join(texts)
    logger.warning(msg)
    ctx.store.event(ctx.mid, "drift", msg, changes=texts)
    ctx.refresh()
    for ch in later:
        if ch.kind == "add_index":
            build_index(ctx, ch.name, ch.detail["definition"])
        else:
            _validate_check(ctx, ch.name)
    ctx.refresh()


def twin_ddl(twin: QualifiedName, ch: Change, key: str) -> list[Composed]:
    """The catalog-only statements that carry one change to the twin (pure)."""
    index = twin_index(twin, ch.name) if ch.kind == "drop_index" else None
    return dsql.twin_ddl(twin, ch.kind, ch.name, ch.detail, index)


def twin_index(twin: QualifiedName, name: str) -> QualifiedName:
    return twin.with_name(twin_index_name(name))


def _schedule_recopy(cur: psycopg.Cursor, ctx) -> None:
    """An added column may hold values the trigger did not copy (written between the ALTER and
    this regeneration), in any row: every range is re-copied (delete the twin's rows, copy
    again, live rows locked FOR SHARE) and verified again."""

    ranges = cur.execute(dsql.RANGES_PLANNED, (ctx.mid,)).fetchone()
    if not ranges[0]:
        return  # not planned yet: the backfill copies every range with the new column
    # Pending ranges too: the trigger may have inserted rows there, and the copy's ON CONFLICT
    # DO NOTHING would keep their stale version.
    ctx.store.ranges_to_repair(cur, ctx.mid)


def build_index(ctx, name: str, definition: str) -> None:
    """An index the application created, on the twin, without blocking writers: the parent
    index ON ONLY the twin (catalog only), then each partition's CONCURRENTLY and attached.
    A unique index gains the partition key, as at prepare. Records it in the shape."""
    plan = ctx.plan
    key = plan.partition_by.column
    with ctx.conn.transaction(), ctx.conn.cursor() as cur:
        cur.execute(dsql.SEARCH_PATH_CATALOG)
        cur.execute(dsql.INDEX_FACTS, (str(plan.table_name), sql.ident(plan.table_name.schema), name))
        row = cur.fetchone()
    if row is None:
        return  # dropped again meanwhile: the next check sees it gone
    qname, qtable, unique, columns = row
    add_key = key if unique and key not in columns else None
    head = dsql.index_definition_head(unique, qname, qtable)
    target = twin_index(plan.twin, name)
    ctx.conn.execute(dsql.create_parent_index(definition, head, unique, target.name, plan.twin, add_key))
    parts = ctx.conn.execute(dsql.PARTITIONS_OF, (str(plan.twin),)).fetchall()
    for schema, part in parts:
        pname = part_index_name(part, name)
        have = ctx.conn.execute(dsql.PARTITION_INDEX_ATTACHED, (str(target), pname)).fetchone()
        if have:
            continue
        ctx.conn.execute(dsql.drop_index(QualifiedName(schema, pname)))  # an invalid leftover
        # CONCURRENTLY: writers to the partition (the capture trigger) go on while it builds.
        ctx.conn.execute(dsql.create_partition_index(definition, head, unique, pname, QualifiedName(schema, part),
                                                     add_key))
        ctx.conn.execute(dsql.attach_index(target, QualifiedName(schema, pname)))
    with ctx.conn.transaction(), ctx.conn.cursor() as cur:
        shape = recorded(ctx) or {}
        shape.setdefault("indexes", {})[name] = definition
        ctx.store.set_facts(cur, ctx.mid, shape=shape)
    ctx.refresh()
    logger.info("drift: index {} built on the twin ({} partitions)", name, len(parts))


def part_index_name(part: str, index: str) -> str:
    """A partition's index name, unique and within 63 bytes: a hash keeps truncated names apart."""
    import hashlib

    h = hashlib.sha1(f"{part}\x00{index}".encode()).hexdigest()[:8]
    head = f"{part}_{index}"
    room = sql.MAX_IDENT - len(h) - 1
    while len(head.encode()) > room:
        head = head[:-1]
    return f"{head}_{h}"


def _validate_check(ctx, name: str) -> None:
    """VALIDATE CONSTRAINT takes SHARE UPDATE EXCLUSIVE on the twin: writers go on."""
    def body(cur: psycopg.Cursor) -> None:
        cur.execute(dsql.validate_constraint(ctx.plan.twin, name))
        shape = recorded(ctx) or {}
        shape.setdefault("checks", {})[name] = shape.get("checks", {}).get(name, "").removesuffix(" NOT VALID")
        ctx.store.set_facts(cur, ctx.mid, shape=shape)

    with_lock_retry(ctx.conn, body, what=f"validate CHECK {name} on the twin",
                    policy=ctx.plan.locks)
    ctx.refresh()


# --- under the cutover lock -----------------------------------------------------------------

def columns_differ(cur: psycopg.Cursor, table: QualifiedName, twin: QualifiedName) -> str | None:
    """One query per table: their columns (name, type, collation, NOT NULL, generated, identity,
    default) in order; the first difference, or None. Run under the cutover lock."""
    a = cur.execute(dsql.COLUMNS, (str(table),)).fetchone()[0]
    b = cur.execute(dsql.COLUMNS, (str(twin),)).fetchone()[0]
    if a == b:
        return None
    la, lb = a.split("\n"), b.split("\n")
    for x, y in zip(la, lb, strict=False):
        if x != y:
            return f"table has {x}, twin has {y}"
    if len(la) > len(lb):
        return f"table has {len(la)} columns, twin has {len(lb)}: {la[len(lb)].split(':')[0]} is not in the twin"
    return f"table has {len(la)} columns, twin has {len(lb)}: {lb[len(la)].split(':')[0]} is not in the table"
