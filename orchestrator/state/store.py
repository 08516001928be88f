"""Reads and writes of the state schema, and the per-table advisory lock.

Writes that record the effect of a step take the step's own cursor, so the work and its
checkpoint commit in one transaction: a crash can never leave them out of step.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Any

import psycopg
from loguru import logger
from psycopg.conninfo import make_conninfo
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from orchestrator.db import connect
from orchestrator.errors import Busy, StateConflict

SCHEMA = "orchestrate"


class _Word(str, Enum):
    """A word stored in the state schema: compares equal to, prints and binds as its text."""

    def __str__(self) -> str:
        return self.value


class PhaseName(_Word):
    """The phases, in their order: names in the state schema, in `--until` and in status."""

    PREPARE = "prepare"
    CAPTURE = "capture"
    BACKFILL = "backfill"
    VERIFY = "verify"
    CUTOVER = "cutover"


class MigrationStatus(_Word):
    """Where a migration stands (orchestrate.migrations.status)."""

    RUNNING = "running"
    CUT_OVER = "cut_over"
    ROLLED_BACK = "rolled_back"
    FINALIZED = "finalized"


PHASES = tuple(p.value for p in PhaseName)
HEAD = "0001"
# Advisory lock namespace (first key of the two-int form): "orch" in ASCII.
LOCK_NAMESPACE = 0x6F726368
# alembic's command API runs env.py through module-level proxies (alembic.context, alembic.op)
# that one thread's run installs and removes: two threads upgrading at once (the maintain
# daemon runs one job per plan) break each other ("KeyError: 'config'"). One upgrade at a
# time per process; env.py's advisory lock serialises processes.
_UPGRADE_LOCK = threading.Lock()


# Why each condition: whoever owns the schema, one of its tables, or may create in it can
# put a trigger, rule or view there that runs with our rights when we write our state.
STATE_SCHEMA_PROBLEMS = """
SELECT 'the schema orchestrate is owned by ' || pg_catalog.pg_get_userbyid(n.nspowner)
  FROM pg_catalog.pg_namespace n WHERE n.nspname = 'orchestrate' AND n.nspowner <> r.oid
UNION ALL
SELECT 'role ' || pg_catalog.pg_get_userbyid(a.grantee) || ' may create objects in the schema orchestrate'
  FROM pg_catalog.pg_namespace n, pg_catalog.aclexplode(n.nspacl) a
 WHERE n.nspname = 'orchestrate' AND a.privilege_type = 'CREATE' AND a.grantee <> r.oid
UNION ALL
SELECT 'orchestrate.' || c.relname || ' is owned by ' || pg_catalog.pg_get_userbyid(c.relowner)
  FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = 'orchestrate' AND c.relowner <> r.oid
UNION ALL
SELECT 'orchestrate.' || c.relname || ' is a view'
  FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = 'orchestrate' AND c.relkind IN ('v', 'm')
UNION ALL
SELECT 'orchestrate.' || c.relname || ' has the trigger ' || t.tgname
  FROM pg_catalog.pg_trigger t JOIN pg_catalog.pg_class c ON c.oid = t.tgrelid
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = 'orchestrate' AND NOT t.tgisinternal
UNION ALL
SELECT 'orchestrate.' || c.relname || ' has the rule ' || w.rulename
  FROM pg_catalog.pg_rewrite w JOIN pg_catalog.pg_class c ON c.oid = w.ev_class
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = 'orchestrate' AND w.rulename <> '_RETURN'
UNION ALL
SELECT 'orchestrate.' || c.relname || ' has a row-level security policy'
  FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = 'orchestrate' AND c.relrowsecurity
"""


def check_state_schema(conn: psycopg.Connection) -> bool:
    """Refuse a state schema another role controls (StateConflict, exit 8); True when it exists.

    Run before every read or write of the state: the schema, its tables and the right to
    create in it must all be the running role's, with no trigger, rule or policy on them.
    """
    with conn.cursor() as cur:
        cur.execute(f"WITH r AS (SELECT oid FROM pg_catalog.pg_roles WHERE rolname = current_user) "
                    f"SELECT problem FROM r, LATERAL ({STATE_SCHEMA_PROBLEMS}) AS p(problem) LIMIT 1")
        row = cur.fetchone()
        if row:
            raise StateConflict(f"refusing to use the state schema: {row[0]}; it must belong to the role running "
                                f"orchestrate ({conn.info.user}) alone. Nothing was changed")
        cur.execute("SELECT pg_catalog.to_regnamespace('orchestrate') IS NOT NULL")
        return bool(cur.fetchone()[0])


def _at_head(conn: psycopg.Connection) -> bool:
    with conn.cursor() as cur:
        cur.execute("SELECT pg_catalog.to_regclass('orchestrate.alembic_version') IS NOT NULL")
        if not cur.fetchone()[0]:
            return False
        cur.execute("SELECT version_num FROM orchestrate.alembic_version")
        row = cur.fetchone()
        return bool(row and row[0] == HEAD)


def ensure_schema(conn: psycopg.Connection) -> None:
    """Create or upgrade the state schema with alembic (no-op when already at head)."""
    check_state_schema(conn)
    if _at_head(conn):
        return
    with _UPGRADE_LOCK:
        if not _at_head(conn):
            _upgrade(conn)
    check_state_schema(conn)
    logger.debug("state schema at {}", HEAD)


def _upgrade(conn: psycopg.Connection) -> None:
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import create_engine
    from sqlalchemy.pool import StaticPool

    # alembic needs a SQLAlchemy connection: wrap a fresh psycopg connection made from the
    # same parameters (never through a URL, so the password is never rendered).
    info = conn.info.get_parameters()
    password = conn.info.password

    def creator() -> psycopg.Connection:
        # One of our own sessions (orchestrator.db.connect): search_path pinned, as the
        # defaults alembic writes (now(), ...) bind to functions by search_path at CREATE; no
        # server-side prepared statements, and no setting left on a pooled server session.
        return connect(make_conninfo(**info, **({"password": password} if password else {})), "schema",
                       autocommit=False)

    engine = create_engine("postgresql+psycopg://", creator=creator, poolclass=StaticPool)
    cfg = Config(str(Path(__file__).with_name("alembic.ini")))
    cfg.set_main_option("script_location", str(Path(__file__).with_name("migrations")))
    try:
        with engine.begin() as sa_conn:
            cfg.attributes["connection"] = sa_conn
            command.upgrade(cfg, "head")
    finally:
        engine.dispose()


@dataclass
class Migration:
    id: int
    table_name: str
    plan_hash: str
    plan: dict
    status: str
    phase: str | None
    key_lo: str | None
    key_hi: str | None
    facts: dict
    error: str | None
    created_at: datetime
    updated_at: datetime
    phases: dict[str, dict] = field(default_factory=dict)

    def phase_state(self, name: str) -> str:
        return self.phases.get(name, {}).get("state", "pending")

    def done(self, name: str) -> bool:
        return self.phase_state(name) == "done"


class Store:
    """State schema access over one autocommit connection (the runner's main session)."""

    def __init__(self, conn: psycopg.Connection):
        self.conn = conn

    # --- migrations ------------------------------------------------------------------
    def _load(self, where: str, params: tuple) -> Migration | None:
        with self.conn.cursor(row_factory=dict_row) as cur:
            cur.execute(f"SELECT * FROM orchestrate.migrations WHERE {where} ORDER BY id DESC LIMIT 1", params)
            row = cur.fetchone()
            if not row:
                return None
            m = Migration(**row)
            cur.execute(
                "SELECT name, state, started_at, finished_at, seconds, detail FROM orchestrate.phases "
                "WHERE migration_id = %s",
                (m.id,),
            )
            m.phases = {r["name"]: r for r in cur.fetchall()}
        return m

    def live(self, table: str) -> Migration | None:
        return self._load("table_name = %s AND status IN ('running','cut_over')", (table,))

    def latest(self, table: str) -> Migration | None:
        return self._load("table_name = %s", (table,))

    def reload(self, m: Migration) -> Migration:
        out = self._load("id = %s", (m.id,))
        assert out is not None
        return out

    def create(self, table: str, plan_hash: str, plan: dict) -> Migration:
        with self.conn.transaction(), self.conn.cursor() as cur:
            cur.execute(
                "INSERT INTO orchestrate.migrations (table_name, plan_hash, plan) VALUES (%s, %s, %s) RETURNING id",
                (table, plan_hash, json.dumps(plan)),
            )
            mid = cur.fetchone()[0]
            for p in PHASES:
                cur.execute("INSERT INTO orchestrate.phases (migration_id, name) VALUES (%s, %s)", (mid, p))
        m = self._load("id = %s", (mid,))
        assert m is not None
        return m

    @staticmethod
    def set_status(cur: psycopg.Cursor, mid: int, status: str, phase: str | None = None) -> None:
        cur.execute(
            "UPDATE orchestrate.migrations SET status = %s, phase = coalesce(%s, phase), updated_at = now(), "
            "error = NULL WHERE id = %s",
            (status, phase, mid),
        )

    @staticmethod
    def set_facts(cur: psycopg.Cursor, mid: int, **facts: Any) -> None:
        cur.execute(
            "UPDATE orchestrate.migrations SET facts = facts || %s::jsonb, updated_at = now() WHERE id = %s",
            (json.dumps(facts, default=str), mid),
        )

    def set_error(self, mid: int, error: str | None) -> None:
        self.conn.execute("UPDATE orchestrate.migrations SET error = %s, updated_at = now() WHERE id = %s",
                          (error, mid))

    # --- phases ----------------------------------------------------------------------
    def phase_started(self, mid: int, name: str) -> None:
        self.conn.execute(
            "UPDATE orchestrate.phases SET state = 'running', started_at = coalesce(started_at, now()) "
            "WHERE migration_id = %s AND name = %s",
            (mid, name),
        )
        self.conn.execute("UPDATE orchestrate.migrations SET phase = %s, updated_at = now() WHERE id = %s", (name, mid))

    @staticmethod
    def phase_done(cur: psycopg.Cursor, mid: int, name: str, seconds: float, **detail: Any) -> None:
        cur.execute(
            "UPDATE orchestrate.phases SET state = 'done', finished_at = now(), seconds = seconds + %s, "
            "detail = detail || %s::jsonb WHERE migration_id = %s AND name = %s",
            (seconds, json.dumps(detail, default=str), mid, name),
        )

    def phase_add_time(self, mid: int, name: str, seconds: float, state: str | None = None, **detail: Any) -> None:
        self.conn.execute(
            "UPDATE orchestrate.phases SET seconds = seconds + %s, state = coalesce(%s, state), "
            "detail = detail || %s::jsonb WHERE migration_id = %s AND name = %s",
            (seconds, state, json.dumps(detail, default=str), mid, name),
        )

    @staticmethod
    def phase_reset(cur: psycopg.Cursor, mid: int, name: str) -> None:
        cur.execute(
            "UPDATE orchestrate.phases SET state = 'pending', finished_at = NULL WHERE migration_id = %s AND name = %s",
            (mid, name),
        )

    # --- ranges (the backfill's and verify's checkpoints) ---------------------------------
    @staticmethod
    def plan_ranges(cur: psycopg.Cursor, mid: int, ranges: list[dict], key_lo: str | None,
                    key_hi: str | None) -> None:
        """The backfill's ranges, once, with the key bounds they were cut from."""
        cur.executemany(
            "INSERT INTO orchestrate.ranges (migration_id, idx, label, lo, hi, is_null) VALUES (%s,%s,%s,%s,%s,%s)",
            [(mid, i, r["label"], r["lo"], r["hi"], r["is_null"]) for i, r in enumerate(ranges)],
        )
        cur.execute("UPDATE orchestrate.migrations SET key_lo = %s, key_hi = %s WHERE id = %s", (key_lo, key_hi, mid))

    # The copy of one batch and its checkpoint are ONE statement (one round trip, one
    # transaction): the executor call that copies as the owner, then this UPDATE of the range,
    # or of every range of a span (a batch over several adjacent ranges, copied whole: its
    # rows and its batch are counted on the first). Its parameters: the copy statement, the
    # ranges' idx (an array: one, or a span's in order), the new cursor (None when done), the
    # new state and the migration id. It returns the rows copied.
    BATCH_CHECKPOINT = (
        "WITH c AS (SELECT {copy} AS n, %s::int[] AS idxs) "
        "UPDATE orchestrate.ranges r SET cursor = %s::jsonb, "
        "rows_copied = r.rows_copied + CASE WHEN r.idx = c.idxs[1] THEN c.n ELSE 0 END, "
        "batches = r.batches + CASE WHEN r.idx = c.idxs[1] THEN 1 ELSE 0 END, state = %s, "
        "copied_at = pg_catalog.now(), verify_state = 'pending' "
        "FROM c WHERE r.migration_id = %s AND r.idx = ANY (c.idxs) RETURNING c.n")

    @classmethod
    def batch_checkpoint(cls, copy_call: str) -> str:
        """The batch statement around ``copy_call`` (an executor call returning the row count)."""
        return cls.BATCH_CHECKPOINT.format(copy=copy_call)

    @staticmethod
    def range_recopied(cur: psycopg.Cursor, mid: int, idx: int, rows: int) -> None:
        """A range copied again whole (--recopy, a carried column): copied, to be verified."""
        cur.execute(
            "UPDATE orchestrate.ranges SET cursor = NULL, rows_copied = %s, batches = batches + 1, state = 'copied', "
            "copied_at = now(), verify_state = 'pending', verify_detail = NULL WHERE migration_id = %s AND idx = %s",
            (rows, mid, idx),
        )

    @staticmethod
    def range_verified(cur: psycopg.Cursor | psycopg.Connection, mid: int, idx: int, result: dict) -> None:
        cur.execute(
            "UPDATE orchestrate.ranges SET verify_state = %s, verify_detail = %s, verified_at = now() "
            "WHERE migration_id = %s AND idx = %s",
            ("ok" if result["ok"] else "mismatch", Jsonb(result), mid, idx),
        )

    @staticmethod
    def ranges_to_repair(cur: psycopg.Cursor, mid: int, idxs: list[int] | None = None) -> None:
        """Mark ranges (all of them when ``idxs`` is None) for a whole re-copy and a new verify;
        the backfill and verify phases run again."""
        if idxs is None:
            cur.execute("UPDATE orchestrate.ranges SET state = 'repair', cursor = NULL, verify_state = 'pending' "
                        "WHERE migration_id = %s", (mid,))
        else:
            cur.execute("UPDATE orchestrate.ranges SET state = 'repair', verify_state = 'pending' "
                        "WHERE migration_id = %s AND idx = ANY(%s)", (mid, idxs))
        for p in ("backfill", "verify"):
            Store.phase_reset(cur, mid, p)

    @staticmethod
    def set_live(conn: psycopg.Connection, mid: int, figures: str) -> None:
        """The running apply's live figures (a JSON text) into facts.live, with phase and time."""
        conn.execute(
            "UPDATE orchestrate.migrations SET facts = jsonb_set(facts, '{live}', "
            "%s::jsonb || jsonb_build_object('phase', phase, 'updated_at', now())) WHERE id = %s",
            (figures, mid),
        )

    @staticmethod
    def heartbeat(conn: psycopg.Connection):
        """The throttle's heartbeat row (replicas read its age); returns the time written."""
        return conn.execute(
            "INSERT INTO orchestrate.heartbeat (id, ts) VALUES (1, clock_timestamp()) "
            "ON CONFLICT (id) DO UPDATE SET ts = excluded.ts RETURNING ts"
        ).fetchone()[0]

    # --- events ----------------------------------------------------------------------
    def event(self, mid: int | None, kind: str, message: str, **data: Any) -> None:
        try:
            self.conn.execute(
                "INSERT INTO orchestrate.events (migration_id, kind, message, data) VALUES (%s, %s, %s, %s)",
                (mid, kind, message, json.dumps(data, default=str)),
            )
        except psycopg.Error as e:  # an event is a log line: never let it fail the run
            logger.warning("could not record event {}: {}", kind, e)

    def events(self, mid: int, limit: int = 20, kind: str | None = None) -> list[dict]:
        with self.conn.cursor(row_factory=dict_row) as cur:
            cur.execute(
                "SELECT at, kind, message, data FROM orchestrate.events WHERE migration_id = %s "
                "AND (%s::text IS NULL OR kind = %s) ORDER BY id DESC LIMIT %s",
                (mid, kind, kind, limit),
            )
            return list(reversed(cur.fetchall()))

    # --- controls (runtime settings changed from another terminal) -------------------
    def controls(self, table: str) -> dict:
        row = self.conn.execute("SELECT settings FROM orchestrate.controls WHERE table_name = %s", (table,)).fetchone()
        return dict(row[0]) if row else {}

    def set_controls(self, table: str, **settings: Any) -> dict:
        row = self.conn.execute(
            "INSERT INTO orchestrate.controls (table_name, settings) VALUES (%s, %s::jsonb) "
            "ON CONFLICT (table_name) DO UPDATE SET settings = controls.settings || excluded.settings, "
            "updated_at = now() RETURNING settings",
            (table, json.dumps(settings)),
        ).fetchone()
        return dict(row[0])

    def clear_controls(self, table: str) -> None:
        self.conn.execute("DELETE FROM orchestrate.controls WHERE table_name = %s", (table,))

    # --- ranges ----------------------------------------------------------------------
    def ranges(self, mid: int) -> list[dict]:
        with self.conn.cursor(row_factory=dict_row) as cur:
            cur.execute("SELECT * FROM orchestrate.ranges WHERE migration_id = %s ORDER BY idx", (mid,))
            return cur.fetchall()

    def range_summary(self, mid: int) -> dict:
        row = self.conn.execute(
            """SELECT count(*), count(*) FILTER (WHERE state = 'copied'), coalesce(sum(rows_copied), 0),
                      count(*) FILTER (WHERE verify_state = 'ok'), count(*) FILTER (WHERE verify_state = 'mismatch'),
                      max(copied_at), coalesce(sum(batches), 0)
               FROM orchestrate.ranges WHERE migration_id = %s""",
            (mid,),
        ).fetchone()
        return {
            "total": row[0], "copied": row[1], "rows_copied": int(row[2]), "verified": row[3],
            "mismatched": row[4], "last_checkpoint": row[5].isoformat() if row[5] else None, "batches": int(row[6]),
        }


class MigrationLock:
    """Session-level advisory lock: one orchestrate process acts on a table at a time.

    Held on its own connection for the life of the command; a crash of the process ends
    the session and so frees the lock, which is what makes `apply` safe to re-run. Through a
    session-mode pool it holds just as well: the server session is ours until our client
    disconnects (then our DISCARD ALL, or the pool's server_reset_query after a crash, frees
    it). Through a transaction-mode pool it would mean nothing: db.connect refuses those.
    """

    def __init__(self, conn: psycopg.Connection, table: str):
        self.conn = conn
        self.table = table

    def acquire(self) -> None:
        # A lock session killed by idle_session_timeout would free the lock unnoticed: the
        # session is opened with idle_session_timeout = 0 (runner.session); say so if not.
        row = self.conn.execute("SELECT pg_catalog.current_setting('idle_session_timeout')").fetchone()
        if row[0] not in ("0", "0ms"):
            raise StateConflict(f"the migration lock's session has idle_session_timeout = {row[0]}: the server "
                                "would end it and free the lock unnoticed")
        row = self.conn.execute(
            "SELECT pg_try_advisory_lock(%s, hashtext(%s))", (LOCK_NAMESPACE, self.table)
        ).fetchone()
        if not row[0]:
            holder = self.conn.execute(
                """SELECT a.pid, a.application_name, a.client_addr::text, a.backend_start
                   FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
                   WHERE l.locktype = 'advisory' AND l.classid = %s::oid AND l.objid = hashtext(%s)::oid
                     AND l.granted LIMIT 1""",
                (LOCK_NAMESPACE, self.table),
            ).fetchone()
            who = f" (pid {holder[0]}, {holder[1]}, since {holder[3]:%Y-%m-%d %H:%M:%S})" if holder else ""
            raise Busy(f"another orchestrate run is acting on {self.table}{who}; wait for it or stop it")

    def held(self) -> bool:
        """Is the lock still ours? False when its session is gone (terminated, timed out)."""
        try:
            row = self.conn.execute(
                "SELECT count(*) FROM pg_catalog.pg_locks WHERE locktype = 'advisory' AND granted "
                "AND pid = pg_catalog.pg_backend_pid() AND classid = %s::oid "
                "AND objid = pg_catalog.hashtext(%s)::oid AND objsubid = 2",
                (LOCK_NAMESPACE, self.table)).fetchone()
        except psycopg.Error:
            return False
        return bool(row and row[0])

    def release(self) -> None:
        try:
            self.conn.execute("SELECT pg_advisory_unlock(%s, hashtext(%s))", (LOCK_NAMESPACE, self.table))
        except psycopg.Error:
            pass  # the session is gone, and with it the lock
