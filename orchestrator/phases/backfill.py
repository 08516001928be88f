"""backfill: copy the rows that existed before capture, range by range, server-side.

Ranges (one day of the key by default, plus open-ended ranges below and above and one for
NULL keys) are planned once capture is live: every row outside them was written after the
trigger existed and is already in the twin. Within a range, batches are windows of
(key, pk) values: an unlocked read finds where the next window ends, then one statement
copies the window locking its source rows (see sql.backfill.backfill_copy for why this is race-free)
and the range's cursor is advanced in the same transaction. Rows never pass through Python.
"""

from __future__ import annotations

import random
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import psycopg
from loguru import logger

from orchestrator import owner, sql

# batch_lock_timeout_ms: a module attribute here too (tests replace it for the backfill).
from orchestrator.db import batch_lock_timeout_ms, connect, is_connection_error
from orchestrator.db import lock_holder as _holder
from orchestrator.drift import ShapeChanged, Watch
from orchestrator.errors import ConnectionFailed, OrchestrateError
from orchestrator.horizon import Tick
from orchestrator.inspect import key_bounds
from orchestrator.phases import Context, Step
from orchestrator.state.store import PhaseName

if TYPE_CHECKING:

    from orchestrator.context import Preflight
from orchestrator.phases.prepare import fmt
from orchestrator.sql import backfill as backfill_sql
from orchestrator.sql.compose import Composed, text


def plan_ranges(ctx: Context, key_min: datetime | None, key_max: datetime | None, nullable: bool) -> list[dict]:
    """The list of ranges: NULL keys, below the first, each interval, from the last on."""
    iv = ctx.plan.backfill.range_value
    out: list[dict] = []
    if nullable:
        out.append({"label": "NULL keys", "lo": None, "hi": None, "is_null": True})
    if key_min is None:
        out.append({"label": "all keys", "lo": None, "hi": None, "is_null": False})
        return out
    # Per-interval ranges only over the partitions' span: keys far outside it (a stray
    # 1900-01-01 or 9999-12-31) go to the default partition and are covered by the two
    # open-ended ranges; otherwise one outlier would plan millions of empty ranges.
    parts = ctx.facts.get("partitions") or []
    if parts:
        first, last = datetime.fromisoformat(parts[0][0]), datetime.fromisoformat(parts[-1][1])
        key_min = min(max(key_min, first), last - timedelta(microseconds=1))
        key_max = max(min(key_max, last - timedelta(microseconds=1)), key_min)
    start, end = iv.floor(key_min), iv.add(iv.floor(key_max))
    out.append({"label": f"before {start:%Y-%m-%d}", "lo": None, "hi": fmt(start), "is_null": False})
    t = start
    while t < end:
        nxt = iv.add(t)
        label = f"{t:%Y-%m-%d}" if iv.unit == "day" and iv.count == 1 else f"{t:%Y-%m-%d}..{nxt:%Y-%m-%d}"
        out.append({"label": label, "lo": fmt(t), "hi": fmt(nxt), "is_null": False})
        t = nxt
    out.append({"label": f"from {end:%Y-%m-%d}", "lo": fmt(end), "hi": None, "is_null": False})
    return out


@dataclass
class Pace:
    """Batch size shared by the workers: adapts toward the target duration, or is pinned."""

    size: int
    target_s: float
    lo: int
    hi: int
    fixed: bool
    sleep_ratio: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def observe(self, rows: int, seconds: float) -> None:
        if self.fixed or rows < self.size // 2 or seconds <= 0:
            return  # a short tail batch says nothing about speed
        with self.lock:
            factor = min(2.0, max(0.5, self.target_s / seconds))
            self.size = int(min(self.hi, max(self.lo, self.size * factor)))


@dataclass
class Counters:
    """What the backfill's workers did in this run (rows, batches, redone and yielded batches)."""

    rows: int = 0
    batches: int = 0
    ranges_done: int = 0
    batches_redone: int = 0  # rolled back by a unique violation and redone with ON CONFLICT
    yields: int = 0  # rolled back on a lock held by the application, then retried
    lock: threading.Lock = field(default_factory=threading.Lock)

    def yielded(self) -> None:
        with self.lock:
            self.yields += 1

    def redone(self) -> None:
        with self.lock:
            self.batches_redone += 1

    def add(self, rows: int, done: int) -> None:
        """One batch committed: ``rows`` copied, ``done`` ranges finished by it (0, 1, or a span's)."""
        with self.lock:
            self.rows += rows
            self.batches += 1
            self.ranges_done += int(done)


#: Most ranges one span may join (see Ranges): bounds the work one batch can lose to a crash
#: or a yield, and the rows one count may read before it finds a span too large.
MAX_SPAN = 64


def fresh(rng: dict) -> bool:
    """A range not started: no cursor, not to be repaired, and not the NULL-key range."""
    return rng.get("state", "pending") == "pending" and rng.get("cursor") is None and not rng["is_null"]


def span_of(ranges: list[dict]) -> dict:
    """One batch's worth of adjacent fresh ranges, as one range: from the first's lower bound
    to the last's upper bound, checkpointed for all of them (``idxs``) in the batch's statement."""
    first, last = ranges[0], ranges[-1]
    return {"label": f"{first['label']} to {last['label']} ({len(ranges)} ranges)", "lo": first["lo"],
            "hi": last["hi"], "is_null": False, "idx": first["idx"], "idxs": [r["idx"] for r in ranges],
            "state": "pending", "cursor": None}


class Ranges:
    """The backfill's queue of ranges, thread-safe, that hands out spans.

    Most ranges of a big table are smaller than a batch (a day of a few million rows), and
    each batch pays a fixed cost: the count, the probe, the call through the owner's
    executor, the checkpoint, the commit and their round trips (about 5 ms, a third of a
    2,700-row day's copy: docs/benchmarks.md). So a worker takes, with the range at the
    front, the fresh ranges that follow it without a gap, as many as the span hint expects
    to fit in one batch: the span is copied by one statement over its whole key interval
    (the same race-free window as a range's, bounded by values) and its checkpoint marks
    every member copied in the same transaction. A span that turns out to hold a batch or
    more is never copied in windows (its cursor would belong to no range): it is given
    back, and its first range is copied alone.
    """

    def __init__(self, ranges: list[dict]):
        self._q = deque(ranges)
        self._lock = threading.Lock()

    def get(self) -> dict | None:
        with self._lock:
            return self._q.popleft() if self._q else None

    def put(self, rng: dict) -> None:
        """A range handed back with its committed cursor: to the back, for whoever comes next."""
        with self._lock:
            self._q.append(rng)

    def give_back(self, ranges: list[dict]) -> None:
        """Ranges taken into a span and not copied: to the front, in their order."""
        with self._lock:
            self._q.extendleft(reversed(ranges))

    def follow(self, rng: dict, most: int) -> list[dict]:
        """Up to ``most`` fresh ranges from the front that continue ``rng`` without a gap."""
        out: list[dict] = []
        with self._lock:
            last = rng
            while self._q and len(out) < most:
                nxt = self._q[0]
                if not fresh(nxt) or last["hi"] is None or nxt["lo"] != last["hi"]:
                    break
                out.append(self._q.popleft())
                last = nxt
        return out

    def empty(self) -> bool:
        with self._lock:
            return not self._q


@dataclass
class SpanHint:
    """How many ranges the next span joins: rows per range as seen so far (a moving average
    of finished fresh ranges and spans), and a span aims at SPAN_FILL of a batch."""

    per_range: float | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ranges(self, batch: int) -> int:
        with self.lock:
            if self.per_range is None:
                return 1  # nothing seen yet: the first range alone tells how big ranges are
            return max(1, min(MAX_SPAN, int(SPAN_FILL * batch / max(self.per_range, 1.0))))

    def observe(self, rows: int, ranges: int) -> None:
        with self.lock:
            seen = rows / ranges
            self.per_range = seen if self.per_range is None else 0.7 * self.per_range + 0.3 * seen

    def too_big(self, batch: int, ranges: int) -> None:
        """A span of ``ranges`` held a batch or more: expect denser ranges from here on."""
        with self.lock:
            self.per_range = max(self.per_range or 0.0, 1.25 * batch / ranges)


SPAN_FILL = 0.7


class SpanTooBig(Exception):
    """The span holds a batch or more rows: rolled back before any write, to be split."""


class Crew:
    """How many backfill workers there should be, and how many there are; thread-safe.

    The first count: ``apply --workers``, else ``orchestrate set workers=``, else the plan.
    While the backfill runs, a change of ``orchestrate set workers=`` (polled by
    :class:`orchestrator.control.Controls`) moves the target: the coordinator starts workers
    up to it; a worker above it leaves before its next batch (or while throttled), handing
    its range, with the cursor it committed, back to the queue. ``workers=default`` returns
    to ``--workers`` or the plan.
    """

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.controls = ctx.options.get("controls")
        cli = ctx.options.get("workers")
        self.base = cli or ctx.plan.backfill.workers  # what workers=default returns to
        self.seen = getattr(self.controls, "workers", None)
        self.target = cli or self.seen or self.base
        self.active = 0
        self._lock = threading.Lock()
        self._show(self.target)

    def join(self) -> bool:
        """The coordinator asks before starting a worker: True (and counted) when one is missing."""
        with self._lock:
            if self.active < self.target:
                self.active += 1
                return True
            return False

    def leave(self) -> bool:
        """A worker asks between batches: True (and counted out) when there are too many."""
        with self._lock:
            if self.active > self.target:
                self.active -= 1
                return True
            return False

    def left(self) -> None:
        """A worker ended on its own (no range left, stopped, or failed)."""
        with self._lock:
            self.active -= 1

    def follow_controls(self) -> None:
        """Apply a change of ``workers`` made with ``orchestrate set`` since the last look."""
        if self.controls is None:
            return
        wanted = self.controls.workers
        if wanted == self.seen:
            return
        self.seen = wanted
        new = wanted or self.base
        if new == self.target:
            return
        old, self.target = self.target, new
        logger.info("backfill: {} worker(s), was {}", new, old)
        self.ctx.store.event(self.ctx.mid, "control", f"backfill workers {old} -> {new}")
        self._show(new)
        throttle = self.ctx.options.get("throttle")
        if throttle is not None and new < old:
            throttle.wake()  # a worker sleeping in its backoff leaves now, not at its next check

    def _show(self, n: int) -> None:
        live = self.ctx.options.get("live")
        if live is not None:
            live.workers = n


# A batch that yields sleeps at most this long before it tries again: the holder may end at
# any moment, and while we sleep we hold nothing, so the wait costs only our own progress.
YIELD_BACKOFF_MAX_S = 2.0
# While a window keeps yielding, its event is recorded again this often (with fresh ages).
YIELD_EVENT_EVERY_S = 30.0
_WAIT_CONTEXT = re.compile(r'while (\w+(?: \w+)*?) tuple \((\d+),(\d+)\) in relation "((?:[^"]|"")*)"')


def describe_blocker(conn: psycopg.Connection, table: sql.QualifiedName, err: psycopg.Error) -> str:
    """Why a batch's lock wait timed out, naming the session that held the lock.

    Read after the batch rolled back, on the same session (autocommit). The error's context
    names the tuple the batch waited for ("while locking tuple (0,5) in relation ..."): its
    xmax is the holder's transaction id (or a multixact of several), and every transaction
    holds an ExclusiveLock on its own id in pg_locks. When the holder is gone by now, or the
    wait was on something else, the oldest other transaction with a row-level lock mode on
    the table is named as the likely holder, and said to be likely.
    """
    context = getattr(err.diag, "context", None) or ""
    m = _WAIT_CONTEXT.search(context)
    try:
        if m and m.group(1) == "locking":
            ctid = f"({m.group(2)},{m.group(3)})"
            row = conn.execute(backfill_sql.tuple_xmax(table), (ctid,)).fetchone()
            xids = [row[0]] if row else []
            if row:
                try:  # xmax may be a multixact (several lockers): its members, when it is one
                    xids += [r[0] for r in conn.execute(backfill_sql.MULTIXACT_MEMBERS, (row[0],))]
                except psycopg.Error:
                    pass
            who = xids and _holder(conn, backfill_sql.HOLDS_XID, [xids])
            if who:
                return f"row lock held by {who}"
        who = _holder(conn, backfill_sql.HOLDS_ROW_LOCKS, [str(table)])
    except psycopg.Error as e:
        return f"lock wait timed out ({str(err).splitlines()[0]}); its holder could not be read: {e}"
    waited = f"lock wait on tuple ({m.group(2)},{m.group(3)}) of {m.group(4)} timed out" if m else \
        str(err).splitlines()[0]
    if who:
        return f"{waited}; likely holder (oldest transaction with row locks on the table): {who}"
    return f"{waited}; the holder has already ended"


class Yielding:
    """One worker's retries of a batch that met a lock held by the application.

    The batch has rolled back (its row locks are released); this decides how long to back off
    (jittered, growing, capped), how small the next window is (halved after the first retry,
    down to one row, and grown back by doubling once batches commit again), and says why:
    logged, an event (the first time, then every YIELD_EVENT_EVERY_S), and the live status's
    throttle reason while it lasts.
    """

    def __init__(self, ctx: Context, conn: psycopg.Connection, table: sql.QualifiedName, label: str, lock_ms: int):
        self.ctx, self.conn, self.table, self.label, self.lock_ms = ctx, conn, table, label, lock_ms
        self.failures = 0
        self.window: int | None = None  # rows in the next window while shrunk; None: the pace's size
        self.total = 0
        self._event_at = 0.0

    def size(self, pace_size: int) -> int:
        return min(self.window, pace_size) if self.window else pace_size

    def failed(self, err: psycopg.Error, size: int) -> float:
        """Record one timed-out batch; returns the seconds to sleep before the next try."""
        self.failures += 1
        self.total += 1
        if self.failures > 1:  # a short holder is usually gone by the first retry
            self.window = max(1, size // 2)
        why = describe_blocker(self.conn, self.table, err)
        reason = f"backfill yields to the application in range {self.label}: {why}"
        live = self.ctx.options.get("live")
        if live is not None:
            live.set_yield(self.label, reason)
        logger.info("{} (batch of {} rows rolled back after {} ms, attempt {})", reason, size, self.lock_ms,
                    self.failures)
        now = time.monotonic()
        if self.failures == 1 or now - self._event_at >= YIELD_EVENT_EVERY_S:
            self._event_at = now
            self.ctx.store.event(self.ctx.mid, "yield", reason, range=self.label, attempt=self.failures,
                                 batch_rows=size, lock_timeout_ms=self.lock_ms)
        base = max(self.lock_ms / 1000, 0.05)
        return random.uniform(base / 2, min(YIELD_BACKOFF_MAX_S, base * 2 ** min(self.failures - 1, 20)))

    def committed(self) -> None:
        """A batch committed: the episode is over; the window grows back toward the pace's size."""
        if self.failures:
            self.failures = 0
            live = self.ctx.options.get("live")
            if live is not None:
                live.set_yield(self.label, None)
        if self.window is not None:
            self.window *= 2


def copy_range(conn: psycopg.Connection, ctx: Context, shape: sql.Shape, rng: dict, pace: Pace,
               counters: Counters, stop: threading.Event, throttle=None,
               leave: Callable[[], bool] | None = None, *, lock_ms: int, hint: SpanHint | None = None) -> bool | None:
    """Copy one range (or a span of ranges, see Ranges) batch by batch; each batch commits
    with the range's new cursor.

    A span is copied by one batch or not at all: None when it holds a batch or more rows
    (nothing was written; the caller splits it). ``hint`` learns the rows of each fresh
    range or span copied whole.

    ``lock_ms``: the batches' lock_timeout (batch_lock_timeout_ms), read once per worker
    session by the caller (pg_settings costs about a millisecond, a tenth of a small
    range's copy).

    True when the range is done; False when `stop` is set or `leave()` (asked before each
    batch, and while throttled) says this worker is to go: ``rng["cursor"]`` then holds the
    committed cursor, so the range can be handed to another worker and goes on from there.
    """
    where, wparams = backfill_sql.range_predicate(shape, rng["lo"], rng["hi"], rng["is_null"])
    cursor = rng["cursor"]
    sync = "on" if ctx.plan.backfill.synchronous_commit else "off"
    if rng.get("state") == "repair":
        _repair(conn, ctx, shape, rng, where, wparams, sync, stop)
        if stop.is_set():
            return False
        counters.add(0, 1)
        return True
    # guarded: this batch copies with ON CONFLICT DO NOTHING, whatever the probe says. Always in
    # distributed mode. There, Citus runs an INSERT .. SELECT from a local table without ON
    # CONFLICT (or RETURNING) as a COPY into the shards, and a unique violation in that COPY
    # reaches us as SQLSTATE XX000 (Citus' ReportCopyError re-raises the worker's message
    # without its code), so the redo below, keyed on 23505, never ran and the run stopped with
    # exit 1 (a crash-resume test, 2 runs in 12). With ON CONFLICT Citus copies into
    # intermediate results and runs INSERT .. ON CONFLICT DO NOTHING on each shard.
    distributed = ctx.plan.distribute is not None
    guarded = distributed
    yielding = Yielding(ctx, conn, ctx.plan.table_name, rng["label"], lock_ms)
    members = len(rng.get("idxs") or [rng["idx"]])
    started_fresh = fresh(rng)
    copied = 0
    while not stop.is_set():
        if (leave is not None and leave()) or (throttle is not None and not throttle.wait(stop, leave)):
            rng["cursor"] = cursor
            return False
        t0 = time.monotonic()
        size = yielding.size(pace.size)
        try:
            row, boundary = _copy_batch(conn, ctx, shape, rng, where, wparams, cursor, size, sync, guarded,
                                        lock_ms)
        except SpanTooBig:
            if hint is not None:
                hint.too_big(size, members)
            return None
        except psycopg.errors.LockNotAvailable as e:
            # A row of the window is locked by the application (idle in transaction, say).
            # The batch has rolled back and released its FOR SHARE locks, so writers of the
            # rows it had locked go on; back off and try a smaller window.
            counters.yielded()
            stop.wait(yielding.failed(e, size))
            continue
        except psycopg.errors.UniqueViolation as e:
            if guarded:
                raise
            # The trigger wrote a row into this window after the probe found it empty
            # (a key moved in, say): nothing was committed; redo the batch with ON CONFLICT.
            logger.debug("backfill: range {}: {}; batch redone with ON CONFLICT",
                         rng["label"], str(e).splitlines()[0])
            guarded = True
            counters.redone()
            continue
        guarded = distributed
        yielding.committed()
        final = boundary is None
        n = int(row[0]) if row else 0
        elapsed = time.monotonic() - t0
        pace.observe(n, elapsed)
        counters.add(n, members if final else 0)
        copied += n
        if final:
            if hint is not None and started_fresh:
                hint.observe(copied, members)
            return True
        cursor = list(boundary)
        if pace.sleep_ratio:
            time.sleep(elapsed * pace.sleep_ratio)
    rng["cursor"] = cursor
    return False


def _copy_batch(conn: psycopg.Connection, ctx: Context, shape: sql.Shape, rng: dict, where: Composed, wparams: list,
                cursor: list | None, size: int, sync: str, guarded: bool,
                lock_ms: int = 0) -> tuple[tuple | None, tuple | None]:
    """One batch, one transaction: (the copy's row count row, the window's upper bound or None
    for the range's last window).

    Pipelined: two round trips instead of six (BEGIN + SET + probe + boundary, then
    copy-with-checkpoint + COMMIT). Round trips dominate small batches on a remote or busy
    server; see docs/benchmarks.md. The checkpoint commits in the copy's own statement, so
    a crash loses the batch and its checkpoint together and the batch is simply redone.
    ``lock_ms``: the batch's lock_timeout (see batch_lock_timeout_ms; 0: no limit).
    """
    src, dst = ctx.plan.table_name, ctx.plan.twin
    after = cursor is not None
    cparams = backfill_sql.cursor_params(shape, rng["is_null"], cursor) if after else []
    with conn.pipeline(), conn.cursor() as cur, conn.cursor() as probe:
        with conn.transaction():
            cur.execute(backfill_sql.synchronous_commit(sync))
            # Never wait long for the application's row locks (see batch_lock_timeout_ms).
            cur.execute(backfill_sql.lock_timeout(lock_ms))
            if not guarded:
                probe.execute(backfill_sql.twin_rows_after(dst, shape, where, after, rng["is_null"]),
                              [*wparams, *cparams])
            boundary = _boundary(cur, src, shape, where, wparams, cparams, after, rng["is_null"], size,
                                 whole=len(rng.get("idxs") or ()) > 1)
            on_conflict = guarded or bool(probe.fetchone()[0])
            final = boundary is None
            copy = backfill_sql.backfill_copy(src, dst, shape, where, after, not final, rng["is_null"], on_conflict)
            # The copy runs as the table owner (orchestrator.owner): the twin's CHECKs, defaults
            # and triggers are the owner's code. The checkpoint is our own write, same statement.
            upto = backfill_sql.cursor_params(shape, rng["is_null"], boundary) if boundary else []
            stmt = owner.render(cur, copy, [*wparams, *cparams, *upto])
            cur.execute(
                ctx.store.batch_checkpoint(owner.call(ctx.function(owner.EXECUTOR))),
                [stmt, rng.get("idxs") or [rng["idx"]], None if final else psycopg.types.json.Jsonb(list(boundary)),
                 "copied" if final else "copying", ctx.mid],
            )
        row = cur.fetchone()
    return row, boundary

def _boundary(cur: psycopg.Cursor, src: sql.QualifiedName, shape: sql.Shape, where: Composed, wparams: list,
              cparams: list, after: bool, is_null: bool, size: int, whole: bool = False) -> tuple | None:
    """The window's upper bound: the (key, pk) of the ``size``-th row after the cursor, or None
    when fewer rows are left (the range's last window).

    A range's first window asks first how many rows the range holds, up to ``size``: that
    count reads the key's index alone (no heap when the pages are all-visible, no sort),
    where the boundary query reads every row of the window in (key, pk) order. Most ranges
    are smaller than a batch (1-day ranges of a table of a few million rows), and for them
    the count is the only read before the copy: measured on the benchmark's table, the
    count took less than half the boundary query's time. A range larger than a batch pays
    both once, a fraction of a batch. ``whole``: a span, copied in one window or not at all
    (SpanTooBig, raised inside the batch's transaction, so it rolls back before any write)."""
    if not after:
        cur.execute(backfill_sql.rows_up_to(src, where), [*wparams, size])
        if cur.fetchone()[0] < size:
            return None
        if whole:
            raise SpanTooBig
    elif whole:
        raise ValueError("a span has no cursor")
    cur.execute(backfill_sql.backfill_boundary(src, shape, where, after, is_null), [*wparams, *cparams, size - 1])
    return cur.fetchone()


def _repair(conn: psycopg.Connection, ctx: Context, shape: sql.Shape, rng: dict, where: Composed, wparams: list,
            sync: str, stop: threading.Event | None = None) -> None:
    """Re-copy a range that failed verification: delete the twin's rows and copy again, in
    one transaction; concurrent writes stay correct (the copy locks its source rows).

    It yields like a batch (see Yielding): under the backfill's lock_timeout, rolled back,
    backed off and retried while the application holds a row lock in the range, so the
    repair never keeps a writer waiting for long and never wins a deadlock against it.
    """
    lock_ms = batch_lock_timeout_ms(conn, ctx.plan.backfill.lock_timeout_s)
    yielding = Yielding(ctx, conn, ctx.plan.table_name, rng["label"], lock_ms)
    while True:
        try:
            removed, n = _repair_once(conn, ctx, shape, rng, where, wparams, sync, lock_ms)
            break
        except psycopg.errors.LockNotAvailable as e:
            delay = yielding.failed(e, 0)
            if stop is not None and stop.wait(delay):
                return
            if stop is None:
                time.sleep(delay)
    yielding.committed()
    ctx.store.event(ctx.mid, "repair", f"range {rng['label']} re-copied: {removed} twin rows replaced by {n}",
                    removed=removed, copied=n)


def _repair_once(conn: psycopg.Connection, ctx: Context, shape: sql.Shape, rng: dict, where: Composed, wparams: list,
                 sync: str, lock_ms: int) -> tuple[int, int]:
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(backfill_sql.synchronous_commit(sync))
        cur.execute(backfill_sql.lock_timeout(lock_ms))
        # Lock the live rows first, in the writers' order (live row, then its twin row via
        # the trigger): deleting the twin's rows first deadlocks with any writer of the range.
        cur.execute(backfill_sql.lock_range(ctx.plan.table_name, where), wparams)
        run_as_owner = owner.as_owner_sql(ctx.function(owner.EXECUTOR))
        cur.execute(run_as_owner, [owner.render(cur, backfill_sql.delete_range(ctx.plan.twin, where), wparams)])
        removed = cur.fetchone()[0]
        copy = backfill_sql.backfill_copy(ctx.plan.table_name, ctx.plan.twin, shape, where, False, False,
                                          rng["is_null"])
        cur.execute(run_as_owner, [owner.render(cur, copy, wparams)])
        n = cur.fetchone()[0]
        ctx.store.range_recopied(cur, ctx.mid, rng["idx"], n)
    return removed, n


def ensure_executor(ctx: Context) -> None:
    """(Re)create the owner's executor if it is missing: a migration started by an older
    version, or an owner that ran DROP OWNED (which it may: it owns the function)."""
    fn = ctx.function(owner.EXECUTOR)
    with ctx.conn.transaction(), ctx.conn.cursor() as cur:
        if cur.execute(backfill_sql.EXECUTOR_MISSING, (f"{fn}(text)",)).fetchone()[0]:
            owner.install_executor(cur, fn, ctx.info.owner if ctx.info is not None else ctx.facts["owner"])


class Backfill:
    """Copies the live table into the twin range by range, in windows that lock their source
    rows (FOR SHARE) and commit their checkpoint with the rows; throttled, resumable, parallel."""

    name = PhaseName.BACKFILL

    def steps(self, ctx: Context, pf: Preflight | None = None) -> list[Step]:
        shape = ctx.shape()
        where, _ = backfill_sql.range_predicate(shape, "<lo>", "<hi>", False)
        b = ctx.plan.backfill
        return [Step(
            self.name,
            f"copy each {b.range} range in batches of about {b.target_batch_seconds}s "
            f"(start {b.batch_size} rows, {b.workers} worker(s)), checkpoint in the same transaction",
            text(backfill_sql.backfill_copy(ctx.plan.table_name, ctx.plan.twin, shape, where, True, True, False)),
            f"ROW SHARE on {ctx.plan.table_name} and FOR SHARE row locks on the batch's rows until it commits "
            f"(writers of those rows wait for one batch); each batch waits at most lock_timeout {b.lock_timeout} "
            "(capped at half of deadlock_timeout) for the application's locks, then rolls back and retries",
        )]

    def ensure_ranges(self, ctx: Context) -> None:
        """Plan the ranges once, after capture: recorded with the key bounds they came from."""
        if ctx.store.ranges(ctx.mid):
            return
        shape = ctx.shape()
        key_min, key_max = key_bounds(ctx.conn, ctx.plan.table_name, shape.key)
        ranges = plan_ranges(ctx, key_min, key_max, shape.key_nullable)
        with ctx.conn.transaction(), ctx.conn.cursor() as cur:
            ctx.store.plan_ranges(cur, ctx.mid, ranges, key_min and fmt(key_min), key_max and fmt(key_max))
        ctx.store.event(ctx.mid, "ranges", f"{len(ranges)} ranges planned", key_min=key_min, key_max=key_max)

    def run(self, ctx: Context) -> None:
        self.ensure_ranges(ctx)
        ensure_executor(ctx)
        pending = [r for r in ctx.store.ranges(ctx.mid) if r["state"] != "copied"]
        total = len(ctx.store.ranges(ctx.mid))
        b = ctx.plan.backfill
        controls = ctx.options.get("controls")
        pace = Pace(b.batch_size, b.target_batch_seconds, b.min_batch_size, b.max_batch_size, b.fixed_batch_size,
                    b.sleep_ratio)
        if controls is not None:
            controls.bind_pace(pace)
        counters = Counters(ranges_done=total - len(pending))
        t0 = time.monotonic()
        self._run_workers(ctx, pending, pace, counters, total)
        with ctx.conn.transaction(), ctx.conn.cursor() as cur:
            left = cur.execute(backfill_sql.RANGES_LEFT, (ctx.mid,)).fetchone()[0]
            if left:
                raise OrchestrateError(f"backfill stopped with {left} ranges left; run apply again to resume")
            # An xid newer than every batch (they all committed before this transaction began):
            # a snapshot older than it may miss copied rows; the cutover waits for those
            # snapshots to end (see cutover_gates, GATE_SNAPSHOTS).
            copied_xid = cur.execute(backfill_sql.CURRENT_XID).fetchone()[0]
            ctx.store.phase_done(cur, ctx.mid, self.name, time.monotonic() - t0, rows=counters.rows,
                                 batches_redone=counters.batches_redone, copied_xid=copied_xid,
                                 yields=counters.yields)

    def _run_workers(self, ctx: Context, pending: list[dict], pace: Pace, counters: Counters, total: int) -> None:
        if not pending:
            return
        queue = Ranges(pending)
        hint = SpanHint()
        stop = threading.Event()
        errors: list[BaseException] = []
        shape = ctx.shape()
        throttle = ctx.options.get("throttle")
        crew = Crew(ctx)

        def work(n: int, rng: dict) -> None:
            gone = False  # counted out by crew.leave()

            def leave() -> bool:
                nonlocal gone
                gone = gone or crew.leave()
                return gone

            conn = None
            held: list[dict] = [rng]  # taken from the queue and not copied: given back on an error
            try:
                conn = connect(ctx.dsn, f"backfill-{n}")
                lock_ms = batch_lock_timeout_ms(conn, ctx.plan.backfill.lock_timeout_s)
                while True:
                    more = queue.follow(rng, hint.ranges(pace.size) - 1) if fresh(rng) else []
                    held = [rng, *more]
                    done = None
                    if more:
                        done = copy_range(conn, ctx, shape, span_of(held), pace, counters, stop, throttle, leave,
                                          lock_ms=lock_ms, hint=hint)
                        if done is None:  # a batch or more: its ranges go back, the first is copied alone
                            queue.give_back(more)
                            held = [rng]
                        elif not done:
                            queue.give_back(held)  # nothing of a span commits before it is done
                    if done is None:
                        if not copy_range(conn, ctx, shape, rng, pace, counters, stop, throttle, leave,
                                          lock_ms=lock_ms, hint=hint):
                            queue.put(rng)  # from its committed cursor, for whoever comes next
                    held = []
                    if stop.is_set() or leave():
                        return
                    rng = queue.get()
                    if rng is None:
                        return
                    held = [rng]
            except BaseException as e:  # noqa: BLE001 - reported by the coordinator below
                if held:
                    queue.give_back(held)
                errors.append(e)
                stop.set()
            finally:
                if conn is not None:
                    conn.close()
                if not gone:
                    crew.left()

        threads: list[threading.Thread] = []
        started = time.monotonic()
        rows0 = counters.rows

        def report() -> None:
            if not ctx.progress:
                return
            elapsed = time.monotonic() - started
            rate = (counters.rows - rows0) / elapsed if elapsed > 0 else 0.0
            done_frac = counters.ranges_done / total if total else 1.0
            eta = elapsed / done_frac * (1 - done_frac) if 0 < done_frac < 1 and counters.ranges_done else None
            ctx.progress({"phase": "backfill", "ranges_done": counters.ranges_done, "ranges_total": total,
                          "rows": counters.rows, "rows_per_s": round(rate), "eta_s": eta and round(eta),
                          "batch_size": pace.size, "ranges_left": total - counters.ranges_done,
                          "workers": crew.target})

        next_progress = 0.0
        watch = Watch(ctx)  # the application's DDL while we copy (see orchestrator/drift.py)
        tick = Tick(ctx)  # partitions due while a long backfill runs (see orchestrator/horizon.py)
        drifted = False
        try:
            while True:
                if not stop.is_set() and watch():
                    drifted = True
                    stop.set()  # workers finish their batch; the runner carries the change and resumes
                crew.follow_controls()
                tick()
                # A new worker starts with a range in hand: never one that would find nothing to do.
                while not stop.is_set() and crew.join():
                    rng = queue.get()
                    if rng is None:
                        crew.left()
                        break
                    n = len(threads)
                    threads.append(threading.Thread(target=work, args=(n, rng), name=f"backfill-{n}", daemon=True))
                    threads[-1].start()
                alive = [t for t in threads if t.is_alive()]
                if not alive and (stop.is_set() or queue.empty()):
                    break
                if alive:
                    alive[0].join(timeout=0.25)
                else:
                    time.sleep(0.05)
                if time.monotonic() >= next_progress:
                    next_progress = time.monotonic() + 1.0
                    report()
            report()
        except KeyboardInterrupt:
            stop.set()
            for t in threads:
                t.join(timeout=10)
            raise
        if drifted:
            raise ShapeChanged("the table's shape changed during the backfill")
        if errors:
            e = errors[0]
            if is_connection_error(e):
                raise ConnectionFailed(
                    f"backfill lost its connection: {str(e).splitlines()[0]}; run apply again to resume") from None
            raise e
        logger.debug("backfill workers finished: {} rows in {} batches", counters.rows, counters.batches)

    def undo(self, ctx: Context) -> None:
        """Nothing to undo: the copied rows go with the twin."""
