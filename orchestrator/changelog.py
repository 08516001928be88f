"""Asynchronous capture (``capture: {mode: async}``): a narrow change log and its replay.

The capture trigger does not write the twin. It appends the key of each changed row, the
twin's key (pk..., partition key), OLD and NEW when an UPDATE moves it, to a log table in
the writer's transaction (``<table>_changes``, owned by the table's owner, WAL-logged: it
must survive a crash). A TRUNCATE appends a marker. A writer pays one narrow insert into a
table with one index instead of a write into an equally indexed twin.

Replay (:class:`Replayer`, a thread of ``apply``; :func:`replay_batch` under the cutover's
lock) takes a batch of log rows and SYNCS THOSE KEYS from the live table: it deletes the
twin's rows with the logged keys, inserts the live table's current rows with those primary
keys, and deletes exactly the log rows it took, all in one transaction (one call of the
owner's ``replay_<id>`` function). The log is its own checkpoint: a crash mid-batch rolls
the batch back and it is replayed again; replaying a key twice is harmless.

Why it is right whatever the writers do (isolation level, key moves, upserts, COPY, bulk
statements, session_replication_role=replica): replay never applies a logged change, it
copies the latest committed row. The one ordering that matters is that the batch's log
rows are read no later than the live rows: a change committed after the live rows were
read has its own log row, which this batch did not take (it deletes its rows by sequence
number, never by key), so it is replayed again. No row lock is needed for that, so replay
never blocks a writer (the backfill keeps its FOR SHARE windows, see backfill_copy).

Verification at a consistent point: in one REPEATABLE READ snapshot, the keys pending in
the log are exactly the rows that may differ; verify compares both tables without them
(:func:`pending_filter`). Cutover: a readiness gate waits until the log is nearly drained;
under the ACCESS EXCLUSIVE lock (no writer can add to the log) the rest is replayed, with
a bound: more than ``capture.max_lock_replay`` pending rolls the attempt back and retries.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from loguru import logger

from orchestrator.db import close_quietly, connect, is_connection_error
from orchestrator.owner import EXECUTOR, acting_mode, as_owner_sql, give_to_owner
from orchestrator.sql import QualifiedName, Shape, fit_name
from orchestrator.sql import changelog as csql
from orchestrator.sql import sync as sync_sql
from orchestrator.sql.changelog import AT, GONE, SEQ, TRUNCATE
from orchestrator.sql.compose import Composed, text

__all__ = ["AT", "GONE", "SEQ", "TRUNCATE"]  # re-exported: the log's column names
REPLAY = "replay"
LAG = "replay_lag"


def log_table(plan) -> QualifiedName:
    """The change log: next to the table, owned by its owner (the trigger runs as the owner)."""
    return plan.table_name.with_name(fit_name(plan.table_name.name, "_changes"))


def is_async(ctx) -> bool:
    return ctx.plan.capture.mode == "async"


# --- rendering (pure; the statements are orchestrator.sql.changelog's) ----------------------
# The phases list (capture) or embed (verify) these as text; this module executes the Composed.

def create_log(log: QualifiedName, src: QualifiedName, shape: Shape) -> list[str]:
    """The log's columns are the twin's key columns, made from the table itself (CREATE TABLE
    AS ... WITH NO DATA), so they keep its types and collations exactly; then the sequence
    number, the TRUNCATE marker and the time the change was logged (for the lag)."""
    return [text(q) for q in csql.create_log(log, src, shape)]


def log_function(fn: QualifiedName, log: QualifiedName, shape: Shape) -> str:
    """The row trigger: one narrow INSERT of the changed row's twin key (OLD and NEW when an
    UPDATE changes it). Nothing else; no read of any table. A key the row left (DELETE, the
    OLD key of a move) is marked ``gone``: only such keys can leave a twin row to delete."""
    return text(csql.log_function(fn, log, shape))


def replay_function(fn: QualifiedName, src: QualifiedName, twin: QualifiedName, log: QualifiedName,
                    shape: Shape, owner: str) -> str:
    """``fn(n integer) RETURNS bigint``: replay up to n log rows (oldest first), return how many.

    1. Take the batch: the sequence numbers of the n oldest committed log rows (one snapshot).
    2. A TRUNCATE marker in the batch: empty the twin (DELETE, not TRUNCATE: no lock that
       would wait for the backfill). Every row the table holds now was inserted after that
       TRUNCATE, so it has a log row later than the marker, which a batch can only take with
       or after the marker: it is copied again.
    3. Delete the twin's rows with the batch's gone keys (DELETEs, the OLD keys of moves)
       that the live table no longer has at that (pk..., key) (the partition key prunes the partitions; the
       primary-key columns are matched exactly). A twin row (pk, k) exists only because the
       live table had a row at (pk, k) when it was copied; the row leaves (pk, k) only by a
       DELETE or a move, logged as gone (or by a TRUNCATE, the marker): the delete step looks
       at those keys alone.
    4. Upsert the live table's current rows with the batch's primary keys (read after step 1:
       a change committed after this read has a log row this batch did not take): an UPDATE
       in place for a row the twin holds (HOT where no indexed column changed: a delete and
       insert would write every index again), an INSERT otherwise. A backfill window in
       flight may insert the same row: it copies the same latest version (it holds the row
       with FOR SHARE), so either write is right.
    5. Delete exactly the batch's log rows, by sequence number, never by key.
    """
    return text(csql.replay_function(fn, src, twin, log, shape, owner))


def pending_filter(shape: Shape, log: QualifiedName, table: QualifiedName) -> Composed:
    """A condition on ``table``'s rows: not pending in the log (verify's consistent point).

    In one snapshot, a key that is not in the log has its latest change replayed: the twin
    holds the live row exactly. A pending key may differ; replay will sync it."""
    return csql.pending_filter(shape, log, table)


# --- acting on the database ------------------------------------------------------------------

def install(cur: psycopg.Cursor, ctx, trigger: str) -> None:
    """Create the log (once), the capture functions and triggers that append to it, and the
    replay and lag functions (again after a carried column: replay copies every column).

    Warning: takes SHARE ROW EXCLUSIVE on the table (CREATE TRIGGER); call inside with_lock_retry."""
    plan = ctx.plan
    shape = ctx.shape()
    log = log_table(plan)
    owner = ctx.info.owner if ctx.info is not None else ctx.facts["owner"]
    run_as_owner = as_owner_sql(ctx.function(EXECUTOR))
    if cur.execute(csql.REGCLASS, (str(log),)).fetchone()[0] is None:
        for stmt in csql.create_log(log, plan.table_name, shape):
            # As the owner (through the executor): the owner's trigger function writes it.
            cur.execute(run_as_owner, [_as_text(cur, stmt)])
        if acting_mode(cur, owner) != "owner":
            cur.execute(run_as_owner, [_as_text(cur, csql.grant_select(log, cur.connection.info.user))])
    fn, tfn = ctx.function("capture"), ctx.function("capture_truncate")
    cur.execute(csql.log_function(fn, log, shape))
    cur.execute(csql.truncate_log_function(tfn, log))
    for f in (fn, tfn):
        give_to_owner(cur, csql.signature(f), owner)
    cur.execute(csql.replay_function(ctx.function(REPLAY), plan.table_name, plan.twin, log, shape, owner))
    give_to_owner(cur, csql.signature(ctx.function(REPLAY), "integer"), owner, executable_by_us=True)
    cur.execute(csql.lag_function(ctx.function(LAG), log))
    give_to_owner(cur, csql.signature(ctx.function(LAG)), owner, executable_by_us=True)
    for stmt in sync_sql.drop_sync_triggers(plan.table_name, trigger) + sync_sql.create_sync_triggers(
            plan.table_name, trigger, fn, tfn):
        cur.execute(stmt)


def _as_text(cur: psycopg.Cursor, stmt: Composed) -> str:
    """A statement as the one text argument the owner's executor takes."""
    return stmt.as_string(cur)


def drop(cur: psycopg.Cursor, ctx) -> None:
    """Drop the log and the replay functions (the triggers and capture functions go with the
    sync ones: same names). Idempotent; a no-op for a sync migration."""
    log = log_table(ctx.plan)
    oid = cur.execute(csql.REGCLASS_OID, (str(log),)).fetchone()[0]
    # Only the log this migration created (its oid is recorded with the capture), never a
    # same-named table of the user's.
    if oid is not None and oid == ctx.facts.get("change_log_oid"):
        cur.execute(csql.drop_table(log))
    cur.execute(csql.drop_function(ctx.function(REPLAY), "integer"))
    cur.execute(csql.drop_function(ctx.function(LAG)))


def exists(conn: psycopg.Connection | psycopg.Cursor, ctx) -> bool:
    return conn.execute(csql.REGPROCEDURE_EXISTS, (csql.signature(ctx.function(REPLAY), "integer"),)).fetchone()[0]


def replay_batch(cur: psycopg.Cursor | psycopg.Connection, ctx, n: int) -> int:
    return int(cur.execute(csql.replay_call(ctx.function(REPLAY)), (n,)).fetchone()[0])


def lag_sql(ctx) -> str:
    """(changes waiting, age in seconds of the oldest) of this migration's change log (as
    text: the throttle keeps it as its replay-lag probe)."""
    return text(csql.lag_query(ctx.function(LAG)))


def lag(cur: psycopg.Cursor | psycopg.Connection, ctx) -> tuple[int, float]:
    pending, oldest = cur.execute(csql.lag_query(ctx.function(LAG))).fetchone()
    return int(pending), float(oldest)


def pending_truncate(cur: psycopg.Cursor, ctx) -> bool:
    log = log_table(ctx.plan)
    return bool(cur.execute(csql.pending_truncate(log)).fetchone()[0])


def drain_locked(cur: psycopg.Cursor, ctx) -> int:
    """Under the cutover's ACCESS EXCLUSIVE lock: replay what is left, in this transaction.

    Bounded by ``capture.max_lock_replay``: more pending rolls the attempt back (as a lock
    attempt that failed: the replayer catches up before the next one), so the hold stays
    within the lock budget whatever the write rate was."""
    pending, _ = lag(cur, ctx)
    cap = ctx.plan.capture.max_lock_replay
    if pending > cap:
        raise psycopg.errors.LockNotAvailable(
            f"change log: {pending} changes pending, more than capture.max_lock_replay ({cap}) to replay "
            "under the lock")
    done = 0
    while True:
        n = replay_batch(cur, ctx, max(cap, 1))
        done += n
        if n == 0:
            return done


class Replayer:
    """The replay thread of one ``apply``: batches from the log into the twin, continuously,
    on its own session, from the moment the capture functions exist until apply ends.

    Not stopped by ``pause`` (which holds the backfill only). With a ``throttle`` (the
    run's :class:`~orchestrator.throttle.Throttler`, ``capture.replay_throttled``) it waits
    while the throttle's load signals say the server is overloaded (``holds_replay``): its
    writes into the twin are the async mode's whole cost to the server, and they can wait for
    a quieter moment; the changes stay in the log, nothing is lost. :meth:`held` keeps it out
    while the cutover drains under its lock."""

    HOLD_POLL_S = 0.25

    def __init__(self, ctx, batch: int, idle_s: float = 0.05, throttle=None):
        self.ctx = ctx
        self.batch = batch
        self.idle_s = idle_s
        self.throttle = throttle
        self.pending: int | None = None
        self.oldest_s: float | None = None
        self.replayed = 0
        self.error: str | None = None
        self.waiting: str | None = None  # why the throttle holds the replay, while it does
        self.waited_s = 0.0  # seconds held so far
        self._lag_read = 0.0  # time.monotonic() of the last lag read while held
        # Set by the cutover once its gates passed: from then on the replay drains whatever the
        # load (holding it would only make every lock attempt find too much to replay).
        self.draining = False
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="replay", daemon=True)

    def start(self) -> Replayer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    @contextmanager
    def held(self) -> Iterator[None]:
        with self._mutex:
            yield

    def _run(self) -> None:
        conn = None
        backoff = 0.5
        last_lag = 0.0
        while not self._stop.is_set():
            try:
                if conn is None or conn.closed:
                    conn = connect(self.ctx.dsn, "replay", autocommit=True)
                if self._hold(conn):
                    self.error = None
                    continue
                with self._mutex:
                    if not exists(conn, self.ctx):
                        n = 0
                    else:
                        n = replay_batch(conn, self.ctx, self.batch)
                        self.replayed += n
                        if n < self.batch or time.monotonic() - last_lag > 1.0:
                            self.pending, self.oldest_s = lag(conn, self.ctx)
                            last_lag = time.monotonic()
                self.error = None
                backoff = 0.5
                if n < self.batch:
                    self._stop.wait(self.idle_s if n else max(self.idle_s, 0.2))
            except psycopg.Error as e:
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                if self.error != msg:
                    logger.warning("replay: {} (retrying)", msg)
                self.error = msg
                if conn is not None and (conn.broken or is_connection_error(e)):
                    close_quietly(conn)
                    conn = None
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
        close_quietly(conn)

    def _hold(self, conn: psycopg.Connection) -> bool:
        """True while the throttle holds the replay (after a short wait, the log's figures
        read again so status shows the lag growing); logs when the hold starts and ends."""
        reason = self.throttle.peek().holds_replay if self.throttle is not None and not self.draining else None
        if reason != self.waiting:
            if reason:
                logger.warning("replay waits: {} (the changes stay in the change log)", reason)
            else:
                logger.info("replay resumes (waited for: {})", self.waiting)
            self.waiting = reason
        if reason is None:
            return False
        started = time.monotonic()
        if started - self._lag_read > 1.0 and exists(conn, self.ctx):
            # At most once a second: enough for status while the log grows.
            self.pending, self.oldest_s = lag(conn, self.ctx)
            self._lag_read = time.monotonic()
        self._stop.wait(self.HOLD_POLL_S)
        self.waited_s += time.monotonic() - started
        return True


@contextmanager
def replaying(ctx) -> Iterator[Replayer | None]:
    """For an async apply: the replay thread in ``ctx.options["replayer"]`` (and in the live
    figures). ``ctx.options["replay"] = False`` (tests only) runs without it."""
    if not is_async(ctx) or ctx.options.get("replay") is False:
        yield None
        return
    throttle = ctx.options.get("throttle") if ctx.plan.capture.replay_throttled else None
    r = Replayer(ctx, ctx.plan.capture.replay_batch, throttle=throttle).start()
    ctx.options["replayer"] = r
    live = ctx.options.get("live")
    if live is not None:
        live.replayer = r
    try:
        yield r
    finally:
        r.stop()
        ctx.options.pop("replayer", None)
