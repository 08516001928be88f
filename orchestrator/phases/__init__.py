"""The phases of a migration, in order, behind one small interface (:class:`Phase`).

Each phase module defines a class with:
- ``name``: a :class:`PhaseName`, its name in the state schema, the CLI (``--until``) and status;
- ``steps(ctx, pf)``: what it would do, as :class:`Step` rows (the `plan` command prints these;
  they are derived from the same facts the phase acts on; ``pf`` is the preflight's result);
- ``run(ctx)``: do it; resumable: a step already recorded done is not repeated;
- ``undo(ctx)``: take its effect back; idempotent, and a no-op when there is nothing of its
  own to take back. Rollback walks the phases in reverse order and calls each one's undo.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import psycopg

from orchestrator.inspect import TableInfo
from orchestrator.plan import Plan
from orchestrator.sql import QualifiedName, Shape
from orchestrator.state.store import Migration, PhaseName, Store

if TYPE_CHECKING:
    from orchestrator.phases.prepare import Preflight

FORWARD_TRIGGER = "orchestrate_capture"
REVERSE_TRIGGER = "orchestrate_reverse"


@dataclass
class Step:
    """One planned action: shown by `plan`, with the lock it takes."""

    phase: str
    action: str
    sql: str
    lock: str
    estimate: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"phase": self.phase, "action": self.action, "sql": self.sql, "lock": self.lock, **(
            {"estimate": self.estimate} if self.estimate else {})}


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


class Phase(Protocol):
    """What the runner, `plan` and rollback need of a phase."""

    name: PhaseName

    def steps(self, ctx: Context, pf: Preflight | None = None) -> list[Step]: ...

    def run(self, ctx: Context) -> None: ...

    def undo(self, ctx: Context) -> None: ...


def ordered() -> list[Phase]:
    """The phases in the order apply runs them (rollback walks them in reverse)."""
    from orchestrator.phases.backfill import Backfill
    from orchestrator.phases.capture import Capture
    from orchestrator.phases.cutover import Cutover
    from orchestrator.phases.prepare import Prepare
    from orchestrator.phases.verify import Verify

    return [Prepare(), Capture(), Backfill(), Verify(), Cutover()]
