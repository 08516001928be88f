"""The backfill's spans: which ranges a worker joins into one batch, and how many."""

from __future__ import annotations

from orchestrator.phases.backfill import MAX_SPAN, SPAN_FILL, Ranges, SpanHint, fresh, span_of


def _day(i: int, **kw) -> dict:
    return {"idx": i, "label": f"day {i}", "lo": f"2026-01-{i:02d}", "hi": f"2026-01-{i + 1:02d}",
            "is_null": False, "state": "pending", "cursor": None, **kw}


def test_a_span_joins_only_the_adjacent_fresh_ranges_at_the_front() -> None:
    q = Ranges([_day(2), _day(3), _day(4, cursor=["x", 1]), _day(5)])
    first = _day(1)
    assert [r["idx"] for r in q.follow(first, 10)] == [2, 3]  # day 4 has a cursor: the span stops there
    assert q.get()["idx"] == 4


def test_a_gap_or_a_repair_or_the_null_range_ends_a_span() -> None:
    gap = _day(3)
    assert Ranges([gap]).follow(_day(1), 5) == []  # day 1 ends where day 2 begins
    assert Ranges([_day(2, state="repair")]).follow(_day(1), 5) == []
    assert not fresh({"idx": 0, "label": "NULL keys", "lo": None, "hi": None, "is_null": True, "state": "pending",
                      "cursor": None})
    open_above = {**_day(9), "hi": None}
    assert Ranges([_day(10)]).follow(open_above, 5) == []  # nothing follows an open upper end


def test_follow_takes_at_most_what_is_asked_and_give_back_restores_the_order() -> None:
    q = Ranges([_day(i) for i in range(2, 8)])
    taken = q.follow(_day(1), 3)
    assert [r["idx"] for r in taken] == [2, 3, 4]
    q.give_back(taken)
    assert [q.get()["idx"] for _ in range(6)] == [2, 3, 4, 5, 6, 7]
    assert q.get() is None and q.empty()


def test_span_of_covers_the_members_bounds_and_names_them() -> None:
    s = span_of([{**_day(1), "lo": None, "label": "before 2026-01-02"}, _day(2), _day(3)])
    assert (s["lo"], s["hi"], s["idxs"], s["idx"]) == (None, "2026-01-04", [1, 2, 3], 1)
    assert s["label"] == "before 2026-01-02 to day 3 (3 ranges)"
    assert s["cursor"] is None and not s["is_null"]


def test_the_hint_starts_alone_fills_a_batch_and_backs_off_when_too_big() -> None:
    h = SpanHint()
    assert h.ranges(5000) == 1
    h.observe(100, 1)
    assert h.ranges(5000) == int(SPAN_FILL * 5000 / 100)
    h.observe(0, 10)  # empty days pull the average down, never below one row a range
    assert 1 <= h.ranges(5000) <= MAX_SPAN
    h.too_big(5000, 20)
    assert h.ranges(5000) < 20
    h2 = SpanHint()
    h2.observe(10_000, 1)  # ranges larger than a batch: never joined
    assert h2.ranges(5000) == 1
