"""The order of the phases: apply runs them in it, rollback walks it in reverse."""

from __future__ import annotations

from orchestrator.phases import Phase
from orchestrator.phases.backfill import Backfill
from orchestrator.phases.capture import Capture
from orchestrator.phases.cutover import Cutover
from orchestrator.phases.prepare import Prepare
from orchestrator.phases.verify import Verify

__all__ = ["ordered"]


def ordered() -> list[Phase]:
    """The phases in the order apply runs them (rollback walks them in reverse)."""
    return [Prepare(), Capture(), Backfill(), Verify(), Cutover()]
