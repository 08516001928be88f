"""The backfill's, capture's and runner's own statements (orchestrator/sql/backfill.py,
sync.py, runner.py), rendered without a server."""

import pytest

from orchestrator.sql import QualifiedName, Shape
from orchestrator.sql import backfill as backfill_sql
from orchestrator.sql import runner as runner_sql
from orchestrator.sql import sync as sync_sql
from orchestrator.sql.compose import SQL, text

T = QualifiedName("app", "Order Items")
T_SQL = '"app"."Order Items"'
WHERE = '"Created At" >= %s AND "Created At" < %s'  # as range_predicate renders it


def test_batch_settings():
    assert text(backfill_sql.synchronous_commit("off")) == "SET LOCAL synchronous_commit = off"
    assert text(backfill_sql.lock_timeout(250)) == "SET LOCAL lock_timeout = 250"
    with pytest.raises(ValueError):
        backfill_sql.synchronous_commit("off; DROP TABLE x")


def test_repair():
    assert text(backfill_sql.lock_range(T, SQL(WHERE))) == f"SELECT 1 FROM {T_SQL} WHERE {WHERE} FOR SHARE"
    assert text(backfill_sql.delete_range(T, SQL(WHERE))) == f"DELETE FROM {T_SQL} WHERE {WHERE}"
    # A str would be formatted as the literal '...': refused, never a WHERE that matches all.
    with pytest.raises(TypeError):
        backfill_sql.delete_range(T, WHERE)


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


SHAPE = Shape(columns=("id", "note", "created_at"), all_columns=("id", "note", "created_at", "total"),
              pk=("id",), key="created_at", key_type="timestamp with time zone", key_nullable=False,
              pk_types=("bigint",))
ORD, OW = QualifiedName("public", "orders"), QualifiedName("public", "orders_partitioned")
TS = "%s::timestamp with time zone"


def test_range_predicates():
    where, params = backfill_sql.range_predicate(SHAPE, "2024-01-01 00:00:00", "2024-01-02 00:00:00", False)
    assert text(where) == f'"created_at" >= {TS} AND "created_at" < {TS}'
    assert params == ["2024-01-01 00:00:00", "2024-01-02 00:00:00"]
    assert text(backfill_sql.range_predicate(SHAPE, None, "2024-01-02 00:00:00", False)[0]) == f'"created_at" < {TS}'
    assert text(backfill_sql.range_predicate(SHAPE, None, None, False)[0]) == '"created_at" IS NOT NULL'
    assert backfill_sql.range_predicate(SHAPE, "x", "y", True)[1] == []


def test_backfill_copy_locks_source_rows_in_a_value_window():
    where, _ = backfill_sql.range_predicate(SHAPE, "2024-01-01 00:00:00", "2024-01-02 00:00:00", False)
    stmt = text(backfill_sql.backfill_copy(ORD, OW, SHAPE, where, after=True, upto=True, is_null=False))
    assert stmt == (
        'INSERT INTO "public"."orders_partitioned" ("id", "note", "created_at") OVERRIDING SYSTEM VALUE '
        'SELECT "id", "note", "created_at" FROM "public"."orders" '
        f'WHERE "created_at" >= {TS} AND "created_at" < {TS} '
        f'AND ("created_at", "id") > ({TS}, %s::bigint) AND ("created_at", "id") <= ({TS}, %s::bigint) '
        "FOR SHARE ON CONFLICT DO NOTHING")
    assert "LIMIT" not in stmt  # the window is bounded by values, never by a count
    first = text(backfill_sql.backfill_copy(ORD, OW, SHAPE, where, after=False, upto=True, is_null=False,
                                            on_conflict=False))
    assert first.endswith(f'AND ("created_at", "id") <= ({TS}, %s::bigint) FOR SHARE')


def test_a_first_window_counts_the_range_from_the_key_alone():
    where, _ = backfill_sql.range_predicate(SHAPE, "2024-01-01 00:00:00", None, False)
    assert text(backfill_sql.rows_up_to(ORD, where)) == (
        f'SELECT pg_catalog.count(*) FROM (SELECT 1 FROM "public"."orders" WHERE "created_at" >= {TS} LIMIT %s) AS w')


def test_backfill_boundary_probe_and_null_range():
    where, params = backfill_sql.range_predicate(SHAPE, None, None, True)
    assert text(where) == '"created_at" IS NULL' and params == []
    # ORDER BY the table's column (s.id), not the output column id::text ('10' < '9').
    assert text(backfill_sql.backfill_boundary(ORD, SHAPE, where, after=True, is_null=True)) == (
        'SELECT "s"."id"::text FROM "public"."orders" AS s WHERE "created_at" IS NULL AND ("id") > (%s::bigint) '
        'ORDER BY "s"."id" OFFSET %s LIMIT 1')
    assert text(backfill_sql.twin_rows_after(OW, SHAPE, where, after=False, is_null=True)) == \
        'SELECT EXISTS (SELECT 1 FROM "public"."orders_partitioned" WHERE "created_at" IS NULL)'


EXT = Shape(columns=("id", "created_at"), all_columns=("id", "created_at"), pk=("id",), key="created_at",
            key_type="timestamp with time zone", key_nullable=False, pk_types=("public.ltree",),
            eq_ops=(("id", "OPERATOR(public.=)"),))


def test_windows_over_an_extension_type_key_use_its_operators():
    """search_path is pinned to pg_catalog: (created_at, id) > (...) would look for ltree's >
    there (none: the batch fails) or take text's for citext (another order than the index)."""
    assert EXT.cmp("id", ">") == "OPERATOR(public.>)" and SHAPE.cmp("id", ">") == ">"
    where, _ = backfill_sql.range_predicate(EXT, "2024-01-01", "2024-02-01", False)
    stmt = text(backfill_sql.backfill_copy(ORD, OW, EXT, where, after=True, upto=True, is_null=False))
    term = f'(("created_at" > {TS}) OR ("created_at" = {TS} AND "id" OPERATOR(public.>) %s::public.ltree))'
    assert f'("created_at" >= {TS} AND {term})' in stmt
    assert f'("created_at" <= {TS} AND NOT {term})' in stmt
    assert '("created_at", "id") >' not in stmt
    # The cursor's values laid out for that form: the key for the leading bound, then per term.
    assert backfill_sql.cursor_params(EXT, False, ["t", "a.b"]) == ["t", "t", "t", "a.b"]
    assert backfill_sql.cursor_params(SHAPE, False, ["t", 7]) == ["t", 7]
    # A NULL-key range orders by the primary key alone.
    assert backfill_sql.cursor_params(EXT, True, ["a.b"]) == ["a.b", "a.b"]
    null_where, _ = backfill_sql.range_predicate(EXT, None, None, True)
    assert '"id" OPERATOR(public.>=) %s::public.ltree AND (("id" OPERATOR(public.>) %s::public.ltree))' in \
        text(backfill_sql.backfill_boundary(ORD, EXT, null_where, after=True, is_null=True))
    with pytest.raises(ValueError):  # a NULL-key range needs a primary key besides the key
        backfill_sql.cursor_columns(Shape(**{**EXT.__dict__, "pk": ("created_at",)}), True)
