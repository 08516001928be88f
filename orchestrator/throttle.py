"""Throttling: when the backfill waits, so that replicas, slots and vacuum keep up.

The :class:`Throttler` merely observes: its checks run on a read-only session (role
``orchestrate:throttle``) and on one session per replica; the only thing it writes is its
own bookkeeping in the state schema (the heartbeat row and ``throttle`` events), on a
separate session (role ``orchestrate:throttle-writer``). It never writes the user's tables.

Signals, each with the reason string that status, the progress line and the events show:

- replica lag (``replica lag 12.3s on host:port/db > 10s``): for every replica DSN
  (``throttle.replicas`` in the plan plus ``--replica-dsn``), ``clock_timestamp() - ts`` of
  the replica's copy of ``orchestrate.heartbeat`` (id 1), which a thread on the primary
  upserts every 0.5 s while ``throttle.heartbeat`` is on; so lag is exact even when the
  primary is otherwise idle (resolution: the beat interval). Until the replica has
  replayed this run's first beat, its lag is at least the time since that beat. The larger
  of that and ``clock_timestamp() - pg_last_xact_replay_timestamp()`` while the replica has
  received WAL it has not replayed (0 when it has replayed all it received) counts, so a
  replica that was already behind when the run started is seen at the first check; without
  the heartbeat only the latter is used. Without any replica DSN:
  ``pg_stat_replication.replay_lag`` on the primary (NULL, i.e. idle, counts as 0), with the
  byte lag as secondary information (the heartbeat's WAL keeps replay_lag growing while a
  standby's replay is stuck).
  Hysteresis: the pause starts above ``max_replica_lag_s`` and ends only below
  ``resume_replica_lag_s`` (default half the pause threshold). Past
  ``critical_replica_lag_s`` the run stops with :class:`ThrottleAbort` (exit 9, resumable).
- fail closed (``replica host:port/db unreachable: ...``): a configured replica that cannot
  be read throttles the run; so do failing checks on the primary.
- WAL retained by replication slots above ``max_slot_retained_bytes``.
- more than ``max_active_sessions`` sessions of this database running a statement (the
  server's load, as gh-ost's max-load ``Threads_running``; ours excluded; fails closed
  without pg_monitor like the next two).
- a transaction older than ``max_xact_age_s`` in this database (our own sessions, whose
  backend pids this process opened, are not counted; without pg_monitor these checks fail
  closed: throttled, with the missing grant as the reason).
- an xmin horizon older than ``max_xmin_age`` transactions (:data:`XMIN_HORIZON`): a
  snapshot, slot or prepared transaction that stops vacuum from cleaning up behind the
  backfill, whose every batch consumes a transaction id.
- the operator's ``query`` (throttle while it returns true; an error throttles too) and
  ``flag_file`` (throttle while the file exists).
- ``paused by operator`` (``orchestrate pause``, applied through :mod:`orchestrator.control`).

Every backfill worker calls :meth:`Throttler.wait` before each batch. Checks are cached
(at most one evaluation per ``check_interval_s``, shared by all workers); while throttled a
worker sleeps with exponential backoff capped at ``backoff_max_s`` and checks again (an
operator's resume or a changed threshold wakes it at once). The capture trigger is not
affected by any of this: while the backfill waits, the application's writes keep reaching
the twin (sync) or the change log (async). Async capture's replay waits too on the load
signals (:data:`REPLAY_HOLDS`, ``capture.replay_throttled``), as gh-ost's binlog apply does.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime

import psycopg
from loguru import logger
from psycopg.conninfo import conninfo_to_dict

from orchestrator.db import Ticker, backoff, connect, own_pids
from orchestrator.db import close_quietly as _close
from orchestrator.errors import OrchestrateError, ThrottleAbort
from orchestrator.owner import MONITOR_HINT, sees_all_sessions
from orchestrator.plan import Throttle
from orchestrator.sql import probes
from orchestrator.sql.probes import PRIMARY_LAG_SQL, REPLICA_LAG_SQL
from orchestrator.state.store import Store

CHECK_INTERVAL_S = 0.5
HEARTBEAT_INTERVAL_S = 0.5
FIRST_BACKOFF_S = 0.25
CHECK_STATEMENT_TIMEOUT_MS = 5000
XMIN_HORIZON = probes.XMIN_HORIZON_SQL  # what holds back vacuum's horizon: orchestrator/sql/probes.py
TRIGGERS_NOTE = "the capture trigger still runs: no write is lost"


# Replica lag, read the same way by the throttle, the cutover's gate (LagProbe) and, on a
# Citus coordinator, for every worker: orchestrator/sql/probes.py.


def replica_lag_s(conn: psycopg.Connection) -> float:
    """Seconds a standby is behind (REPLICA_LAG_SQL), on a session to that standby."""
    return max(0.0, float(conn.execute(REPLICA_LAG_SQL).fetchone()[0]))


def primary_lag(conn: psycopg.Connection) -> tuple[float, int | None, int]:
    """(worst lag in seconds, worst bytes behind or None, standbys) from pg_stat_replication."""
    lag, behind, n = conn.execute(PRIMARY_LAG_SQL).fetchone()
    return float(lag), (None if behind is None else int(behind)), int(n)


#: The signals that hold async capture's replay too (``capture.replay_throttled``): the ones
#: that say the server is overloaded, which the replay's own writes would add to (WAL that
#: replicas and slots must take, sessions competing for the CPUs, the load the operator's
#: query or flag file watches). Not the operator's pause (it holds only the backfill), nor the
#: replay's own lag, nor the signals about other sessions' transactions or about checks that
#: failed: holding the replay for those would relieve nothing.
REPLAY_HOLDS = frozenset({"lag", "slot", "active", "query", "flag"})


@dataclass(frozen=True)
class ThrottleState:
    """The last decision: what progress, status and metrics show."""

    throttled: bool = False
    reason: str | None = None
    lag_s: float | None = None
    lag_bytes: int | None = None
    paused: bool = False
    critical: str | None = None
    # The reasons that also hold async capture's replay (load signals: replica lag, slots,
    # active sessions, the operator's query and flag file), or None; see REPLAY_HOLDS.
    holds_replay: str | None = None
    checked_at: float = 0.0  # time.monotonic() of the evaluation; 0 = never

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("checked_at")
        return d


class LagGate:
    """Hysteresis on one number: closes above `pause`, opens again only below `resume`."""

    def __init__(self, pause: float, resume: float | None = None):
        self.closed = False
        self.pause = pause
        self.resume = pause / 2
        self.set(pause, resume)

    def set(self, pause: float, resume: float | None = None) -> None:
        self.pause = pause
        self.resume = pause / 2 if resume is None else min(resume, pause)

    def update(self, value: float | None) -> bool:
        """Feed a reading (None: unknown, keeps the state); True while the gate is closed."""
        if value is not None:
            if value > self.pause:
                self.closed = True
            elif value < self.resume:
                self.closed = False
        return self.closed


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def dsn_label(dsn: str) -> str:
    """host:port/dbname of a DSN: short, and without the password."""
    try:
        p = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "<invalid dsn>"
    host = p.get("host") or p.get("hostaddr") or "localhost"
    return f"{host}:{p.get('port') or 5432}/{p.get('dbname') or p.get('user') or ''}"


class Throttler:
    """Decides whether the backfill may run its next batch. Thread-safe; see the module doc."""

    def __init__(self, settings: Throttle, dsn: str, *, replicas: tuple[str, ...] | list[str] = (),
                 mid: int | None = None, check_interval_s: float = CHECK_INTERVAL_S,
                 heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S):
        self.plan_settings = settings
        self.settings = settings  # with the operator's changes (configure)
        self.dsn = dsn
        self.replicas = tuple(dict.fromkeys([*settings.all_replicas, *replicas]))
        self.mid = mid
        self.replay_lag_sql: str | None = None  # async capture: set by control.steering
        self.check_interval_s = check_interval_s
        self.heartbeat_interval_s = heartbeat_interval_s
        self.gate = LagGate(settings.max_replica_lag_s, settings.resume_replica_lag_s)
        self.critical_s = settings.critical_replica_lag_s
        self.backoff_max_s = settings.backoff_max_s
        self._paused = False
        self._state = ThrottleState()
        self._keys: tuple = ()
        self._lock = threading.Lock()  # one evaluation at a time; the checks' sessions
        self._wake = threading.Condition()
        self._generation = 0
        self._conn: psycopg.Connection | None = None  # read-only checks on the primary
        self._writer: psycopg.Connection | None = None  # heartbeat row and events
        self._writer_lock = threading.Lock()
        self._replica_conns: dict[str, psycopg.Connection] = {}
        self._citus: bool | None = None  # a Citus coordinator: its workers are watched too
        self._heartbeat = Ticker("throttle-heartbeat", self.heartbeat_interval_s, self._beat)
        self._hb_started: datetime | None = None  # primary time of this run's first beat
        self._hb_ok_at = 0.0
        self._refresher: threading.Thread | None = None  # peek()'s evaluation, off the caller's thread
        self._refresher_lock = threading.Lock()
        self._stopped = False

    # --- life cycle -------------------------------------------------------------------
    def start(self) -> Throttler:
        """Write the first heartbeat (so replica lag is measured from now) and start beating."""
        if self.settings.heartbeat:
            self._beat()
            self._heartbeat.start()
        return self

    def stop(self) -> None:
        with self._refresher_lock:
            self._stopped = True  # no check started by peek() from now on
            refresher = self._refresher
        if refresher is not None:
            refresher.join(timeout=CHECK_STATEMENT_TIMEOUT_MS / 1000 + 5)
        self._heartbeat.stop()
        with self._lock:
            for c in [self._conn, *self._replica_conns.values()]:
                _close(c)
            self._conn = None
            self._replica_conns.clear()
        with self._writer_lock:
            _close(self._writer)
            self._writer = None

    # --- operator's knobs (from orchestrator.control) ----------------------------------
    def set_paused(self, paused: bool) -> None:
        self._paused = bool(paused)
        self.wake()

    @property
    def paused(self) -> bool:
        return self._paused

    def configure(self, overrides: dict) -> None:
        """The operator's values over the plan's (``orchestrate set``; an absent key: the
        plan's; None turns an optional signal off). Takes effect at the next check, now."""
        overrides = dict(overrides)
        if "max_replica_lag_s" in overrides and "resume_replica_lag_s" not in overrides:
            overrides["resume_replica_lag_s"] = None  # a new pause threshold resumes at half of it
        s = self.plan_settings.model_copy(update=overrides)
        self.settings = s
        self.gate.set(s.max_replica_lag_s, s.resume_replica_lag_s)
        self.critical_s = s.critical_replica_lag_s
        self.backoff_max_s = s.backoff_max_s
        self.wake()

    def wake(self) -> None:
        """Invalidate the cached decision and wake the waiting workers (they check again)."""
        with self._wake:
            self._state = ThrottleState(**{**asdict(self._state), "checked_at": 0.0})
            self._generation += 1
            self._wake.notify_all()

    # --- the decision -------------------------------------------------------------------
    @property
    def state(self) -> ThrottleState:
        return self._state

    def check(self, force: bool = False) -> ThrottleState:
        """The current decision, evaluated at most once per check interval (shared)."""
        if not force and time.monotonic() - self._state.checked_at < self.check_interval_s:
            return self._state
        with self._lock:
            if not force and time.monotonic() - self._state.checked_at < self.check_interval_s:
                return self._state  # another worker evaluated while we waited for the lock
            state, keys = self._evaluate()
            self._record(state, keys)
            self._state = state
            return state

    def peek(self) -> ThrottleState:
        """The last decision, without waiting: a stale one is re-evaluated on a short-lived
        thread, so a slow check (an unreachable replica's connect timeout, a statement timeout)
        never stalls the caller (async capture's replay, which must not slow down for a signal
        that does not hold it)."""
        if time.monotonic() - self._state.checked_at >= self.check_interval_s:
            with self._refresher_lock:
                if not self._stopped and (self._refresher is None or not self._refresher.is_alive()):
                    self._refresher = threading.Thread(target=self._refresh, name="throttle-check", daemon=True)
                    self._refresher.start()
        return self._state

    def _refresh(self) -> None:
        try:
            self.check()
        except Exception as e:  # a thread of its own: say it; the next peek tries again, not at once
            logger.warning("throttle check failed: {}", _first_line(e))
            time.sleep(self.check_interval_s)

    def wait(self, stop: threading.Event, leave: Callable[[], bool] | None = None) -> bool:
        """True when the next batch may run; False when `stop` is set or `leave()` turns true
        while waiting (a worker the operator took away); ThrottleAbort past critical."""
        delays = backoff(FIRST_BACKOFF_S, self.backoff_max_s)
        while not stop.is_set():
            st = self.check()
            if st.critical:
                raise ThrottleAbort(st.critical)
            if not st.throttled:
                return True
            if leave is not None and leave():
                return False
            self._sleep(next(delays), stop)
        return False

    def _sleep(self, seconds: float, stop: threading.Event) -> None:
        deadline = time.monotonic() + seconds
        gen = self._generation
        with self._wake:
            while not stop.is_set() and self._generation == gen:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._wake.wait(min(left, 0.25))

    def _evaluate(self) -> tuple[ThrottleState, tuple]:
        s = self.settings
        reasons: list[tuple[str, str]] = []  # (stable key, text): events fire when the keys change
        critical = None
        if self._paused:
            reasons.append(("paused", "paused by operator"))
        if s.flag_file and os.path.exists(s.flag_file):
            reasons.append(("flag", f"flag file {s.flag_file} exists"))
        lag: float | None = None
        lag_bytes: int | None = None
        lag_on = ""
        for dsn in self.replicas:
            try:
                value = self._replica_lag(dsn)
            except (psycopg.Error, OrchestrateError) as e:
                _close(self._replica_conns.pop(dsn, None))
                reasons.append((f"unreachable {dsn}", f"replica {dsn_label(dsn)} unreachable: {_first_line(e)}"))
                continue
            if lag is None or value > lag:
                lag, lag_on = value, f" on {dsn_label(dsn)}"
        try:
            conn = self._primary()
            if not self.replicas:
                lag, lag_bytes = self._primary_replication_lag(conn)
                lag_on = " (pg_stat_replication)"
            reason = self._replay_reason(conn)
            if reason is not None:
                reasons.append(("replay", reason))
            if s.max_slot_retained_bytes is not None:
                row = conn.execute(probes.SLOT_RETAINED_SQL).fetchone()
                if row and row[1] > s.max_slot_retained_bytes:
                    reasons.append(("slot", f"slot {row[0]} retains {row[1]} bytes of WAL > "
                                            f"{s.max_slot_retained_bytes}"))
            if self._citus is None:
                from orchestrator.distribute import citus_version

                self._citus = citus_version(conn) is not None
            if self._citus:
                # A Citus coordinator: the workers' own standbys and slots count too (their
                # shards take the backfill's rows). Read through the coordinator.
                from orchestrator.distribute import worker_signals

                for node, ok, w_lag, w_slot, w_retained in worker_signals(conn):
                    if not ok:
                        reasons.append((f"worker {node}", f"worker {node}: replication figures unreadable"))
                        continue
                    if w_lag is not None and (lag is None or w_lag > lag):
                        lag, lag_on = w_lag, f" on worker {node}'s standby"
                    if s.max_slot_retained_bytes is not None and w_retained is not None \
                            and w_retained > s.max_slot_retained_bytes:
                        reasons.append((f"slot {node}", f"slot {w_slot} on worker {node} retains {w_retained} "
                                                        f"bytes of WAL > {s.max_slot_retained_bytes}"))
            blind = (s.max_xact_age_s is not None or s.max_xmin_age is not None
                     or s.max_active_sessions is not None) and not self._sees_all(conn)
            if blind:
                # Other roles' transactions read as NULL without pg_read_all_stats: fail closed.
                reasons.append(("blind", "max_xact_age_s / max_xmin_age / max_active_sessions cannot see other "
                                         "roles' sessions: " + MONITOR_HINT))
            if s.max_active_sessions is not None and not blind:
                active = conn.execute(probes.ACTIVE_SESSIONS_SQL, (own_pids(),)).fetchone()[0]
                if active > s.max_active_sessions:
                    reasons.append(("active", f"{active} sessions running a statement > {s.max_active_sessions}"))
            if s.max_xact_age_s is not None and not blind:
                row = conn.execute(probes.OLDEST_XACT_SQL, (own_pids(),)).fetchone()
                if row and row[2] > s.max_xact_age_s:
                    who = f" ({row[1]})" if row[1] else ""
                    reasons.append(("xact", f"transaction of pid {row[0]}{who} open for {row[2]:.0f}s > "
                                            f"{s.max_xact_age_s:g}s"))
            if s.max_xmin_age is not None and not blind:
                row = conn.execute(XMIN_HORIZON, (own_pids(),)).fetchone()
                if row and row[1] is not None and row[1] > s.max_xmin_age:
                    reasons.append(("xmin", f"oldest xmin is {row[1]} transactions old ({row[0]}) > "
                                            f"{s.max_xmin_age}: vacuum cannot clean up behind it"))
            if s.query:
                try:
                    row = conn.execute(s.query).fetchone()
                except psycopg.Error as e:
                    if conn.broken:
                        raise
                    reasons.append(("query error", f"throttle query failed: {_first_line(e)}"))
                else:
                    if row is not None and row[0]:
                        reasons.append(("query", "throttle query returned true"))
        except (psycopg.Error, OrchestrateError) as e:
            _close(self._conn)
            self._conn = None
            reasons.append(("primary", f"throttle checks failed on the primary: {_first_line(e)}"))
        if self.gate.update(lag):
            shown = f"{lag:.1f}s" if lag is not None else "unknown"
            if lag is not None and lag > self.gate.pause:
                text = f"replica lag {shown}{lag_on} > {self.gate.pause:g}s"
            else:
                text = f"replica lag {shown}{lag_on}: waiting until below {self.gate.resume:g}s"
            reasons.append(("lag", text))
        if self.critical_s is not None and lag is not None and lag > self.critical_s:
            critical = (f"replica lag {lag:.1f}s{lag_on} passed the critical threshold {self.critical_s:g}s: "
                        "backfill stopped to protect the replicas (run apply again to resume)")
        # A lag gate that is shut while the lag is unknown (a replica unreachable since) does
        # not hold the replay: nothing says the server is loaded, and nothing would reopen it.
        holds = [t for k, t in reasons
                 if (k in REPLAY_HOLDS or k.startswith("slot ")) and not (k == "lag" and lag is None)]
        state = ThrottleState(
            throttled=bool(reasons) or critical is not None,
            holds_replay="; ".join(holds) or None,
            reason="; ".join(t for _, t in reasons) or (critical and "critical replica lag"),
            lag_s=None if lag is None else round(lag, 3),
            lag_bytes=lag_bytes,
            paused=self._paused,
            critical=critical,
            checked_at=time.monotonic(),
        )
        return state, tuple(k for k, _ in reasons) + (("critical",) if critical else ())

    def _record(self, state: ThrottleState, keys: tuple) -> None:
        """Log and record an event when the decision (its set of reasons) changes."""
        if keys == self._keys:
            return
        was = self._state
        self._keys = keys
        if state.critical:
            logger.error("throttle: {}", state.critical)
            self._event(f"critical: {state.critical}")
        elif state.throttled:
            logger.warning("backfill throttled: {} ({})", state.reason, TRIGGERS_NOTE)
            self._event(f"throttled: {state.reason} ({TRIGGERS_NOTE})")
        else:
            logger.info("backfill resumes: throttle lifted (was: {})", was.reason)
            self._event(f"resumed (was: {was.reason})")

    # --- sessions and queries -------------------------------------------------------------
    def _primary(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            # Merely observes: read-only, and no check may hang the run.
            conn = connect(self.dsn, "throttle", settings={"statement_timeout": CHECK_STATEMENT_TIMEOUT_MS,
                                                           "default_transaction_read_only": "on"})
            self._conn = conn
        return self._conn

    def _replay_reason(self, conn: psycopg.Connection) -> str | None:
        """Async capture: the replay falls behind when the oldest logged change waits longer
        than max_replay_lag_s (read from the log itself: a replay stuck on a lock shows too)."""
        limit = self.settings.max_replay_lag_s
        if limit is None or self.replay_lag_sql is None:
            return None
        try:
            pending, oldest = conn.execute(self.replay_lag_sql).fetchone()
        except psycopg.errors.UndefinedFunction:
            return None  # capture not installed yet: nothing to replay
        if oldest is None or float(oldest) <= limit:
            return None
        return f"replay {float(oldest):.1f}s behind ({int(pending)} changes waiting in the change log) > {limit:g}s"

    @staticmethod
    def _sees_all(conn: psycopg.Connection) -> bool:
        return sees_all_sessions(conn)

    @staticmethod
    def _primary_replication_lag(conn: psycopg.Connection) -> tuple[float, int | None]:
        lag, behind, _n = primary_lag(conn)
        return lag, behind

    def _replica_lag(self, dsn: str) -> float:
        conn = self._replica_conns.get(dsn)
        if conn is None or conn.closed:
            conn = connect(dsn, "throttle-replica", settings={"statement_timeout": CHECK_STATEMENT_TIMEOUT_MS})
            self._replica_conns[dsn] = conn
        # Received but not replayed: the age of the last replayed commit (the heartbeat commits
        # every beat, so on a primary that is otherwise idle this is still exact to a beat).
        behind = replica_lag_s(conn)
        beating = self._hb_started is not None and time.monotonic() - self._hb_ok_at < 5 * max(
            1.0, self.heartbeat_interval_s)
        if not beating:
            return max(0.0, behind)
        # The heartbeat also sees WAL the replica has not even received; until the replica has
        # replayed this run's first beat, it is at least the time since that beat behind.
        has = conn.execute(probes.HEARTBEAT_EXISTS_SQL).fetchone()[0]
        if has:
            row = conn.execute(probes.HEARTBEAT_LAG_SQL, (self._hb_started,)).fetchone()
        else:
            row = conn.execute(probes.SINCE_FIRST_BEAT_SQL, (self._hb_started,)).fetchone()
        return max(0.0, behind, float(row[0]))

    def _writer_conn(self) -> psycopg.Connection:
        if self._writer is None or self._writer.closed:
            # A paused or slow synchronous standby must not hold up the heartbeat itself.
            conn = connect(self.dsn, "throttle-writer", settings={"synchronous_commit": "local",
                                                                  "lock_timeout": 2000})
            self._writer = conn
        return self._writer

    def _beat(self) -> None:
        try:
            with self._writer_lock:
                ts = Store.heartbeat(self._writer_conn())
            if self._hb_started is None:
                self._hb_started = ts
            self._hb_ok_at = time.monotonic()
        except (psycopg.Error, OrchestrateError) as e:
            with self._writer_lock:
                _close(self._writer)
                self._writer = None
            logger.warning("throttle: heartbeat failed: {}", _first_line(e))

    def _event(self, message: str) -> None:
        if self.mid is None:
            return
        try:
            with self._writer_lock:
                Store(self._writer_conn()).event(self.mid, "throttle", message)
        except (psycopg.Error, OrchestrateError) as e:
            logger.warning("throttle: could not record event: {}", _first_line(e))

