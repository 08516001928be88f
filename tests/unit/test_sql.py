"""What the SQL package's modules share (names, the Shape, bounds, dollar quoting), read
without a database. Each module's statements have their own tests/unit/test_sql_<module>.py."""

import pytest

from orchestrator import sql
from orchestrator.sql import QualifiedName, Shape, ident, parse_qualified
from orchestrator.sql.compose import SQL, col, text, with_body

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


def test_twin_key():
    assert SHAPE.twin_key == ("id", "created_at")
    assert SHAPE.order_columns == ("created_at", "id") and SHAPE.order_types == ("timestamp with time zone", "bigint")


def test_rewrite_index_points_at_twin_and_adds_key():
    d = ("CREATE UNIQUE INDEX orders_email_key ON public.orders USING btree (lower(email), \"Tenant\") "
         "INCLUDE (x) WHERE (a > 0)")
    out = sql.rewrite_index(d, "CREATE UNIQUE INDEX orders_email_key ON public.orders USING ",
                            "CREATE UNIQUE INDEX orders_email_key_twin ON public.orders_partitioned USING ",
                            "created_at")
    assert out == ("CREATE UNIQUE INDEX orders_email_key_twin ON public.orders_partitioned USING btree "
                   "(lower(email), \"Tenant\", \"created_at\") INCLUDE (x) WHERE (a > 0)")
    with pytest.raises(ValueError):
        sql.rewrite_index(d, "CREATE INDEX other ON x USING ", "")


def test_rewrite_index_quotes_the_added_key():
    d = "CREATE INDEX i ON public.t USING btree (a)"
    assert sql.rewrite_index(d, "CREATE INDEX i ON public.t USING ", "", "Created At") == 'btree (a, "Created At")'


def test_bounds_by_key_type():
    assert text(sql.bound("2024-01-01 00:00:00", "date")) == "'2024-01-01'"
    assert text(sql.bound("2024-01-01 00:00:00", "timestamp(3) with time zone")) == "'2024-01-01 00:00:00+00'"
    assert text(sql.bound("2024-01-01 00:00:00", "timestamp without time zone")) == "'2024-01-01 00:00:00'"
    assert text(sql.bound(None, "date")) == "MAXVALUE"


def test_a_function_body_is_quoted_with_a_tag_no_name_holds():
    """A column named ``x$orchestrate$`` must not end the body: the tag changes until it
    occurs only around the body (twice)."""
    template = SQL("CREATE FUNCTION f() RETURNS int LANGUAGE sql AS {q}SELECT {c}{q}")
    assert text(with_body(template, c=col("a"))) == \
        'CREATE FUNCTION f() RETURNS int LANGUAGE sql AS $orchestrate$SELECT "a"$orchestrate$'
    hostile = with_body(template, c=col("x$orchestrate$; SELECT 1; $orchestrate_1$"))
    assert text(hostile) == ('CREATE FUNCTION f() RETURNS int LANGUAGE sql AS '
                             '$orchestrate_2$SELECT "x$orchestrate$; SELECT 1; $orchestrate_1$"$orchestrate_2$')
