"""SQL rendering: pure functions, read without a database."""

import pytest

from orchestrator import sql
from orchestrator.sql import QualifiedName, Shape, ident, parse_qualified

SHAPE = Shape(columns=("id", "note", "created_at"), all_columns=("id", "note", "created_at", "total"),
              pk=("id",), key="created_at", key_type="timestamp with time zone", key_nullable=False,
              pk_types=("bigint",))
T = QualifiedName("public", "orders")
TW = QualifiedName("public", "orders_partitioned")


@pytest.mark.parametrize("name, quoted", [
    ("orders", "orders"), ("Orders", '"Orders"'), ("user", '"user"'), ('we"ird', '"we""ird"'),
    ("order items", '"order items"'), ("_x1$", "_x1$"),
])
def test_ident(name, quoted):
    assert ident(name) == quoted


@pytest.mark.parametrize("text, schema, name", [
    ("public.orders", "public", "orders"), ("orders", "public", "orders"), ("Public.Orders", "public", "orders"),
    ('"Sales"."Order Items"', "Sales", "Order Items"), ('sales."a.b"', "sales", "a.b"),
])
def test_parse_qualified(text, schema, name):
    assert parse_qualified(text) == QualifiedName(schema, name)


@pytest.mark.parametrize("text", ["public.orders; drop table x", "a.b.c", "", "1abc", "orders--", '"unclosed', "a b"])
def test_parse_qualified_refuses(text):
    with pytest.raises(ValueError):
        parse_qualified(text)


def test_literal_escapes_quotes():
    assert sql.literal("it's") == "'it''s'"


def test_twin_key_and_primary_key():
    assert SHAPE.twin_key == ("id", "created_at")
    assert sql.twin_primary_key(TW, SHAPE) == "ALTER TABLE public.orders_partitioned ADD PRIMARY KEY (id, created_at)"
    nullable = Shape(**{**SHAPE.__dict__, "key_nullable": True})
    assert "UNIQUE NULLS NOT DISTINCT (id, created_at)" in sql.twin_primary_key(TW, nullable)


def test_sync_function_paths():
    body = sql.sync_function(QualifiedName("orchestrate", "capture_1"), TW, SHAPE)
    # every writable column on insert, never the generated one
    assert "INSERT INTO public.orders_partitioned (id, note, created_at) OVERRIDING SYSTEM VALUE" in body
    assert "total" not in body
    # a change of key moves the row; else an UPDATE by (pk, key) that may touch nothing
    assert "(NEW.id, NEW.created_at) IS DISTINCT FROM (OLD.id, OLD.created_at)" in body
    assert "DELETE FROM public.orders_partitioned WHERE id = OLD.id AND created_at = OLD.created_at" in body
    assert ("UPDATE public.orders_partitioned SET note = NEW.note "
            "WHERE id = OLD.id AND created_at = OLD.created_at") in body
    # the insert path is a plain insert (divergence fails loudly); only the probe after a
    # by-key miss uses ON CONFLICT, on dst's own key, so an invisible row raises 40001
    assert "VALUES (NEW.id, NEW.note, NEW.created_at);\n" in body
    assert body.count("ON CONFLICT (id, created_at) DO NOTHING") == 3  # update, delete, delete half of a move
    assert body.count("IF NOT FOUND THEN INSERT") == 3
    assert "ON CONFLICT" not in sql.sync_function(QualifiedName("orchestrate", "capture_1"), TW, SHAPE, probe=False)
    reverse = sql.sync_function(QualifiedName("orchestrate", "reverse_1"), T, SHAPE, dst_key=("id",))
    assert "ON CONFLICT (id) DO NOTHING" in reverse


def test_sync_triggers_fire_always():
    stmts = sql.create_sync_triggers(T, "orchestrate_capture", QualifiedName("orchestrate", "c"),
                                     QualifiedName("orchestrate", "c_t"))
    assert stmts[2:] == [f"ALTER TABLE {T} ENABLE ALWAYS TRIGGER orchestrate_capture",
                         f"ALTER TABLE {T} ENABLE ALWAYS TRIGGER orchestrate_capture_truncate"]


def test_sync_function_nullable_key_branches():
    nullable = Shape(**{**SHAPE.__dict__, "key_nullable": True})
    body = sql.sync_function(QualifiedName("orchestrate", "capture_1"), TW, nullable)
    assert ("IF OLD.created_at IS NULL THEN DELETE FROM public.orders_partitioned "
            "WHERE id = OLD.id AND created_at IS NULL") in body


def test_backfill_copy_locks_source_rows_in_a_value_window():
    where, params = sql.range_predicate(SHAPE, "2024-01-01 00:00:00", "2024-01-02 00:00:00", False)
    assert params == ["2024-01-01 00:00:00", "2024-01-02 00:00:00"]
    stmt = sql.backfill_copy(T, TW, SHAPE, where, after=True, upto=True, is_null=False)
    assert stmt.endswith("FOR SHARE ON CONFLICT DO NOTHING")
    assert "(created_at, id) > (%s::timestamp with time zone, %s::bigint)" in stmt
    assert "(created_at, id) <= (%s::timestamp with time zone, %s::bigint)" in stmt
    assert "LIMIT" not in stmt  # the window is bounded by values, never by a count


def test_backfill_boundary_and_null_range():
    where, params = sql.range_predicate(SHAPE, None, None, True)
    assert where == "created_at IS NULL" and params == []
    b = sql.backfill_boundary(T, SHAPE, where, after=True, is_null=True)
    # ORDER BY the table's column (s.id), not the output column id::text ('10' < '9').
    assert b == ("SELECT s.id::text FROM public.orders AS s WHERE created_at IS NULL AND (id) > (%s::bigint) "
                 "ORDER BY s.id OFFSET %s LIMIT 1")


EXT = Shape(columns=("id", "created_at"), all_columns=("id", "created_at"), pk=("id",), key="created_at",
            key_type="timestamp with time zone", key_nullable=False, pk_types=("public.ltree",),
            eq_ops=(("id", "OPERATOR(public.=)"),))


def test_windows_over_an_extension_type_key_use_its_operators():
    """search_path is pinned to pg_catalog: (created_at, id) > (...) would look for ltree's >
    there (none: the batch fails) or take text's for citext (another order than the index)."""
    assert EXT.cmp("id", ">") == "OPERATOR(public.>)" and SHAPE.cmp("id", ">") == ">"
    where, _ = sql.range_predicate(EXT, "2024-01-01", "2024-02-01", False)
    stmt = sql.backfill_copy(T, TW, EXT, where, after=True, upto=True, is_null=False)
    after = ("(created_at >= %s::timestamp with time zone AND ((created_at > %s::timestamp with time zone) OR "
             "(created_at = %s::timestamp with time zone AND id OPERATOR(public.>) %s::public.ltree)))")
    assert after in stmt
    assert ("(created_at <= %s::timestamp with time zone AND NOT ((created_at > %s::timestamp with time zone) OR "
            "(created_at = %s::timestamp with time zone AND id OPERATOR(public.>) %s::public.ltree)))") in stmt
    assert "(created_at, id) >" not in stmt
    # The cursor's values laid out for that form: the key for the leading bound, then per term.
    assert sql.cursor_params(EXT, False, ["t", "a.b"]) == ["t", "t", "t", "a.b"]
    assert sql.cursor_params(SHAPE, False, ["t", 7]) == ["t", 7]
    # A NULL-key range orders by the primary key alone.
    assert sql.cursor_params(EXT, True, ["a.b"]) == ["a.b", "a.b"]
    assert "id OPERATOR(public.>=) %s::public.ltree AND ((id OPERATOR(public.>) %s::public.ltree))" in \
        sql.backfill_boundary(T, EXT, "created_at IS NULL", after=True, is_null=True)


def test_range_digest_hashes_every_column():
    d = sql.range_digest(T, SHAPE, "true", "hash")
    t = '::pg_catalog.text COLLATE pg_catalog."C"'
    assert f"pg_catalog.hash_record_extended(ROW(id{t}, note{t}, created_at{t}, total{t}), 0::pg_catalog.int8)" in d
    # Columns whose type hashes exactly go in as themselves; the others as their text.
    d = sql.range_digest(T, SHAPE, "true", "hash", frozenset({"id", "created_at"}))
    assert f"hash_record_extended(ROW(id, note{t}, created_at, total{t}), 0::pg_catalog.int8)" in d


def test_rewrite_index_points_at_twin_and_adds_key():
    d = ("CREATE UNIQUE INDEX orders_email_key ON public.orders USING btree (lower(email), \"Tenant\") "
         "INCLUDE (x) WHERE (a > 0)")
    out = sql.rewrite_index(d, "CREATE UNIQUE INDEX orders_email_key ON public.orders USING ",
                            "CREATE UNIQUE INDEX orders_email_key_twin ON public.orders_partitioned USING ",
                            "created_at")
    assert out == ("CREATE UNIQUE INDEX orders_email_key_twin ON public.orders_partitioned USING btree "
                   "(lower(email), \"Tenant\", created_at) INCLUDE (x) WHERE (a > 0)")
    with pytest.raises(ValueError):
        sql.rewrite_index(d, "CREATE INDEX other ON x USING ", "")


def test_partition_bounds_by_key_type():
    assert sql.create_partition(QualifiedName("s", "p"), TW, "2024-01-01 00:00:00", "2024-02-01 00:00:00", "date") == (
        "CREATE TABLE s.p PARTITION OF public.orders_partitioned FOR VALUES FROM ('2024-01-01') TO ('2024-02-01')")
    assert "'2024-01-01 00:00:00+00'" in sql.create_partition(QualifiedName("s", "p"), TW, "2024-01-01 00:00:00",
                                                            "2024-02-01 00:00:00", "timestamp with time zone")
