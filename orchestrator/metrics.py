"""Live figures of a running apply: in status (``live``) and, optionally, for Prometheus.

:class:`LiveFigures` sits between the backfill and the progress printer: it keeps the last
progress figures, adds the throttle's (``lag_s``, ``throttle``) for the printer, and every
2 s writes them as ``facts.live`` of the migration row, on its own session (role
``orchestrate:live``), so ``orchestrate status --output json`` shows ``data["live"]``:

==================  ===========================================================================
field               meaning
==================  ===========================================================================
phase               the phase the run is in (prepare, capture, backfill, verify, cutover)
active              true while the apply runs; false in the last snapshot it writes on exit
pid                 process id of the apply
ranges_done         ranges copied so far (all runs), of ``ranges_total``
ranges_total        ranges planned for the backfill
rows                rows copied by this run's backfill
rows_per_s          this run's backfill rate (rows per second since it started)
eta_s               estimated seconds left in the backfill (null until a range is done)
batch_size          current rows per batch (adaptive, or pinned by ``orchestrate set``)
batch_pinned        true when the batch size is fixed (plan or ``orchestrate set batch_size``)
workers             backfill workers wanted now (--workers, ``orchestrate set workers=``, or the plan)
lag_s               worst replica lag, seconds (null when not measured yet)
lag_bytes           bytes of WAL not yet replayed (only without --replica-dsn: pg_stat_replication)
throttled           true while the backfill waits
throttle_reason     why it waits ("replica lag 12.3s on host:5432/db > 10s", "paused by operator",
                    "replica host:5432/db unreachable: ...", ...; several joined by "; ")
paused              true while paused by ``orchestrate pause``
updated_at          server time of this snapshot (a stale one means the apply is gone)
==================  ===========================================================================

With ``apply --metrics-port N``, :class:`MetricsServer` serves the same figures at
``http://127.0.0.1:N/metrics`` in the Prometheus text format, through prometheus_client
(loopback only unless ``--metrics-host`` says otherwise):
orchestrate_rows_copied_total, orchestrate_ranges_done, orchestrate_ranges_total,
orchestrate_batch_size, orchestrate_workers, orchestrate_replica_lag_seconds,
orchestrate_throttled, orchestrate_paused, orchestrate_rows_per_second; each labelled ``table="schema.name"``.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable

import psycopg
from loguru import logger
from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from orchestrator.db import Ticker, close_quietly, connect
from orchestrator.errors import OrchestrateError, PlanError
from orchestrator.state.store import Store

WRITE_INTERVAL_S = 2.0
PROGRESS_KEYS = ("ranges_done", "ranges_total", "rows", "rows_per_s", "eta_s", "batch_size")


class LiveFigures:
    """Collects the run's figures; writes them into facts.live every ~2 s (see module doc)."""

    def __init__(self, dsn: str, mid: int, table: str, *, throttle=None, controls=None,
                 interval_s: float = WRITE_INTERVAL_S):
        self.dsn = dsn
        self.mid = mid
        self.table = table
        self.throttle = throttle
        self.controls = controls
        self.interval_s = interval_s
        self.progress: dict = {}
        self.workers: int | None = None
        self.yields: dict[str, str] = {}  # range label -> why its batch yields to the application
        self.replayer = None  # async capture's replay thread (orchestrator/changelog.py)
        self._lock = threading.Lock()
        self._conn: psycopg.Connection | None = None
        self._ticker = Ticker("live-figures", interval_s, self._tick)

    # --- collecting ---------------------------------------------------------------------
    def wrap(self, printer: Callable[[dict], None] | None) -> Callable[[dict], None]:
        """A progress callback that records the figures, adds the throttle's, then prints."""

        def progress(p: dict) -> None:
            with self._lock:
                self.progress = dict(p)
            if printer is not None:
                st = self.throttle.state if self.throttle is not None else None
                extra = {}
                if st is not None:
                    extra = {"lag_s": st.lag_s, "throttle": st.reason if st.throttled else None}
                printer({**p, **extra})

        return progress

    def set_yield(self, label: str, reason: str | None) -> None:
        """A backfill worker's batch yields to an application lock (reason), or no longer (None)."""
        with self._lock:
            if reason is None:
                self.yields.pop(label, None)
            else:
                self.yields[label] = reason

    def snapshot(self) -> dict:
        """The figures now (without phase and updated_at, which the database fills in)."""
        with self._lock:
            p = dict(self.progress)
        out = {k: p.get(k) for k in PROGRESS_KEYS}
        out["rows"] = out["rows"] or 0
        pace = getattr(self.controls, "pace", None)
        if pace is not None:
            out["batch_size"] = pace.size
            out["batch_pinned"] = bool(pace.fixed)
        else:
            out["batch_pinned"] = None
        out["workers"] = self.workers
        st = self.throttle.state if self.throttle is not None else None
        out["lag_s"] = st.lag_s if st else None
        out["lag_bytes"] = st.lag_bytes if st else None
        out["throttled"] = bool(st and st.throttled)
        out["throttle_reason"] = st.reason if st and st.throttled else None
        with self._lock:
            yields = "; ".join(self.yields.values()) or None
        out["yielding"] = yields
        if yields and not out["throttled"]:  # a batch that waits for the application's lock is throttled by it
            out["throttled"], out["throttle_reason"] = True, yields
        out["paused"] = bool(getattr(self.controls, "paused", False) or (st and st.paused))
        r = self.replayer
        if r is not None:
            out["replay_pending"] = r.pending
            out["replay_lag_s"] = None if r.oldest_s is None else round(r.oldest_s, 3)
            out["replayed"] = r.replayed
            out["replay_error"] = r.error
            out["replay_waiting"] = r.waiting
            out["replay_waited_s"] = round(r.waited_s, 1)
            out["replay_held"] = bool(r.waiting)
        out["pid"] = os.getpid()
        out["active"] = True
        return out

    # --- writing facts.live ---------------------------------------------------------------
    def start(self) -> LiveFigures:
        self.write()
        self._ticker.start()
        return self

    def stop(self) -> None:
        self._ticker.stop()
        self.write(active=False)
        close_quietly(self._conn)
        self._conn = None

    def _tick(self) -> None:
        with self._lock:
            p = self.progress
            copying = p.get("phase") == "backfill" and p.get("ranges_done") != p.get("ranges_total")
        if self.throttle is not None and copying:
            try:
                # Keeps the figures fresh while every worker sleeps in its backoff (cached).
                self.throttle.check()
            except Exception as e:  # noqa: BLE001 - a figure, never a failure of the run
                logger.debug("live: throttle check failed: {}", e)
        self.write()

    def write(self, active: bool = True) -> None:
        snap = self.snapshot()
        snap["active"] = active
        try:
            if self._conn is None or self._conn.closed:
                self._conn = connect(self.dsn, "live", settings={"lock_timeout": 1000})
            Store.set_live(self._conn, self.mid, json.dumps(snap, default=str))
        except (psycopg.Error, OrchestrateError) as e:
            logger.debug("live: could not write the live figures: {}", e)
            if self._conn is not None and self._conn.broken:
                self._conn = None


# name, kind, help, snapshot key (a counter's name gains _total when exposed)
_FAMILIES = (
    ("orchestrate_rows_copied", "counter", "Rows copied by this run's backfill.", "rows"),
    ("orchestrate_ranges_done", "gauge", "Backfill ranges copied.", "ranges_done"),
    ("orchestrate_ranges_total", "gauge", "Backfill ranges planned.", "ranges_total"),
    ("orchestrate_batch_size", "gauge", "Rows per backfill batch.", "batch_size"),
    ("orchestrate_workers", "gauge", "Backfill workers wanted now.", "workers"),
    ("orchestrate_replica_lag_seconds", "gauge", "Worst replica lag seen by the throttle.", "lag_s"),
    ("orchestrate_throttled", "gauge", "1 while the backfill is throttled.", "throttled"),
    ("orchestrate_paused", "gauge", "1 while paused by the operator.", "paused"),
    ("orchestrate_rows_per_second", "gauge", "Backfill rate of this run.", "rows_per_s"),
)
_REPLAY_FAMILIES = (  # async capture only
    ("orchestrate_replay_pending", "gauge", "Changes waiting in the change log (async capture).", "replay_pending"),
    ("orchestrate_replay_lag_seconds", "gauge", "Age of the oldest change waiting in the change log.",
     "replay_lag_s"),
    ("orchestrate_replayed", "counter", "Changes replayed into the twin by this run.", "replayed"),
    ("orchestrate_replay_held", "gauge", "1 while a load signal holds the replay (capture.replay_throttled).",
     "replay_held"),
)


class LiveCollector(Collector):
    """A prometheus_client collector that reads the run's figures at each scrape."""

    def __init__(self, snapshot: Callable[[], dict], table: str):
        self.snapshot = snapshot
        self.table = table

    def collect(self):
        snap = self.snapshot()
        families = _FAMILIES + (_REPLAY_FAMILIES if "replay_pending" in snap else ())
        for name, kind, help_text, key in families:
            family = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(name, help_text,
                                                                                      labels=["table"])
            value = snap.get(key)
            family.add_metric([self.table], float("nan") if value is None else float(value))
            yield family


def registry(snapshot: Callable[[], dict], table: str) -> CollectorRegistry:
    """A registry of our own (never prometheus_client's global one) with the run's figures."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(LiveCollector(snapshot, table))
    return reg


def render(snap: dict, table: str) -> str:
    """The Prometheus text exposition of a snapshot, as a scrape returns it."""
    return generate_latest(registry(lambda: snap, table)).decode()


class MetricsServer:
    """prometheus_client's HTTP server on its own thread: GET /metrics -> the live figures.

    Binds when made (a port in use is a PlanError, exit 2), loopback unless told otherwise.
    """

    def __init__(self, port: int, live: LiveFigures | None, host: str = "127.0.0.1"):
        self.port = port
        self.live = live
        reg = registry(lambda: live.snapshot(), live.table) if live is not None else CollectorRegistry()
        try:
            self.server, self._thread = start_http_server(port, addr=host, registry=reg)
        except OSError as e:
            raise PlanError(f"--metrics-port {port}: cannot listen ({e.strerror})") from None

    def start(self) -> MetricsServer:
        logger.info("metrics: serving Prometheus figures on port {}", self.port)
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=5)
