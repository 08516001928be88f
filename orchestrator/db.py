"""Connections: the only place that sets session settings, timeouts and retries.

Every orchestrator session runs in UTC (partition bounds are rendered as UTC), with an
``application_name`` that says which role the session plays, a connect timeout so an
unreachable server fails in seconds, and ``lock_timeout`` set per statement by
:func:`with_lock_retry`, the only retry loop for lock waits in the codebase.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import psycopg
from loguru import logger
from psycopg import errors as pgerr
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from orchestrator.errors import ConnectionFailed, LockNotAcquired

T = TypeVar("T")
CONNECT_TIMEOUT_S = 5


# Backend pids of the sessions this process opened: how the throttle and the cutover's
# blocker checks leave our own sessions out. application_name is no proof: anyone can set it.
OWN_PIDS: set[int] = set()


def redact(dsn: str) -> str:
    """The DSN without its password, for messages and logs.

    A DSN libpq cannot parse is not shown at all: where its password starts and ends is
    exactly what cannot be known then."""
    try:
        parts = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "<unparsable DSN, not shown>"
    if "password" in parts:
        parts["password"] = "***"
    return make_conninfo(**parts)


def own_pids() -> list[int]:
    """This process's sessions' backend pids (a list, for ``pid <> ALL(%s)``)."""
    return sorted(OWN_PIDS)


def connect(dsn: str, role: str = "main", autocommit: bool = True) -> psycopg.Connection:
    """Open a session for one role (main, worker-N, lock, verify, ...)."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        # libpq's message quotes the token it choked on, which may be the password.
        raise ConnectionFailed("invalid DSN: not a libpq keyword string or URL "
                               "(not shown: it may hold a password)") from None
    params.setdefault("connect_timeout", CONNECT_TIMEOUT_S)
    params["application_name"] = f"orchestrate:{role}"
    try:
        conn = psycopg.connect(**params, autocommit=autocommit)
    except psycopg.OperationalError as e:
        first = (str(e).strip().splitlines() or ["connection failed"])[-1]
        if params.get("password"):  # never echo it, whatever the server or libpq put in the message
            first = first.replace(str(params["password"]), "***")
        raise ConnectionFailed(f"cannot connect to {redact(dsn)}: {first}") from None
    # UTC so that partition bounds and range literals mean the same thing everywhere;
    # no statement_timeout by default: backfill batches are bounded by their size.
    with conn.cursor() as cur:
        cur.execute("SET TimeZone = 'UTC'")
        # Nothing the table owner (or anyone) creates in public can shadow a built-in; pg_temp
        # last so a temporary table never shadows ours (functions are never looked up there).
        cur.execute("SET search_path = pg_catalog, pg_temp")
        # A read that row-level security would filter raises instead of counting fewer rows.
        cur.execute("SET row_security = off")
    OWN_PIDS.add(conn.info.backend_pid)
    if not autocommit:
        conn.commit()
    return conn


def close_quietly(conn: psycopg.Connection | None) -> None:
    """Close a session whose server may already be gone (cleanup must never raise)."""
    if conn is not None:
        try:
            conn.close()
        except psycopg.Error:
            pass


def is_connection_error(e: BaseException) -> bool:
    return isinstance(e, (psycopg.OperationalError, psycopg.InterfaceError)) and not isinstance(
        e, (pgerr.LockNotAvailable, pgerr.QueryCanceled, pgerr.DeadlockDetected)
    )


@dataclass
class LockAttempt:
    """What one attempt at a short lock did: for logs and status."""

    attempt: int
    ok: bool
    waited_s: float
    held_s: float | None = None
    error: str | None = None


def backoff_delays(attempts: int, base: float, cap: float, rng: random.Random | None = None) -> Iterator[float]:
    """Exponential backoff with full jitter: attempt k sleeps uniform(0, min(cap, base*2^k))."""
    rng = rng or random.Random()
    for k in range(attempts):
        yield rng.uniform(base / 2, min(cap, base * (2**k)))


def with_lock_retry(
    conn: psycopg.Connection,
    body: Callable[[psycopg.Cursor], T],
    *,
    what: str,
    lock_timeout_s: float,
    attempts: int,
    backoff_max_s: float = 5.0,
    on_attempt: Callable[[LockAttempt], None] | None = None,
) -> T:
    """Run ``body`` in one transaction with a short lock_timeout, retrying on lock waits.

    Warning: ``body`` takes locks that block the application while held; it must only do
    catalog work and cheap statements. A waiting ACCESS EXCLUSIVE request queues every
    later query on the table behind it, which is why each wait is capped by
    ``lock_timeout`` and retried after a jittered backoff rather than waited out.
    On exhaustion raises LockNotAcquired: every attempt rolled back, nothing changed.
    """
    delays = backoff_delays(attempts, base=max(lock_timeout_s, 0.05), cap=backoff_max_s)
    last = ""
    for attempt in range(1, attempts + 1):
        t0 = time.monotonic()
        try:
            with conn.transaction():
                with conn.cursor() as cur:
                    cur.execute(f"SET LOCAL lock_timeout = '{int(lock_timeout_s * 1000)}ms'")
                    result = body(cur)
            elapsed = time.monotonic() - t0
            if on_attempt:
                on_attempt(LockAttempt(attempt, True, elapsed))
            return result
        except (pgerr.LockNotAvailable, pgerr.DeadlockDetected) as e:
            last = str(e).splitlines()[0]
            waited = time.monotonic() - t0
            if on_attempt:
                on_attempt(LockAttempt(attempt, False, waited, error=last))
            logger.info("{}: lock attempt {}/{} gave up after {:.0f} ms ({})", what, attempt, attempts,
                        waited * 1000, last)
            if attempt < attempts:
                time.sleep(next(delays))
    raise LockNotAcquired(
        f"{what}: could not take the lock in {attempts} attempts of {lock_timeout_s * 1000:.0f} ms "
        f"({last}); nothing changed, run again later"
    )


@contextmanager
def transaction(conn: psycopg.Connection) -> Iterator[psycopg.Cursor]:
    with conn.transaction():
        with conn.cursor() as cur:
            yield cur


class Ticker:
    """Calls ``fn`` every ``interval_s`` seconds on a daemon thread until stopped.

    The one background loop the runtime roles share (operator controls, live figures,
    the throttle's heartbeat): stop() wakes the wait at once, so shutdown never waits out
    an interval.
    """

    def __init__(self, name: str, interval_s: float, fn: Callable[[], None]):
        self.name = name
        self.interval_s = interval_s
        self.fn = fn
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.fn()
