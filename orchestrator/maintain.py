"""maintain: after cutover, keep partitions coming and let old data leave cheaply.

One *pass* (:func:`maintain_pass`) is idempotent and does, in order:

(a) **create** the aligned partitions from the newest existing one (or the current
    interval) up to now + ``partition_by.premake``, named by ``plan.partition_name``;
(b) **retention**: partitions whose upper bound is at or before
    ``floor(now) - retention.keep intervals`` are detached, then dropped, kept detached, or
    moved to ``retention.archive_schema`` (``retention.action``);
(c) **check the default partition**: how many rows it holds and in which intervals.

Creating a partition when a DEFAULT partition exists (pg_partman#604)
---------------------------------------------------------------------
``CREATE TABLE .. PARTITION OF`` takes ACCESS EXCLUSIVE on the parent *and* scans the
default partition under that lock to prove it holds no row of the new range, and fails
outright if it does. This module never does that. Every partition is built as a
standalone *staging* table and attached:

1. (no lock on live data) ``CREATE TABLE new (LIKE parent INCLUDING ALL EXCLUDING IDENTITY)``,
   ``key SET NOT NULL`` and ``CHECK (key >= lo AND key < hi)``: the CHECK lets ATTACH skip
   scanning the new table. The table carries a COMMENT marking it as staging, so a pass
   that crashed leaves something the next pass recognises and rebuilds.
2. (no lock on live data) if the default holds rows of [lo, hi) and the table has a
   primary key: copy them into ``new`` in primary-key order, in batches of
   ``backfill.batch_size``, one short transaction each. The rows *stay* in the default
   and the application keeps writing into the default meanwhile.
3. (one short transaction, ``lock_timeout`` = ``cutover.lock_timeout``, retried with
   backoff by :func:`orchestrator.db.with_lock_retry`)::

       LOCK parent IN SHARE MODE                    -- writers wait, readers continue
       LOCK default IN ACCESS EXCLUSIVE MODE        -- the default is now frozen
       DELETE FROM new  WHERE no identical row (same pk, same ROW()::text) in default[lo,hi)
       INSERT INTO new  rows of default[lo,hi) whose pk is not in new   -- the delta
       DELETE FROM default WHERE key >= lo AND key < hi
       ALTER TABLE parent ATTACH PARTITION new FOR VALUES FROM (lo) TO (hi)
       ALTER TABLE new DROP CONSTRAINT <staging check>; COMMENT ON TABLE new IS NULL

   Why no row is lost or duplicated: while the ACCESS EXCLUSIVE lock is held nobody can
   read or write the default, so after the two reconcile statements ``new`` holds exactly
   the rows of default[lo, hi) at that instant (rows changed after their copy are deleted
   and copied again, deleted ones disappear, new ones are added); those rows are then
   deleted from the default, and the partition is attached, all in one transaction. Any
   write that committed before the lock is seen; any write after commit is routed to the
   new partition. A writer still in flight on the default makes the lock wait, which gives
   up after lock_timeout, rolls everything back, and retries: nothing is half-done.

   Lock profile: the parent gets SHARE (SELECTs continue; INSERT/UPDATE/DELETE on any
   partition wait: an INSERT holding only the parent's old partition descriptor could
   otherwise route a row of [lo, hi) to the default, wait for it, and then fail its new
   partition constraint), the default ACCESS EXCLUSIVE (reads that are not pruned away
   from the default wait too). Compare CREATE TABLE .. PARTITION OF, which holds ACCESS
   EXCLUSIVE on the parent (reads wait too) for the same scan of the default. It is held
   for: the reconcile (an index
   anti-join over the rows of the range, cheap when few rows changed since the copy),
   the delete of the moved rows, and ATTACH's validation scan of the *remaining* default
   (PostgreSQL has to prove it holds no row of the range; it cannot use an index). So the
   lock lasts O(rows in the default) -- milliseconds for a healthy default, which only
   holds NULL and far-out keys. It is measured and returned as ``lock_held_ms``.
   Without a primary key the rows are copied inside the locked transaction (longer lock;
   the pass says ``copied_under_lock``).

Retention
---------
``DETACH PARTITION .. CONCURRENTLY`` (PostgreSQL >= 14) takes only SHARE UPDATE EXCLUSIVE,
but PostgreSQL refuses it when the table has a default partition ("cannot detach
partitions concurrently when a default partition exists", checked by the tests) and it
cannot run inside a transaction block. So: without a default partition, one CONCURRENTLY
attempt under lock_timeout; with a default (or if that attempt fails), a plain DETACH
(ACCESS EXCLUSIVE on the parent, catalog-only, no scan) under lock_timeout + retry, in the
same transaction as the DROP or SET SCHEMA that follows. The pass reports which was used.
A partition whose range reaches into the retention window, and the default partition,
are never touched.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import psycopg
from loguru import logger
from psycopg import errors as pgerr

from orchestrator.context import REVERSE_TRIGGER, session
from orchestrator.db import (
    LockAttempt,
    LockPolicy,
    batch_lock_timeout_ms,
    close_quietly,
    connect,
    lock_holder,
    with_lock_retry,
)
from orchestrator.distribute import is_distributed
from orchestrator.errors import OrchestrateError, PlanError, PreflightError
from orchestrator.inspect import Facts, Part, naive_utc, parse_bound, parse_partbound
from orchestrator.inspect import partitioned_facts as table_facts
from orchestrator.owner import as_owner_sql, render, table_executor
from orchestrator.plan import Plan, parse_duration, utc_now
from orchestrator.sql import MAX_IDENT, QualifiedName, timestamp_text
from orchestrator.sql import maintain as msql
from orchestrator.sql.compose import Composed
from orchestrator.state.store import Store

#: Test hook: called with the attach's cursor right after its locks are taken (tests only).
on_attach_locked: Any = None
STAGING_COMMENT = "orchestrate maintain: staging partition, not attached yet; safe to drop"
DEFAULT_ARCHIVE_SCHEMA = "archive"

# --------------------------------------------------------------------------- pure helpers

def parse_every(text: str | int | float) -> float:
    """Seconds from a maintenance interval ('1 hour', '30 s', '5 min', '2h', '1 day', 90): the
    plan's one duration parser, with maintain's error."""
    try:
        seconds = parse_duration(text)
    except ValueError:
        raise PlanError(f"maintenance.interval {text!r} is not a duration: "
                        "use e.g. '30 s', '5 min', '1 hour'") from None
    if seconds <= 0:
        raise PlanError(f"maintenance.interval {text!r} must be positive")
    return seconds


fmt = timestamp_text


def retention_cutoff(plan: Plan, now: datetime) -> datetime | None:
    """Partitions ending at or before this are expired (None: no retention)."""
    keep = plan.retention.keep
    if keep is None:
        return None
    iv = plan.partition_by.interval_value
    return iv.add(iv.floor(now), -keep)


def ranges_to_create(plan: Plan, now: datetime,
                     parts: list[Part]) -> tuple[list[tuple[datetime, datetime]], list[dict]]:
    """Aligned [lo, hi) intervals to create, and the ones skipped because they overlap.

    From the end of the newest ranged partition (or the current interval when there is
    none, or the retention cutoff if that is later) up to floor(now) + premake + 1.
    """
    pb = plan.partition_by
    iv = pb.interval_value
    current = iv.floor(now)
    horizon = iv.add(current, pb.premake + 1)
    ranged = [p for p in parts if not p.is_default]
    his = [p.hi for p in ranged if p.hi is not None]
    if any(p.hi is None for p in ranged):
        return [], []  # a partition already reaches MAXVALUE: nothing can be added above it
    start = max(his) if his else current
    if not his:
        start = current
    cutoff = retention_cutoff(plan, now)
    if cutoff is not None and start < cutoff:
        start = cutoff
    t = iv.floor(start)
    out: list[tuple[datetime, datetime]] = []
    skipped: list[dict] = []
    while t < horizon:
        nxt = iv.add(t)
        clash = next((p for p in ranged if (p.lo is None or p.lo < nxt) and (p.hi is None or t < p.hi)), None)
        if clash is None:
            out.append((t, nxt))
        elif not (clash.lo == t and clash.hi == nxt):
            skipped.append({"from": fmt(t), "to": fmt(nxt), "reason": f"overlaps {clash.name}"})
        t = nxt
        if len(out) > pb.max_partitions:
            raise PreflightError(
                f"maintain would create more than {pb.max_partitions} partitions; raise partition_by.max_partitions"
            )
    return out, skipped


def expired_partitions(plan: Plan, now: datetime, parts: list[Part]) -> list[Part]:
    """Ranged partitions entirely before the retention window; never the default."""
    cutoff = retention_cutoff(plan, now)
    if cutoff is None:
        return []
    return [p for p in parts if not p.is_default and p.hi is not None and p.hi <= cutoff]


# --------------------------------------------------------------------------- catalog
# (what a partitioned table looks like: inspect.partitioned_facts)


def _range_sql(f: Facts, lo: datetime, hi: datetime, alias: str | None = None) -> Composed:
    return msql.key_range(f.key, f.key_type, lo, hi, alias)


def default_report(conn: psycopg.Connection, plan: Plan, f: Facts, limit: int = 50) -> dict:
    """Rows in the default partition, by aligned interval of the plan (NULL/infinite apart)."""
    if f.default is None:
        return {"default_partition": None, "default_rows": 0, "default_ranges": []}
    rows = conn.execute(msql.default_by_day(f.default, f.key)).fetchall()
    iv = plan.partition_by.interval_value
    buckets: dict[Any, int] = {}
    total = 0
    for day, n in rows:
        total += n
        b = None if day is None else iv.floor(day)
        buckets[b] = buckets.get(b, 0) + n
    ranges = []
    for b, n in sorted(buckets.items(), key=lambda kv: (kv[0] is not None, kv[0] or datetime.min)):
        if b is None:
            ranges.append({"range": "NULL or infinite key", "rows": n})
        else:
            ranges.append({"range": iv.suffix(b), "from": fmt(b), "to": fmt(iv.add(b)), "rows": n,
                           "partition": plan.partition_name(b).name})
    return {"default_partition": str(f.default), "default_rows": total, "default_ranges": ranges[:limit]}


def _count_in_default(conn: psycopg.Connection, f: Facts, lo: datetime, hi: datetime) -> int:
    if f.default is None:
        return 0
    return conn.execute(msql.count_where(f.default, _range_sql(f, lo, hi))).fetchone()[0]


def _action(plan: Plan) -> str:
    return plan.retention.action


def _archive_schema(plan: Plan) -> str:
    return plan.retention.archive_schema or DEFAULT_ARCHIVE_SCHEMA


def maintenance_preview(plan: Plan, conn: psycopg.Connection, now: datetime | None = None) -> dict:
    """What the next pass would do, read-only: partitions to create (with the rows the
    default holds for them) and to remove (with the action), plus the default's content.
    For `orchestrate plan` and `maintain --dry-run`."""
    now = naive_utc(now) or utc_now()
    f = table_facts(conn, plan)
    create, skipped = ranges_to_create(plan, now, f.parts)
    expired = expired_partitions(plan, now, f.parts)
    return {
        "table": str(f.parent),
        "now": now.isoformat(),
        "create": [{"partition": str(plan.partition_name(lo)), "from": fmt(lo), "to": fmt(hi),
                    "default_rows_to_move": _count_in_default(conn, f, lo, hi)} for lo, hi in create],
        "skipped": skipped,
        "remove": [{"partition": str(p.name), "from": fmt(p.lo) if p.lo else "MINVALUE", "to": fmt(p.hi),
                    "action": _action(plan), **({"archive_schema": _archive_schema(plan)}
                                                if _action(plan) == "archive" else {})} for p in expired],
        "retention_cutoff": (c.isoformat() if (c := retention_cutoff(plan, now)) else None),
        **default_report(conn, plan, f),
    }


# --------------------------------------------------------------------------- the pass


def _timed_locked(conn: psycopg.Connection, what: str, body, locks: list[tuple[QualifiedName, str]],
                  policy: LockPolicy, on_attempt=None) -> tuple[Any, float]:
    """with_lock_retry around body after LOCKing ``locks`` in order; returns (result, ms held)."""
    mark: dict[str, float] = {}

    def wrapped(cur: psycopg.Cursor) -> Any:
        for rel, mode in locks:
            cur.execute(msql.lock_table(rel, mode))
        mark["t"] = time.monotonic()
        return body(cur)

    out = with_lock_retry(conn, wrapped, what=what, policy=policy, on_attempt=on_attempt)
    return out, (time.monotonic() - mark["t"]) * 1000


class _Pass:
    def __init__(self, plan: Plan, conn: psycopg.Connection, now: datetime, dsn: str | None = None):
        self.plan, self.conn, self.now, self.dsn = plan, conn, now, dsn
        self._executor: tuple[QualifiedName, str] | None = None
        c = plan.cutover
        # Never above half of deadlock_timeout, like a backfill batch: while the swap waits for
        # the default's lock it holds SHARE on the parent, so writers queue behind it for at
        # most this long, and it gives up before a writer it blocks could be a deadlock victim.
        lock_s = batch_lock_timeout_ms(conn, c.lock_timeout_s) / 1000
        self.locks = plan.locks.capped(lock_s)
        self.result: dict[str, Any] = {
            "table": str(plan.table_name), "now": now.isoformat(), "dry_run": False,
            "created": [], "moved": {}, "copied_under_lock": [], "detached": [], "detach_method": {},
            "dropped": [], "archived": [], "lock_held_ms": {}, "skipped": [], "default_rows": 0,
        }

    # -- helpers
    def _event(self, kind: str, message: str) -> None:
        """An event in the state schema (status shows it), on the table's latest migration when
        there is one; nothing when the state schema was never made (a table maintain alone manages)."""
        try:
            if not self.conn.execute(msql.EVENTS_TABLE_EXISTS).fetchone()[0]:
                return
            store = Store(self.conn)
            latest = store.latest(str(self.plan.table_name))
            store.event(latest.id if latest else None, kind, message)
        except psycopg.Error as e:  # an event is a log line: never let it fail the pass
            logger.debug("maintain: could not record the event: {}", e)

    def _owner(self, f: Facts) -> tuple[QualifiedName, str]:
        """The executor that writes the table's partitions as its owner, and the owner."""
        if self._executor is None:
            self._executor = table_executor(self.conn, f.oid)
        return self._executor

    def _as_owner(self, cur: psycopg.Cursor, f: Facts, query: Composed, params: list | tuple = ()) -> int:
        """Run one write as the table's owner (its CHECKs, defaults and triggers are its
        code: never run with our rights); returns the row count."""
        fn, _owner = self._owner(f)
        return int(cur.execute(as_owner_sql(fn), [render(cur, query, params)]).fetchone()[0])

    def _locked(self, what: str, body, locks: list[tuple[QualifiedName, str]]) -> Any:
        """with_lock_retry around body; measures from the moment the locks are held to commit."""
        def note(a: LockAttempt) -> None:
            if a.ok or not locks:
                return
            try:
                who = lock_holder(self.conn, msql.LOCK_HOLDER_WHERE, [[str(rel) for rel, _ in locks]])
            except psycopg.Error:
                who = None
            why = f"{what}: attempt {a.attempt} gave up after {a.waited_s * 1000:.0f} ms; " + (
                f"lock held by {who}" if who else "the lock holder has already ended")
            logger.info("maintain: {}", why)
            waited = self.result.setdefault("waited_for", [])
            if len(waited) < 20:
                waited.append(why)
                self._event("yield", f"maintain {why}")

        out, held = _timed_locked(self.conn, what, body, locks, policy=self.locks, on_attempt=note)
        self.result["lock_held_ms"][what] = round(held, 1)
        if locks:
            logger.info("maintain: {} (locks held {:.1f} ms)", what, held)
        return out

    # -- (a) create
    def create(self, f: Facts, lo: datetime, hi: datetime) -> None:
        plan, conn = self.plan, self.conn
        name = plan.partition_name(lo)
        with conn.cursor() as cur:
            cur.execute(msql.RELATION_BY_NAME, (name.schema, name.name))
            row = cur.fetchone()
        if row is not None:
            if row[0] == "r" and not row[1] and row[2] == STAGING_COMMENT:
                logger.info("maintain: dropping {} left over by an interrupted pass", name)
                self._locked(f"drop leftover staging {name.name}", lambda cur: cur.execute(msql.drop_table(name)),
                             [(name, "ACCESS EXCLUSIVE")])
            else:
                raise PreflightError(f"cannot create partition {name}: a relation of that name already exists")
        check = _constraint_name(name.name)
        _fn, owner = self._owner(f)

        like = _sibling(conn, f)

        def stage(cur: psycopg.Cursor) -> None:
            _create_like(cur, name, f.parent)
            _like_sibling(cur, name, like)
            cur.execute(msql.stage_bounds(name, f.key, check, _range_sql(f, lo, hi)))
            cur.execute(msql.comment_on_table(name, STAGING_COMMENT))
            # The owner's before a row is written into it, like every partition of the table.
            cur.execute(msql.owner_to(name, owner))

        # Only the new table is locked exclusively; LIKE reads the parent under ACCESS SHARE.
        self._locked(f"stage {name.name}", stage, [])
        self.result["lock_held_ms"].pop(f"stage {name.name}", None)  # locks nothing live
        distributed = plan.distribute is not None and _distributed(conn, f.parent)
        if distributed:
            # Citus attaches only a distributed table to a distributed parent: the (empty)
            # staging table is distributed colocated with it, so the rows moved out of the
            # default partition go shard to shard, and ATTACH is catalog work on each node.
            self._locked(f"distribute {name.name}", lambda cur: cur.execute(
                msql.DISTRIBUTE_COLOCATED, (str(name), plan.distribute.column, str(f.parent))), [])
            self.result["lock_held_ms"].pop(f"distribute {name.name}", None)  # locks nothing live
        precopied = 0
        if f.default is not None and f.pk:
            precopied = self._copy_batches(f, name, lo, hi)
        elif f.default is not None and _count_in_default(conn, f, lo, hi):
            self.result["copied_under_lock"].append(name.name)

        rng = _range_sql(f, lo, hi)
        rng_d = _range_sql(f, lo, hi, "d")

        def swap(cur: psycopg.Cursor) -> int:
            moved = 0
            if distributed:
                # One connection per worker: Citus refuses DDL (ATTACH) after a parallel DML.
                cur.execute(msql.CITUS_SEQUENTIAL)
            if on_attach_locked is not None:
                on_attach_locked(cur)
            if f.default is not None:
                if f.pk:
                    # Copies that are stale (row changed, moved or deleted since the copy).
                    self._as_owner(cur, f, msql.delete_stale_copies(name, f.default, f.pk, f.columns, rng_d))
                    # Rows not copied yet (new, or changed and just deleted above).
                    self._as_owner(cur, f, msql.insert_missing(name, f.default, f.pk, f.writable, rng_d))
                else:
                    self._as_owner(cur, f, msql.insert_where(name, f.default, f.writable, rng))
                # A move is not a delete: between cutover and finalize the reverse trigger
                # (cloned onto the default partition) would delete the moved rows from the
                # retired table, and a rollback would lose them. The staging table has no
                # trigger yet, so the retired table is left as it is. We hold ACCESS
                # EXCLUSIVE on the default: no other write can slip past the disabled trigger.
                paused = cur.execute(msql.ENABLED_TRIGGER, (str(f.default), REVERSE_TRIGGER)).fetchall()
                for tg, _ in paused:
                    cur.execute(msql.set_trigger(f.default, tg, "DISABLE"))
                moved = self._as_owner(cur, f, msql.delete_where(f.default, rng))
                for tg, mode in paused:
                    verb = {"O": "ENABLE", "R": "ENABLE REPLICA", "A": "ENABLE ALWAYS"}[mode]
                    cur.execute(msql.set_trigger(f.default, tg, verb))
                cur.execute(msql.count_rows(name))
                if cur.fetchone()[0] != moved:  # cannot happen; never attach on a doubt
                    raise PreflightError(f"{name}: moved row count mismatch; nothing changed")
            cur.execute(msql.attach_partition(f.parent, name, f.key_type, lo, hi))
            cur.execute(msql.drop_constraint(name, check))
            cur.execute(msql.comment_on_table(name, None))
            _replica_identity_index_like_sibling(cur, name, like)
            return moved

        # SHARE, not just the SHARE UPDATE EXCLUSIVE that ATTACH needs: an INSERT that got the
        # old partition descriptor would route a row of [lo, hi) to the default, wait for
        # the default's lock, then fail the default's new partition constraint after our
        # commit. SHARE makes writers wait *before* they read the descriptor.
        locks = [(f.parent, "SHARE")]
        if f.default is not None:
            locks.append((f.default, "ACCESS EXCLUSIVE"))
        moved = self._locked(f"attach {name.name}", swap, locks)
        self.result["created"].append(name.name)
        if moved:
            self.result["moved"][name.name] = moved
        if precopied:
            self.result.setdefault("precopied", {})[name.name] = precopied
        f.parts.append(Part(name, lo, hi))

    def _copy_batches(self, f: Facts, name: QualifiedName, lo: datetime, hi: datetime) -> int:
        """Copy the default's rows of [lo, hi) into the staging table, pk order, one batch per
        transaction, without locking them: the locked swap reconciles whatever changed."""
        size = self.plan.backfill.batch_size
        last: list[str] | None = None
        total = 0
        while True:
            where = msql.copy_where(_range_sql(f, lo, hi), f.pk, f.pk_types, after=last is not None)
            # The window's end (a read), then its copy as the owner, bounded by that value.
            row = self.conn.execute(msql.copy_window(f.default, f.pk, where), [*(last or []), size]).fetchone()
            if row is None:
                break
            with self.conn.cursor() as cur:
                self._as_owner(cur, f, msql.copy_batch(name, f.default, f.writable, f.pk, f.pk_types, where),
                               [*(last or []), *row[1:]])
            total += row[0]
            last = list(row[1:])
            if row[0] < size:
                break
        if total:
            logger.info("maintain: pre-copied {} rows of the default into {} (no lock on live data)", total, name)
        return total

    # -- (b) retention
    def retire(self, f: Facts, p: Part) -> None:
        plan = self.plan
        action = _action(plan)
        name = p.name
        concurrent_ok = f.default is None and f.server_version >= 14
        method = "plain"
        detached_already = False
        if concurrent_ok:
            method = "concurrently"
            try:
                self._detach_concurrently(f, p)
                detached_already = True
            except (pgerr.LockNotAvailable, pgerr.ObjectNotInPrerequisiteState) as e:
                logger.info("maintain: DETACH CONCURRENTLY of {} failed ({}); falling back to plain DETACH",
                            name, str(e).splitlines()[0])
                method = "plain (concurrently failed)"
                if self._detach_pending(name):
                    self._locked(f"finalize detach {name.name}", lambda cur: cur.execute(
                        msql.detach_partition(f.parent, name, "FINALIZE")),
                        [(f.parent, "SHARE UPDATE EXCLUSIVE")])
                    detached_already = True
        archive = QualifiedName(_archive_schema(plan), name.name)

        def body(cur: psycopg.Cursor) -> None:
            if not detached_already:
                cur.execute(msql.detach_partition(f.parent, name))
            if action == "drop":
                cur.execute(msql.drop_table(name))
            elif action == "archive":
                cur.execute(msql.create_schema(archive.schema))
                cur.execute(msql.set_schema(name, archive.schema))

        if not detached_already:
            locks = [(f.parent, "ACCESS EXCLUSIVE")]  # plain DETACH takes it anyway; take it first
            self._locked(f"detach {name.name}", body, locks)
        elif action != "detach":
            self._locked(f"{action} {name.name}", body, [(name, "ACCESS EXCLUSIVE")])
        self.result["detached"].append(name.name)
        self.result["detach_method"][name.name] = method
        if action == "drop":
            self.result["dropped"].append(name.name)
        elif action == "archive":
            self.result["archived"].append(str(archive))
        f.parts.remove(p)

    def _detach_concurrently(self, f: Facts, p: Part) -> None:
        """DETACH .. CONCURRENTLY: outside any transaction block, one attempt under lock_timeout."""
        ms = int(self.locks.lock_timeout_s * 1000)
        # Its own session, lock_timeout a connection parameter of it: no SET LOCAL outside a
        # transaction block, and no session-level SET on the main session.
        assert self.dsn is not None, "a pass that detaches is built with its DSN"
        conn = connect(self.dsn, "maintain-detach", settings={"lock_timeout": f"{ms}ms"})
        t0 = time.monotonic()
        try:
            conn.execute(msql.detach_partition(f.parent, p.name, "CONCURRENTLY"))
        finally:
            close_quietly(conn)
        # CONCURRENTLY holds SHARE UPDATE EXCLUSIVE only: writers are never blocked.
        self.result["lock_held_ms"][f"detach {p.name.name} (concurrently, SHARE UPDATE EXCLUSIVE)"] = round(
            (time.monotonic() - t0) * 1000, 1)

    def _detach_pending(self, name: QualifiedName) -> bool:
        row = self.conn.execute(msql.DETACH_PENDING, (name.schema, name.name)).fetchone()
        return bool(row and row[0])


@dataclass
class Sibling:
    """What a new partition copies from the table and its newest partition: the owner (a
    partition made by the role running maintain would otherwise be that role's, and the
    owner's next ALTER TABLE would fail), storage parameters and replica identity (which
    the cutover gave every partition, and which do not come with LIKE or ATTACH)."""

    owner: str
    reloptions: list[str]
    replident: str
    replident_parent_index: int | None  # the parent's index the sibling's replica identity index belongs to


def _sibling(conn: psycopg.Connection, f: Facts) -> Sibling:
    owner = conn.execute(msql.TABLE_OWNER, (f.oid,)).fetchone()[0]
    ranged = [p for p in f.parts if not p.is_default and not p.detach_pending]
    if not ranged:
        return Sibling(owner, [], "d", None)
    newest = max(ranged, key=lambda p: p.lo or datetime.min)
    row = conn.execute(msql.NEWEST_PARTITION_STORAGE, (str(newest.name),)).fetchone()
    return Sibling(owner, list(row[0]), row[1], row[2])


def _like_sibling(cur: psycopg.Cursor, name: QualifiedName, like: Sibling) -> None:
    """Owner, storage parameters, replica identity FULL/NOTHING onto the staging table (it
    is not attached yet: no lock on live data)."""
    cur.execute(msql.owner_to(name, like.owner))
    if like.reloptions:
        cur.execute(msql.set_reloptions(name, like.reloptions))
    if like.replident in ("f", "n"):
        cur.execute(msql.replica_identity(name, like.replident))


def _replica_identity_index_like_sibling(cur: psycopg.Cursor, name: QualifiedName, like: Sibling) -> None:
    """REPLICA IDENTITY USING INDEX: the new partition's index attached to the same parent
    index (known only once ATTACH matched them). The partition was attached in this very
    transaction: nobody else can hold a lock on it yet."""
    if like.replident != "i" or like.replident_parent_index is None:
        return
    row = cur.execute(msql.REPLIDENT_INDEX_OF, (like.replident_parent_index, str(name))).fetchone()
    if row is not None:
        cur.execute(msql.replica_identity_index(name, row[0]))


def _constraint_name(table: str) -> str:
    suffix = "_orchestrate_bounds"
    return table.encode()[: MAX_IDENT - len(suffix)].decode(errors="ignore") + suffix




def _distributed(conn: psycopg.Connection, table: QualifiedName) -> bool:

    return is_distributed(conn, str(table))


def _create_like(cur: psycopg.Cursor, name: QualifiedName, parent: QualifiedName) -> None:
    last: Exception | None = None
    # LIKE options, most complete first; the next is tried when PostgreSQL refuses one
    # (e.g. COMPRESSION before PG 14); IDENTITY is excluded (see msql.LIKE_OPTIONS).
    for opts in msql.LIKE_OPTIONS:
        try:
            with cur.connection.transaction():  # a savepoint: a refused option leaves nothing behind
                cur.execute(msql.create_like(name, parent, opts))
            return
        except (pgerr.FeatureNotSupported, pgerr.SyntaxError, pgerr.InvalidTableDefinition,
                pgerr.WrongObjectType) as e:
            last = e
            logger.info("maintain: CREATE TABLE (LIKE .. {}) refused ({}); trying fewer options", opts,
                        str(e).splitlines()[0])
    assert last is not None
    raise last


def maintain_pass(plan: Plan, dsn: str, now: datetime | None = None, dry_run: bool = False) -> dict:
    """One idempotent maintenance pass on plan.table_name; returns what it did (see module doc).

    Keys: created, moved {partition: rows}, precopied, copied_under_lock, detached,
    detach_method, dropped, archived, default_rows, default_ranges, lock_held_ms
    {step: ms}, skipped, now. With dry_run: the same keys empty, and ``preview``.
    """

    now = naive_utc(now) or utc_now()
    # The same session discipline as apply: the per-table advisory lock (a pass never runs
    # beside an apply or another pass on this table), connection errors as exit 4.
    with session(plan, dsn, lock=not dry_run, role="maintain", state=False) as ctx:
        conn = ctx.conn
        if dry_run:
            preview = maintenance_preview(plan, conn, now)
            p = _Pass(plan, conn, now)
            p.result.update(dry_run=True, preview=preview, default_rows=preview["default_rows"],
                            default_ranges=preview["default_ranges"])
            return p.result
        p = _Pass(plan, conn, now, dsn)
        f = table_facts(conn, plan)
        for part in [x for x in f.parts if x.detach_pending]:  # an interrupted DETACH CONCURRENTLY
            p._locked(f"finalize detach {part.name.name}", lambda cur, n=part.name: cur.execute(
                msql.detach_partition(f.parent, n, "FINALIZE")), [(f.parent, "SHARE UPDATE EXCLUSIVE")])
            f.parts.remove(part)
        create, skipped = ranges_to_create(plan, now, f.parts)
        p.result["skipped"] = skipped
        for lo, hi in create:
            p.create(f, lo, hi)
        for part in expired_partitions(plan, now, f.parts):
            p.retire(f, part)
        rep = default_report(conn, plan, f)
        p.result["default_rows"] = rep["default_rows"]
        p.result["default_ranges"] = rep["default_ranges"]
        logger.info("maintain {}: {}", plan.table_name, summary(p.result))
        return p.result


def summary(r: dict) -> str:
    """One line for logs and text output."""
    if r.get("dry_run"):
        pv = r["preview"]
        return (f"dry run: would create {[c['partition'] for c in pv['create']] or 'nothing'}, "
                f"would remove {[(x['partition'], x['action']) for x in pv['remove']] or 'nothing'}; "
                f"default holds {pv['default_rows']} rows")
    parts = [f"created {r['created'] or 'nothing'}"]
    if r["moved"]:
        parts.append(f"moved rows out of the default {r['moved']}")
    parts.append(f"detached {r['detached'] or 'nothing'}")
    if r["detach_method"]:
        parts.append(f"detach method {r['detach_method']}")
    if r["dropped"]:
        parts.append(f"dropped {r['dropped']}")
    if r["archived"]:
        parts.append(f"archived {r['archived']}")
    parts.append(f"default holds {r['default_rows']} rows")
    if r["lock_held_ms"]:
        parts.append("locks held " + ", ".join(f"{k}: {v} ms" for k, v in r["lock_held_ms"].items()))
    return "; ".join(parts)


# --------------------------------------------------------------------------- pg_partman


def partman_handover(plan: Plan, conn: psycopg.Connection) -> dict:
    """Hand the table's upkeep to pg_partman: ``create_parent`` on the existing partitioned
    table, then retention in ``part_config`` per the plan.

    Requires the pg_partman extension in this database (``CREATE SCHEMA partman; CREATE
    EXTENSION pg_partman SCHEMA partman``; Debian package postgresql-NN-partman); raises
    PreflightError saying so otherwise. Supports pg_partman 4.x (p_type 'native') and 5.x
    (p_type 'range'). pg_partman 5 is told ``p_default_table := false`` when the table has
    a default partition; pg_partman 4 always creates ``<table>_default``, so in one
    transaction (parent ACCESS EXCLUSIVE, under lock_timeout + retry) ours is detached and
    parked, partman's is created, and the parked rows are re-inserted through the parent
    (the lock lasts as long as the default is big). Our partition names match pg_partman's for day/month/year intervals
    (``<table>_p2026_03``); pg_partman 4 names weekly partitions ``p2026w10``, so with a
    weekly plan existing partitions keep our names and new ones get pg_partman's. After the
    handover stop ``orchestrate maintain`` for this table and run partman's
    ``run_maintenance()`` (or its background worker) instead.
    """
    row = conn.execute(msql.PARTMAN_EXTENSION).fetchone()
    if row is None:
        available = conn.execute(msql.PARTMAN_AVAILABLE).fetchone()[0]
        hint = ("CREATE SCHEMA partman; CREATE EXTENSION pg_partman SCHEMA partman" if available
                else "install the server package (e.g. apt-get install postgresql-15-partman), then "
                     "CREATE SCHEMA partman; CREATE EXTENSION pg_partman SCHEMA partman")
        raise PreflightError(f"pg_partman is not installed in this database: {hint}")
    version, schema = row
    f = table_facts(conn, plan)
    major = int(version.split(".")[0])
    target = f"{f.parent.schema}.{f.parent.name}"  # a value: part_config.parent_table's spelling
    registered = conn.execute(msql.partman_registered(schema), (target,)).fetchone()[0]
    if not registered:
        argnames = conn.execute(msql.PARTMAN_CREATE_PARENT_ARGS, (schema,)).fetchone()[0] or []
        has_default_arg = "p_default_table" in argnames
        p_type = "native" if major < 5 else "range"
        call = msql.partman_create_parent(schema, no_default_table=bool(has_default_arg and f.default))
        args = (target, f.key, p_type, plan.partition_by.interval, plan.partition_by.premake)
        parked = f.parent.with_name(_constraint_name(f.parent.name).replace("_orchestrate_bounds", "_handover"))

        def body(cur: psycopg.Cursor) -> None:
            if f.default is not None and not has_default_arg:
                # pg_partman 4 always creates and attaches <table>_default: park ours, let it
                # make its own, and route the parked rows through the parent (few rows in a
                # healthy default; the parent stays ACCESS EXCLUSIVE locked meanwhile).
                cur.execute(msql.detach_partition(f.parent, f.default))
                cur.execute(msql.rename_to(f.default, parked.name))
                cur.execute(call, args)
                cur.execute(msql.insert_through_parent(f.parent, parked, f.writable))
                cur.execute(msql.drop_table(parked))
            else:
                cur.execute(call, args)
            if plan.retention.keep is not None:
                iv = plan.partition_by.interval_value
                cur.execute(
                    msql.partman_retention(schema),
                    (f"{iv.count * plan.retention.keep} {iv.unit}s", plan.retention.action != "drop",
                     _archive_schema(plan) if plan.retention.action == "archive" else None, target),
                )

        locks = [(f.parent, "ACCESS EXCLUSIVE")]
        _, held = _timed_locked(conn, "pg_partman handover", body, locks, plan.locks)
    else:
        held = 0.0
    cfg = conn.execute(msql.partman_config(schema), (target,)).fetchone()
    return {"partman_version": version, "schema": schema, "already_registered": bool(registered),
            "lock_held_ms": round(held, 1),
            "part_config": dict(zip(("parent_table", "control", "partition_interval", "premake", "retention",
                                     "retention_keep_table"), [str(v) if v is not None else None for v in cfg],
                                    strict=True))}


# --------------------------------------------------------------------------- daemon


def run_daemon(plans: list[Plan], dsn: str, stop: threading.Event | None = None) -> int:
    """A pass per plan every plan.maintenance.interval until SIGTERM/SIGINT (returns 0).

    A failed pass (database down, lock not taken, ...) is logged and the next one runs at
    the next interval: the daemon survives database restarts.
    """
    from apscheduler.schedulers.background import BackgroundScheduler

    stop = stop or threading.Event()
    sched = BackgroundScheduler(timezone=timezone.utc, job_defaults={"coalesce": True, "max_instances": 1})
    counters: dict[str, int] = {}

    def one(plan: Plan) -> None:
        table = str(plan.table_name)
        counters[table] = counters.get(table, 0) + 1
        n = counters[table]
        try:
            r = maintain_pass(plan, dsn)
            logger.info("maintain daemon: pass {} for {} done: {}", n, table, summary(r))
        except (OrchestrateError, psycopg.Error) as e:
            logger.error("maintain daemon: pass {} for {} failed, retrying at the next interval: {}", n, table,
                         " ".join(str(e).split()))
        except Exception as e:  # noqa: BLE001 - a daemon must outlive one bad pass
            logger.exception("maintain daemon: pass {} for {} failed unexpectedly: {}", n, table, e)

    for plan in plans:
        every = parse_every(plan.maintenance.interval)
        sched.add_job(one, "interval", args=[plan], seconds=every, id=str(plan.table_name),
                      next_run_time=datetime.now(timezone.utc), misfire_grace_time=max(1, int(every)))
        logger.info("maintain daemon: {} every {:g}s", plan.table_name, every)

    def on_signal(signum: int, _frame: object) -> None:
        logger.info("maintain daemon: signal {} received, stopping after the pass in progress", signum)
        stop.set()

    old = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            old[sig] = signal.signal(sig, on_signal)
    sched.start()
    try:
        while not stop.wait(0.5):
            pass
    finally:
        sched.shutdown(wait=True)  # lets a pass in progress finish its transaction
        for sig, h in old.items():
            signal.signal(sig, h)
    logger.info("maintain daemon: stopped")
    return 0


__all__ = ["maintain_pass", "maintenance_preview", "partman_handover", "parse_every", "run_daemon", "summary",
           # the partition layout is read by orchestrator.inspect; these names stay importable here
           "Facts", "Part", "naive_utc", "parse_bound", "parse_partbound", "table_facts"]
