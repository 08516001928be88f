"""verify: prove, range by range, that the twin holds exactly the live table's rows.

Both tables are read in ONE REPEATABLE READ snapshot per range. The dual-write trigger
writes the twin in the writer's own transaction, so in any snapshot the two tables must
agree exactly: a difference is a real divergence, never a race. Each range compares the
row count and an order-independent hash of every column of every row.
"""

from __future__ import annotations

import time

import psycopg
from psycopg.types.json import Jsonb

from orchestrator import sql
from orchestrator.errors import VerificationFailed
from orchestrator.phases import Context, Step


def digest_range(cur: psycopg.Cursor, ctx: Context, shape: sql.Shape, rng: dict) -> dict:
    where, params = sql.range_predicate(shape, rng["lo"], rng["hi"], rng["is_null"])
    mode = ctx.plan.verify.mode
    cur.execute(sql.range_digest(ctx.plan.table_name, shape, where, mode), params)
    src_count, src_hash = cur.fetchone()
    cur.execute(sql.range_digest(ctx.plan.twin, shape, where, mode), params)
    dst_count, dst_hash = cur.fetchone()
    return {"ok": src_count == dst_count and src_hash == dst_hash, "live_rows": src_count, "twin_rows": dst_count,
            "live_hash": str(src_hash), "twin_hash": str(dst_hash)}


class Verify:
    name = "verify"

    def steps(self, ctx: Context) -> list[Step]:
        shape = ctx.shape()
        where, _ = sql.range_predicate(shape, "<lo>", "<hi>", False)
        return [Step(self.name, f"per range, in one REPEATABLE READ snapshot: {ctx.plan.verify.mode} of both tables",
                     sql.range_digest(ctx.plan.table_name, shape, where, ctx.plan.verify.mode),
                     "ACCESS SHARE on both tables (reads only)")]

    def run(self, ctx: Context) -> None:
        t0 = time.monotonic()
        shape = ctx.shape()
        ranges = [r for r in ctx.store.ranges(ctx.mid) if r["verify_state"] != "ok"]
        total = len(ctx.store.ranges(ctx.mid))
        bad: list[str] = []
        rows = 0
        for i, rng in enumerate(ranges):
            with ctx.conn.transaction(), ctx.conn.cursor() as cur:
                cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                result = digest_range(cur, ctx, shape, rng)
            rows += result["live_rows"]
            state = "ok" if result["ok"] else "mismatch"
            ctx.conn.execute(
                "UPDATE orchestrate.ranges SET verify_state = %s, verify_detail = %s, verified_at = now() "
                "WHERE migration_id = %s AND idx = %s",
                (state, Jsonb(result), ctx.mid, rng["idx"]),
            )
            if not result["ok"]:
                bad.append(f"{rng['label']} (live {result['live_rows']} rows, twin {result['twin_rows']})")
                ctx.store.event(ctx.mid, "mismatch", f"range {rng['label']} differs", **result)
            if ctx.progress and (i % 25 == 0 or i == len(ranges) - 1):
                ctx.progress({"phase": "verify", "ranges_done": total - len(ranges) + i + 1, "ranges_total": total,
                              "rows": rows})
        elapsed = time.monotonic() - t0
        if bad:
            ctx.store.phase_add_time(ctx.mid, self.name, elapsed, state="failed", mismatched=len(bad))
            more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
            raise VerificationFailed(
                f"verification failed for {len(bad)} range(s): {'; '.join(bad[:5])}{more}. Nothing was cut over; "
                "repair with `orchestrate apply PLAN --recopy RANGE` (or --recopy all)"
            )
        with ctx.conn.transaction(), ctx.conn.cursor() as cur:
            ctx.store.phase_done(cur, ctx.mid, self.name, elapsed, rows=rows,
                                 rows_per_s=round(rows / elapsed) if elapsed else None)

    def undo(self, ctx: Context) -> None:
        """Nothing to undo: verification only reads."""
