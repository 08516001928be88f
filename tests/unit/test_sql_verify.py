"""verify's statements (orchestrator/sql/verify.py), rendered without a server."""

import pytest

from orchestrator.sql import QualifiedName, Shape
from orchestrator.sql import verify as verify_sql
from orchestrator.sql.compose import SQL, text

SHAPE = Shape(columns=("id", "note", "created_at"), all_columns=("id", "note", "created_at", "total"),
              pk=("id",), key="created_at", key_type="timestamp with time zone", key_nullable=False,
              pk_types=("bigint",))
T = QualifiedName("app", "Order Items")
AS_TEXT = '::pg_catalog.text COLLATE pg_catalog."C"'


def test_range_digest_hashes_every_column_generated_ones_too():
    d = text(verify_sql.range_digest(T, SHAPE, SQL("true"), "hash"))
    assert d == ("SELECT pg_catalog.count(*), coalesce(pg_catalog.sum(pg_catalog.hash_record_extended("
                 f'ROW("id"{AS_TEXT}, "note"{AS_TEXT}, "created_at"{AS_TEXT}, "total"{AS_TEXT}), '
                 '0::pg_catalog.int8)), 0) FROM "app"."Order Items" WHERE true')
    # Columns whose type hashes exactly go in as themselves; the others as their text.
    d = text(verify_sql.range_digest(T, SHAPE, SQL("true"), "hash", frozenset({"id", "created_at"})))
    assert f'ROW("id", "note"{AS_TEXT}, "created_at", "total"{AS_TEXT})' in d


def test_count_mode_and_a_str_condition_is_refused():
    assert text(verify_sql.range_digest(T, SHAPE, SQL("true"), "count")) == \
        'SELECT pg_catalog.count(*), 0::pg_catalog.numeric FROM "app"."Order Items" WHERE true'
    with pytest.raises(TypeError):
        verify_sql.range_digest(T, SHAPE, "true", "hash")


def test_exact_hash_columns_is_catalog_qualified():
    q = text(verify_sql.EXACT_HASH_COLUMNS)
    assert "pg_catalog.btequalimage" in q and " pg_attribute " not in q
