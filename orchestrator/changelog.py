"""Asynchronous capture (``capture: {mode: async}``): a narrow change log and its replay.

The capture trigger does not write the twin. It appends the key of each changed row, the
twin's key (pk..., partition key), OLD and NEW when an UPDATE moves it, to a log table in
the writer's transaction (``<table>_changes``, owned by the table's owner, WAL-logged: it
must survive a crash). A TRUNCATE appends a marker. A writer pays one narrow insert into a
table with one index instead of a write into an equally indexed twin.

Replay (:class:`Replayer`, a thread of ``apply``; :func:`replay_batch` under the cutover's
lock) takes a batch of log rows and SYNCS THOSE KEYS from the live table: it deletes the
twin's rows with the logged keys, inserts the live table's current rows with those primary
keys, and deletes exactly the log rows it took, all in one transaction (one call of the
owner's ``replay_<id>`` function). The log is its own checkpoint: a crash mid-batch rolls
the batch back and it is replayed again; replaying a key twice is harmless.

Why it is right whatever the writers do (isolation level, key moves, upserts, COPY, bulk
statements, session_replication_role=replica): replay never applies a logged change, it
copies the latest committed row. The one ordering that matters is that the batch's log
rows are read no later than the live rows: a change committed after the live rows were
read has its own log row, which this batch did not take (it deletes its rows by sequence
number, never by key), so it is replayed again. No row lock is needed for that, so replay
never blocks a writer (the backfill keeps its FOR SHARE windows, see backfill_copy).

Verification at a consistent point: in one REPEATABLE READ snapshot, the keys pending in
the log are exactly the rows that may differ; verify compares both tables without them
(:func:`pending_filter`). Cutover: a readiness gate waits until the log is nearly drained;
under the ACCESS EXCLUSIVE lock (no writer can add to the log) the rest is replayed, with
a bound: more than ``capture.max_lock_replay`` pending rolls the attempt back and retries.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from loguru import logger

from orchestrator import sql
from orchestrator.db import close_quietly, connect, is_connection_error
from orchestrator.owner import EXECUTOR, acting_mode, as_owner_sql, give_to_owner
from orchestrator.sql import QualifiedName, Shape, column_list, fit_name, ident, literal

SEQ = "orchestrate_seq"
TRUNCATE = "orchestrate_truncate"
AT = "orchestrate_at"
GONE = "orchestrate_gone"
REPLAY = "replay"
LAG = "replay_lag"


def log_table(plan) -> QualifiedName:
    """The change log: next to the table, owned by its owner (the trigger runs as the owner)."""
    return plan.table_name.with_name(fit_name(plan.table_name.name, "_changes"))


def is_async(ctx) -> bool:
    return ctx.plan.capture.mode == "async"


# --- rendering (pure) ------------------------------------------------------------------------

def create_log(log: QualifiedName, src: QualifiedName, shape: Shape) -> list[str]:
    """The log's columns are the twin's key columns, made from the table itself (CREATE TABLE
    AS ... WITH NO DATA), so they keep its types and collations exactly; then the sequence
    number, the TRUNCATE marker and the time the change was logged (for the lag)."""
    return [
        f"CREATE TABLE {log} AS SELECT {column_list(list(shape.twin_key))} FROM ONLY {src} WITH NO DATA",
        f"ALTER TABLE {log} ADD COLUMN {SEQ} bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, "
        f"ADD COLUMN {TRUNCATE} boolean NOT NULL DEFAULT false, "
        f"ADD COLUMN {GONE} boolean NOT NULL DEFAULT false, "
        f"ADD COLUMN {AT} timestamptz NOT NULL DEFAULT pg_catalog.statement_timestamp()",
        # Replay and verify read the log by key; an index keeps the anti-join cheap when it grows.
        f"CREATE INDEX ON {log} ({column_list(list(shape.pk))})",
    ]


def log_function(fn: QualifiedName, log: QualifiedName, shape: Shape) -> str:
    """The row trigger: one narrow INSERT of the changed row's twin key (OLD and NEW when an
    UPDATE changes it). Nothing else; no read of any table. A key the row left (DELETE, the
    OLD key of a move) is marked ``gone``: only such keys can leave a twin row to delete."""
    cols = column_list(list(shape.twin_key))
    gcols = cols + f", {GONE}"
    new, old = column_list(list(shape.twin_key), "NEW."), column_list(list(shape.twin_key), "OLD.")
    changed = sql._key_changed(shape)
    return f"""CREATE OR REPLACE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $orchestrate$
BEGIN
  IF TG_OP = 'INSERT' THEN
    INSERT INTO {log} ({cols}) VALUES ({new});
  ELSIF TG_OP = 'DELETE' THEN
    INSERT INTO {log} ({gcols}) VALUES ({old}, true);
  ELSIF {changed} THEN
    INSERT INTO {log} ({gcols}) VALUES ({old}, true), ({new}, false);
  ELSE
    INSERT INTO {log} ({cols}) VALUES ({new});
  END IF;
  RETURN NULL;
END
$orchestrate$"""


def truncate_log_function(fn: QualifiedName, log: QualifiedName) -> str:
    return f"""CREATE OR REPLACE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $orchestrate$
BEGIN
  INSERT INTO {log} ({TRUNCATE}) VALUES (true);
  RETURN NULL;
END
$orchestrate$"""


def _match(shape: Shape, cols: tuple[str, ...], left: str, right: str) -> str:
    return " AND ".join(f"{left}.{ident(c)} {shape.eq(c)} {right}.{ident(c)}" for c in cols)


def replay_function(fn: QualifiedName, src: QualifiedName, twin: QualifiedName, log: QualifiedName,
                    shape: Shape, owner: str) -> str:
    """``fn(n integer) RETURNS bigint``: replay up to n log rows (oldest first), return how many.

    1. Take the batch: the sequence numbers of the n oldest committed log rows (one snapshot).
    2. A TRUNCATE marker in the batch: empty the twin (DELETE, not TRUNCATE: no lock that
       would wait for the backfill). Every row the table holds now was inserted after that
       TRUNCATE, so it has a log row later than the marker, which a batch can only take with
       or after the marker: it is copied again.
    3. Delete the twin's rows with the batch's gone keys (DELETEs, the OLD keys of moves)
       that the live table no longer has at that (pk..., key) (the partition key prunes the partitions; the
       primary-key columns are matched exactly).
    4. Upsert the live table's current rows with the batch's primary keys (read after step 1:
       a change committed after this read has a log row this batch did not take): an UPDATE
       in place for a row the twin holds (HOT where no indexed column changed: a delete and
       insert would write every index again), an INSERT otherwise. A backfill window in
       flight may insert the same row: it copies the same latest version (it holds the row
       with FOR SHARE), so either write is right.
    5. Delete exactly the batch's log rows, by sequence number, never by key.
    """
    pk, key = shape.pk, shape.key
    tk = shape.twin_key
    cols = column_list(list(shape.columns))
    batch = f"l.{SEQ} OPERATOR(pg_catalog.=) ANY (s) AND NOT l.{TRUNCATE}"

    # A twin row (pk, k) exists only because the live table had a row at (pk, k) when it was
    # copied; the row leaves (pk, k) only by a DELETE or a move, logged as gone (or by a
    # TRUNCATE, the marker): the delete step looks at those keys alone.
    gone = f"{batch} AND l.{GONE}"

    def values(c: str, where: str = batch) -> str:
        # An initplan: evaluated once, then an index condition (and partition pruning for the key).
        return f"ARRAY(SELECT DISTINCT l.{ident(c)} FROM {log} l WHERE {where})"

    def in_batch(alias: str, where: str = batch) -> str:
        conds = [f"{alias}.{ident(c)} {shape.eq(c)} ANY ({values(c, where)})" for c in pk if c != key]
        if len(pk) > 1 or not conds:
            # The arrays drive the index scan; the exact key tuple comes from the batch itself.
            conds.append(f"EXISTS (SELECT 1 FROM {log} l WHERE {where} AND {_match(shape, tuple(pk), alias, 'l')})")
        return " AND ".join(conds)

    def still_there() -> str:
        # The live row with this twin row's (pk..., key), if any: then the row stays (the
        # upsert below refreshes it in place, a HOT update where the indexes allow).
        conds = [f"s.{ident(c)} {shape.eq(c)} t.{ident(c)}" for c in tk if c != key or not shape.key_nullable]
        if shape.key_nullable:
            k = ident(key)
            conds.append(f"(s.{k} = t.{k} OR (s.{k} IS NULL AND t.{k} IS NULL))")
        return f"EXISTS (SELECT 1 FROM ONLY {src} s WHERE {' AND '.join(conds)})"

    key_cond = f"(t.{ident(key)} = ANY ({values(key, gone)})"
    if shape.key_nullable:
        key_cond += f" OR (has_null AND t.{ident(key)} IS NULL)"
    key_cond += ")"
    sets = ", ".join(f"{ident(c)} = EXCLUDED.{ident(c)}" for c in shape.columns if c not in tk)
    conflict = f"DO UPDATE SET {sets}" if sets else "DO NOTHING"
    return f"""CREATE OR REPLACE FUNCTION {fn}(n integer) RETURNS bigint LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp SET row_security = off AS $orchestrate$
DECLARE
  s bigint[];
  trunc boolean;
  has_null boolean;
  any_gone boolean;
  has_rows boolean;
BEGIN
  IF current_user OPERATOR(pg_catalog.<>) {literal(owner)}::pg_catalog.name THEN
    RAISE EXCEPTION 'orchestrate: % runs as %, not as the table owner', {literal(str(fn))}, current_user;
  END IF;
  SELECT pg_catalog.array_agg(b.{SEQ}), pg_catalog.bool_or(b.{TRUNCATE}) INTO s, trunc
    FROM (SELECT {SEQ}, {TRUNCATE} FROM {log} ORDER BY {SEQ} LIMIT n) b;
  IF s IS NULL THEN
    RETURN 0;
  END IF;
  IF trunc THEN
    DELETE FROM {twin};
  END IF;
  SELECT pg_catalog.count(*) > 0, pg_catalog.bool_or(l.{GONE}), pg_catalog.bool_or(l.{GONE} AND
         l.{ident(key)} IS NULL) INTO STRICT has_rows, any_gone, has_null
    FROM {log} l WHERE {batch};
  IF any_gone THEN
    DELETE FROM {twin} t WHERE {key_cond} AND {in_batch('t', gone)} AND NOT {still_there()};
  END IF;
  IF has_rows THEN
    INSERT INTO {twin} ({cols}) OVERRIDING SYSTEM VALUE
      SELECT {cols} FROM ONLY {src} t WHERE {in_batch('t')}
      ON CONFLICT ({column_list(list(tk))}) {conflict};
  END IF;
  DELETE FROM {log} WHERE {SEQ} OPERATOR(pg_catalog.=) ANY (s);
  RETURN pg_catalog.cardinality(s);
END
$orchestrate$"""


def lag_function(fn: QualifiedName, log: QualifiedName) -> str:
    """``fn() -> (pending bigint, oldest_s float8)``: log rows waiting and the age of the oldest."""
    return f"""CREATE OR REPLACE FUNCTION {fn}(OUT pending bigint, OUT oldest_s double precision)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $orchestrate$
SELECT pg_catalog.count(*), coalesce(extract(epoch FROM pg_catalog.clock_timestamp() OPERATOR(pg_catalog.-)
       pg_catalog.min({AT}))::double precision, 0) FROM {log}
$orchestrate$"""


def pending_filter(shape: Shape, log: QualifiedName, table: QualifiedName) -> str:
    """A condition on ``table``'s rows: not pending in the log (verify's consistent point).

    In one snapshot, a key that is not in the log has its latest change replayed: the twin
    holds the live row exactly. A pending key may differ; replay will sync it."""
    return (f"NOT EXISTS (SELECT 1 FROM {log} l WHERE NOT l.{TRUNCATE} AND "
            f"{_match(shape, tuple(shape.pk), 'l', str(table))})")


# --- acting on the database ------------------------------------------------------------------

def install(cur: psycopg.Cursor, ctx, trigger: str) -> None:
    """Create the log (once), the capture functions and triggers that append to it, and the
    replay and lag functions (again after a carried column: replay copies every column).

    Warning: takes SHARE ROW EXCLUSIVE on the table (CREATE TRIGGER); call inside with_lock_retry."""
    plan = ctx.plan
    shape = ctx.shape()
    log = log_table(plan)
    owner = ctx.info.owner if ctx.info is not None else ctx.facts["owner"]
    run_as_owner = as_owner_sql(ctx.function(EXECUTOR))
    if cur.execute("SELECT pg_catalog.to_regclass(%s)", (str(log),)).fetchone()[0] is None:
        for stmt in create_log(log, plan.table_name, shape):
            # As the owner (through the executor): the owner's trigger function writes it.
            cur.execute(run_as_owner, [stmt])
        if acting_mode(cur, owner) != "owner":
            cur.execute(run_as_owner, [f"GRANT SELECT ON {log} TO {ident(cur.connection.info.user)}"])
    fn, tfn = ctx.function("capture"), ctx.function("capture_truncate")
    cur.execute(log_function(fn, log, shape))
    cur.execute(truncate_log_function(tfn, log))
    for f in (fn, tfn):
        give_to_owner(cur, f"{f}()", owner)
    cur.execute(replay_function(ctx.function(REPLAY), plan.table_name, plan.twin, log, shape, owner))
    give_to_owner(cur, f"{ctx.function(REPLAY)}(integer)", owner, executable_by_us=True)
    cur.execute(lag_function(ctx.function(LAG), log))
    give_to_owner(cur, f"{ctx.function(LAG)}()", owner, executable_by_us=True)
    for stmt in sql.drop_sync_triggers(plan.table_name, trigger) + sql.create_sync_triggers(
            plan.table_name, trigger, fn, tfn):
        cur.execute(stmt)


def drop(cur: psycopg.Cursor, ctx) -> None:
    """Drop the log and the replay functions (the triggers and capture functions go with the
    sync ones: same names). Idempotent; a no-op for a sync migration."""
    log = log_table(ctx.plan)
    oid = cur.execute("SELECT pg_catalog.to_regclass(%s)::oid", (str(log),)).fetchone()[0]
    # Only the log this migration created (its oid is recorded with the capture), never a
    # same-named table of the user's.
    if oid is not None and oid == ctx.facts.get("change_log_oid"):
        cur.execute(f"DROP TABLE {log}")
    cur.execute(f"DROP FUNCTION IF EXISTS {ctx.function(REPLAY)}(integer)")
    cur.execute(f"DROP FUNCTION IF EXISTS {ctx.function(LAG)}()")


def exists(conn: psycopg.Connection | psycopg.Cursor, ctx) -> bool:
    return conn.execute("SELECT pg_catalog.to_regprocedure(%s) IS NOT NULL",
                        (f"{ctx.function(REPLAY)}(integer)",)).fetchone()[0]


def replay_batch(cur: psycopg.Cursor | psycopg.Connection, ctx, n: int) -> int:
    return int(cur.execute(f"SELECT {ctx.function(REPLAY)}(%s)", (n,)).fetchone()[0])


def lag_sql(ctx) -> str:
    """(changes waiting, age in seconds of the oldest) of this migration's change log."""
    return f"SELECT * FROM {ctx.function(LAG)}()"


def lag(cur: psycopg.Cursor | psycopg.Connection, ctx) -> tuple[int, float]:
    pending, oldest = cur.execute(lag_sql(ctx)).fetchone()
    return int(pending), float(oldest)


def pending_truncate(cur: psycopg.Cursor, ctx) -> bool:
    log = log_table(ctx.plan)
    return bool(cur.execute(f"SELECT EXISTS (SELECT 1 FROM {log} WHERE {TRUNCATE})").fetchone()[0])


def drain_locked(cur: psycopg.Cursor, ctx) -> int:
    """Under the cutover's ACCESS EXCLUSIVE lock: replay what is left, in this transaction.

    Bounded by ``capture.max_lock_replay``: more pending rolls the attempt back (as a lock
    attempt that failed: the replayer catches up before the next one), so the hold stays
    within the lock budget whatever the write rate was."""
    pending, _ = lag(cur, ctx)
    cap = ctx.plan.capture.max_lock_replay
    if pending > cap:
        raise psycopg.errors.LockNotAvailable(
            f"change log: {pending} changes pending, more than capture.max_lock_replay ({cap}) to replay "
            "under the lock")
    done = 0
    while True:
        n = replay_batch(cur, ctx, max(cap, 1))
        done += n
        if n == 0:
            return done


class Replayer:
    """The replay thread of one ``apply``: batches from the log into the twin, continuously,
    on its own session, from the moment the capture functions exist until apply ends.

    Not stopped by ``pause`` (which holds the backfill only): the twin must keep up.
    :meth:`held` keeps it out while the cutover drains under its lock."""

    def __init__(self, ctx, batch: int, idle_s: float = 0.05):
        self.ctx = ctx
        self.batch = batch
        self.idle_s = idle_s
        self.pending: int | None = None
        self.oldest_s: float | None = None
        self.replayed = 0
        self.error: str | None = None
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="replay", daemon=True)

    def start(self) -> Replayer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    @contextmanager
    def held(self) -> Iterator[None]:
        with self._mutex:
            yield

    def _run(self) -> None:
        conn = None
        backoff = 0.5
        last_lag = 0.0
        while not self._stop.is_set():
            try:
                if conn is None or conn.closed:
                    conn = connect(self.ctx.dsn, "replay", autocommit=True)
                with self._mutex:
                    if not exists(conn, self.ctx):
                        n = 0
                    else:
                        n = replay_batch(conn, self.ctx, self.batch)
                        self.replayed += n
                        if n < self.batch or time.monotonic() - last_lag > 1.0:
                            self.pending, self.oldest_s = lag(conn, self.ctx)
                            last_lag = time.monotonic()
                self.error = None
                backoff = 0.5
                if n < self.batch:
                    self._stop.wait(self.idle_s if n else max(self.idle_s, 0.2))
            except psycopg.Error as e:
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                if self.error != msg:
                    logger.warning("replay: {} (retrying)", msg)
                self.error = msg
                if conn is not None and (conn.broken or is_connection_error(e)):
                    close_quietly(conn)
                    conn = None
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
        close_quietly(conn)


@contextmanager
def replaying(ctx) -> Iterator[Replayer | None]:
    """For an async apply: the replay thread in ``ctx.options["replayer"]`` (and in the live
    figures). ``ctx.options["replay"] = False`` (tests only) runs without it."""
    if not is_async(ctx) or ctx.options.get("replay") is False:
        yield None
        return
    r = Replayer(ctx, ctx.plan.capture.replay_batch).start()
    ctx.options["replayer"] = r
    live = ctx.options.get("live")
    if live is not None:
        live.replayer = r
    try:
        yield r
    finally:
        r.stop()
        ctx.options.pop("replayer", None)
