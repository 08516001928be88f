"""Async capture's SQL (orchestrator/changelog.py), as rendered: what the functions touch
and in what order, without a database."""

from __future__ import annotations

from orchestrator import changelog
from orchestrator.plan import parse_plan
from orchestrator.sql import QualifiedName, Shape
from orchestrator.sql.compose import text

SRC, TWIN = QualifiedName("public", "orders"), QualifiedName("public", "orders_partitioned")
LOG = QualifiedName("public", "orders_changes")
SHAPE = Shape(columns=("id", "amount", "created_at"), all_columns=("id", "amount", "created_at"), pk=("id",),
              key="created_at", key_type="timestamp with time zone", key_nullable=False, pk_types=("bigint",))


def test_the_capture_trigger_only_appends_keys() -> None:
    fn = changelog.log_function(QualifiedName("orchestrate", "capture_1"), LOG, SHAPE)
    assert "SET search_path = pg_catalog, pg_temp" in fn
    assert fn.count('INSERT INTO "public"."orders_changes" ("id", "created_at"') == 4
    assert 'VALUES (OLD."id", OLD."created_at", true), (NEW."id", NEW."created_at", false)' in fn  # a move: both keys
    assert "orders_partitioned" not in fn and "UPDATE " not in fn and "DELETE " not in fn


def test_replay_reads_the_batch_first_and_deletes_its_log_rows_by_sequence_number() -> None:
    fn = changelog.replay_function(QualifiedName("orchestrate", "replay_1"), SRC, TWIN, LOG, SHAPE, "app")
    assert "SET search_path = pg_catalog, pg_temp SET row_security = off" in fn
    assert "current_user OPERATOR(pg_catalog.<>) 'app'::pg_catalog.name" in fn
    take = fn.index('ORDER BY "orchestrate_seq" LIMIT n')
    delete_twin = fn.index('DELETE FROM "public"."orders_partitioned" t')
    insert = fn.index('INSERT INTO "public"."orders_partitioned"')
    forget = fn.index('DELETE FROM "public"."orders_changes" WHERE "orchestrate_seq" OPERATOR(pg_catalog.=) ANY (s)')
    assert take < delete_twin < insert < forget
    assert 'FROM ONLY "public"."orders" t' in fn
    assert 'ON CONFLICT ("id", "created_at") DO UPDATE SET "amount" = EXCLUDED."amount"' in fn
    assert 'IF trunc THEN\n    DELETE FROM "public"."orders_partitioned";' in fn  # the TRUNCATE marker


def test_composite_keys_are_matched_exactly_and_null_keys_found() -> None:
    shape = Shape(columns=("tenant", "id", "at"), all_columns=("tenant", "id", "at"), pk=("tenant", "id"),
                  key="at", key_type="timestamp with time zone", key_nullable=True, pk_types=("integer", "bigint"))
    fn = changelog.replay_function(QualifiedName("orchestrate", "replay_1"), SRC, TWIN, LOG, shape, "app")
    assert '"t"."tenant" = "l"."tenant" AND "t"."id" = "l"."id"' in fn
    assert 'OR (has_null AND "t"."at" IS NULL)' in fn
    assert 'ON CONFLICT ("tenant", "id", "at") DO NOTHING' in fn  # no column outside the key


def test_verify_filter_names_the_table_it_filters() -> None:
    f = text(changelog.pending_filter(SHAPE, LOG, TWIN))
    assert f == ('NOT EXISTS (SELECT 1 FROM "public"."orders_changes" l WHERE NOT "l"."orchestrate_truncate" AND '
                 '"l"."id" = "public"."orders_partitioned"."id")')


def test_async_mode_is_part_of_the_shape_and_sync_hash_unchanged() -> None:
    base = {"table": "public.orders", "partition_by": {"column": "created_at", "interval": "1 month"}}
    sync = parse_plan(base)
    assert parse_plan({**base, "capture": {"mode": "sync"}}).shape_hash() == sync.shape_hash()
    assert parse_plan({**base, "capture": {"mode": "async"}}).shape_hash() != sync.shape_hash()
    assert changelog.log_table(sync) == LOG
