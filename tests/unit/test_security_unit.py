"""Security rules that need no database: plan validation, redaction, rendered SQL, bindings."""

from __future__ import annotations

import sys

import pytest
from loguru import logger

from orchestrator import sql
from orchestrator.db import redact
from orchestrator.errors import PlanError
from orchestrator.metrics import MetricsServer
from orchestrator.owner import executor_function
from orchestrator.plan import env_value, parse_plan
from orchestrator.sql.compose import SQL, text
from orchestrator.sql.sync import sync_function
from orchestrator.sql.verify import range_digest

BASE = {"version": 1, "table": "public.orders", "partition_by": {"column": "created_at", "interval": "1 month"}}
SECRET = "Pw-unit-9f2c"


@pytest.mark.parametrize("value", ["0.5ms", "0.9ms", "0.0001", "0ms", "-1ms"])
def test_a_lock_timeout_under_one_millisecond_is_refused(value):
    """PostgreSQL counts lock_timeout in whole ms: below 1 ms it would become 0, no timeout."""
    with pytest.raises(PlanError) as e:
        parse_plan({**BASE, "cutover": {"lock_timeout": value}})
    assert e.value.exit_code == 2 and "lock_timeout" in str(e.value)


@pytest.mark.parametrize("value", ["1ms", "1.5ms", "0.001", "200ms"])
def test_a_lock_timeout_of_one_millisecond_or_more_is_accepted(value):
    assert parse_plan({**BASE, "cutover": {"lock_timeout": value}}).cutover.lock_timeout_s >= 0.001


def test_replica_dsns_are_stored_without_their_password():
    plan = parse_plan({**BASE, "throttle": {"replicas": [f"host=r1 user=u password={SECRET}",
                                                         f"postgresql://u:{SECRET}@r2/db"]}})
    stored = plan.for_state()
    assert SECRET not in str(stored)
    assert len(stored["throttle"]["replicas"]) == 2 and "r1" in stored["throttle"]["replicas"][0]
    assert SECRET in str(plan.model_dump())  # the plan in memory still connects with it


def test_dsn_env_names_a_variable_and_a_missing_one_is_a_plan_error(monkeypatch):
    plan = parse_plan({**BASE, "dsn_env": "ORDERS_DSN", "throttle": {"replicas_env": ["R1"]}})
    monkeypatch.setenv("R1", "host=r1")
    assert plan.throttle.all_replicas == ["host=r1"]
    monkeypatch.delenv("ORDERS_DSN", raising=False)
    with pytest.raises(PlanError) as e:
        env_value("ORDERS_DSN", "dsn_env")
    assert e.value.exit_code == 2 and "ORDERS_DSN" in str(e.value)
    for bad in ("1ABC", "A B", "$(x)", ""):
        with pytest.raises(PlanError):
            parse_plan({**BASE, "dsn_env": bad})


@pytest.mark.parametrize("dsn", [f"host=h user=u {SECRET}", f"host=h password='{SECRET}", f"password={SECRET} x"])
def test_an_unparsable_dsn_is_never_shown(dsn):
    assert SECRET not in redact(dsn)


def test_a_parsable_dsn_is_shown_without_its_password():
    shown = redact(f"host=h user=u password={SECRET} dbname=d")
    assert SECRET not in shown and "host=h" in shown


def test_owner_functions_pin_search_path_and_qualify_builtins():
    shape = sql.Shape(columns=("id", "created_at"), all_columns=("id", "created_at"), pk=("id",), key="created_at",
                      key_type="timestamp with time zone", key_nullable=False, pk_types=("bigint",))
    fn = sql.QualifiedName("orchestrate", "capture_1")
    body = text(sync_function(fn, sql.QualifiedName("public", "t_partitioned"), shape))
    assert "SET search_path = pg_catalog, pg_temp" in body
    ex = text(executor_function(sql.QualifiedName("orchestrate", "as_owner_1"), "app_owner"))
    assert "SET search_path = pg_catalog, pg_temp" in ex and "SET row_security = off" in ex
    assert "current_user OPERATOR(pg_catalog.<>) 'app_owner'::pg_catalog.name" in ex
    digest = text(range_digest(sql.QualifiedName("public", "t"), shape, SQL("true"), "hash"))
    assert "pg_catalog.hash_record_extended(" in digest and ", 0::pg_catalog.int8)" in digest
    assert " hash_record_extended(" not in digest.replace("pg_catalog.hash_record_extended(", "")


def test_metrics_listen_on_loopback_by_default():
    server = MetricsServer(0, None)  # port 0: any free port
    try:
        assert server.server.server_address[0] == "127.0.0.1"
    finally:
        server.stop()


def test_logging_never_prints_a_tracebacks_locals(capsys):
    """loguru's diagnose mode prints every local variable of a failing frame (a DSN's password)."""
    from orchestrator.cli.common import setup_logging

    def refuse(dsn: str) -> None:
        raise RuntimeError("boom")

    def connect_somewhere():
        dsn = f"host=h password={SECRET}"
        refuse(dsn)  # diagnose would print this line with dsn's value under it

    try:
        for fmt in ("text", "json"):
            setup_logging("DEBUG", fmt)
            try:
                connect_somewhere()
            except RuntimeError:
                logger.exception("failed")
        err = capsys.readouterr().err
        assert "boom" in err and SECRET not in err
    finally:
        logger.remove()
        logger.add(sys.stderr)
