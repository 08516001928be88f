"""The contract of ``orchestrate status --output json``: a pydantic model and its JSON schema.

CI pipelines and dashboards read this object (README "Status JSON"); ``runner.status``
builds it through :class:`Status`, so a field that is renamed or changes type fails here,
not in someone's pipeline. ``orchestrate schema status`` prints the schema and
``plans/status.schema.json`` is that output (a unit test keeps them equal).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

PhaseState = Literal["pending", "running", "done", "failed"]
MigrationStatus = Literal["running", "cut_over", "rolled_back", "finalized", "none"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PhaseStatus(_Model):
    """One phase of the migration, across every run of apply."""

    state: PhaseState
    duration_s: float = Field(description="Seconds spent in the phase, across runs.")
    started_at: str | None = None
    finished_at: str | None = None
    detail: dict[str, Any] = Field(default_factory=dict, description="e.g. rows, rows_per_s; for the cutover "
                                   "lock_held_ms and what was carried over.")


class Ranges(_Model):
    """Per-range progress of the backfill and verify."""

    total: int
    copied: int
    rows_copied: int
    verified: int
    mismatched: int
    batches: int
    last_checkpoint: str | None = Field(None, description="Time of the last committed batch.")
    mismatched_labels: list[str] = Field(default_factory=list, description="Ranges that failed verification "
                                         "(the first 50).")


class Gate(_Model):
    gate: str
    ok: bool
    detail: Any = None
    waits: Any = None


class Gates(_Model):
    """The cutover's readiness gates, as last checked."""

    checked_at: str
    ok: bool
    gates: list[Gate]


class Event(_Model):
    at: str
    kind: str
    message: str


class Replay(_Model):
    """Async capture: the change log, read when status ran."""

    pending: int | None = None
    oldest_s: float | None = None
    error: str | None = None


class Status(_Model):
    """What ``orchestrate status PLAN -o json`` prints (besides its ``message``)."""

    table: str
    status: MigrationStatus
    migration_id: int | None = None
    phase: str | None = None
    error: str | None = None
    plan_hash: str | None = Field(None, description="Shape hash recorded at the start.")
    plan_matches: bool | None = Field(None, description="False when the plan file changed (apply refuses).")
    started_at: str | None = None
    updated_at: str | None = None
    phases: dict[str, PhaseStatus] | None = None
    ranges: Ranges | None = None
    last_checkpoint: str | None = None
    controls: dict[str, Any] | None = Field(None, description="Settings given with pause, resume and set.")
    warnings: list[str] | None = None
    gates: Gates | None = None
    recent_events: list[Event] | None = None
    live: dict[str, Any] | None = Field(None, description="Figures the running apply writes every ~2 s "
                                        "(orchestrator/metrics.py lists them).")
    replay: Replay | None = None

    def data(self) -> dict[str, Any]:
        """The object as printed: only the fields this status has (no nulls added)."""
        return self.model_dump(exclude_unset=True)


def json_schema() -> dict[str, Any]:
    schema = Status.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "orchestrate status (--output json)"
    return schema
