"""Plan parsing and validation: pure, no database."""

import json
from datetime import datetime
from pathlib import Path

import pytest

from orchestrator.errors import PlanError
from orchestrator.plan import Interval, json_schema, load_plan, parse_duration, parse_plan

ROOT = Path(__file__).resolve().parents[2]
BASE = {"version": 1, "table": "public.orders",
        "partition_by": {"column": "created_at", "interval": "1 month", "premake": 3}}


def plan_with(**changes):
    data = json.loads(json.dumps(BASE))
    for path, value in changes.items():
        node = data
        *head, last = path.split("__")
        for h in head:
            node = node.setdefault(h, {})
        node[last] = value
    return data


@pytest.mark.parametrize("path", sorted((ROOT / "plans" / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_examples_are_valid(path):
    plan = load_plan(path)
    assert plan.version == 1
    assert plan.partition_by.interval_value.count >= 1


def test_at_least_two_examples():
    assert len(list((ROOT / "plans" / "examples").glob("*.yaml"))) >= 2


def test_schema_file_is_current():
    on_disk = json.loads((ROOT / "plans" / "schema.json").read_text())
    assert on_disk == json.loads(json.dumps(json_schema())), "run: orchestrate schema > plans/schema.json"


def test_defaults_and_derived_names():
    plan = parse_plan(BASE)
    assert str(plan.twin) == "public.orders_partitioned"
    assert str(plan.retired) == "public.orders_retired"
    assert str(plan.default_partition) == "public.orders_default"
    assert plan.backfill.range == "1 day"
    assert plan.cutover.lock_timeout_s == 0.2
    assert plan.partition_name(datetime(2024, 3, 1)).name == "orders_p2024_03"


@pytest.mark.parametrize("data, fragment", [
    (plan_with(partition_by__interval="7 parsecs"), "partition_by.interval: '7 parsecs' is not an interval"),
    (plan_with(table="public.orders; drop table x"), "table: 'public.orders; drop table x' is not a table name"),
    (plan_with(colour="blue"), "colour: unknown field"),
    (plan_with(partition_by__premake=-1), "partition_by.premake"),
    (plan_with(version=2), "version"),
    (plan_with(cutover__lock_timeout="soon"), "cutover.lock_timeout"),
    # PostgreSQL counts lock_timeout in whole milliseconds: 0.5ms would become 0, no timeout.
    (plan_with(cutover__lock_timeout="0.5ms"), "cutover.lock_timeout: must be at least 1ms"),
    (plan_with(backfill__lock_timeout="0.5ms"), "backfill.lock_timeout: must be at least 1ms"),
    (plan_with(backfill__lock_timeout="0s"), "backfill.lock_timeout: must be positive"),
    (plan_with(cutover__gate_timeout="-1 s"), "cutover.gate_timeout"),
    (plan_with(maintenance__interval="1 fortnight"), "maintenance.interval"),
    (plan_with(maintenance__interval="0 s"), "maintenance.interval: must be positive"),
    ({"version": 1, "table": "t"}, "partition_by: Field required"),
    (plan_with(names__retired="orders"), "must differ"),
])
def test_bad_plans_give_one_clear_line(data, fragment):
    with pytest.raises(PlanError) as e:
        parse_plan(data, "p.yaml")
    msg = str(e.value)
    assert fragment in msg and "\n" not in msg


def test_malformed_yaml(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("version: 1\ntable: [unclosed\n")
    with pytest.raises(PlanError, match=r"malformed YAML at line \d+"):
        load_plan(f)


def test_missing_file(tmp_path):
    with pytest.raises(PlanError, match="cannot read plan"):
        load_plan(tmp_path / "nope.yaml")


def test_shape_hash_ignores_tuning_but_not_shape():
    a = parse_plan(BASE)
    tuned = parse_plan(plan_with(backfill__batch_size=99, throttle__max_replica_lag_s=1))
    reshaped = parse_plan(plan_with(partition_by__interval="1 week"))
    assert a.shape_hash() == tuned.shape_hash()
    assert a.shape_hash() != reshaped.shape_hash()


@pytest.mark.parametrize("text, t, floor, nxt, suffix", [
    ("1 day", datetime(2024, 3, 18, 15, 4), datetime(2024, 3, 18), datetime(2024, 3, 19), "p2024_03_18"),
    ("1 week", datetime(2024, 3, 20), datetime(2024, 3, 18), datetime(2024, 3, 25), "p2024_03_18"),
    ("1 month", datetime(2024, 1, 31), datetime(2024, 1, 1), datetime(2024, 2, 1), "p2024_01"),
    ("3 months", datetime(2024, 5, 5), datetime(2024, 4, 1), datetime(2024, 7, 1), "p2024_04"),
    ("1 year", datetime(2024, 5, 5), datetime(2024, 1, 1), datetime(2025, 1, 1), "p2024"),
])
def test_interval_alignment(text, t, floor, nxt, suffix):
    iv = Interval.parse(text)
    assert iv.floor(t) == floor
    assert iv.add(floor) == nxt
    assert iv.suffix(floor) == suffix


def test_durations():
    assert parse_duration("200ms") == 0.2
    assert parse_duration("2s") == 2
    assert parse_duration("1 min") == 60
    assert parse_duration("2 hours") == parse_duration("2h") == 7200
    assert parse_duration("1 day") == 86400
    with pytest.raises(ValueError):
        parse_duration("forever")


def test_async_capture_is_refused_with_distribute():
    data = {"table": "public.orders", "partition_by": {"column": "created_at", "interval": "1 month"},
            "capture": {"mode": "async"}, "distribute": {"column": "customer_id"}}
    with pytest.raises(PlanError, match="capture.mode async is not supported with distribute"):
        parse_plan(data, "plan.yaml")
