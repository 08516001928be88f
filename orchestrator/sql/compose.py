"""The building blocks of composed SQL: psycopg.sql objects for our names and values.

Every statement the engine runs is rendered by a pure function of ``orchestrator.sql``. New
renderers return ``psycopg.sql.Composed`` and take identifiers through ``sql.Identifier``
(via :func:`name` and :func:`col` below), values through ``sql.Literal`` or query
parameters, and never format user text into SQL. :func:`text` renders a Composed without a
server, for the snapshot tests and for ``plan``'s listing.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import count

from psycopg import sql

from orchestrator.sql import QualifiedName

__all__ = ["SQL", "Composed", "Literal", "Placeholder", "name", "col", "cols", "text", "with_body", "composable"]

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


def with_body(template: sql.SQL, **parts: sql.Composable) -> sql.Composed:
    """``template.format(**parts)`` with ``{q}`` (written twice in the template, around a
    function's body) as a dollar-quote tag that occurs nowhere else in the statement.

    Why not a fixed ``$orchestrate$``: the body holds the table's column names, which the
    table owner chooses. Quoting a name as an identifier does not protect it inside a
    dollar-quoted body: a column named ``x$orchestrate$`` ended the body there, and the rest
    of the name was read as SQL by the role running orchestrate (a superuser, say)."""
    for n in count():
        tag = "$orchestrate$" if n == 0 else f"$orchestrate_{n}$"
        statement = template.format(q=sql.SQL(tag), **parts)
        if text(statement).count(tag) == 2:
            return statement
    raise AssertionError("unreachable")


def composable(part: object, what: str = "the condition") -> sql.Composable:
    """``part``, refused when it is not SQL: ``SQL.format`` quotes a str as a literal, so a
    WHERE clause passed as text would silently become the constant ``'...'``."""
    if not isinstance(part, sql.Composable):
        raise TypeError(f"{what} must be SQL, not {type(part).__name__}")
    return part
