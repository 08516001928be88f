"""Steering a running migration from another terminal: pause, resume, set.

The commands only write ``orchestrate.controls`` (one row per table, a JSON object of
settings); the running ``apply`` polls that row every second on its own session
(:class:`Controls`) and applies each change, logging it (``control: batch_size 5000 -> 200``)
and recording it as a ``control`` event. Settings persist across runs of apply, so a
pause given before ``apply`` starts (or while it is down) holds when it starts.

Settings (``orchestrate set PLAN key=value ...``; ``default`` returns any of them to the
plan's value, ``off`` turns an optional signal off):

- ``batch_size``: rows per batch, pinned (adaptive sizing stops); ``batch_size=auto``
  returns to the plan's sizing. Takes effect at the next batch.
- ``target_batch_seconds``, ``sleep_ratio``: the adaptive sizing's aim and the pause after
  each batch (a multiple of its duration).
- ``workers``: backfill workers. A running backfill grows to the new count within a second,
  or shrinks: a worker over the count leaves before its next batch and hands its range, from
  its last committed cursor, to the others (see :class:`orchestrator.phases.backfill.Crew`).
  At the start of a backfill ``apply --workers`` wins over a stored value; ``workers=default``
  returns to ``--workers`` or the plan.
- every throttle signal of the plan: ``max_replica_lag_s``, ``resume_replica_lag_s``
  (setting only the pause threshold resumes at half of it), ``critical_replica_lag_s``,
  ``max_slot_retained_bytes``, ``max_xact_age_s``, ``max_xmin_age``, ``max_replay_lag_s``, ``max_active_sessions``,
  ``query``, ``flag_file``
  (these eight accept ``off``) and ``backoff_max_s``. They take effect at the next check (half a second);
  workers asleep in their backoff are woken to check again.
- ``paused`` (through ``orchestrate pause`` / ``resume``): the backfill waits before its next
  batch with the throttle reason ``paused by operator``; the capture trigger keeps running.

:func:`steering` wires all of it (throttle, controls, live figures, metrics) into one run.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
from loguru import logger

from orchestrator import changelog
from orchestrator.db import Ticker, close_quietly, connect
from orchestrator.errors import OrchestrateError, PlanError
from orchestrator.state.store import Store, ensure_schema

POLL_S = 1.0

OFF = "off"  # an optional signal turned off (stored as the word, so `status` shows it)


@dataclass(frozen=True)
class Setting:
    kind: type  # int, float or str
    lo: float = 0
    hi: float = 0
    can_be_off: bool = False  # the plan's field is optional: `off` means None
    reset: str = "default"  # the word that returns it to the plan


# Order matters only for the help and error text.
SETTINGS: dict[str, Setting] = {
    "batch_size": Setting(int, 1, 10_000_000, reset="auto"),
    "max_replica_lag_s": Setting(float, 0.001, 86_400),
    "resume_replica_lag_s": Setting(float, 0, 86_400),
    "critical_replica_lag_s": Setting(float, 0.001, 86_400, can_be_off=True),
    "max_slot_retained_bytes": Setting(int, 0, 2**62, can_be_off=True),
    "max_xact_age_s": Setting(float, 0.001, 10_000_000, can_be_off=True),
    "max_xmin_age": Setting(int, 1, 2_000_000_000, can_be_off=True),
    "max_replay_lag_s": Setting(float, 0.001, 86_400, can_be_off=True),
    "max_active_sessions": Setting(int, 1, 1_000_000, can_be_off=True),
    "query": Setting(str, can_be_off=True),
    "flag_file": Setting(str, can_be_off=True),
    "backoff_max_s": Setting(float, 0.01, 3_600),
    "workers": Setting(int, 1, 32),
    "target_batch_seconds": Setting(float, 0.01, 600),
    "sleep_ratio": Setting(float, 0, 100),
}
PACE_ATTRS = {"target_batch_seconds": "target_s", "sleep_ratio": "sleep_ratio"}
THROTTLE_KEYS = ("max_replica_lag_s", "resume_replica_lag_s", "critical_replica_lag_s", "max_slot_retained_bytes",
                 "max_xact_age_s", "max_xmin_age", "max_replay_lag_s", "max_active_sessions", "query", "flag_file",
                 "backoff_max_s")


def parse_setting(key: str, raw: Any) -> int | float | str | None:
    """Validate one setting (from the command line or the controls row).

    None means "back to the plan" (``default``, or ``auto`` for batch_size); :data:`OFF`
    turns an optional signal off."""
    if key not in SETTINGS:
        raise PlanError(f"unknown setting {key!r}: use one of {', '.join(SETTINGS)}")
    st = SETTINGS[key]
    word = raw.strip().lower() if isinstance(raw, str) else None
    if raw is None or word in ("auto", "default"):
        return None
    if word == OFF and st.can_be_off:
        return OFF
    words = f"{st.reset}{' or off' if st.can_be_off else ''}"
    if st.kind is str:
        if not isinstance(raw, str) or not raw.strip():
            raise PlanError(f"{key} must be a non-empty text (or {words}), got {raw!r}")
        return raw.strip()
    what = "an integer" if st.kind is int else "a number"
    span = f"from {st.lo:g} to {st.hi:g}" if st.kind is float else f"from {int(st.lo)} to {int(st.hi)}"
    try:
        if isinstance(raw, bool):
            raise ValueError
        if st.kind is int:
            if isinstance(raw, float) and not raw.is_integer():
                raise ValueError
            value: int | float = int(raw) if not isinstance(raw, str) else int(raw.strip())
        else:
            value = float(raw)
            if value != value or value in (float("inf"), float("-inf")):
                raise ValueError
    except (TypeError, ValueError):
        raise PlanError(f"{key} must be {what} {span} (or {words}), got {raw!r}") from None
    if not st.lo <= value <= st.hi:
        raise PlanError(f"{key} must be {what} {span} (or {words}), got {raw!r}")
    return value


def parse_assignments(pairs: tuple[str, ...] | list[str]) -> dict[str, int | float | str | None]:
    """`key=value` words -> validated settings (the last of a repeated key wins)."""
    if not pairs:
        raise PlanError(f"nothing to set: give key=value pairs ({', '.join(SETTINGS)})")
    out: dict[str, int | float | str | None] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key or not raw.strip():
            raise PlanError(f"expected key=value, got {pair!r}")
        out[key] = parse_setting(key, raw)
    pause = out.get("max_replica_lag_s")
    resume = out.get("resume_replica_lag_s")
    if pause is not None and resume is not None and resume > pause:
        raise PlanError(f"resume_replica_lag_s ({resume:g}) must not exceed max_replica_lag_s ({pause:g})")
    return out


class Controls:
    """The running apply's side: polls the controls row and applies changes (thread-safe)."""

    def __init__(self, dsn: str, table: str, *, throttler=None, mid: int | None = None,
                 plan_fixed_batch: bool = False, poll_s: float = POLL_S):
        self.dsn = dsn
        self.table = table
        self.throttler = throttler
        self.mid = mid
        self.poll_s = poll_s
        self.pace = None
        self.plan_pace = {"fixed": plan_fixed_batch}
        self.settings: dict[str, Any] = {}  # the last applied, validated
        self.paused = False
        self.workers: int | None = None
        self.batch_size: int | None = None
        self._lock = threading.Lock()
        self._conn: psycopg.Connection | None = None
        self._ticker = Ticker("controls", poll_s, self.poll)

    def start(self) -> Controls:
        """Apply the stored settings now (so a pause holds from the first batch), then poll."""
        self.poll()
        self._ticker.start()
        return self

    def stop(self) -> None:
        self._ticker.stop()
        close_quietly(self._conn)
        self._conn = None

    def bind_pace(self, pace) -> None:
        """Called by the backfill with its shared Pace: the settings made so far apply to it."""
        with self._lock:
            self.pace = pace
            self.plan_pace = {"fixed": pace.fixed, "target_s": pace.target_s, "sleep_ratio": pace.sleep_ratio}
            with pace.lock:
                if self.batch_size is not None:
                    pace.size, pace.fixed = self.batch_size, True
                for key, attr in PACE_ATTRS.items():
                    if self.settings.get(key) is not None:
                        setattr(pace, attr, self.settings[key])

    def poll(self) -> None:
        try:
            if self._conn is None or self._conn.closed:
                self._conn = connect(self.dsn, "controls")
            raw = Store(self._conn).controls(self.table)
        except (psycopg.Error, OrchestrateError) as e:
            logger.warning("control: cannot read the controls: {}", str(e).strip().splitlines()[0])
            close_quietly(self._conn)
            self._conn = None
            return
        self.apply(raw)

    def apply(self, raw: dict) -> None:
        """Apply a controls row: each changed setting is applied, logged and recorded."""
        wanted: dict[str, Any] = {"paused": bool(raw.get("paused", False))}
        for key in SETTINGS:
            try:
                wanted[key] = parse_setting(key, raw.get(key))
            except PlanError as e:
                logger.warning("control: ignoring {}: {}", key, e)
                wanted[key] = self.settings.get(key)
        with self._lock:
            changes = []
            for key, new in wanted.items():
                old = self.settings.get(key, False if key == "paused" else None)
                if new == old:
                    continue
                shown_old = self._apply_one(key, old, new)
                changes.append(f"{key} {shown_old} -> {_show(key, new)}")
                self.settings[key] = new
        for change in changes:
            logger.info("control: {}", change)
            self._event(f"control: {change}")

    def _apply_one(self, key: str, old: Any, new: Any) -> str:
        shown_old = _show(key, old)
        if key == "paused":
            self.paused = new
            if self.throttler is not None:
                self.throttler.set_paused(new)
        elif key == "batch_size":
            self.batch_size = new
            if self.pace is not None:
                with self.pace.lock:
                    shown_old = str(self.pace.size) if old is None else shown_old
                    if new is None:
                        self.pace.fixed = self.plan_pace["fixed"]
                    else:
                        self.pace.size, self.pace.fixed = new, True
        elif key in PACE_ATTRS:
            if self.pace is not None:
                attr = PACE_ATTRS[key]
                with self.pace.lock:
                    shown_old = _show(key, getattr(self.pace, attr))
                    setattr(self.pace, attr, self.plan_pace[attr] if new is None else new)
        elif key in THROTTLE_KEYS:
            if self.throttler is not None:
                shown_old = _show(key, self._effective(key))
                self.throttler.configure(self._throttle_overrides({**self.settings, key: new}))
        elif key == "workers":
            self.workers = new
        return shown_old

    def _effective(self, key: str) -> Any:
        """The throttler's value of a setting now (what `default` would show as)."""
        if key == "max_replica_lag_s":
            return self.throttler.gate.pause
        if key == "resume_replica_lag_s":
            return self.throttler.gate.resume
        value = getattr(self.throttler.settings, key)
        return OFF if value is None else value

    @staticmethod
    def _throttle_overrides(settings: dict[str, Any]) -> dict[str, Any]:
        return {k: (None if v == OFF else v) for k, v in settings.items() if k in THROTTLE_KEYS and v is not None}

    def _event(self, message: str) -> None:
        if self.mid is None or self._conn is None:
            return
        Store(self._conn).event(self.mid, "control", message)


def _show(key: str, value: Any) -> str:
    if value is None:
        return SETTINGS[key].reset if key in SETTINGS else "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:g}" if isinstance(value, float) else str(value)


@contextmanager
def steering(ctx) -> Iterator[None]:
    """For one apply: the throttle, the operator's controls, live figures and the metrics
    endpoint, in ``ctx.options`` ("throttle", "controls", "live"); all stopped on exit."""
    from orchestrator.metrics import LiveFigures, MetricsServer
    from orchestrator.throttle import Throttler

    plan = ctx.plan
    with ExitStack() as stack:
        throttle = ctx.options.get("throttle")
        if throttle is None:
            throttle = Throttler(plan.throttle, ctx.dsn, replicas=ctx.replica_dsns, mid=ctx.mid)
            if changelog.is_async(ctx):
                throttle.replay_lag_sql = changelog.lag_sql(ctx)  # replay lag is a signal too
            throttle.start()
            stack.callback(throttle.stop)
            ctx.options["throttle"] = throttle
        controls = ctx.options.get("controls")
        if controls is None:
            controls = Controls(ctx.dsn, str(plan.table_name), throttler=throttle, mid=ctx.mid,
                                plan_fixed_batch=plan.backfill.fixed_batch_size)
            controls.start()
            stack.callback(controls.stop)
            ctx.options["controls"] = controls
        live = LiveFigures(ctx.dsn, ctx.mid, str(plan.table_name), throttle=throttle, controls=controls)
        # --workers > `orchestrate set workers=` > plan; the backfill's Crew follows later changes.
        live.workers = ctx.options.get("workers") or controls.workers or plan.backfill.workers
        ctx.progress = live.wrap(ctx.progress)
        ctx.options["live"] = live
        port = ctx.options.get("metrics_port")
        if port:
            server = MetricsServer(port, live, host=ctx.options.get("metrics_host") or "127.0.0.1")
            server.start()
            stack.callback(server.stop)
        live.start()
        stack.callback(live.stop)
        yield


# --- recording a change ------------------------------------------------------------------


def set_controls(plan, dsn: str, settings: dict) -> tuple[str, dict, Any]:
    """Record ``settings`` for the plan's table (the running apply picks them up within a
    second) and an event on the running migration; returns (table, all settings, live run)."""
    conn = connect(dsn, "control")
    try:
        ensure_schema(conn)
        store = Store(conn)
        table = str(plan.table_name)
        stored = store.controls(table)
        if "resume_replica_lag_s" in settings or "max_replica_lag_s" in settings:
            pause = (settings.get("max_replica_lag_s", stored.get("max_replica_lag_s"))
                     or plan.throttle.max_replica_lag_s)
            resume = settings.get("resume_replica_lag_s", stored.get("resume_replica_lag_s"))
            if resume is not None and resume > pause:
                raise PlanError(f"resume_replica_lag_s ({resume:g}) must not exceed max_replica_lag_s ({pause:g})")
        result = store.set_controls(table, **settings)
        live = store.live(table)
        if live is not None:
            store.event(live.id, "control", f"set by {os.environ.get('USER', 'operator')}: "
                        + describe(settings))
        return table, result, live
    finally:
        conn.close()


def describe(settings: dict) -> str:
    """``key=value, ...`` as the operator reads it (``off``, durations, flags)."""
    return ", ".join(f"{k}={_show(k, v)}" for k, v in settings.items())
