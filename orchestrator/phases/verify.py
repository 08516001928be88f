"""verify: prove, range by range, that the twin holds exactly the live table's rows.

Both tables are read in ONE REPEATABLE READ snapshot per range. The dual-write trigger
writes the twin in the writer's own transaction, so in any snapshot the two tables must
agree exactly: a difference is a real divergence, never a race. Each range compares the
row count and an order-independent hash of every column of every row.

Ranges are independent, so ``verify.workers`` sessions take them from one queue, each
asking the throttler before every range like the backfill does. The hash reads each
column through its type's own hash function where that is exact (see
``sql.verify.range_digest``), which is several times cheaper than hashing every row's text.
"""

from __future__ import annotations

import threading
import time
from queue import Empty, Queue
from typing import TYPE_CHECKING

import psycopg
from loguru import logger

from orchestrator import changelog, sql
from orchestrator.db import close_quietly, connect, is_connection_error
from orchestrator.distribute import settled_digest
from orchestrator.errors import ConnectionFailed, VerificationFailed
from orchestrator.phases import Context, Step
from orchestrator.sql import backfill as backfill_sql
from orchestrator.sql import session as session_sql
from orchestrator.sql import verify as verify_sql
from orchestrator.sql.compose import SQL, text
from orchestrator.state.store import PhaseName

if TYPE_CHECKING:
    from orchestrator.context import Preflight


def exact_hash_columns(conn: psycopg.Connection, table: sql.QualifiedName) -> frozenset[str]:
    """The columns of ``table`` that ``verify_sql.range_digest`` may hash by type (see there)."""
    return frozenset(r[0] for r in conn.execute(verify_sql.EXACT_HASH_COLUMNS, (str(table),)).fetchall())


def digest_range(cur: psycopg.Cursor, ctx: Context, shape: sql.Shape, rng: dict,
                 by_type: frozenset[str] = frozenset()) -> dict:
    """Count and hash one range of both tables; call inside one REPEATABLE READ transaction."""
    where, params = backfill_sql.range_predicate(shape, rng["lo"], rng["hi"], rng["is_null"])
    mode = ctx.plan.verify.mode
    src_where = dst_where = where
    if changelog.is_async(ctx) and changelog.exists(cur, ctx):
        # Async capture: the keys pending in the log (in this same snapshot) are the only rows
        # that may differ, and replay will sync them; every other row must be equal.
        log = changelog.log_table(ctx.plan)
        if changelog.pending_truncate(cur, ctx):
            return {"ok": False, "pending": True, "live_rows": 0, "twin_rows": 0}
        src_where = where + SQL(" AND ") + changelog.pending_filter(shape, log, ctx.plan.table_name)
        dst_where = where + SQL(" AND ") + changelog.pending_filter(shape, log, ctx.plan.twin)
    cur.execute(verify_sql.range_digest(ctx.plan.table_name, shape, src_where, mode, by_type), params)
    src_count, src_hash = cur.fetchone()
    cur.execute(verify_sql.range_digest(ctx.plan.twin, shape, dst_where, mode, by_type), params)
    dst_count, dst_hash = cur.fetchone()
    return {"ok": src_count == dst_count and src_hash == dst_hash, "live_rows": src_count, "twin_rows": dst_count,
            "live_hash": str(src_hash), "twin_hash": str(dst_hash)}


def _check_range(conn: psycopg.Connection, ctx: Context, shape: sql.Shape, rng: dict,
                 by_type: frozenset[str]) -> dict:
    """One range: the digest in its own snapshot, then its verdict recorded."""
    if ctx.plan.distribute is not None:

        def digest(cur: psycopg.Cursor, locked: bool) -> dict:
            if not locked:  # under the lock each statement sees everything committed before it
                cur.execute(session_sql.READ_ONLY_SNAPSHOT)
            return digest_range(cur, ctx, shape, rng, by_type)

        # The twin's shards are read in other snapshots than the heap table.
        result = settled_digest(conn, digest, str(ctx.plan.table_name), ctx.plan.cutover.lock_timeout_s)
    else:
        deadline = time.monotonic() + 300
        while True:
            with conn.transaction(), conn.cursor() as cur:
                cur.execute(session_sql.READ_ONLY_SNAPSHOT)
                result = digest_range(cur, ctx, shape, rng, by_type)
            if not result.get("pending") or time.monotonic() > deadline:
                break
            time.sleep(0.5)  # async capture: a TRUNCATE waits in the log; compare once it is replayed
    ctx.store.range_verified(conn, ctx.mid, rng["idx"], result)
    return result


class Verify:
    """Compares every range of the live table and the twin; records each verdict."""

    name = PhaseName.VERIFY

    def steps(self, ctx: Context, pf: Preflight | None = None) -> list[Step]:
        shape = ctx.shape()
        where, _ = backfill_sql.range_predicate(shape, "<lo>", "<hi>", False)
        v = ctx.plan.verify
        return [Step(self.name, f"per range, in one REPEATABLE READ snapshot: {v.mode} of both tables "
                                f"({v.workers} session(s) in parallel, throttled like the backfill)",
                     text(verify_sql.range_digest(ctx.plan.table_name, shape, where, v.mode)),
                     "ACCESS SHARE on both tables (reads only)")]

    def run(self, ctx: Context) -> None:
        t0 = time.monotonic()
        shape = ctx.shape()
        all_ranges = ctx.store.ranges(ctx.mid)
        ranges = [r for r in all_ranges if r["verify_state"] != "ok"]
        total = len(all_ranges)
        by_type = exact_hash_columns(ctx.conn, ctx.plan.table_name) if ctx.plan.verify.mode == "hash" else frozenset()
        results = self._run_workers(ctx, shape, ranges, total, by_type)
        bad: list[str] = []
        rows = 0
        for rng in ranges:
            result = results[rng["idx"]]
            rows += result["live_rows"]
            if not result["ok"]:
                bad.append(f"{rng['label']} (live {result['live_rows']} rows, twin {result['twin_rows']})")
                ctx.store.event(ctx.mid, "mismatch", f"range {rng['label']} differs", **result)
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
                                 rows_per_s=round(rows / elapsed) if elapsed else None,
                                 workers=ctx.plan.verify.workers)

    def _run_workers(self, ctx: Context, shape: sql.Shape, ranges: list[dict], total: int,
                     by_type: frozenset[str]) -> dict[int, dict]:
        """Check ``ranges`` on ``verify.workers`` sessions; every range's result by idx.

        Every range is checked even when one differs: the operator gets the whole list of
        ranges to re-copy in one run."""
        results: dict[int, dict] = {}
        if not ranges:
            return results
        queue: Queue = Queue()
        for r in ranges:
            queue.put(r)
        stop = threading.Event()
        errors: list[BaseException] = []
        throttle = ctx.options.get("throttle")
        lock = threading.Lock()

        def work(n: int) -> None:
            conn = None
            try:
                conn = connect(ctx.dsn, f"verify-{n}")
                while not stop.is_set():
                    try:
                        rng = queue.get_nowait()
                    except Empty:
                        return
                    if throttle is not None and not throttle.wait(stop):
                        return
                    result = _check_range(conn, ctx, shape, rng, by_type)
                    with lock:
                        results[rng["idx"]] = result
            except BaseException as e:  # noqa: BLE001 - reported by the coordinator below
                errors.append(e)
                stop.set()
            finally:
                close_quietly(conn)

        n_workers = max(1, min(ctx.plan.verify.workers, len(ranges)))
        threads = [threading.Thread(target=work, args=(n,), name=f"verify-{n}", daemon=True) for n in range(n_workers)]
        for t in threads:
            t.start()
        done_before = total - len(ranges)
        next_progress = 0.0
        try:
            while alive := [t for t in threads if t.is_alive()]:
                alive[0].join(timeout=0.25)
                if ctx.progress and time.monotonic() >= next_progress:
                    next_progress = time.monotonic() + 1.0
                    with lock:
                        done, rows = len(results), sum(r["live_rows"] for r in results.values())
                    ctx.progress({"phase": "verify", "ranges_done": done_before + done, "ranges_total": total,
                                  "rows": rows, "workers": n_workers})
        except KeyboardInterrupt:
            stop.set()
            for t in threads:
                t.join(timeout=10)
            raise
        if errors:
            e = errors[0]
            if is_connection_error(e):
                raise ConnectionFailed(
                    f"verify lost its connection: {str(e).splitlines()[0]}; run apply again to resume") from None
            raise e
        logger.debug("verify: {} ranges on {} session(s)", len(results), n_workers)
        return results

    def undo(self, ctx: Context) -> None:
        """Nothing to undo: verification only reads."""
