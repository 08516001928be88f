"""capture: a synchronous dual-write trigger that applies every change to the twin.

The trigger runs in the writer's transaction, so in every snapshot the twin holds the
latest version of every row it holds: verification can then compare both tables in one
REPEATABLE READ snapshot, and cutover needs no drain. The function is SECURITY DEFINER
owned by the table's owner (orchestrator.owner), so application roles need no privilege on
the twin and nothing the owner controls runs with more than the owner's rights; its
search_path is pinned and every name in it is schema-qualified.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import psycopg

from orchestrator import changelog, drift, sql
from orchestrator.db import with_lock_retry
from orchestrator.owner import give_to_owner
from orchestrator.phases import FORWARD_TRIGGER, REVERSE_TRIGGER, Context, Step
from orchestrator.sql import sync as sync_sql
from orchestrator.sql.compose import text
from orchestrator.state.store import MigrationStatus, PhaseName

if TYPE_CHECKING:
    from orchestrator.context import Preflight


def distributed_sync(ctx: Context) -> dict[str, bool]:
    """The sync function's options when the twin is a Citus table (see sql.sync.sync_function):
    recheck a by-key miss in a newer snapshot, and commit with two phases."""
    distributed = ctx.plan.distribute is not None
    return {"recheck": distributed, "two_phase": distributed}


def render_sync(cur: psycopg.Cursor, ctx: Context, fn: sql.QualifiedName, dst: sql.QualifiedName, kind: str) -> None:
    """CREATE OR REPLACE the dual-write function ``fn`` writing to dst. dst's own key
    arbitrates the trigger's probe: the twin's (pk..., key), or the live primary key when dst
    is the retired heap table (the reverse trigger)."""
    shape = ctx.shape()
    cur.execute(sync_sql.sync_function(fn, dst, shape, dst_key=shape.pk if kind == "reverse" else shape.twin_key,
                                       **distributed_sync(ctx)))


def install_sync(cur: psycopg.Cursor, ctx: Context, src: sql.QualifiedName, dst: sql.QualifiedName,
                 trigger: str, kind: str, switch: sql.QualifiedName | None = None) -> None:
    """Create the sync functions and the triggers on src that write to dst (with ``switch``:
    triggers that fire only once it is turned on, see :func:`stage_reverse`).

    Warning: takes SHARE ROW EXCLUSIVE on src (CREATE TRIGGER); call inside with_lock_retry.
    """
    fn, tfn = ctx.function(kind), ctx.function(kind + "_truncate")
    render_sync(cur, ctx, fn, dst, kind)
    cur.execute(sync_sql.truncate_function(tfn, dst))
    # Owned by the table's owner, SECURITY DEFINER: the owner's code this reaches (CHECKs,
    # defaults, triggers on dst) runs as the owner, never as the role running orchestrate.
    owner = ctx.info.owner if ctx.info is not None else ctx.facts["owner"]
    for f in (fn, tfn):
        give_to_owner(cur, f"{f}()", owner)
    for stmt in [*sync_sql.drop_sync_triggers(src, trigger),
                 *sync_sql.create_sync_triggers(src, trigger, fn, tfn, switch)]:
        cur.execute(stmt)


def refresh_distributed_capture(cur: psycopg.Cursor, ctx: Context) -> bool:
    """Render the dual-write function again if the twin is a Citus table and the function was
    created without the two-phase prologue (by an older version; see sql.sync.sync_function),
    so the writers' transactions commit with two phases from now on. CREATE OR REPLACE
    FUNCTION locks no table, and the triggers run the new body from their next row; it resets
    SECURITY DEFINER, so the function is given to the owner again. True when it did."""
    if ctx.plan.distribute is None or changelog.is_async(ctx):
        return False
    fn = ctx.function("capture")
    row = cur.execute(sync_sql.LACKS_TWO_PHASE, (f"{fn}()",)).fetchone()
    if not (row and row[0]):
        return False
    render_sync(cur, ctx, fn, ctx.plan.twin, "capture")
    give_to_owner(cur, f"{fn}()", ctx.info.owner if ctx.info is not None else ctx.facts["owner"])
    return True


def install_capture(cur: psycopg.Cursor, ctx: Context) -> None:
    """The forward capture of the plan's mode: the dual-write trigger (sync) or the change
    log's trigger and replay functions (async, orchestrator/changelog.py).

    Warning: takes SHARE ROW EXCLUSIVE on the table (CREATE TRIGGER); call inside with_lock_retry."""
    if changelog.is_async(ctx):
        changelog.install(cur, ctx, FORWARD_TRIGGER)
        oid = cur.execute(sync_sql.TO_REGCLASS_OID, (str(changelog.log_table(ctx.plan)),)).fetchone()[0]
        ctx.store.set_facts(cur, ctx.mid, change_log_oid=int(oid))
    else:
        install_sync(cur, ctx, ctx.plan.table_name, ctx.plan.twin, FORWARD_TRIGGER, "capture")


def stage_reverse(cur: psycopg.Cursor, ctx: Context) -> None:
    """Create the reverse triggers on the (still empty) twin at prepare, switched off.

    The reverse sync must run from the moment the twin becomes the live table, but creating
    a row trigger on a partitioned table clones it onto every partition: 100 ms and more
    at 1,000 partitions, which under the cutover's ACCESS EXCLUSIVE lock every reader and
    writer would wait for. Staged here, where it costs nobody anything, the cutover only
    turns it on (:func:`arm_reverse`): O(1) whatever the partition count.
    """
    switch = ctx.function("reverse_on")
    cur.execute(sync_sql.sync_switch(switch, False))
    install_sync(cur, ctx, ctx.plan.twin, ctx.plan.retired, REVERSE_TRIGGER, "reverse", switch)
    drift.install_column_guard(cur, ctx.plan.twin, REVERSE_TRIGGER, list(ctx.shape().columns),
                               ctx.function("reverse_columns"))


def reverse_staged(cur: psycopg.Cursor, ctx: Context, table: sql.QualifiedName) -> bool:
    """Does ``table`` carry the reverse trigger staged at prepare (a migration prepared by an
    older version does not: its cutover creates the trigger under the lock)?"""
    cur.execute(sync_sql.STAGED_TRIGGER, (str(table), REVERSE_TRIGGER))
    return cur.fetchone()[0] == 1


def arm_reverse(cur: psycopg.Cursor, ctx: Context, on: bool) -> None:
    """Turn the staged reverse triggers on (cutover) or off (rollback): one catalog row each.

    Turning on also renders the reverse function again from the table as it is now, so a
    column carried to the twin since prepare is mirrored too."""
    if on:
        shape = ctx.shape()
        fn = ctx.function("reverse")
        cur.execute(sync_sql.sync_function(fn, ctx.plan.retired, shape, dst_key=shape.pk))
        # CREATE OR REPLACE keeps the owner but resets every property it does not name:
        # SECURITY DEFINER must be given back, or the reverse sync would run as each writer.
        give_to_owner(cur, f"{fn}()", ctx.info.owner if ctx.info is not None else ctx.facts["owner"])
    cur.execute(sync_sql.sync_switch(ctx.function("reverse_on"), on))


def drop_sync(cur: psycopg.Cursor, ctx: Context, table: sql.QualifiedName, trigger: str, kind: str) -> None:
    """Warning: takes ACCESS EXCLUSIVE on table (DROP TRIGGER); call inside with_lock_retry."""
    exists = cur.execute(sync_sql.TO_REGCLASS, (str(table),)).fetchone()[0] is not None
    if exists:
        for stmt in sync_sql.drop_sync_triggers(table, trigger):
            cur.execute(stmt)
    # One guard function per side: the reverse side's is staged at prepare and must outlive
    # the capture side's, dropped at cutover.
    drift.drop_column_guard(cur, table if exists else None, trigger, ctx.function(kind + "_columns"))
    if kind == "capture" and ctx.migration is not None:
        drift.drop_ddl_guard(cur, ctx.mid)
        changelog.drop(cur, ctx)
    for k in (kind, kind + "_truncate", kind + "_on", kind + "_columns"):
        cur.execute(sync_sql.drop_function(ctx.function(k)))


def replication_warnings(conn: psycopg.Connection, table: sql.QualifiedName, twin: sql.QualifiedName) -> list[str]:
    """One line per publication and subscription that involves the table (for plan and status).

    Publications (pg_publication_tables: listed, FOR TABLES IN SCHEMA and FOR ALL TABLES)
    publish the writes their tables receive; subscriptions (pg_subscription_rel, this
    database) write into the table as ``session_replication_role = replica``, which the
    capture and reverse triggers (ENABLE ALWAYS) capture. A catalog that cannot be read
    is said so, never fatal.
    """
    out: list[str] = []
    try:
        pubs = conn.execute(sync_sql.PUBLICATIONS_OF, (table.schema, table.name)).fetchall()
        for name, all_tables, via_root in pubs:
            if all_tables:
                out.append(f"publication {sql.ident(name)} is FOR ALL TABLES: it also publishes the twin {twin} "
                           "and its partitions (every backfilled row); its subscribers need those tables")
            else:
                out.append(f"publication {sql.ident(name)} publishes {table}: after cutover it publishes the "
                           "partitioned table" + ("" if via_root else " as its leaf partitions (publish_via_partition_"
                                                   "root is off; subscribers keyed on the table name break)"))
        subs = conn.execute(sync_sql.SUBSCRIPTIONS_INTO, (str(table),)).fetchall()
        for name, enabled in subs:
            out.append(f"subscription {sql.ident(name)} writes into {table}"
                       + ("" if enabled else " (disabled now)")
                       + " as session_replication_role = replica: captured, the triggers are ENABLE ALWAYS")
    except psycopg.Error as e:
        out.append(f"publications and subscriptions of {table} could not be read: {str(e).splitlines()[0]}")
    return out


class Capture:
    """Makes every write to the live table reach the twin: the synchronous trigger, or the
    change log that apply replays (capture: {mode: async})."""

    name = PhaseName.CAPTURE

    def steps(self, ctx: Context, pf: Preflight | None = None) -> list[Step]:
        shape = ctx.shape()
        if changelog.is_async(ctx):
            log = changelog.log_table(ctx.plan)
            fn = sql.QualifiedName("orchestrate", "capture_<id>")
            return [
                Step(self.name, f"change log {log}: the twin's key of each changed row (OLD and NEW when it moves), "
                     "a sequence number, TRUNCATE markers; owned by the table's owner",
                     "; ".join(changelog.create_log(log, ctx.plan.table_name, shape)), "none"),
                Step(self.name, "async capture: the trigger appends one narrow row per change (about 0.9x of the "
                     "write throughput without capture); apply replays the log into the twin",
                     changelog.log_function(fn, log, shape), "none"),
                Step(self.name, "row and TRUNCATE triggers on the live table",
                     "; ".join(text(s) for s in sync_sql.create_sync_triggers(
                         ctx.plan.table_name, FORWARD_TRIGGER, fn,
                         sql.QualifiedName("orchestrate", "capture_<id>_truncate"))),
                     f"SHARE ROW EXCLUSIVE on {ctx.plan.table_name}: waits for writers in flight; "
                     f"lock_timeout {ctx.plan.cutover.lock_timeout} x {ctx.plan.cutover.attempts} attempts"),
            ]
        return [
            Step(self.name, "dual-write function (INSERT / UPDATE by key / key move = DELETE+INSERT / DELETE)",
                 text(sync_sql.sync_function(sql.QualifiedName("orchestrate", "capture_<id>"), ctx.plan.twin, shape,
                                             **distributed_sync(ctx))),
                 "none"),
            Step(self.name, "row and TRUNCATE triggers on the live table",
                 "; ".join(text(s) for s in sync_sql.create_sync_triggers(
                     ctx.plan.table_name, FORWARD_TRIGGER, sql.QualifiedName("orchestrate", "capture_<id>"),
                     sql.QualifiedName("orchestrate", "capture_<id>_truncate"))),
                 f"SHARE ROW EXCLUSIVE on {ctx.plan.table_name}: waits for writers in flight; "
                 f"lock_timeout {ctx.plan.cutover.lock_timeout} x {ctx.plan.cutover.attempts} attempts"),
        ]

    def run(self, ctx: Context) -> None:
        t0 = time.monotonic()

        def body(cur: psycopg.Cursor) -> None:
            install_capture(cur, ctx)
            # DROP COLUMN / ALTER TYPE of a captured column is refused by PostgreSQL from now on,
            # instead of breaking every write in the trigger (see orchestrator/drift.py).
            drift.install_column_guard(cur, ctx.plan.table_name, FORWARD_TRIGGER, ctx.shape().columns,
                                       ctx.function("capture_columns"))
            if ctx.plan.guard_ddl and drift.can_guard_ddl(ctx.conn)[0]:
                drift.install_ddl_guard(cur, ctx.mid, ctx.info.oid, ctx.plan.table_name)
            ctx.store.phase_done(cur, ctx.mid, self.name, time.monotonic() - t0)

        with_lock_retry(ctx.conn, body, what="install the capture trigger",
                        policy=ctx.plan.locks)
        if ctx.plan.guard_ddl and not drift.can_guard_ddl(ctx.conn)[0]:
            ctx.store.event(ctx.mid, "warning", drift.can_guard_ddl(ctx.conn)[1])

    def undo(self, ctx: Context) -> None:
        """Drop the capture triggers. After a cutover there are none: the cutover took them with
        the old table's role, and its own undo put the heap back without them."""
        if ctx.migration is not None and ctx.migration.status == MigrationStatus.CUT_OVER:
            return

        def body(cur: psycopg.Cursor) -> None:
            drop_sync(cur, ctx, ctx.plan.table_name, FORWARD_TRIGGER, "capture")

        with_lock_retry(ctx.conn, body, what="drop the capture trigger",
                        policy=ctx.plan.locks)
