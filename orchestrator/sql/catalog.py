"""Catalog reads: what the live table looks like, what depends on it, how a partitioned
table is laid out. Pure; ``orchestrator.inspect`` only executes them and never writes.

Fixed, parameterized queries are ``SQL`` constants (parameters: the table's oid unless
noted). They name only pg_catalog objects, unqualified: every session pins ``search_path``
to ``pg_catalog, pg_temp`` (inspect_table to ``pg_catalog``). Statements that take an
identifier are functions returning ``Composed``.
"""

from __future__ import annotations

from orchestrator.sql import QualifiedName
from orchestrator.sql.compose import SQL, Composed, col, name
from orchestrator.sql.twin import CATALOG_SEARCH_PATH

__all__ = [
    "CATALOG_SEARCH_PATH", "RELATION_BY_NAME", "TABLE_BY_NAME_ANY_CASE", "TABLE_ROW", "COLUMNS", "INDEXES",
    "CHECKS", "OUTGOING_FKS", "INCOMING_FKS", "DEPENDENTS", "TRIGGERS", "OWNED_SEQUENCES", "TABLE_ACL",
    "COLUMN_ACL", "REPLIDENT_INDEX", "POLICIES", "PUBLICATIONS", "EQ_OPS", "CATALOG_FINGERPRINT",
    "PARTITIONED_TABLE", "PART_KEY_COLUMN", "PART_COLUMNS", "PART_PRIMARY_KEY", "PARTITIONS", "key_bounds",
]

# --- the live table (inspect_table) ---------------------------------------------------

# (oid, relkind) of a relation by its exact name. Parameters: schema, name.
RELATION_BY_NAME = SQL(
    "SELECT c.oid, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
    "WHERE n.nspname = %s AND c.relname = %s")

# The table whose name matches but for case (the hint of "does not exist"). Parameters: schema, name.
TABLE_BY_NAME_ANY_CASE = SQL(
    "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
    "WHERE lower(n.nspname) = lower(%s) AND lower(c.relname) = lower(%s) AND c.relkind IN ('r','p') LIMIT 1")

# The rest of this section runs in inspect_table's transaction, with search_path =
# pg_catalog (twin.CATALOG_SEARCH_PATH): the definitions come out fully qualified.
# Parameter: the table's oid (DEPENDENTS: twice).
TABLE_ROW = SQL(
    """SELECT pg_get_userbyid(c.relowner), obj_description(c.oid, 'pg_class'), c.relreplident,
                      c.relrowsecurity, c.relforcerowsecurity, coalesce(c.reloptions, '{}'),
                      greatest(c.reltuples, 0)::bigint, pg_total_relation_size(c.oid), c.relpersistence
               FROM pg_class c WHERE c.oid = %s""")

COLUMNS = SQL(
    """SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
                      pg_get_expr(d.adbin, d.adrelid), a.attgenerated::text, a.attidentity::text,
                      CASE WHEN a.attstattarget >= 0 THEN a.attstattarget END
               FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
               WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum""")

INDEXES = SQL(
    """SELECT i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid), i.indisunique, i.indisprimary,
                      con.conname,
                      ARRAY(SELECT a.attname FROM unnest(i.indkey) WITH ORDINALITY k(n, o)
                            JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.n
                            WHERE k.n > 0 ORDER BY k.o),
                      0 = ANY (i.indkey::int2[]) OR i.indexprs IS NOT NULL, c2.relname
               FROM pg_index i JOIN pg_class c2 ON c2.oid = i.indexrelid
               LEFT JOIN pg_constraint con ON con.conindid = i.indexrelid AND con.conrelid = i.indrelid
               WHERE i.indrelid = %s ORDER BY c2.relname""")

CHECKS = SQL(
    "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = %s AND contype = 'c' "
    "ORDER BY conname")

OUTGOING_FKS = SQL(
    """SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint
               WHERE conrelid = %s AND contype = 'f' ORDER BY conname""")

INCOMING_FKS = SQL(
    """SELECT con.conname, n.nspname, c.relname, pg_get_constraintdef(con.oid),
                      ARRAY(SELECT a.attname FROM unnest(con.conkey) k(n)
                            JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.n)
               FROM pg_constraint con JOIN pg_class c ON c.oid = con.conrelid
               JOIN pg_namespace n ON n.oid = c.relnamespace
               WHERE con.confrelid = %s AND con.contype = 'f' AND con.conrelid <> con.confrelid
               ORDER BY 1""")

DEPENDENTS = SQL(
    """SELECT DISTINCT v.oid, n.nspname, v.relname, v.relkind, pg_get_viewdef(v.oid),
                      coalesce(v.reloptions, '{}')
               FROM pg_depend d JOIN pg_rewrite r ON r.oid = d.objid AND d.classid = 'pg_rewrite'::regclass
               JOIN pg_class v ON v.oid = r.ev_class JOIN pg_namespace n ON n.oid = v.relnamespace
               WHERE d.refobjid = %s AND d.refclassid = 'pg_class'::regclass AND v.oid <> %s
               ORDER BY v.oid""")

# Not our own triggers (orchestrate_*): they are the capture's, not the table's.
TRIGGERS = SQL(
    """SELECT tgname, pg_get_triggerdef(oid), tgenabled::text FROM pg_trigger
               WHERE tgrelid = %s AND NOT tgisinternal AND tgname NOT LIKE 'orchestrate\\_%%' ORDER BY tgname""")

OWNED_SEQUENCES = SQL(
    """SELECT n.nspname, s.relname, a.attname, d.deptype = 'i'
               FROM pg_depend d JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S'
               JOIN pg_namespace n ON n.oid = s.relnamespace
               JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
               WHERE d.refobjid = %s AND d.classid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')""")

# The grantee is NULL for PUBLIC: a role may be named "PUBLIC" too.
TABLE_ACL = SQL(
    """SELECT CASE WHEN a.grantee = 0 THEN NULL ELSE pg_get_userbyid(a.grantee) END,
                      a.privilege_type, a.is_grantable
               FROM pg_class c, aclexplode(c.relacl) a WHERE c.oid = %s AND a.grantee <> c.relowner""")

COLUMN_ACL = SQL(
    """SELECT att.attname, CASE WHEN a.grantee = 0 THEN NULL ELSE pg_get_userbyid(a.grantee) END,
                      a.privilege_type
               FROM pg_attribute att, aclexplode(att.attacl) a
               WHERE att.attrelid = %s AND att.attacl IS NOT NULL AND NOT att.attisdropped""")

REPLIDENT_INDEX = SQL(
    "SELECT i.indexrelid::regclass::text FROM pg_index i WHERE i.indrelid = %s AND i.indisreplident")

# A policy's parts: name, permissive, command, roles (NULL: PUBLIC), and its two
# expressions as the server deparses them (NULL when absent).
POLICIES = SQL(
    """SELECT polname, polpermissive, polcmd::text,
                      CASE WHEN polroles = '{0}' THEN NULL
                           ELSE ARRAY(SELECT r.rolname FROM unnest(polroles) WITH ORDINALITY AS u(oid, n)
                                      JOIN pg_roles r ON r.oid = u.oid ORDER BY u.n) END,
                      pg_get_expr(polqual, polrelid), pg_get_expr(polwithcheck, polrelid)
               FROM pg_policy WHERE polrelid = %s ORDER BY polname""")

PUBLICATIONS = SQL(
    """SELECT p.pubname FROM pg_publication_rel pr JOIN pg_publication p ON p.oid = pr.prpubid
               WHERE pr.prrelid = %s ORDER BY 1""")

# The btree equality operator, schema-qualified (OPERATOR(public.=)), of every column whose
# type lives outside pg_catalog (citext, ltree); NULL when the type has no default btree class.
EQ_OPS = SQL(
    """SELECT a.attname,
                      (SELECT format('OPERATOR(%%s.=)', quote_ident(o.oprnamespace::regnamespace::text))
                       FROM pg_opclass oc JOIN pg_am am ON am.oid = oc.opcmethod AND am.amname = 'btree'
                       JOIN pg_amop ao ON ao.amopfamily = oc.opcfamily AND ao.amopstrategy = 3
                            AND ao.amoplefttype = oc.opcintype AND ao.amoprighttype = oc.opcintype
                       JOIN pg_operator o ON o.oid = ao.amopopr
                       WHERE oc.opcdefault AND oc.opcintype = t.oid)
               FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
               WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped
                 AND t.typnamespace <> 'pg_catalog'::regnamespace""")

# --- the cutover's re-inspection --------------------------------------------------------

# One cheap query whose answer changes when anything inspect_table reads changes (see
# inspect.catalog_fingerprint). Parameter: {"o": the table's oid}.
CATALOG_FINGERPRINT = SQL(
    """SELECT md5(concat_ws('|',
             (SELECT xmin::text FROM pg_class WHERE oid = %(o)s),
             (SELECT string_agg(xmin::text, ',' ORDER BY attnum) FROM pg_attribute WHERE attrelid = %(o)s),
             (SELECT string_agg(xmin::text || ':' || objid::text, ',' ORDER BY objid, objsubid)
                FROM pg_depend WHERE refobjid = %(o)s AND refclassid = 'pg_class'::regclass),
             (SELECT string_agg(xmin::text, ',' ORDER BY oid) FROM pg_trigger WHERE tgrelid = %(o)s),
             (SELECT string_agg(xmin::text, ',' ORDER BY oid) FROM pg_policy WHERE polrelid = %(o)s),
             (SELECT string_agg(xmin::text, ',' ORDER BY objsubid) FROM pg_description
                WHERE objoid = %(o)s AND classoid = 'pg_class'::regclass),
             (SELECT string_agg(xmin::text, ',' ORDER BY oid) FROM pg_publication_rel WHERE prrelid = %(o)s),
             (SELECT string_agg(xmin::text, ',' ORDER BY oid) FROM pg_constraint
                WHERE conrelid = %(o)s OR confrelid = %(o)s),
             (SELECT string_agg(xmin::text, ',' ORDER BY indexrelid) FROM pg_index WHERE indrelid = %(o)s)))""")

# --- partitioned tables (partitioned_facts: maintain, the horizon) ------------------------

# oid, relkind and partitioning of a table by name. Parameters: schema, name.
PARTITIONED_TABLE = SQL(
    "SELECT c.oid, c.relkind, pt.partstrat, pt.partnatts, pt.partattrs::int2[], pt.partdefid "
    "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
    "LEFT JOIN pg_partitioned_table pt ON pt.partrelid = c.oid WHERE n.nspname = %s AND c.relname = %s")

# The partition key's column. Parameters: the oid, the key's attnum.
PART_KEY_COLUMN = SQL(
    "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = %s AND attnum = %s")

PART_COLUMNS = SQL(
    "SELECT attname, attgenerated::text FROM pg_attribute WHERE attrelid = %s AND attnum > 0 "
    "AND NOT attisdropped ORDER BY attnum")

# The primary key's columns and their types, in key order.
PART_PRIMARY_KEY = SQL(
    """SELECT a.attname, format_type(a.atttypid, a.atttypmod)
               FROM pg_index i CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
               JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
               WHERE i.indrelid = %s AND i.indisprimary ORDER BY k.ord""")

# Every partition with its bound expression and whether a DETACH CONCURRENTLY is pending.
PARTITIONS = SQL(
    """SELECT n.nspname, c.relname, pg_get_expr(c.relpartbound, c.oid), i.inhdetachpending
               FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
               JOIN pg_namespace n ON n.oid = c.relnamespace WHERE i.inhparent = %s""")


def key_bounds(table: QualifiedName, key: str) -> Composed:
    """min and max of the finite keys (two index probes when the key is indexed).

    'infinity' / '-infinity' keys are left out: no partition can hold them (they go to the
    default partition with NULLs and far-out keys) and Python's datetime cannot either."""
    k, t = col(key), name(table)
    return SQL("SELECT (SELECT {k}::timestamp FROM {t} WHERE {k} IS NOT NULL AND isfinite({k}) "
               "ORDER BY {k} LIMIT 1), (SELECT {k}::timestamp FROM {t} WHERE {k} IS NOT NULL AND "
               "isfinite({k}) ORDER BY {k} DESC LIMIT 1)").format(k=k, t=t)
