"""cutover: swap the twin into the live table's name in one short transaction.

Order inside the transaction (all of it commits or none of it does):
 1. LOCK the live table, then the twin, ACCESS EXCLUSIVE, each wait capped by lock_timeout
    (a waiting ACCESS EXCLUSIVE request blocks every later query, reads included, so we
    never wait long: we give up, back off with jitter and try again);
 2. drop the capture trigger; rename live -> retired, twin -> live name;
 3. move what is bound to the old table: sequence ownership, identity continuation,
    dependent views (re-created from their definitions, which now resolve to the new
    table), owner, grants, comment, RLS policies, replica identity, publications,
    statistics targets, user triggers (re-created; disabled on the retired table);
 4. install the reverse trigger: every write to the new table reaches the retired one,
    so a rollback after cutover loses nothing;
 5. record the phase as done.
Every statement is catalog-only: the lock is held for milliseconds, measured and reported.
The same swap, run the other way, is the rollback after cutover.
"""

from __future__ import annotations

import time
from datetime import datetime

import psycopg
from loguru import logger

from orchestrator import sql
from orchestrator.db import LockAttempt, with_lock_retry
from orchestrator.errors import StateConflict
from orchestrator.inspect import TableInfo, inspect_table
from orchestrator.phases import FORWARD_TRIGGER, REVERSE_TRIGGER, Context, Step
from orchestrator.phases.capture import drop_sync, install_sync
from orchestrator.phases.prepare import fmt, partition_bounds
from orchestrator.plan import utc_now
from orchestrator.sql import QualifiedName, ident


def carry_objects(cur: psycopg.Cursor, old: TableInfo, new: QualifiedName, retired: QualifiedName,
                  new_is_partitioned: bool) -> list[str]:
    """Move what is bound to ``old`` (now renamed ``retired``) onto ``new`` (now live).

    Runs inside the swap transaction, after the renames: names in saved definitions
    (views, triggers) now resolve to the new table. Returns what it did, for the log.
    """
    done: list[str] = []
    for seq in old.sequences:
        if seq.identity:
            continue  # identity sequences belong to their column; continued below
        cur.execute(f"ALTER SEQUENCE {seq.name} OWNED BY {new}.{ident(seq.column)}")
        done.append(f"sequence {seq.name} owned by {new}.{seq.column}")
    for col in old.columns:
        if col.identity:
            # The new table's identity sequence must continue where the old one stands.
            cur.execute("SELECT pg_get_serial_sequence(%s, %s), pg_get_serial_sequence(%s, %s)",
                        (str(retired), col.name, str(new), col.name))
            old_seq, new_seq = cur.fetchone()
            cur.execute(f"SELECT last_value, is_called FROM {old_seq}")
            last, called = cur.fetchone()
            cur.execute("SELECT setval(%s, %s, %s)", (new_seq, last, called))
            done.append(f"identity {col.name} continues at {last}")
    cur.execute(f"ALTER TABLE {new} OWNER TO {ident(old.owner)}")
    if new_is_partitioned:
        for part in _partitions(cur, new):
            cur.execute(f"ALTER TABLE {part} OWNER TO {ident(old.owner)}")
    for grantee, priv, grantable in old.acl:
        who = "PUBLIC" if grantee == "PUBLIC" else ident(grantee)
        cur.execute(f"GRANT {priv} ON {new} TO {who}{' WITH GRANT OPTION' if grantable else ''}")
    for column, grantee, priv in old.column_acl:
        who = "PUBLIC" if grantee == "PUBLIC" else ident(grantee)
        cur.execute(f"GRANT {priv} ({ident(column)}) ON {new} TO {who}")
    if old.acl or old.column_acl:
        done.append(f"{len(old.acl) + len(old.column_acl)} grants")
    # Utility statements take no bound parameters: the comment goes in as a quoted literal.
    cur.execute(f"COMMENT ON TABLE {new} IS {sql.literal(old.comment) if old.comment is not None else 'NULL'}")
    for col in old.columns:
        if col.stattarget is not None:
            cur.execute(f"ALTER TABLE {new} ALTER COLUMN {ident(col.name)} SET STATISTICS {int(col.stattarget)}")
    for view in old.dependents:
        if view.kind != "v":
            continue
        opts = f" WITH ({', '.join(view.options)})" if view.options else ""
        cur.execute(f"CREATE OR REPLACE VIEW {view.name}{opts} AS {view.definition}")
        done.append(f"view {view.name} re-created")
    cur.execute("SELECT polname FROM pg_policy WHERE polrelid = %s::regclass", (str(new),))
    existing = {r[0] for r in cur.fetchall()}
    for name, stmt in old.policies:
        if name not in existing:
            cur.execute(stmt.replace("{table}", str(new)))
    if old.policies:
        done.append(f"{len(old.policies)} RLS policies")
    if old.rls_enabled:
        cur.execute(f"ALTER TABLE {new} ENABLE ROW LEVEL SECURITY")
    if old.rls_forced:
        cur.execute(f"ALTER TABLE {new} FORCE ROW LEVEL SECURITY")
    if old.replica_identity == "f":
        cur.execute(f"ALTER TABLE {new} REPLICA IDENTITY FULL")
    elif old.replica_identity == "n":
        cur.execute(f"ALTER TABLE {new} REPLICA IDENTITY NOTHING")
    for pub in old.publications:
        cur.execute(f"ALTER PUBLICATION {ident(pub)} DROP TABLE {retired}")
        cur.execute(f"ALTER PUBLICATION {ident(pub)} ADD TABLE {new}")
        done.append(f"publication {pub}")
    for trig in old.triggers:
        if trig.name in (FORWARD_TRIGGER, REVERSE_TRIGGER) or trig.name.startswith("orchestrate_"):
            continue
        cur.execute(f"DROP TRIGGER IF EXISTS {ident(trig.name)} ON {new}")
        cur.execute(trig.definition)  # its text names the live table, which is now `new`
        if trig.enabled == "D":
            cur.execute(f"ALTER TABLE {new} DISABLE TRIGGER {ident(trig.name)}")
        # The retired table only receives mirrored writes now: its own triggers must not fire twice.
        cur.execute(f"ALTER TABLE {retired} DISABLE TRIGGER {ident(trig.name)}")
        done.append(f"trigger {trig.name}")
    return done


def _partitions(cur: psycopg.Cursor, parent: QualifiedName) -> list[QualifiedName]:
    cur.execute(
        "SELECT n.nspname, c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE i.inhparent = %s::regclass",
        (str(parent),),
    )
    return [QualifiedName(r[0], r[1]) for r in cur.fetchall()]


def lock_both(cur: psycopg.Cursor, first: QualifiedName, second: QualifiedName) -> None:
    """Lock in the order writers take them (live table, then twin via the trigger): no deadlock."""
    cur.execute(f"LOCK TABLE {first} IN ACCESS EXCLUSIVE MODE")
    cur.execute(f"LOCK TABLE {second} IN ACCESS EXCLUSIVE MODE")


def record_attempt(ctx: Context, what: str):
    def on_attempt(a: LockAttempt) -> None:
        ctx.store.event(ctx.mid, "lock_attempt", f"{what} attempt {a.attempt}: {'ok' if a.ok else a.error}",
                        attempt=a.attempt, ok=a.ok, waited_ms=round(a.waited_s * 1000, 1))
    return on_attempt


class Cutover:
    name = "cutover"

    def steps(self, ctx: Context) -> list[Step]:
        p = ctx.plan
        lock = (f"ACCESS EXCLUSIVE on {p.table_name} and {p.twin}, lock_timeout {p.cutover.lock_timeout}, "
                f"up to {p.cutover.attempts} attempts with jittered backoff (cap {p.cutover.backoff_max})")
        return [
            Step(self.name, "readiness gates: backfill complete, verification passed, partitions up to now + premake",
                 "(state and catalog reads)", "none"),
            Step(self.name, "lock both tables, drop the capture trigger, swap the names",
                 f"LOCK TABLE {p.table_name}, {p.twin} IN ACCESS EXCLUSIVE MODE; "
                 f"ALTER TABLE {p.table_name} RENAME TO {ident(p.retired.name)}; "
                 f"ALTER TABLE {p.twin} RENAME TO {ident(p.table_name.name)}", lock),
            Step(self.name, "move sequences, identity, views, owner, grants, comment, policies, publications, "
                 "statistics targets, user triggers", "(catalog statements)", "same transaction"),
            Step(self.name, "reverse trigger: writes to the new table reach the retired one (rollback keeps them)",
                 f"CREATE TRIGGER {REVERSE_TRIGGER} AFTER INSERT OR UPDATE OR DELETE ON {p.table_name} ...",
                 "same transaction"),
        ]

    def gates(self, ctx: Context) -> list[tuple[str, bool, str]]:
        """(gate, passed, detail) for each readiness gate, in order."""
        m = ctx.migration
        out = [
            ("backfill complete", m.done("backfill"), m.phase_state("backfill")),
            ("verification passed", m.done("verify"), m.phase_state("verify")),
        ]
        iv = ctx.plan.partition_by.interval_value
        need = fmt(iv.add(iv.floor(ctx.now or utc_now()), ctx.plan.partition_by.premake + 1))
        parts = ctx.facts.get("partitions") or []
        have = parts[-1][1] if parts else None
        out.append(("partitions exist up to now + premake", bool(have and have >= need), f"up to {have}, need {need}"))
        return out

    def ensure_partitions(self, ctx: Context) -> None:
        """Create partitions that became due while the migration ran (a long backfill can
        cross a month boundary); the twin's default partition must not start filling."""
        parts = [tuple(p) for p in ctx.facts.get("partitions") or []]
        wanted = partition_bounds(ctx, datetime.fromisoformat(parts[0][0]) if parts else None)
        missing = [b for b in wanted if parts and b[0] >= parts[-1][1]]
        if not missing:
            return
        shape = ctx.shape()

        def body(cur: psycopg.Cursor) -> None:
            for lo, hi in missing:
                cur.execute(sql.create_partition(ctx.plan.partition_name(datetime.fromisoformat(lo)), ctx.plan.twin,
                                                 lo, hi, shape.key_type))
            ctx.store.set_facts(cur, ctx.mid, partitions=[list(p) for p in parts] + [list(b) for b in missing])

        with_lock_retry(ctx.conn, body, what="create due partitions", lock_timeout_s=ctx.plan.cutover.lock_timeout_s,
                        attempts=ctx.plan.cutover.attempts, backoff_max_s=ctx.plan.cutover.backoff_max_s)
        ctx.refresh()

    def run(self, ctx: Context) -> None:
        ctx.refresh()
        self.ensure_partitions(ctx)
        ctx.refresh()
        failed = [(g, d) for g, ok, d in self.gates(ctx) if not ok]
        if failed:
            raise StateConflict(f"cutover gate not met: {failed[0][0]} ({failed[0][1]})")
        plan = ctx.plan
        t0 = time.monotonic()
        held: dict[str, float] = {}

        def body(cur: psycopg.Cursor) -> list[str]:
            lock_both(cur, plan.table_name, plan.twin)
            held["locked_at"] = time.monotonic()
            # Inspect under the lock: nothing can change the table's shape from here on.
            old = inspect_table(ctx.conn, plan.table_name)
            if old.oid != ctx.facts.get("table_oid"):
                raise StateConflict(f"{plan.table_name} is not the table this migration started on")
            ctx.info = old
            drop_sync(cur, ctx, plan.table_name, FORWARD_TRIGGER, "capture")
            for fk in old.incoming_fks:
                cur.execute(f"ALTER TABLE {fk.table} DROP CONSTRAINT {ident(fk.name)}")
            cur.execute(f"ALTER TABLE {plan.table_name} RENAME TO {ident(plan.retired.name)}")
            cur.execute(f"ALTER TABLE {plan.twin} RENAME TO {ident(plan.table_name.name)}")
            done = carry_objects(cur, old, plan.table_name, plan.retired, new_is_partitioned=True)
            install_sync(cur, ctx, plan.table_name, plan.retired, REVERSE_TRIGGER, "reverse")
            ctx.store.set_status(cur, ctx.mid, "cut_over", "cutover")
            ctx.store.phase_done(cur, ctx.mid, self.name, time.monotonic() - t0, carried=done)
            return done

        done = with_lock_retry(ctx.conn, body, what="cutover", lock_timeout_s=plan.cutover.lock_timeout_s,
                               attempts=plan.cutover.attempts, backoff_max_s=plan.cutover.backoff_max_s,
                               on_attempt=record_attempt(ctx, "cutover"))
        held_ms = (time.monotonic() - held["locked_at"]) * 1000
        ctx.store.phase_add_time(ctx.mid, self.name, 0, lock_held_ms=round(held_ms, 1))
        ctx.store.event(ctx.mid, "cutover", f"cut over; ACCESS EXCLUSIVE held {held_ms:.1f} ms", lock_held_ms=held_ms,
                        carried=done)
        logger.info("cutover: lock held {:.1f} ms; carried: {}", held_ms, "; ".join(done) or "nothing")

    def undo(self, ctx: Context) -> None:
        """Swap back: the retired heap table (kept exact by the reverse trigger) becomes live
        again, under the same lock discipline; the partitioned table is dropped afterwards."""
        plan = ctx.plan
        held: dict[str, float] = {}
        t0 = time.monotonic()

        def body(cur: psycopg.Cursor) -> list[str]:
            lock_both(cur, plan.table_name, plan.retired)
            held["locked_at"] = time.monotonic()
            current = inspect_table(ctx.conn, plan.table_name, allow_partitioned=True)
            ctx.info = inspect_table(ctx.conn, plan.retired)
            drop_sync(cur, ctx, plan.table_name, REVERSE_TRIGGER, "reverse")
            cur.execute(f"ALTER TABLE {plan.table_name} RENAME TO {ident(plan.twin.name)}")
            cur.execute(f"ALTER TABLE {plan.retired} RENAME TO {ident(plan.table_name.name)}")
            for trig in ctx.info.triggers:
                if not trig.name.startswith("orchestrate_"):
                    cur.execute(f"ALTER TABLE {plan.table_name} ENABLE TRIGGER {ident(trig.name)}")
            done = carry_objects(cur, current, plan.table_name, plan.twin, new_is_partitioned=False)
            return done

        done = with_lock_retry(ctx.conn, body, what="rollback swap", lock_timeout_s=plan.cutover.lock_timeout_s,
                               attempts=plan.cutover.attempts, backoff_max_s=plan.cutover.backoff_max_s,
                               on_attempt=record_attempt(ctx, "rollback"))
        held_ms = (time.monotonic() - held["locked_at"]) * 1000
        ctx.store.event(ctx.mid, "rollback", f"swapped back; ACCESS EXCLUSIVE held {held_ms:.1f} ms",
                        lock_held_ms=held_ms, carried=done, seconds=time.monotonic() - t0)
