"""The catalog reads (orchestrator/sql/catalog.py), rendered without a server."""

import re

from orchestrator.sql import QualifiedName, catalog
from orchestrator.sql.compose import text

# A relation after FROM / JOIN (not a function call, not a subquery, not extract(epoch FROM x)).
_RELATION = re.compile(r"(?<!epoch )\b(?:FROM|JOIN)\s+(?:LATERAL\s+)?(?!LATERAL\b)([\w.\"]+)(?![\w.\"(])(?!\s*\()",
                       re.IGNORECASE)


def relations(statement: str) -> set[str]:
    return {m.group(1) for m in _RELATION.finditer(statement)}


def unqualified_non_catalog(statement: str) -> set[str]:
    """Relations neither in pg_catalog (pg_*) nor schema-qualified: search_path is pinned to
    pg_catalog, pg_temp, so those would not be found."""
    return {r for r in relations(statement) if "." not in r and not r.startswith("pg_")}


def test_constants_name_only_catalog_relations():
    constants = [n for n in catalog.__all__ if n.isupper()]
    assert len(constants) == 24
    for n in constants:
        statement = text(getattr(catalog, n))
        assert unqualified_non_catalog(statement) == set(), n


def test_the_check_sees_relations():
    assert relations(text(catalog.PART_PRIMARY_KEY)) == {"pg_index", "pg_attribute"}
    assert unqualified_non_catalog("SELECT 1 FROM heartbeat JOIN orchestrate.x ON true") == {"heartbeat"}


def test_triggers_leave_ours_out():
    # the LIKE's backslash and the doubled %: orchestrate\_% once psycopg has its parameters
    assert "tgname NOT LIKE 'orchestrate\\_%%'" in text(catalog.TRIGGERS)


def test_key_bounds():
    assert text(catalog.key_bounds(QualifiedName("app", "Order Items"), "Created At")) == (
        'SELECT (SELECT "Created At"::timestamp FROM "app"."Order Items" WHERE "Created At" IS NOT NULL '
        'AND isfinite("Created At") ORDER BY "Created At" LIMIT 1), (SELECT "Created At"::timestamp FROM '
        '"app"."Order Items" WHERE "Created At" IS NOT NULL AND isfinite("Created At") ORDER BY "Created At" '
        "DESC LIMIT 1)")
