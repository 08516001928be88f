"""A horizon that moves: the twin keeps getting partitions while a long migration runs.

Role: during a migration (prepare done, not cut over), creates the twin's partitions that
became due since prepare (up to now + premake), so that no row of a now-due period is left
in the twin's DEFAULT partition and the cutover's partition gate can always be met.

It reuses maintain's way of creating a partition (``maintain._Pass.create``): a staging
table, the default partition's rows of the range copied without locks, then one short
locked transaction that reconciles, moves them out of the default and attaches. Never
``CREATE TABLE .. PARTITION OF``, which scans the default under ACCESS EXCLUSIVE and fails
outright when the default holds a row of the new range (the cutover did that before, and
a migration that outlived ``premake`` could then never be cut over).

Called at every phase boundary (runner) and from the backfill's coordinator loop
(:class:`Tick`); each call is a pure computation unless a partition is due.
"""

from __future__ import annotations

import time
from datetime import datetime

from loguru import logger

from orchestrator import maintain
from orchestrator.context import Context
from orchestrator.errors import PreflightError
from orchestrator.inspect import partitioned_facts as table_facts
from orchestrator.maintain import _Pass
from orchestrator.plan import utc_now
from orchestrator.sql import timestamp_text


def partition_bounds(ctx: Context, key_min: datetime | None) -> list[tuple[str, str]]:
    """Aligned intervals from the oldest row's (or plan.start) to now + premake."""
    pb = ctx.plan.partition_by
    iv = pb.interval_value
    now = ctx.now or utc_now()
    current = iv.floor(now)
    if pb.start is not None:
        start = iv.floor(datetime(pb.start.year, pb.start.month, pb.start.day))
    else:
        start = iv.floor(min(key_min, now)) if key_min else current
    end = iv.add(current, pb.premake + 1)
    out: list[tuple[str, str]] = []
    t = start
    while t < end:
        nxt = iv.add(t)
        out.append((timestamp_text(t), timestamp_text(nxt)))
        t = nxt
        if len(out) > pb.max_partitions:
            raise PreflightError(
                f"the plan would create more than {pb.max_partitions} partitions (oldest key "
                f"{key_min:%Y-%m-%d}): set partition_by.start to leave older rows in the default partition, "
                "or raise partition_by.max_partitions"
            )
    return out




def due(ctx) -> list[tuple[str, str]]:
    """Partitions the twin should have by now and does not, per the migration's facts."""
    parts = [tuple(p) for p in ctx.facts.get("partitions") or []]
    if not parts:
        return []
    wanted = partition_bounds(ctx, datetime.fromisoformat(parts[0][0]))
    return [b for b in wanted if b[0] >= parts[-1][1]]


def extend(ctx) -> list[str]:
    """Create the due partitions on the twin (moving the default's rows of their ranges out)
    and record them in the facts. Idempotent; returns the partitions created.

    Warning: each partition's attach takes SHARE on the twin and ACCESS EXCLUSIVE on its
    default partition for milliseconds (capped by cutover.lock_timeout, retried): the
    capture trigger's writes, hence the application's, wait that long."""

    m = ctx.migration
    if m is None or m.status != "running" or not m.done("prepare"):
        return []
    missing = due(ctx)
    if not missing:
        return []
    plan = ctx.plan
    twin_plan = plan.model_copy(update={"table": str(plan.twin)})
    now = maintain.naive_utc(ctx.now) or utc_now()
    facts = table_facts(ctx.conn, twin_plan)
    p = _Pass(plan, ctx.conn, now)  # names from the live table's plan, parent from the twin's facts
    have = {(part.lo, part.hi) for part in facts.parts if not part.is_default}
    created: list[str] = []
    recorded = [list(x) for x in ctx.facts.get("partitions") or []]
    for lo, hi in missing:
        blo, bhi = datetime.fromisoformat(lo), datetime.fromisoformat(hi)
        if (blo, bhi) not in have:
            p.create(facts, blo, bhi)
            created.append(plan.partition_name(blo).name)
        recorded.append([lo, hi])
        # Recorded one by one: a crash after an attach leaves facts that the next call completes.
        with ctx.conn.transaction(), ctx.conn.cursor() as cur:
            ctx.store.set_facts(cur, ctx.mid, partitions=recorded)
    ctx.refresh()
    moved = p.result.get("moved") or {}
    msg = (f"horizon: {len(created)} partition(s) created on the twin up to now + premake"
           + (f"; rows moved out of its default partition: {moved}" if moved else ""))
    logger.info(msg)
    ctx.store.event(ctx.mid, "horizon", msg, created=created, moved=moved, lock_held_ms=p.result["lock_held_ms"])
    return created


class Tick:
    """For a long phase's coordinator loop: :func:`extend` at most every ``interval_s``."""

    def __init__(self, ctx, interval_s: float = 60.0):
        self.ctx = ctx
        self.interval_s = interval_s
        self._next = time.monotonic() + interval_s

    def __call__(self) -> None:
        if time.monotonic() < self._next:
            return
        self._next = time.monotonic() + self.interval_s
        extend(self.ctx)
