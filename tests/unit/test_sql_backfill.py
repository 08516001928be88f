"""The backfill's, capture's and runner's own statements (orchestrator/sql/backfill.py,
sync.py, runner.py), rendered without a server."""

import pytest

from orchestrator.sql import QualifiedName
from orchestrator.sql import backfill as backfill_sql
from orchestrator.sql import runner as runner_sql
from orchestrator.sql import sync as sync_sql
from orchestrator.sql.compose import text

T = QualifiedName("app", "Order Items")
T_SQL = '"app"."Order Items"'
WHERE = '"Created At" >= %s AND "Created At" < %s'  # as range_predicate renders it


def test_batch_settings():
    assert text(backfill_sql.synchronous_commit("off")) == "SET LOCAL synchronous_commit = off"
    assert text(backfill_sql.lock_timeout(250)) == "SET LOCAL lock_timeout = 250"
    with pytest.raises(ValueError):
        backfill_sql.synchronous_commit("off; DROP TABLE x")


def test_repair():
    assert text(backfill_sql.lock_range(T, WHERE)) == f"SELECT 1 FROM {T_SQL} WHERE {WHERE} FOR SHARE"
    assert text(backfill_sql.delete_range(T, WHERE)) == f"DELETE FROM {T_SQL} WHERE {WHERE}"


def test_holders():
    assert text(backfill_sql.tuple_xmax(T)) == f"SELECT xmax::text FROM {T_SQL} WHERE ctid = %s::tid"
    q = text(backfill_sql.holder(backfill_sql.HOLDS_XID))
    assert q.startswith("SELECT a.pid, coalesce(a.state, 'unknown'), ")
    assert q.endswith("WHERE a.pid <> pg_catalog.pg_backend_pid() AND a.pid IN (SELECT l.pid FROM pg_catalog.pg_locks "
                      "l WHERE l.locktype = 'transactionid' AND l.granted AND l.transactionid::text = ANY(%s)) "
                      "ORDER BY a.xact_start LIMIT 1")
    assert "NOT LIKE 'orchestrate:%%'" in text(backfill_sql.holder(backfill_sql.HOLDS_ROW_LOCKS))


def test_capture_and_runner():
    fn = QualifiedName("orchestrate", "capture_truncate_3")
    assert text(sync_sql.drop_function(fn)) == 'DROP FUNCTION IF EXISTS "orchestrate"."capture_truncate_3"()'
    assert text(runner_sql.drop_table(QualifiedName("app", "Order Items_retired"))) == \
        'DROP TABLE "app"."Order Items_retired"'
    assert text(runner_sql.drop_function(QualifiedName("orchestrate", "exec_3"), "text")) == \
        'DROP FUNCTION IF EXISTS "orchestrate"."exec_3"(text)'
    assert text(runner_sql.replay_lag(QualifiedName("orchestrate", "replay_lag_3"))) == \
        'SELECT * FROM "orchestrate"."replay_lag_3"()'


def test_a_locked_step_sets_its_lock_timeout_in_whole_milliseconds():
    from orchestrator.sql.session import lock_timeout

    assert text(lock_timeout(0.2)) == "SET LOCAL lock_timeout = '200ms'"
    assert text(lock_timeout(0.0015)) == "SET LOCAL lock_timeout = '1ms'"
