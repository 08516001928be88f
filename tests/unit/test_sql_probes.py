"""The lag probes and the throttle's checks (orchestrator/sql/probes.py), without a server."""

from orchestrator.sql import probes
from orchestrator.sql.compose import text
from tests.unit.test_sql_catalog import relations, unqualified_non_catalog


def _text(statement) -> str:
    return statement if isinstance(statement, str) else text(statement)


def test_every_probe_names_only_catalog_or_qualified_relations():
    assert len(probes.__all__) == 10
    for n in probes.__all__:
        assert unqualified_non_catalog(_text(getattr(probes, n))) == set(), n


def test_heartbeat_is_the_state_schemas():
    assert relations(text(probes.HEARTBEAT_LAG_SQL)) == {"orchestrate.heartbeat"}
    assert "to_regclass('orchestrate.heartbeat')" in text(probes.HEARTBEAT_EXISTS_SQL)


def test_own_sessions_are_a_parameter():
    for statement in (probes.OLDEST_XACT_SQL, probes.XMIN_HORIZON_SQL, probes.ACTIVE_SESSIONS_SQL):
        assert "pid <> ALL (%s::int[])" in text(statement)
