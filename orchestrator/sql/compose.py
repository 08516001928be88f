"""The building blocks of composed SQL: psycopg.sql objects for our names and values.

Every statement the engine runs is rendered by a pure function of ``orchestrator.sql``. New
renderers return ``psycopg.sql.Composed`` and take identifiers through ``sql.Identifier``
(via :func:`name` and :func:`col` below), values through ``sql.Literal`` or query
parameters, and never format user text into SQL. :func:`text` renders a Composed without a
server, for the snapshot tests and for ``plan``'s listing.
"""

from __future__ import annotations

from collections.abc import Iterable

from psycopg import sql

from orchestrator.sql import QualifiedName

__all__ = ["SQL", "Composed", "Literal", "Placeholder", "name", "col", "cols", "text"]

SQL, Composed, Literal, Placeholder = sql.SQL, sql.Composed, sql.Literal, sql.Placeholder


def name(q: QualifiedName) -> sql.Identifier:
    """A schema-qualified relation (or function) name."""
    return sql.Identifier(q.schema, q.name)


def col(column: str, alias: str | None = None) -> sql.Identifier:
    """A column, optionally qualified by a table alias."""
    return sql.Identifier(alias, column) if alias else sql.Identifier(column)


def cols(columns: Iterable[str], alias: str | None = None) -> sql.Composed:
    """``a, "B", c`` (or ``x.a, x."B"``)."""
    return sql.SQL(", ").join(col(c, alias) for c in columns)


def text(statement: sql.Composable) -> str:
    """The statement's text, rendered without a connection (snapshot tests, ``plan``)."""
    return statement.as_string(None)
