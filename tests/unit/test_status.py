"""The status JSON contract (orchestrator/status.py): the schema file, the shape it enforces."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from orchestrator.status import Status, json_schema

ROOT = Path(__file__).resolve().parents[2]

RUNNING = {
    "table": "public.orders", "migration_id": 3, "status": "running", "phase": "backfill", "error": None,
    "plan_hash": "abc", "plan_matches": True, "started_at": "2026-11-21T10:00:00+00:00",
    "updated_at": "2026-11-21T10:00:05+00:00",
    "phases": {"prepare": {"state": "done", "duration_s": 1.5, "started_at": "2026-11-21T10:00:00+00:00",
                           "finished_at": "2026-11-21T10:00:01+00:00", "detail": {"partitions": 4}},
               "backfill": {"state": "running", "duration_s": 4.0, "started_at": None, "finished_at": None,
                            "detail": {}}},
    "ranges": {"total": 9, "copied": 4, "rows_copied": 1200, "verified": 0, "mismatched": 0, "batches": 12,
               "last_checkpoint": "2026-11-21T10:00:04+00:00", "mismatched_labels": []},
    "last_checkpoint": "2026-11-21T10:00:04+00:00", "controls": {"paused": True}, "warnings": ["w"],
    "gates": None, "recent_events": [{"at": "2026-11-21T10:00:02+00:00", "kind": "throttle", "message": "m"}],
    "live": {"phase": "backfill", "rows": 1200},
}


def test_schema_file_is_current():
    on_disk = json.loads((ROOT / "plans" / "status.schema.json").read_text())
    assert on_disk == json.loads(json.dumps(json_schema())), "run: orchestrate schema status > plans/status.schema.json"


def test_a_status_is_printed_as_built_no_field_added():
    assert Status(**RUNNING).data() == RUNNING
    assert Status(status="none", table="public.orders").data() == {"status": "none", "table": "public.orders"}


@pytest.mark.parametrize("change", [
    {"status": "paused"},                                    # not a status
    {"surprise": 1},                                         # not a field
    {"ranges": {**RUNNING["ranges"], "copied": "four"}},     # a type
    {"phases": {"backfill": {"state": "halfway", "duration_s": 1}}},
])
def test_the_contract_refuses_what_it_does_not_document(change):
    with pytest.raises(ValidationError):
        Status(**{**RUNNING, **change})


def test_stored_words_behave_as_their_text():
    """PhaseName and MigrationStatus are compared with, formatted into and bound as text."""
    from orchestrator.state.store import PHASES, MigrationStatus, PhaseName

    assert PHASES == ("prepare", "capture", "backfill", "verify", "cutover")
    assert f"{PhaseName.CUTOVER}" == str(PhaseName.CUTOVER) == "cutover" == PhaseName.CUTOVER
    assert {"cut_over": 1}[MigrationStatus.CUT_OVER] == 1 and json.dumps([MigrationStatus.RUNNING]) == '["running"]'
