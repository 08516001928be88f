"""Statements that will break, found before they break (pg_stat_statements).

Role: reads ``pg_stat_statements`` (when the extension is installed) and names the
application's statements on the table that will fail once the partitioned table is live.
Reads only. After the cutover every unique index of the table includes the partition key
(PostgreSQL requires it), so:

- ``INSERT ... ON CONFLICT (cols)`` whose target does not name the key column finds no
  unique index to infer and fails ("there is no unique or exclusion constraint matching
  the ON CONFLICT specification");
- ``ON CONFLICT ON CONSTRAINT name`` naming one of today's constraints fails: the new
  table's constraints have other names.

``plan`` lists them with their queryid; ``apply`` refuses (exit 3) unless the plan lists
each one under ``acknowledge_statements``. ``ON CONFLICT DO NOTHING`` without a target,
UPDATE, DELETE and SELECT are unaffected.
"""

from __future__ import annotations

import re

import psycopg

from orchestrator.errors import PreflightError
from orchestrator.inspect import TableInfo
from orchestrator.sql import statements as statements_sql

_NAME = r'(?:"(?:[^"]|"")+"|[A-Za-z_][A-Za-z0-9_$]*)'
_INSERT = re.compile(rf"\binsert\s+into\s+(?:only\s+)?(?P<table>{_NAME}(?:\s*\.\s*{_NAME})?)", re.IGNORECASE)
_CONFLICT = re.compile(rf"\bon\s+conflict\s*(?:\((?P<cols>.*?)\)\s*(?:where\b.*?)?\s*do\b|on\s+constraint\s+"
                       rf"(?P<con>{_NAME}))", re.IGNORECASE | re.DOTALL)


def _unquote(name: str) -> str:
    name = name.strip()
    if name.startswith('"') and name.endswith('"'):
        return name[1:-1].replace('""', '"')
    return name.lower()


def _names_table(text: str, info: TableInfo) -> bool:
    parts = [_unquote(p) for p in re.split(r"\s*\.\s*(?=(?:[^\"]*\"[^\"]*\")*[^\"]*$)", text)]
    if len(parts) == 2:
        return (parts[0], parts[1]) == (info.name.schema, info.name.name)
    return parts[0] == info.name.name  # unqualified: resolved through the application's search_path


def breaks(query: str, info: TableInfo, key: str, constraints: set[str]) -> str | None:
    """Why this statement fails after cutover, or None (pure; unit-testable)."""
    ins = _INSERT.search(query)
    if ins is None or not _names_table(ins.group("table"), info):
        return None
    m = _CONFLICT.search(query, ins.end())
    if m is None:
        return None
    if m.group("con"):
        con = _unquote(m.group("con"))
        if con in constraints:
            return f"ON CONFLICT ON CONSTRAINT {con}: the partitioned table's constraints have other names"
        return None
    cols = m.group("cols") or ""
    names = {_unquote(c) for c in cols.split(",") if re.fullmatch(rf"\s*{_NAME}\s*", c)}
    expressions = [c for c in cols.split(",") if not re.fullmatch(rf"\s*{_NAME}\s*", c)]
    if key in names or any(re.search(rf'\b{re.escape(key)}\b', e) for e in expressions):
        return None
    return (f"ON CONFLICT ({cols.strip()}): after cutover every unique index includes {key}, so no index matches "
            f"this target; name {key} in it")


def find(conn: psycopg.Connection, info: TableInfo, key: str) -> list[dict]:
    """[{queryid, calls, query, reason}] for the statements that will break; [] without
    pg_stat_statements (or without the right to read it)."""
    row = conn.execute(statements_sql.EXTENSION_SCHEMA).fetchone()
    if row is None:
        return []
    schema = row[0]
    constraints = {r[0] for r in conn.execute(statements_sql.UNIQUE_CONSTRAINTS, (info.oid,)).fetchall()}
    try:
        with conn.transaction():
            rows = conn.execute(statements_sql.on_conflict_statements(schema),
                                (f"%{info.name.name}%",)).fetchall()
    except psycopg.Error:
        return []  # not loaded (shared_preload_libraries) or not readable: nothing to say
    out = []
    for queryid, calls, query in rows:
        if query is None:
            continue  # another role's statement text is hidden without pg_read_all_stats
        reason = breaks(query, info, key, constraints)
        if reason:
            out.append({"queryid": queryid, "calls": int(calls), "query": " ".join(query.split())[:300],
                        "reason": reason})
    return out


def check(conn: psycopg.Connection, info: TableInfo, key: str, acknowledged: list[str]) -> list[str]:
    """Warnings for acknowledged statements; PreflightError for the others."""
    found = find(conn, info, key)
    ack = {str(a) for a in acknowledged}
    open_ = [s for s in found if s["queryid"] not in ack]
    if open_:
        listed = "; ".join(f"queryid {s['queryid']} ({s['calls']} calls: {s['query'][:100]}): {s['reason']}"
                           for s in open_[:5])
        more = f"; and {len(open_) - 5} more" if len(open_) > 5 else ""
        raise PreflightError(
            f"{len(open_)} statement(s) of the application will fail after cutover (pg_stat_statements): "
            f"{listed}{more}. Change them, or list their queryids under acknowledge_statements: in the plan")
    return [f"statement {s['queryid']} will fail after cutover (acknowledged): {s['reason']}" for s in found]
