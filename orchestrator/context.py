"""The Context every phase (and maintain, drift, distribute, horizon) works with, and the
session that builds it: the main connection, the table's advisory lock, the state store.

Below the phases in the import order: anything may take a Context without importing the
phases package.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg

from orchestrator.db import close_quietly, connect, is_connection_error
from orchestrator.errors import ConnectionFailed
from orchestrator.inspect import TableInfo
from orchestrator.plan import Plan
from orchestrator.sql import QualifiedName, Shape
from orchestrator.sql import runner as runner_sql
from orchestrator.state.store import Migration, MigrationLock, Store, check_state_schema, ensure_schema

__all__ = ["Context", "FORWARD_TRIGGER", "Preflight", "REVERSE_TRIGGER", "session"]

FORWARD_TRIGGER = "orchestrate_capture"
REVERSE_TRIGGER = "orchestrate_reverse"


@dataclass
class Preflight:
    """The facts and decisions the checks produced: partitions to make, warnings, estimates."""

    info: TableInfo
    partitions: list[tuple[str, str]]  # [lo, hi) as 'YYYY-MM-DD HH:MM:SS' (UTC)
    key_min: datetime | None
    key_max: datetime | None
    rows_to_default: int
    warnings: list[str] = field(default_factory=list)
    server_version: int = 0

    @property
    def estimates(self) -> dict:
        return {
            "rows": self.info.estimated_rows,
            "bytes": self.info.total_bytes,
            "partitions": len(self.partitions) + 1,
            "rows_to_default_partition": self.rows_to_default,
            "key_min": self.key_min.isoformat() if self.key_min else None,
            "key_max": self.key_max.isoformat() if self.key_max else None,
        }


@dataclass
class Context:
    """Everything a phase needs: the plan, the sessions, the recorded state, the table facts."""

    plan: Plan
    dsn: str
    conn: psycopg.Connection
    store: Store
    migration: Migration | None
    info: TableInfo | None = None
    replica_dsns: tuple[str, ...] = ()
    progress: Callable[[dict], None] | None = None
    now: Any = None  # datetime override for tests (maintain, premake)
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def mid(self) -> int:
        assert self.migration is not None
        return self.migration.id

    @property
    def facts(self) -> dict:
        return self.migration.facts if self.migration else {}

    def shape(self, info: TableInfo | None = None) -> Shape:
        info = info or self.info
        assert info is not None
        key = self.plan.partition_by.column
        col = info.column(key)
        assert col is not None
        types = {c.name: c.type for c in info.columns}
        return Shape(
            columns=tuple(info.writable_columns),
            all_columns=tuple(info.all_columns),
            pk=tuple(info.primary_key),
            key=key,
            key_type=col.type,
            key_nullable=not col.not_null,
            pk_types=tuple(types[c] for c in info.primary_key),
            eq_ops=tuple((c, info.eq_ops[c]) for c in info.primary_key if info.eq_ops.get(c)),
            dist=self.plan.distribute.column if self.plan.distribute is not None else None,
        )

    def function(self, kind: str) -> QualifiedName:
        """Trigger functions live in the state schema, named per migration."""
        return QualifiedName("orchestrate", f"{kind}_{self.mid}")

    def refresh(self) -> None:
        if self.migration is not None:
            self.migration = self.store.reload(self.migration)



@contextmanager
def session(plan: Plan, dsn: str, *, lock: bool = True, role: str = "main", state: bool = True) -> Iterator[Context]:
    """Open the main session and (with ``lock``) the table's advisory lock; with ``state``,
    make sure the state schema exists and load the live migration."""
    conn = connect(dsn, role)
    lock_conn = None
    held = None
    try:
        # Only an existing state schema is upgraded here; apply creates it after preflight.
        has_state = state and _state_tables(conn)
        if has_state:
            ensure_schema(conn)
        if lock:
            # A lock session killed by idle_session_timeout would free the lock unnoticed: a
            # connection parameter of this session alone (never a SET that could outlive it).
            lock_conn = connect(dsn, f"{role}-lock", settings={"idle_session_timeout": 0})
            held = MigrationLock(lock_conn, str(plan.table_name))
            held.acquire()
        store = Store(conn)
        ctx = Context(plan=plan, dsn=dsn, conn=conn, store=store,
                      migration=store.live(str(plan.table_name)) if has_state else None)
        if held is not None:
            ctx.options["lock"] = held
        yield ctx
    except psycopg.OperationalError as e:
        if is_connection_error(e):
            raise ConnectionFailed(f"lost the database connection: {str(e).strip().splitlines()[0]}") from None
        raise
    finally:
        if held:
            held.release()
        close_quietly(lock_conn)
        close_quietly(conn)


def _state_tables(conn: psycopg.Connection) -> bool:
    """Does the state schema hold our tables? Refuses (exit 8) a schema others control."""
    if not check_state_schema(conn):
        return False
    return conn.execute(runner_sql.STATE_TABLES_EXIST).fetchone()[0]


