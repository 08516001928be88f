"""The statements that keep the table's shape on the twin (see :mod:`orchestrator.fidelity`):
catalog reads at preflight, and the twin's copies of NOT VALID and DEFERRABLE constraints.

Pure functions; identifiers through ``sql.Identifier``, values as query parameters. A
constraint's definition is embedded with ``SQL(...)``: it is PostgreSQL's own rendering
(``pg_get_constraintdef``), already quoted by the server.
"""

from __future__ import annotations

from orchestrator.sql import QualifiedName, rewrite_index
from orchestrator.sql.compose import SQL, Composed, Literal, col, name

__all__ = [
    "DEFERRABLE_PRIMARY_KEY", "NOT_VALID_CHECKS_MISSING", "NOT_VALID_FKS_MISSING", "DEFERRABLE_UNIQUES",
    "PUBLICATIONS_OF", "SCHEMA_PUBLICATIONS_OF", "drop_constraint", "add_constraint", "unique_constraint",
]

#: Param: the table's oid.
DEFERRABLE_PRIMARY_KEY = SQL(
    "SELECT conname FROM pg_constraint WHERE conrelid = %s AND contype = 'p' AND condeferrable")


def _not_valid_missing(contype: str) -> Composed:
    return SQL(
        "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = %s::regclass "
        "AND contype = {t} AND NOT convalidated AND conname NOT IN "
        "(SELECT conname FROM pg_constraint WHERE conrelid = %s::regclass AND contype = {t}) ORDER BY 1"
    ).format(t=Literal(contype))


#: The live table's NOT VALID CHECKs (foreign keys) the twin has no constraint of that name for.
#: Params: the table, the twin (regclass texts).
NOT_VALID_CHECKS_MISSING = _not_valid_missing("c")
NOT_VALID_FKS_MISSING = _not_valid_missing("f")
#: Param: the table's oid.
DEFERRABLE_UNIQUES = SQL(
    "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
    "WHERE conrelid = %s AND contype = 'u' AND condeferrable")
#: The publications that list the table or every table. Param: the table's oid.
PUBLICATIONS_OF = SQL(
    "SELECT p.pubname, p.pubviaroot, p.puballtables, "
    "  EXISTS (SELECT 1 FROM pg_publication_rel pr JOIN pg_class c ON c.oid = pr.prrelid "
    "          WHERE pr.prpubid = p.oid AND c.relkind = 'p') "
    "FROM pg_publication p WHERE p.puballtables OR p.oid IN "
    "  (SELECT prpubid FROM pg_publication_rel WHERE prrelid = %s) ORDER BY 1")
#: PostgreSQL 15+: the publications of the table's schema. Param: the table's oid.
SCHEMA_PUBLICATIONS_OF = SQL(
    "SELECT p.pubname, p.pubviaroot, false, false FROM pg_publication p "
    "JOIN pg_publication_namespace pn ON pn.pnpubid = p.oid "
    "JOIN pg_class c ON c.relnamespace = pn.pnnspid AND c.oid = %s ORDER BY 1")


def drop_constraint(twin: QualifiedName, constraint: str) -> Composed:
    return SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(name(twin), col(constraint))


def add_constraint(twin: QualifiedName, constraint: str, definition: str) -> Composed:
    """``definition``: pg_get_constraintdef's text (catalog-rendered, embedded as SQL)."""
    return SQL("ALTER TABLE {} ADD CONSTRAINT {} {}").format(name(twin), col(constraint), SQL(definition))


def unique_constraint(twin: QualifiedName, constraint: str, definition: str, add_key: str | None) -> Composed:
    """The twin's copy of a unique constraint, keeping DEFERRABLE / INITIALLY DEFERRED.
    ``definition``: pg_get_constraintdef's text; rewrite_index adds ``add_key`` (quoted) to
    its column list, the rest stays the server's rendering, so it is embedded as SQL."""
    return SQL("ALTER TABLE {} ADD CONSTRAINT {} {}").format(
        name(twin), col(constraint), SQL(rewrite_index(definition, "", "", add_key)))
