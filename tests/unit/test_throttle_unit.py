"""Pure parts of throttling and control: hysteresis, backoff, settings, Pace, metrics text."""

from __future__ import annotations

import socket
import threading
import time
from itertools import islice

import pytest

from orchestrator.cli.report import status_text
from orchestrator.control import Controls, parse_assignments, parse_setting
from orchestrator.errors import PlanError
from orchestrator.metrics import render
from orchestrator.phases.backfill import Pace
from orchestrator.plan import Throttle
from orchestrator.throttle import LagGate, Throttler, ThrottleState, backoff, dsn_label


def test_lag_gate_has_hysteresis():
    g = LagGate(10.0)
    assert g.resume == 5.0
    assert [g.update(v) for v in (1, 9.9, 10.5, 9, 6, 5.1, None, 4.9, 8, 10)] == [
        False, False, True, True, True, True, True, False, False, False]
    g.set(2.0, 1.5)
    assert (g.pause, g.resume) == (2.0, 1.5)
    g.set(2.0, 3.0)  # a resume above the pause would never pause: clamped
    assert g.resume == 2.0


def test_backoff_doubles_up_to_the_cap():
    assert list(islice(backoff(0.25, 3.0), 7)) == [0.25, 0.5, 1.0, 2.0, 3.0, 3.0, 3.0]


def test_lock_retry_delays_are_the_same_backoff_with_jitter():
    import random

    from orchestrator.db import backoff_delays

    delays = list(backoff_delays(8, base=0.2, cap=1.0, rng=random.Random(7)))
    ceilings = [0.2, 0.4, 0.8, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert len(delays) == 8 and all(0.1 <= d <= c for d, c in zip(delays, ceilings, strict=True)), delays
    assert len(set(delays)) == 8  # jittered: no two waiters retry in step


def test_parse_settings():
    assert parse_setting("batch_size", "200") == 200
    assert parse_setting("batch_size", "auto") is None
    assert parse_setting("max_replica_lag_s", "2.5") == 2.5
    assert parse_setting("workers", 4) == 4
    assert parse_assignments(["batch_size=100", "batch_size=300", "workers=3"]) == {"batch_size": 300, "workers": 3}
    for bad in (["x=1"], ["batch_size=1.5"], ["batch_size=0"], ["workers=40"], ["max_replica_lag_s=nan"],
                ["max_replica_lag_s=-1"], ["batch_size="], ["=3"], ["batch_size"], [],
                ["max_replica_lag_s=2", "resume_replica_lag_s=3"]):
        with pytest.raises(PlanError):
            parse_assignments(bad)


def _converge(pace: Pace, seconds_per_row: float, batches: int = 40) -> int:
    for _ in range(batches):
        pace.observe(pace.size, pace.size * seconds_per_row + 0.001)
    return pace.size


def test_pace_moves_toward_the_target_duration():
    narrow = _converge(Pace(5000, 0.5, 100, 200_000, False), 1e-6)  # 1 µs per row
    wide = _converge(Pace(5000, 0.5, 100, 200_000, False), 1e-4)  # 100 µs per row
    assert narrow == 200_000  # capped at max_batch_size
    assert 4000 <= wide <= 6000  # 0.5 s / 100 µs = 5000 rows
    slow = _converge(Pace(5000, 0.5, 100, 200_000, False), 1e-2)
    assert slow == 100  # floored at min_batch_size
    pinned = Pace(5000, 0.5, 100, 200_000, True)
    assert _converge(pinned, 1e-2) == 5000
    tail = Pace(5000, 0.5, 100, 200_000, False)
    tail.observe(10, 5.0)  # a short tail batch says nothing about speed
    assert tail.size == 5000


def test_controls_apply_pins_the_batch_and_steers_the_throttle():
    t = Throttler(Throttle(max_replica_lag_s=10), "host=127.0.0.1 port=1")
    c = Controls("host=127.0.0.1 port=1", "public.orders", throttler=t)
    pace = Pace(5000, 0.5, 100, 200_000, False)
    c.apply({"batch_size": 300})  # before the backfill binds its pace: kept for it
    c.bind_pace(pace)
    assert (pace.size, pace.fixed) == (300, True)
    c.apply({"batch_size": "auto", "paused": True, "max_replica_lag_s": 4, "workers": 3})
    assert pace.fixed is False and t.paused and c.paused and c.workers == 3
    assert (t.gate.pause, t.gate.resume) == (4, 2)
    c.apply({"max_replica_lag_s": 4, "resume_replica_lag_s": 3, "batch_size": "oops"})  # bad value ignored
    assert (t.gate.pause, t.gate.resume) == (4, 3) and not t.paused
    c.apply({})
    assert (t.gate.pause, t.gate.resume) == (10, 5) and c.workers is None


def test_every_throttle_signal_and_the_pace_can_be_changed_and_reset():
    plan = Throttle(max_replica_lag_s=10, critical_replica_lag_s=60, max_xact_age_s=300, query="SELECT false",
                    backoff_max_s=30)
    t = Throttler(plan, "host=127.0.0.1 port=1")
    c = Controls("host=127.0.0.1 port=1", "public.orders", throttler=t)
    c.apply({"sleep_ratio": 2, "target_batch_seconds": 0.2})  # before the backfill: kept for its Pace
    pace = Pace(5000, 0.5, 100, 200_000, False)
    c.bind_pace(pace)
    assert (pace.sleep_ratio, pace.target_s) == (2, 0.2)
    c.apply({"critical_replica_lag_s": "off", "max_slot_retained_bytes": 10**9, "max_xact_age_s": 30,
             "query": "SELECT true", "flag_file": "/tmp/hold", "backoff_max_s": 2, "sleep_ratio": 0})
    s = t.settings
    assert (s.critical_replica_lag_s, s.max_slot_retained_bytes, s.max_xact_age_s, s.query, s.flag_file) == (
        None, 10**9, 30, "SELECT true", "/tmp/hold")
    assert t.critical_s is None and t.backoff_max_s == 2 and pace.sleep_ratio == 0
    c.apply({"max_xact_age_s": "off", "query": "default", "flag_file": "off"})
    assert (t.settings.max_xact_age_s, t.settings.query, t.settings.flag_file) == (None, "SELECT false", None)
    assert t.settings.max_slot_retained_bytes is None and t.critical_s == 60 and t.backoff_max_s == 30
    assert (pace.sleep_ratio, pace.target_s) == (0, 0.5)  # sleep_ratio reset, target back to the plan's
    assert t.plan_settings == plan  # the plan itself is never changed


def test_set_words_for_optional_signals():
    assert parse_setting("critical_replica_lag_s", "off") == "off"
    assert parse_setting("query", " SELECT 1 ") == "SELECT 1"
    assert parse_setting("max_slot_retained_bytes", "default") is None
    for key, raw in (("max_replica_lag_s", "off"), ("backoff_max_s", "off"), ("query", ""), ("sleep_ratio", "-1")):
        with pytest.raises(PlanError):
            parse_setting(key, raw)


def test_throttler_fails_closed_and_reports_every_reason(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    flag = tmp_path / "hold"
    flag.touch()
    t = Throttler(Throttle(flag_file=str(flag), replicas=[f"postgresql://u:secret@127.0.0.1:{port}/r"]),
                  f"host=127.0.0.1 port={port} dbname=p connect_timeout=2")
    t.set_paused(True)
    st = t.check(force=True)
    assert st.throttled and st.paused
    assert st.reason.startswith(f"paused by operator; flag file {flag} exists; replica 127.0.0.1:{port}/r "
                                "unreachable: "), st.reason
    assert "throttle checks failed on the primary" in st.reason and "secret" not in st.reason
    stop = threading.Event()
    stop.set()
    t.wait(stop)  # returns at once when the backfill stops
    t.stop()


def test_wait_is_woken_by_an_operator_change(tmp_path):
    flag = tmp_path / "hold"
    flag.touch()
    t = Throttler(Throttle(flag_file=str(flag), backoff_max_s=30), "host=127.0.0.1 port=1", check_interval_s=0.05)

    def evaluate():  # the flag file only: no database in a unit test
        reasons = [("flag", "flag")] if flag.exists() else []
        reasons += [("paused", "paused by operator")] if t.paused else []
        return ThrottleState(bool(reasons), "; ".join(r for _, r in reasons) or None,
                             checked_at=time.monotonic()), tuple(k for k, _ in reasons)

    t._evaluate = evaluate
    t._event = lambda message: None
    stop = threading.Event()
    done = threading.Event()
    threading.Thread(target=lambda: (t.wait(stop), done.set()), daemon=True).start()
    time.sleep(2.0)  # the worker backs off: 0.25, 0.5, 1, then 2 s from 1.75 s to 3.75 s
    assert not done.is_set()
    flag.unlink()
    t.configure({"max_replica_lag_s": 5})  # any change wakes the waiting workers at once
    assert done.wait(0.6)


def test_dsn_label_hides_the_password():
    assert dsn_label("postgresql://u:pw@db.example:6432/app") == "db.example:6432/app"
    assert dsn_label("host=r1 dbname=x password=pw") == "r1:5432/x"


def test_metrics_text_format():
    text = render({"rows": 1200, "ranges_done": 3, "ranges_total": 9, "batch_size": 500, "lag_s": 1.25,
                   "throttled": True, "paused": False, "rows_per_s": None, "workers": 3}, 'public."Odd"')
    lines = text.splitlines()
    assert 'orchestrate_rows_copied_total{table="public.\\"Odd\\""} 1200.0' in lines
    assert 'orchestrate_replica_lag_seconds{table="public.\\"Odd\\""} 1.25' in lines
    assert 'orchestrate_throttled{table="public.\\"Odd\\""} 1.0' in lines
    assert 'orchestrate_paused{table="public.\\"Odd\\""} 0.0' in lines
    assert 'orchestrate_workers{table="public.\\"Odd\\""} 3.0' in lines
    assert 'orchestrate_rows_per_second{table="public.\\"Odd\\""} NaN' in lines
    assert "# TYPE orchestrate_rows_copied_total counter" in lines
    assert text.endswith("\n")
    names = {line.split("{")[0] for line in lines if not line.startswith("#")}
    assert names == {"orchestrate_rows_copied_total", "orchestrate_ranges_done", "orchestrate_ranges_total",
                     "orchestrate_batch_size", "orchestrate_workers", "orchestrate_replica_lag_seconds",
                     "orchestrate_throttled",
                     "orchestrate_paused", "orchestrate_rows_per_second"}


def test_status_text_shows_the_live_figures_as_a_progress_line():
    data = {"table": "public.orders", "migration_id": 3, "status": "running", "phase": "backfill",
            "ranges": {"copied": 4, "total": 9, "rows_copied": 1200, "verified": 0, "mismatched": 0},
            "last_checkpoint": "2026-11-21T10:00:00", "controls": {"paused": True},
            "live": {"phase": "backfill", "ranges_done": 4, "ranges_total": 9, "rows": 1200, "rows_per_s": 300,
                     "eta_s": 20, "batch_size": 500, "workers": 2, "lag_s": 0.4, "throttled": True,
                     "throttle_reason": "paused by operator", "paused": True, "active": True, "pid": 4242,
                     "updated_at": "2026-11-21T10:00:01.5+00:00"},
            "phases": {"backfill": {"state": "running", "duration_s": 4.0, "detail": {}}}}
    text = status_text(data)
    assert ("live       backfill | ranges 4/9 | rows 1200 | 300 rows/s | ETA 20s | batch 500 | 2 workers | "
            "lag 0.4s | THROTTLED: paused by operator") in text, text
    assert ("apply running (pid 4242); figures of 2026-11-21T10:00:01; paused: the capture trigger keeps writes "
            "flowing to the twin") in text, text


def test_peek_never_waits_for_a_slow_check():
    """The replay reads the throttle with peek(): a check that hangs (an unreachable replica's
    connect timeout) runs on a thread of its own while peek returns the last decision."""
    t = Throttler(Throttle(heartbeat=False), "host=127.0.0.1 port=1 dbname=x", check_interval_s=0.0)
    release, evaluating = threading.Event(), threading.Event()
    held = ThrottleState(throttled=True, reason="flag file f exists", holds_replay="flag file f exists")

    def slow_evaluate():
        evaluating.set()
        release.wait(30)
        return held, ("flag",)

    t._evaluate = slow_evaluate  # type: ignore[method-assign]
    t._record = lambda state, keys: None  # type: ignore[method-assign]
    got: list[ThrottleState] = []
    reader = threading.Thread(target=lambda: got.extend(t.peek() for _ in range(3)))
    reader.start()
    assert evaluating.wait(10), "peek did not start a check"
    reader.join(10)
    assert not reader.is_alive() and len(got) == 3, "peek waited for the check"
    assert all(s.holds_replay is None for s in got)  # the last decision: not evaluated yet
    release.set()
    deadline = time.monotonic() + 10
    while t.state is not held and time.monotonic() < deadline:
        time.sleep(0.01)
    assert t.peek() is held  # the check's result, once it came


def test_replay_waits_while_held_and_not_once_the_cutover_drains():
    from types import SimpleNamespace

    from orchestrator.changelog import Replayer

    class Signal:
        reason: str | None = "replica lag 12.0s on r:5432/app > 10s"

        def peek(self):
            return SimpleNamespace(holds_replay=self.reason)

    signal = Signal()
    r = Replayer(ctx=None, batch=10, throttle=signal)
    r.HOLD_POLL_S = 0.01
    r._lag_read = time.monotonic() + 3600  # no lag read: there is no server here
    assert r._hold(conn=None) and r.waiting == signal.reason and r.waited_s > 0
    signal.reason = None
    assert not r._hold(conn=None) and r.waiting is None
    signal.reason = "flag file f exists"
    assert r._hold(conn=None)
    r.draining = True  # the cutover's gates passed: drain whatever the load
    assert not r._hold(conn=None) and r.waiting is None
    assert not Replayer(ctx=None, batch=10)._hold(conn=None)  # capture.replay_throttled off: no throttle


def test_an_unknown_replica_lag_does_not_hold_the_replay():
    """The lag gate keeps its state while the lag is unknown (the backfill stays held, fail
    closed); the replay is held only by a lag that is known to be high."""
    import psycopg

    t = Throttler(Throttle(max_replica_lag_s=10, heartbeat=False), "host=127.0.0.1 port=1 dbname=x",
                  replicas=["host=replica dbname=x"])
    lag: list = [20.0]

    def replica_lag(dsn):
        if lag[0] is None:
            raise psycopg.OperationalError("connection refused")
        return lag[0]

    def primary():
        raise psycopg.OperationalError("no primary here")

    t._replica_lag = replica_lag  # type: ignore[method-assign]
    t._primary = primary  # type: ignore[method-assign]
    t._record = lambda state, keys: None  # type: ignore[method-assign]
    st = t.check(force=True)
    assert st.throttled and st.holds_replay and st.holds_replay.startswith("replica lag 20.0s")
    lag[0] = None  # the replica became unreachable: the gate stays shut, the lag unknown
    st = t.check(force=True)
    assert st.throttled and "replica lag unknown" in st.reason and "unreachable" in st.reason, st.reason
    assert st.holds_replay is None


def test_the_replay_waits_again_when_the_swap_fails():
    """After the gates the replay drains whatever the load; when the swap raises (attempts
    exhausted, or a drift that sends the run back to the backfill) it waits again."""
    from types import SimpleNamespace

    from orchestrator.changelog import Replayer
    from orchestrator.errors import OrchestrateError
    from orchestrator.phases.cutover import Cutover

    replayer = Replayer(ctx=None, batch=10)
    ctx = SimpleNamespace(options={"replayer": replayer}, refresh=lambda: None)
    seen = []
    phase = Cutover()
    phase.ensure_partitions = lambda c: None  # type: ignore[method-assign]
    phase.wait_for_gates = lambda c: []  # type: ignore[method-assign]

    def swap_fails(c):
        seen.append(replayer.draining)
        raise OrchestrateError("cutover: 30 lock attempts failed")

    phase.lock_and_swap = swap_fails  # type: ignore[method-assign]
    with pytest.raises(OrchestrateError):
        phase.run(ctx)  # type: ignore[arg-type]
    assert seen == [True] and replayer.draining is False
