"""The phases of a migration, in order, behind one small interface (:class:`Phase`).

Each phase module defines a class with:
- ``name``: a :class:`PhaseName`, its name in the state schema, the CLI (``--until``) and status;
- ``steps(ctx, pf)``: what it would do, as :class:`Step` rows (the `plan` command prints these;
  they are derived from the same facts the phase acts on; ``pf`` is the preflight's result);
  their order is :func:`orchestrator.phases.order.ordered`;
- ``run(ctx)``: do it; resumable: a step already recorded done is not repeated;
- ``undo(ctx)``: take its effect back; idempotent, and a no-op when there is nothing of its
  own to take back. Rollback walks the phases in reverse order and calls each one's undo.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

# The Context and the trigger names live below the phases (orchestrator/context.py), so
# that the modules the phases use (drift, distribute, maintain, horizon) can take a
# Context without importing the phases: the engine's imports have no cycle.
from orchestrator.context import FORWARD_TRIGGER, REVERSE_TRIGGER, Context, Preflight
from orchestrator.state.store import PhaseName

__all__ = ["Context", "FORWARD_TRIGGER", "REVERSE_TRIGGER", "Phase", "Step"]




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


class Phase(Protocol):
    """What the runner, `plan` and rollback need of a phase."""

    name: PhaseName

    def steps(self, ctx: Context, pf: Preflight | None = None) -> list[Step]: ...

    def run(self, ctx: Context) -> None: ...

    def undo(self, ctx: Context) -> None: ...
