"""maintain's pure parts: intervals, bounds, which partitions to create and to retire."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from orchestrator.errors import PlanError, PreflightError
from orchestrator.maintain import (
    Part,
    expired_partitions,
    naive_utc,
    parse_bound,
    parse_every,
    parse_partbound,
    ranges_to_create,
    retention_cutoff,
    summary,
)
from orchestrator.plan import parse_plan
from orchestrator.sql import QualifiedName


def plan(interval="1 month", premake=2, keep=3, action="drop", **pb):
    return parse_plan({
        "table": "public.orders",
        "partition_by": {"column": "created_at", "interval": interval, "premake": premake, **pb},
        "retention": {"keep": keep, "action": action},
    })


def month_parts(*months: tuple[int, int], default=True) -> list[Part]:
    out = []
    for y, m in months:
        lo = datetime(y, m, 1)
        hi = datetime(y + m // 12, m % 12 + 1, 1)
        out.append(Part(QualifiedName("public", f"orders_p{y}_{m:02d}"), lo, hi))
    if default:
        out.append(Part(QualifiedName("public", "orders_default"), None, None, True))
    return out


@pytest.mark.parametrize("text,seconds", [
    ("1 hour", 3600), ("30 s", 30), ("5 min", 300), ("2 hours", 7200), ("1 day", 86400), ("250ms", 0.25),
    ("90", 90), ("1.5 h", 5400), ("10 minutes", 600), (45, 45),
])
def test_parse_every(text, seconds):
    assert parse_every(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "1 fortnight", "0 s", "-1 s"])
def test_parse_every_refuses(text):
    with pytest.raises(PlanError):
        parse_every(text)


def test_bounds_are_read_as_naive_utc():
    assert parse_partbound("FOR VALUES FROM ('2026-01-01 00:00:00+00') TO ('2026-02-01 00:00:00+00')") == (
        datetime(2026, 1, 1), datetime(2026, 2, 1), False)
    assert parse_partbound("FOR VALUES FROM ('2026-01-01') TO ('2026-01-02')")[:2] == (
        datetime(2026, 1, 1), datetime(2026, 1, 2))
    assert parse_partbound("FOR VALUES FROM (MINVALUE) TO ('2026-01-01 00:00:00')") == (
        None, datetime(2026, 1, 1), False)
    assert parse_partbound("DEFAULT") == (None, None, True)
    assert parse_partbound("FOR VALUES IN (1, 2)") is None
    assert parse_bound("'2026-03-01 01:00:00+01'") == datetime(2026, 3, 1)
    assert parse_bound("MAXVALUE") is None
    assert naive_utc(datetime(2026, 1, 1, 2, tzinfo=timezone.utc)) == datetime(2026, 1, 1, 2)


def test_creates_from_the_newest_partition_to_now_plus_premake():
    p = plan(premake=2, keep=None)
    create, skipped = ranges_to_create(p, datetime(2026, 7, 15), month_parts((2026, 4), (2026, 5)))
    assert create == [(datetime(2026, m, 1), datetime(2026, m + 1, 1)) for m in (6, 7, 8, 9)]
    assert skipped == []
    # Up to date: nothing.
    create, _ = ranges_to_create(p, datetime(2026, 7, 15), month_parts(*[(2026, m) for m in range(4, 10)]))
    assert create == []
    # No ranged partition at all: the current interval and premake.
    create, _ = ranges_to_create(p, datetime(2026, 12, 31, 23, 59), month_parts(default=True))
    assert create == [(datetime(2026, 12, 1), datetime(2027, 1, 1)), (datetime(2027, 1, 1), datetime(2027, 2, 1)),
                      (datetime(2027, 2, 1), datetime(2027, 3, 1))]


def test_never_creates_what_retention_would_remove_and_skips_overlaps():
    p = plan(premake=0, keep=1)
    create, _ = ranges_to_create(p, datetime(2026, 9, 2), month_parts((2026, 1)))
    assert create == [(datetime(2026, 8, 1), datetime(2026, 9, 1)), (datetime(2026, 9, 1), datetime(2026, 10, 1))]
    odd = [Part(QualifiedName("public", "odd"), datetime(2026, 9, 15), datetime(2026, 10, 15))]
    create, skipped = ranges_to_create(plan(premake=1, keep=None), datetime(2026, 9, 2),
                                       month_parts((2026, 8)) + odd)
    assert create == [] and skipped[0]["reason"] == "overlaps public.odd"
    assert len(skipped) == 1  # holes below the newest partition are not filled
    with pytest.raises(PreflightError, match="max_partitions"):
        ranges_to_create(plan("1 day", premake=10, keep=None, max_partitions=5), datetime(2026, 1, 1), [])


def test_retention_cutoff_and_expired():
    p = plan(keep=3)
    now = datetime(2026, 7, 1, 0, 0)
    assert retention_cutoff(p, now) == datetime(2026, 4, 1)
    parts = month_parts(*[(2026, m) for m in range(1, 8)])
    parts.append(Part(QualifiedName("public", "from_minvalue"), None, datetime(2025, 1, 1)))
    parts.append(Part(QualifiedName("public", "to_maxvalue"), datetime(2030, 1, 1), None))
    names = [x.name.name for x in expired_partitions(p, now, parts)]
    assert names == ["orders_p2026_01", "orders_p2026_02", "orders_p2026_03", "from_minvalue"]
    assert "orders_default" not in names
    assert expired_partitions(plan(keep=None), now, parts) == []
    # A week interval: keep counts intervals, aligned like date_trunc('week').
    w = plan("1 week", keep=2)
    assert retention_cutoff(w, datetime(2026, 3, 19)) == datetime(2026, 3, 2)


def test_summary_line():
    r = {"dry_run": False, "created": ["orders_p2026_08"], "moved": {"orders_p2026_08": 4}, "detached": ["a"],
         "detach_method": {"a": "plain"}, "dropped": ["a"], "archived": [], "default_rows": 1,
         "lock_held_ms": {"attach orders_p2026_08": 3.2}}
    line = summary(r)
    assert "created ['orders_p2026_08']" in line and "'orders_p2026_08': 4" in line
    assert "attach orders_p2026_08: 3.2 ms" in line and "default holds 1 rows" in line
