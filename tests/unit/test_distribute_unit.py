"""The plan's distribute section and the SQL of distributed mode, without a database."""

from __future__ import annotations

import pytest

from orchestrator.errors import PlanError
from orchestrator.plan import parse_plan
from orchestrator.sql import QualifiedName, Shape
from orchestrator.sql.compose import text
from orchestrator.sql.sync import sync_function

BASE = {"table": "public.orders", "partition_by": {"column": "created_at", "interval": "1 month"}}


def test_distribute_fields_parse():
    plan = parse_plan({**BASE, "distribute": {"column": "customer_id", "shard_count": 8, "colocate_with": "none"}})
    assert plan.distribute.column == "customer_id"
    assert plan.distribute.shard_count == 8
    assert plan.distribute.accept_no_rollback_after_cutover is False


@pytest.mark.parametrize("bad", [{"column": "customer_id", "shard_count": 0}, {"column": ""},
                                 {"column": "customer_id", "colour": "x"}, {}])
def test_distribute_bad_fields_are_one_line(bad):
    with pytest.raises(PlanError) as e:
        parse_plan({**BASE, "distribute": bad})
    assert "distribute" in str(e.value) and "\n" not in str(e.value)


def test_shape_hash_unchanged_without_distribute_and_covers_it():
    plain = parse_plan(BASE)
    dist = parse_plan({**BASE, "distribute": {"column": "customer_id"}})
    ack = parse_plan({**BASE, "distribute": {"column": "customer_id", "accept_no_rollback_after_cutover": True}})
    # A running single-node migration keeps its hash across this version.
    assert plain.shape_hash() == parse_plan({**BASE}).shape_hash()
    assert dist.shape_hash() != plain.shape_hash()
    # The acknowledgement does not change what is built: adding it to a running plan is allowed.
    assert ack.shape_hash() == dist.shape_hash()
    assert parse_plan({**BASE, "distribute": {"column": "customer_id", "shard_count": 4}}).shape_hash() \
        != dist.shape_hash()


def _shape(dist):
    return Shape(columns=("id", "customer_id", "created_at", "note"), all_columns=("id", "customer_id", "created_at",
                 "note"), pk=("id",), key="created_at", key_type="timestamp with time zone", key_nullable=False,
                 pk_types=("bigint",), dist=dist)


def test_twin_key_holds_the_distribution_column():
    assert _shape(None).twin_key == ("id", "created_at")
    assert _shape("customer_id").twin_key == ("id", "created_at", "customer_id")
    assert _shape("id").twin_key == ("id", "created_at")  # already in it


def test_sync_function_never_sets_the_distribution_column():
    """Citus refuses an UPDATE that assigns the distribution column: the trigger matches rows
    by it and treats a change of it as a move (DELETE + INSERT), like a key move."""
    fn = QualifiedName("orchestrate", "capture_1")
    body = text(sync_function(fn, QualifiedName("public", "orders_partitioned"), _shape("customer_id")))
    update_line = next(line for line in body.splitlines() if 'UPDATE "public"."orders_partitioned" SET' in line)
    assert '"customer_id" = NEW."customer_id"' not in update_line.split(" WHERE ")[0]
    assert '"customer_id" = OLD."customer_id"' in update_line
    assert 'NEW."customer_id"' in body.split("IS DISTINCT FROM")[0]


def test_create_distributed_table_sql():
    from orchestrator.distribute import distribute_twin_sql
    from orchestrator.phases import Context
    plan = parse_plan({**BASE, "distribute": {"column": "customer_id", "shard_count": 4,
                                              "colocate_with": "public.customers"}})
    ctx = Context(plan=plan, dsn="", conn=None, store=None, migration=None)  # type: ignore[arg-type]
    assert text(distribute_twin_sql(ctx)) == (
        "SELECT pg_catalog.create_distributed_table('public.orders_partitioned'::pg_catalog.regclass, "
        "'customer_id', colocate_with => 'public.customers', shard_count => 4)")
