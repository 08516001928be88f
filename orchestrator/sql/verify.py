"""verify's statements: the count and content hash of one key range, and which columns may
be hashed by their type.

Pure; ``orchestrator.phases.verify`` only executes what these return. ``where`` is
``backfill.range_predicate``'s (the same ranges the backfill copied).
"""

from __future__ import annotations

from psycopg import sql

from orchestrator.sql import QualifiedName, Shape
from orchestrator.sql.compose import SQL, Composed, col, composable, name


def range_digest(table: QualifiedName, shape: Shape, where: sql.Composable, mode: str,
                 by_type: frozenset[str] = frozenset()) -> Composed:
    """Count and an order-independent content hash of every column of the rows in a range.

    Each row is hashed with ``hash_record_extended`` over all its columns. A column in
    ``by_type`` (see :data:`EXACT_HASH_COLUMNS`) goes in as itself, hashed by its type's own
    hash function: a type whose equal values are bit-for-bit identical ("equal image") loses
    nothing that way and skips the costly text output. Every other column (numeric, where
    1.0 = 1.00; float, where -0 = 0; citext; jsonb; arrays; domains ...) goes in as its text,
    so a difference a person could see is a difference in the hash. The per-row hashes are
    summed as bigints (exact: int128 accumulation), which is order-independent. Text fields
    are hashed under the "C" collation: byte for byte.
    """
    t, where = name(table), composable(where)
    if mode == "count":
        return SQL("SELECT pg_catalog.count(*), 0::pg_catalog.numeric FROM {} WHERE {}").format(t, where)
    # COLLATE "C": a text field hashes with its expression's collation, and a column under a
    # nondeterministic (case-insensitive) collation would hash 'A' and 'a' alike.
    fields = SQL(", ").join(col(c) if c in by_type else col(c) + SQL('::pg_catalog.text COLLATE pg_catalog."C"')
                            for c in shape.all_columns)
    return SQL("SELECT pg_catalog.count(*), "
               "coalesce(pg_catalog.sum(pg_catalog.hash_record_extended(ROW({}), 0::pg_catalog.int8)), 0) "
               "FROM {} WHERE {}").format(fields, t, where)


# Columns whose type hashes exactly: a default hash opclass with an extended (seeded) hash
# function, and a default btree opclass whose "equal image" support function says that equal
# values are identical images (btequalimage; for text-like types btvarstrequalimage, true
# only under a deterministic collation). Parameter: the table (regclass text).
EXACT_HASH_COLUMNS = SQL("""SELECT a.attname FROM pg_catalog.pg_attribute a
WHERE a.attrelid = %s::pg_catalog.regclass AND a.attnum > 0 AND NOT a.attisdropped
  AND EXISTS (SELECT 1 FROM pg_catalog.pg_opclass oc
              JOIN pg_catalog.pg_am am ON am.oid = oc.opcmethod AND am.amname = 'hash'
              JOIN pg_catalog.pg_amproc p ON p.amprocfamily = oc.opcfamily AND p.amprocnum = 2
               AND p.amproclefttype = oc.opcintype AND p.amprocrighttype = oc.opcintype
              WHERE oc.opcdefault AND oc.opcintype = a.atttypid)
  AND EXISTS (SELECT 1 FROM pg_catalog.pg_opclass oc
              JOIN pg_catalog.pg_am am ON am.oid = oc.opcmethod AND am.amname = 'btree'
              JOIN pg_catalog.pg_amproc p ON p.amprocfamily = oc.opcfamily AND p.amprocnum = 4
               AND p.amproclefttype = oc.opcintype AND p.amprocrighttype = oc.opcintype
              WHERE oc.opcdefault AND oc.opcintype = a.atttypid
                AND (p.amproc = 'pg_catalog.btequalimage'::pg_catalog.regproc
                     OR (p.amproc = 'pg_catalog.btvarstrequalimage'::pg_catalog.regproc
                         AND (a.attcollation = 0 OR (SELECT c.collisdeterministic FROM pg_catalog.pg_collation c
                                                     WHERE c.oid = a.attcollation)))))""")
