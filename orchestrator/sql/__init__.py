"""The SQL package: every statement the engine runs is rendered by a pure function here.

One module per role: ``twin`` (the partitioned twin prepare builds), ``sync`` (the
synchronous capture's trigger functions), ``changelog`` (async capture), ``backfill`` (a
range's windows and their copy), ``verify`` (a range's digest), ``swap`` (the cutover),
``maintain``, ``drift``, ``distribute`` (Citus), ``owner`` (the owner's executor),
``fidelity``, ``catalog``, ``probes`` (replica lag), ``session``, ``runner`` and
``statements``. They return ``psycopg.sql.Composed``: identifiers through ``sql.Identifier``
(``compose.name`` / ``compose.col``), values as ``%s`` parameters or ``sql.Literal``.

This module holds what they share: names (:class:`QualifiedName`, :func:`parse_qualified`,
:func:`fit_name`), the table pair's :class:`Shape`, partition bounds. :func:`ident` quotes a
name the way PostgreSQL's quote_ident does, for messages to people; SQL never uses it.
Nothing here talks to a database, so the unit tests read the SQL without a server.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from psycopg import sql

_PLAIN = re.compile(r"^[a-z_][a-z0-9_$]*$")
# Words that must be quoted even when they look plain (reserved in PostgreSQL).
_RESERVED = frozenset(
    """all analyse analyze and any array as asc asymmetric both case cast check collate column
    constraint create current_catalog current_date current_role current_time current_timestamp
    current_user default deferrable desc distinct do else end except false fetch for foreign
    from grant group having in initially intersect into lateral leading limit localtime
    localtimestamp not null offset on only or order placing primary references returning
    select session_user some symmetric system_user table then to trailing true union unique
    user using variadic when where window with authorization binary collation concurrently
    cross current_schema freeze full ilike inner is isnull join left like natural notnull
    outer overlaps right similar tablesample verbose""".split()
)
MAX_IDENT = 63


def ident(name: str) -> str:
    """A name as PostgreSQL's quote_ident prints it, for messages (SQL uses sql.Identifier)."""
    if not name:
        raise ValueError("empty identifier")
    if "\x00" in name:
        raise ValueError("identifier contains a NUL byte")
    if _PLAIN.match(name) and name not in _RESERVED:
        return name
    return '"' + name.replace('"', '""') + '"'


def fit_name(base: str, suffix: str) -> str:
    """``base + suffix`` within PostgreSQL's 63 bytes, unique per base: when too long, the base
    is cut and a hash of the whole base is put before the suffix, so two long names that
    share their first 50 bytes never truncate to the same identifier."""
    name = base + suffix
    if len(name.encode()) <= MAX_IDENT:
        return name
    import hashlib

    h = "_" + hashlib.sha1(base.encode()).hexdigest()[:8]
    room = MAX_IDENT - len(h.encode()) - len(suffix.encode())
    return base.encode()[:room].decode(errors="ignore") + h + suffix


def literal(value: str) -> str:
    """Quote a string literal (standard_conforming_strings on, E'' never used)."""
    if "\x00" in value:
        raise ValueError("literal contains a NUL byte")
    return "'" + value.replace("'", "''") + "'"


@dataclass(frozen=True, order=True)
class QualifiedName:
    """A schema-qualified relation name, stored unquoted (as in pg_class)."""

    schema: str
    name: str

    def __str__(self) -> str:
        return f"{ident(self.schema)}.{ident(self.name)}"

    @property
    def display(self) -> str:
        return str(self)

    def with_name(self, name: str) -> QualifiedName:
        return QualifiedName(self.schema, name)


_IDENT_TOKEN = re.compile(r'"((?:[^"]|"")+)"|([A-Za-z_][A-Za-z0-9_$]*)')


def parse_qualified(text: str, default_schema: str = "public") -> QualifiedName:
    """Parse ``schema.table`` with PostgreSQL's rules: unquoted parts fold to lower case,
    double-quoted parts keep their case. Anything else (spaces, semicolons, extra parts)
    is refused with ValueError, so SQL can never ride in on a table name."""
    parts: list[str] = []
    pos = 0
    text = text.strip()
    while True:
        m = _IDENT_TOKEN.match(text, pos)
        if not m:
            raise ValueError(f"{text!r} is not a table name (expected schema.table)")
        parts.append(m.group(1).replace('""', '"') if m.group(1) is not None else m.group(2).lower())
        pos = m.end()
        if pos == len(text):
            break
        if text[pos] != ".":
            raise ValueError(f"{text!r} is not a table name (unexpected {text[pos]!r} at position {pos})")
        pos += 1
    if len(parts) > 2:
        raise ValueError(f"{text!r} is not a table name (too many dots)")
    for p in parts:
        if len(p.encode()) > MAX_IDENT:
            raise ValueError(f"{p!r} is longer than PostgreSQL's {MAX_IDENT}-byte identifier limit")
    if len(parts) == 1:
        return QualifiedName(default_schema, parts[0])
    return QualifiedName(parts[0], parts[1])


# --------------------------------------------------------------------------------------
# A Shape holds what every statement needs to know about the table pair.
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """The columns and keys shared by the live table and its twin."""

    columns: tuple[str, ...]  # writable columns (generated ones excluded), in table order
    all_columns: tuple[str, ...]  # every column, generated ones included (for hashing)
    pk: tuple[str, ...]  # the live table's primary key columns
    key: str  # partition key column
    key_type: str  # format_type of the key
    key_nullable: bool
    pk_types: tuple[str, ...] = ()
    eq_ops: tuple[tuple[str, str], ...] = ()  # (column, qualified equality operator) for extension types
    dist: str | None = None  # Citus distribution column (distributed mode), part of the twin's key

    def eq(self, column: str) -> str:
        """The equality operator to match ``column`` with: ``=``, or the type's own btree
        operator schema-qualified (search_path is pinned to pg_catalog in our functions)."""
        return dict(self.eq_ops).get(column) or "="

    def eq_sql(self, column: str) -> sql.SQL:
        """:meth:`eq` as SQL to compose with (the operator's text is the catalog's)."""
        return sql.SQL(self.eq(column))

    def cmp(self, column: str, op: str) -> str:
        """The ordering operator ``op`` (``<``, ``>``, ...) for ``column``, from the same btree
        operator family as :meth:`eq` (``OPERATOR(public.>)`` for ltree or citext), so a
        comparison orders exactly as ORDER BY and the key's index do."""
        eq = dict(self.eq_ops).get(column)
        return f"{eq[:-2]}{op})" if eq else op

    @property
    def order_columns(self) -> tuple[str, ...]:
        """(key, pk...) without repeating the key when it is part of the primary key."""
        return (self.key, *[c for c in self.pk if c != self.key])

    @property
    def order_types(self) -> tuple[str, ...]:
        types = dict(zip(self.pk, self.pk_types, strict=False))
        return (self.key_type, *[types[c] for c in self.pk if c != self.key])

    @property
    def twin_key(self) -> tuple[str, ...]:
        """The twin's primary key: the live key plus the partition key (and, distributed, the
        distribution column: Citus enforces a unique key only if it holds that column)."""
        key = self.pk if self.key in self.pk else (*self.pk, self.key)
        return key if self.dist is None or self.dist in key else (*key, self.dist)


def timestamp_text(t) -> str:
    """A naive timestamp as the text of a bound or a label ('2026-01-01 00:00:00')."""
    return t.strftime("%Y-%m-%d %H:%M:%S")


def bound(value: str | None, key_type: str) -> sql.Composable:
    """A partition bound; value is 'YYYY-MM-DD HH:MM:SS' meaning UTC (None: MAXVALUE)."""
    if value is None:
        return sql.SQL("MAXVALUE")
    if key_type == "date":
        return sql.Literal(value[:10])
    if re.sub(r"\(\d+\)", "", key_type).startswith("timestamp with time zone"):  # timestamp(3) too
        return sql.Literal(value + "+00")
    return sql.Literal(value)


def quote(name: str) -> str:
    """An identifier, always double-quoted (``sql.Identifier``'s text): for SQL text that is
    spliced as text, such as an index definition the server rendered."""
    return sql.Identifier(name).as_string(None)


def rewrite_index(definition: str, prefix: str, new_prefix: str, add_key: str | None = None) -> str:
    """Point an index definition at another table (and optionally append the key column).

    ``prefix`` is the exact head PostgreSQL rendered (``CREATE INDEX name ON tbl USING ``);
    refusing anything else keeps this from ever guessing at SQL it did not render.
    """
    if not definition.startswith(prefix):
        raise ValueError(f"unexpected index definition: {definition}")
    rest = definition[len(prefix):]
    if add_key is not None:
        # rest = "btree (a, b) INCLUDE (c) WHERE ...": insert the key before the first
        # top-level closing parenthesis of the key list.
        depth, in_quote = 0, False
        for i, ch in enumerate(rest):
            if ch == '"':
                in_quote = not in_quote
            elif not in_quote and ch == "(":
                depth += 1
            elif not in_quote and ch == ")":
                depth -= 1
                if depth == 0:
                    rest = rest[:i] + ", " + quote(add_key) + rest[i:]
                    break
        else:
            raise ValueError(f"cannot find the key list in: {definition}")
    return new_prefix + rest
