"""Connections: the only place that sets session settings, timeouts and retries.

Every orchestrator session runs in UTC (partition bounds are rendered as UTC) with
``search_path = pg_catalog, pg_temp``, an ``application_name`` that says which role the
session plays, a connect timeout so an unreachable server fails in seconds, and
``lock_timeout`` set per transaction by :func:`with_lock_retry`, the only retry loop for
lock waits in the codebase. Session settings are connection parameters (:func:`connect`),
never a ``SET`` that could outlive our use of a pooled server session; an endpoint that
multiplexes transactions (a transaction-mode pooler) is refused (:func:`check_endpoint`).
"""

from __future__ import annotations

import itertools
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import psycopg
from loguru import logger
from psycopg import errors as pgerr
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from orchestrator.errors import BadEndpoint, ConnectionFailed, LockNotAcquired
from orchestrator.sql import QualifiedName, swap
from orchestrator.sql import backfill as backfill_sql
from orchestrator.sql import session as session_sql

if TYPE_CHECKING:
    from psycopg.sql import Composable

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


#: Settings every orchestrate session runs with: UTC so that partition bounds and range
#: literals mean the same thing everywhere; a search_path no table owner can plant objects
#: in (everything is schema-qualified). No statement_timeout: batches are bounded by size.
BASE_SETTINGS: dict[str, str] = {"TimeZone": "UTC", "search_path": "pg_catalog, pg_temp",
                                 # A read row-level security would filter raises instead of counting fewer rows.
                                 "row_security": "off"}
#: Rounds of the transaction-pooling probe (see check_endpoint).
PROBE_ROUNDS = 3
_checked: set[tuple] = set()
_checked_lock = threading.Lock()


class Session(psycopg.Connection):
    """A connection of ours. ``pooled`` when our settings had to be ``SET`` (a session-mode pool
    that passes no ``options`` on; or PGTZ, which libpq applies after them): close() then
    discards every piece of session state before the server session goes back to a pool."""

    pooled = False

    def close(self) -> None:
        if self.pooled and not self.closed and not self.broken:
            # Only from idle: a pool drops a server session whose client left mid-transaction.
            if self.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
                try:
                    self.autocommit = True
                    self.execute(session_sql.DISCARD_ALL)  # RESET ALL, DEALLOCATE ALL, advisory unlock all, ...
                except psycopg.Error:
                    pass
        super().close()


def own_pids() -> list[int]:
    """This process's sessions' backend pids (a list, for ``pid <> ALL(%s)``)."""
    return sorted(OWN_PIDS)


def connect(dsn: str, role: str = "main", autocommit: bool = True,
            settings: dict[str, object] | None = None) -> psycopg.Connection:
    """Open a session for one role (main, worker-N, lock, verify, ...) with its settings.

    ``settings`` (on top of BASE_SETTINGS) are connection parameters (libpq ``options``), so
    they live and die with this session's own server backend and never reach a connection
    someone else uses. Server-side prepared statements are off: through a pooler they
    outlive our use of a server session and collide with the next client's. An endpoint
    that multiplexes transactions (a pooler in transaction or statement mode) is refused
    with BadEndpoint before anything is done (see check_endpoint). A session-mode pool that
    refuses or ignores ``options`` gets the settings with ``SET`` instead: safe there because
    the server session is ours alone until we disconnect, and Session.close() discards them.
    """
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        # libpq's message quotes the token it choked on, which may be the password.
        raise ConnectionFailed("invalid DSN: not a libpq keyword string or URL "
                               "(not shown: it may hold a password)") from None
    params.setdefault("connect_timeout", CONNECT_TIMEOUT_S)
    params["application_name"] = f"orchestrate:{role}"
    wanted = {**BASE_SETTINGS, **{k: str(v) for k, v in (settings or {}).items()}}
    # Any options of the user's own (DSN or PGOPTIONS) are kept; ours come later and win.
    theirs = str(params.pop("options", None) or os.environ.get("PGOPTIONS", "")).strip()
    plain = {**params, **({"options": theirs} if theirs else {})}
    try:
        conn = _open(dsn, {**params, "options": f"{theirs} {_options(wanted)}".strip()}, autocommit)
    except ConnectionFailed as e:
        if "unsupported startup parameter" not in str(e):
            raise
        conn = _open(dsn, plain, autocommit)  # a pooler that refuses options (PgBouncer's default)
    try:
        check_endpoint(conn, plain, dsn)
        if not _took_options(conn, wanted):
            for name, value in wanted.items():
                conn.execute(session_sql.SET_CONFIG, (name, value))
            conn.pooled = True
        if not autocommit:
            conn.commit()
        OWN_PIDS.add(conn.info.backend_pid)  # our sessions are known by pid, never by a name anyone can set
    except psycopg.Error as e:
        close_quietly(conn)
        raise ConnectionFailed(f"cannot set up a session on {redact(dsn)}: {str(e).strip().splitlines()[0]}") \
            from None
    except BaseException:
        close_quietly(conn)
        raise
    return conn


def check_endpoints(dsns: list[str] | tuple[str, ...], role: str) -> None:
    """Connect once to each DSN: BadEndpoint for a transaction-mode pooler. One that cannot be
    reached is left to its user (the throttle reports it and fails closed)."""
    for dsn in dict.fromkeys(dsns):
        try:
            close_quietly(connect(dsn, role))
        except ConnectionFailed:
            pass


def _open(dsn: str, params: dict, autocommit: bool) -> Session:
    try:
        return Session.connect(**params, autocommit=autocommit, prepare_threshold=None)
    except psycopg.OperationalError as e:
        first = (str(e).strip().splitlines() or ["connection failed"])[-1]
        if params.get("password"):  # never echo it, whatever the server or libpq put in the message
            first = first.replace(str(params["password"]), "***")
        raise ConnectionFailed(f"cannot connect to {redact(dsn)}: {first}") from None


def _options(settings: dict[str, str]) -> str:
    """libpq ``options`` for ``settings``: ``-c name=value``, spaces and backslashes escaped."""
    def esc(v: str) -> str:
        return v.replace("\\", "\\\\").replace(" ", "\\ ")

    return " ".join(f"-c {name}={esc(value)}" for name, value in settings.items())


def _took_options(conn: psycopg.Connection, wanted: dict[str, str]) -> bool:
    """True when every setting came from the startup packet (source 'client'). A pooler that
    accepts ``options`` but drops them (ignore_startup_parameters) leaves them at the server's
    defaults; one that re-SETs them itself shows 'session'. Either way: not ours to rely on."""
    # libpq sends PGTZ as a startup parameter of its own, applied after ``options``: also 'client'.
    row = conn.execute(session_sql.SETTINGS_FROM_CLIENT, ([n.lower() for n in wanted],)).fetchone()
    if not conn.autocommit:
        conn.commit()
    return row is not None and row[0] == len(wanted) and row[1] == wanted["TimeZone"]


def check_endpoint(conn: psycopg.Connection, params: dict, dsn: str) -> None:
    """Refuse (BadEndpoint) an endpoint that does not give each client its own server session.

    orchestrate needs session state to stay put: its settings, the per-table advisory lock
    (a session lock), and statements that must run on the session that holds those. A pooler
    in transaction (or statement) mode hands each transaction of one client to whichever
    server session is free, and that session to other clients in between.

    The probe, read-only and leaving nothing behind: on ``conn``, ``pg_backend_pid()`` in a
    transaction of its own; then a second client connection opens a transaction and reads its
    backend pid while holding it; then ``conn`` reads its pid again. A direct connection or a
    session pool gives ``conn`` one backend throughout and the second client another. Seeing
    the second client on ``conn``'s backend (a transaction pool hands out the server session
    just released: PgBouncer reuses the most recent one), or ``conn`` on a new backend while
    the other client holds one (a busy pool), proves multiplexing; neither can happen
    without it, so the probe has no false positives. A few rounds make a miss in a busy pool
    improbable. Checked once per endpoint and process.
    """
    key = (conn.info.host, conn.info.port, conn.info.dbname, conn.info.user)
    with _checked_lock:
        if key in _checked:
            return
    why = _multiplexed(conn, params, dsn)
    if why:
        raise BadEndpoint(
            f"refusing {conn.info.host}:{conn.info.port}: a connection pooler in transaction or statement mode "
            f"({why}); orchestrate needs server sessions of its own (its settings, its advisory lock): connect "
            "directly to PostgreSQL or through a session-mode pool"
        )
    with _checked_lock:
        _checked.add(key)


def _multiplexed(conn: psycopg.Connection, params: dict, dsn: str) -> str | None:
    """Why ``conn``'s endpoint multiplexes transactions over server sessions, or None."""
    def pid(c: psycopg.Connection) -> int:
        value = c.execute(session_sql.BACKEND_PID).fetchone()[0]
        if not c.autocommit:
            c.commit()
        return int(value)

    other = _open(dsn, {**params, "application_name": f"{params.get('application_name', 'orchestrate')}-probe"},
                  autocommit=True)
    try:
        for _ in range(PROBE_ROUNDS):
            mine = pid(conn)
            try:
                with other.transaction():
                    theirs = pid(other)
                    if theirs == mine:
                        return f"two client connections were served by one server session, pid {mine}"
                    again = pid(conn)
            except psycopg.Error as e:
                if "statement pooling" in str(e):
                    return "it refuses transaction blocks: statement pooling"
                raise
            if again != mine:
                return f"one client connection moved from server session {mine} to {again} between transactions"
        return None
    finally:
        close_quietly(other)


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


def backoff(first: float, cap: float, *, jitter: random.Random | None = None) -> Iterator[float]:
    """The one backoff: first, 2*first, 4*first, ... capped at cap, without end. With ``jitter``
    each delay d is drawn from uniform(first/2, d) instead (lock retries: waiters that collided
    once must not collide again)."""
    d = first
    while True:
        step = min(d, cap)
        yield jitter.uniform(first / 2, step) if jitter is not None else step
        d = min(d * 2, cap)


def backoff_delays(attempts: int, base: float, cap: float, rng: random.Random | None = None) -> Iterator[float]:
    """``attempts`` jittered delays of :func:`backoff` (the lock-retry loop's)."""
    return itertools.islice(backoff(base, cap, jitter=rng or random.Random()), attempts)


@dataclass(frozen=True)
class LockPolicy:
    """How a short locked step waits for its locks: each wait capped by ``lock_timeout_s``,
    up to ``attempts`` tries, a jittered backoff capped at ``backoff_max_s`` in between.
    Built once from the plan (``Plan.locks``, the cutover section's settings) for every
    locked step of a migration; maintain caps the timeout lower (:meth:`capped`)."""

    lock_timeout_s: float
    attempts: int
    backoff_max_s: float = 5.0

    def capped(self, lock_timeout_s: float) -> LockPolicy:
        return LockPolicy(min(self.lock_timeout_s, lock_timeout_s), self.attempts, self.backoff_max_s)


def with_lock_retry(
    conn: psycopg.Connection,
    body: Callable[[psycopg.Cursor], T],
    *,
    what: str,
    policy: LockPolicy,
    on_attempt: Callable[[LockAttempt], None] | None = None,
) -> T:
    """Run ``body`` in one transaction with a short lock_timeout, retrying on lock waits.

    Warning: ``body`` takes locks that block the application while held; it must only do
    catalog work and cheap statements. A waiting ACCESS EXCLUSIVE request queues every
    later query on the table behind it, which is why each wait is capped by
    ``lock_timeout`` and retried after a jittered backoff rather than waited out.
    On exhaustion raises LockNotAcquired: every attempt rolled back, nothing changed.
    """
    lock_timeout_s, attempts = policy.lock_timeout_s, policy.attempts
    delays = backoff_delays(attempts, base=max(lock_timeout_s, 0.05), cap=policy.backoff_max_s)
    last = ""
    for attempt in range(1, attempts + 1):
        t0 = time.monotonic()
        try:
            with conn.transaction():
                with conn.cursor() as cur:
                    cur.execute(session_sql.lock_timeout(lock_timeout_s))
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


# --- locks the application holds, and ours -------------------------------------------------

def lock_both(cur: psycopg.Cursor, first: QualifiedName, second: QualifiedName,
              marks: dict[str, float] | None = None) -> None:
    """Lock in the order writers take them (live table, then twin via the trigger): no deadlock.

    ``marks["first"]`` is set when the live table's lock is granted: from then on the
    application waits on us, so that is where the held time starts. ONLY: every access to a
    partitioned table goes through its parent's lock first, so the parent's ACCESS EXCLUSIVE
    already keeps everyone out; locking each partition too costs O(partitions) under the lock."""
    cur.execute(swap.lock_table(first))
    if marks is not None:
        marks["first"] = time.monotonic()
    cur.execute(swap.lock_table(second))


def batch_lock_timeout_ms(conn: psycopg.Connection, plan_s: float) -> int:
    """The lock_timeout of every backfill batch: the plan's, never above half the server's
    deadlock_timeout.

    Why below deadlock_timeout: a batch that waits for an application's row lock while it
    holds FOR SHARE on rows it locked before can be part of a deadlock when the application
    then touches one of those rows. PostgreSQL's detector runs in whichever backend has
    waited deadlock_timeout and aborts that one; a batch that gives up first means the
    application's transaction is never the victim.
    """
    row = conn.execute(backfill_sql.DEADLOCK_TIMEOUT_MS).fetchone()
    deadlock_ms = int(row[0]) if row else 1000
    return max(1, min(int(plan_s * 1000), deadlock_ms // 2))


def lock_holder(conn: psycopg.Connection, where: Composable, params: list) -> str | None:
    """'pid N, idle in transaction for 42 s' for the first session matching ``where``."""
    row = conn.execute(backfill_sql.holder(where), params).fetchone()
    if row is None:
        return None
    pid, state, in_state, in_xact, app = row
    text = f"pid {pid}, {state} for {in_state} s"
    if state != "idle in transaction" and in_xact is not None:
        text += f" (transaction open {in_xact} s)"
    return text + (f", application {app!r}" if app else "")
