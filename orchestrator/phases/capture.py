"""capture: a synchronous dual-write trigger that applies every change to the twin.

The trigger runs in the writer's transaction, so in every snapshot the twin holds the
latest version of every row it holds: verification can then compare both tables in one
REPEATABLE READ snapshot, and cutover needs no drain. The function is SECURITY DEFINER
(owned by the role running orchestrate) so application roles need no privilege on the
twin; its search_path is pinned and every name in it is schema-qualified.
"""

from __future__ import annotations

import time

import psycopg

from orchestrator import sql
from orchestrator.db import with_lock_retry
from orchestrator.phases import FORWARD_TRIGGER, Context, Step


def install_sync(cur: psycopg.Cursor, ctx: Context, src: sql.QualifiedName, dst: sql.QualifiedName,
                 trigger: str, kind: str) -> None:
    """Create the sync functions and the triggers on src that write to dst.

    Warning: takes SHARE ROW EXCLUSIVE on src (CREATE TRIGGER); call inside with_lock_retry.
    """
    shape = ctx.shape()
    fn, tfn = ctx.function(kind), ctx.function(kind + "_truncate")
    # dst's own key arbitrates the trigger's probe: the twin's (pk..., key), or the live
    # primary key when dst is the retired heap table (the reverse trigger).
    cur.execute(sql.sync_function(fn, dst, shape, dst_key=shape.pk if kind == "reverse" else shape.twin_key))
    cur.execute(sql.truncate_function(tfn, dst))
    for f in (fn, tfn):
        cur.execute(f"ALTER FUNCTION {f}() SECURITY DEFINER")
        cur.execute(f"REVOKE ALL ON FUNCTION {f}() FROM PUBLIC")
    for stmt in sql.drop_sync_triggers(src, trigger) + sql.create_sync_triggers(src, trigger, fn, tfn):
        cur.execute(stmt)


def drop_sync(cur: psycopg.Cursor, ctx: Context, table: sql.QualifiedName, trigger: str, kind: str) -> None:
    """Warning: takes ACCESS EXCLUSIVE on table (DROP TRIGGER); call inside with_lock_retry."""
    if cur.execute("SELECT to_regclass(%s)", (str(table),)).fetchone()[0] is not None:
        for stmt in sql.drop_sync_triggers(table, trigger):
            cur.execute(stmt)
    for k in (kind, kind + "_truncate"):
        cur.execute(f"DROP FUNCTION IF EXISTS {ctx.function(k)}()")


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
        pubs = conn.execute(
            "SELECT DISTINCT p.pubname, p.puballtables, p.pubviaroot FROM pg_catalog.pg_publication p "
            "JOIN pg_catalog.pg_publication_tables t ON t.pubname = p.pubname "
            "WHERE t.schemaname = %s AND t.tablename = %s ORDER BY 1", (table.schema, table.name)).fetchall()
        for name, all_tables, via_root in pubs:
            if all_tables:
                out.append(f"publication {sql.ident(name)} is FOR ALL TABLES: it also publishes the twin {twin} "
                           "and its partitions (every backfilled row); its subscribers need those tables")
            else:
                out.append(f"publication {sql.ident(name)} publishes {table}: after cutover it publishes the "
                           "partitioned table" + ("" if via_root else " as its leaf partitions (publish_via_partition_"
                                                   "root is off; subscribers keyed on the table name break)"))
        subs = conn.execute(
            "SELECT s.subname, s.subenabled FROM pg_catalog.pg_subscription_rel r "
            "JOIN pg_catalog.pg_subscription s ON s.oid = r.srsubid WHERE r.srrelid = %s::regclass ORDER BY 1",
            (str(table),)).fetchall()
        for name, enabled in subs:
            out.append(f"subscription {sql.ident(name)} writes into {table}"
                       + ("" if enabled else " (disabled now)")
                       + " as session_replication_role = replica: captured, the triggers are ENABLE ALWAYS")
    except psycopg.Error as e:
        out.append(f"publications and subscriptions of {table} could not be read: {str(e).splitlines()[0]}")
    return out


class Capture:
    name = "capture"

    def steps(self, ctx: Context) -> list[Step]:
        shape = ctx.shape()
        return [
            Step(self.name, "dual-write function (INSERT / UPDATE by key / key move = DELETE+INSERT / DELETE)",
                 sql.sync_function(sql.QualifiedName("orchestrate", "capture_<id>"), ctx.plan.twin, shape), "none"),
            Step(self.name, "row and TRUNCATE triggers on the live table",
                 "; ".join(sql.create_sync_triggers(ctx.plan.table_name, FORWARD_TRIGGER,
                                                    sql.QualifiedName("orchestrate", "capture_<id>"),
                                                    sql.QualifiedName("orchestrate", "capture_<id>_truncate"))),
                 f"SHARE ROW EXCLUSIVE on {ctx.plan.table_name}: waits for writers in flight; "
                 f"lock_timeout {ctx.plan.cutover.lock_timeout} x {ctx.plan.cutover.attempts} attempts"),
        ]

    def run(self, ctx: Context) -> None:
        t0 = time.monotonic()

        def body(cur: psycopg.Cursor) -> None:
            install_sync(cur, ctx, ctx.plan.table_name, ctx.plan.twin, FORWARD_TRIGGER, "capture")
            ctx.store.phase_done(cur, ctx.mid, self.name, time.monotonic() - t0)

        with_lock_retry(ctx.conn, body, what="install the capture trigger",
                        lock_timeout_s=ctx.plan.cutover.lock_timeout_s, attempts=ctx.plan.cutover.attempts,
                        backoff_max_s=ctx.plan.cutover.backoff_max_s)

    def undo(self, ctx: Context) -> None:
        def body(cur: psycopg.Cursor) -> None:
            drop_sync(cur, ctx, ctx.plan.table_name, FORWARD_TRIGGER, "capture")

        with_lock_retry(ctx.conn, body, what="drop the capture trigger",
                        lock_timeout_s=ctx.plan.cutover.lock_timeout_s, attempts=ctx.plan.cutover.attempts,
                        backoff_max_s=ctx.plan.cutover.backoff_max_s)
