"""pg_stat_statements' reads (orchestrator/sql/statements.py), rendered without a server."""

from orchestrator.sql import statements
from orchestrator.sql.compose import text
from tests.unit.test_sql_catalog import unqualified_non_catalog


def test_constants_name_only_catalog_relations():
    for statement in (statements.EXTENSION_SCHEMA, statements.UNIQUE_CONSTRAINTS):
        assert unqualified_non_catalog(text(statement)) == set()


def test_on_conflict_statements_in_the_extensions_schema():
    assert text(statements.on_conflict_statements('Ext "Schema"')) == (
        'SELECT queryid::text, calls, query FROM "Ext ""Schema"""."pg_stat_statements" '
        "WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) "
        "AND query ~* 'on[[:space:]]+conflict' AND query ILIKE %s ORDER BY calls DESC")
    assert unqualified_non_catalog(text(statements.on_conflict_statements("public"))) == set()
