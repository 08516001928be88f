"""The synchronous capture: the dual-write trigger functions, the triggers and their switch,
and the reads around them (what is installed, the replication catalog for warnings).

Pure functions returning ``psycopg.sql.Composed``; ``orchestrator.phases.capture`` only
executes what they return. Identifiers go through ``sql.Identifier``; PL/pgSQL's record
names (``NEW``, ``OLD``) stay bare keywords in front of them, and ``Shape.eq`` (``=`` or a
schema-qualified ``OPERATOR(...)`` read from the catalog) is embedded as the server wrote it.
A function body is dollar-quoted by ``compose.with_body``, with a tag no column name holds.
"""

from __future__ import annotations

from collections.abc import Sequence

from orchestrator.sql import QualifiedName, Shape
from orchestrator.sql.compose import SQL, Composed, Literal, col, cols, name, with_body
from orchestrator.sql.twin import drop_function

__all__ = [
    "drop_function", "field", "fields", "key_match", "key_changed", "sync_function", "truncate_function",
    "create_sync_triggers", "sync_switch", "drop_sync_triggers", "TO_REGCLASS_OID", "TO_REGCLASS",
    "STAGED_TRIGGER", "PUBLICATIONS_OF", "SUBSCRIPTIONS_INTO", "LACKS_TWO_PHASE",
]  # drop_function: the capture and reverse functions go as prepare's rollback drops them


def field(record: str, column: str) -> Composed:
    """``NEW."a"``: a field of a PL/pgSQL record (the record name stays a bare keyword)."""
    return SQL(record + ".") + col(column)


def fields(record: str, columns: Sequence[str]) -> Composed:
    """``NEW."a", NEW."b"``."""
    return SQL(", ").join(field(record, c) for c in columns)


def key_match(shape: Shape, record: str) -> Composed:
    """WHERE clause that finds the record's row in the other table by (pk..., key).

    The key is part of the match so the planner prunes to one partition. A NULL key needs
    IS NULL (= never matches NULL); the caller branches on it so both forms stay indexable.
    """
    return SQL(" AND ").join(SQL("{} {} {}").format(col(c), shape.eq_sql(c), field(record, c))
                             for c in shape.twin_key)


def _key_match_null(shape: Shape, record: str) -> Composed:
    parts = [SQL("{} {} {}").format(col(c), shape.eq_sql(c), field(record, c)) for c in shape.pk if c != shape.key]
    parts.append(SQL("{} IS NULL").format(col(shape.key)))
    return SQL(" AND ").join(parts)


def key_changed(shape: Shape) -> Composed:
    """Did this UPDATE change (pk, key)? A row IS DISTINCT FROM resolves ``=`` through the
    search_path; a key of an extension type (ltree, citext) needs its own operator, named."""
    if not any(shape.eq(c) != "=" for c in shape.twin_key):
        return SQL("({}) IS DISTINCT FROM ({})").format(fields("NEW", shape.twin_key), fields("OLD", shape.twin_key))

    def one(c: str) -> Composed:
        return SQL("NOT coalesce({n} {eq} {o}, ({n} IS NULL) = ({o} IS NULL))").format(
            n=field("NEW", c), eq=shape.eq_sql(c), o=field("OLD", c))

    return SQL("(") + SQL(" OR ").join(one(c) for c in shape.twin_key) + SQL(")")


def sync_function(fn: QualifiedName, dst: QualifiedName, shape: Shape, dst_key: tuple[str, ...] | None = None,
                  probe: bool = True, recheck: bool = False, two_phase: bool = False) -> Composed:
    """The dual-write trigger function: applies each row change of one table to the other.

    - INSERT: a plain INSERT (no upsert: a new row cannot be in the twin yet, and a
      conflict here would mean the tables already diverged, which must fail loudly).
    - UPDATE keeping (pk, key): UPDATE by (pk, key).
    - UPDATE changing pk or key: DELETE the old (pk, key) and INSERT the new row; this moves
      it across partitions.
    - DELETE: by (pk, key).
    Every column is written, NULLs included; generated columns are computed by the twin.

    ``dst_key``: the columns of dst's own primary key (or NULLS NOT DISTINCT unique key),
    the arbiter of the probe below; the twin's (pk..., key) by default, the live primary key
    when dst is the retired heap table (the reverse trigger).

    Why the probe (``probe=False`` only renders the old behaviour for the tests' control
    runs): the UPDATE and DELETE by OLD key run in the writer's snapshot. When they touch
    no row, either the row is not in dst yet (READ COMMITTED, or any level before the
    backfill reached it: the backfill copies with FOR SHARE, so it will copy the version
    this transaction commits), or, at REPEATABLE READ / SERIALIZABLE, dst got the row after
    the writer's snapshot was taken and it is invisible: then doing nothing would lose the
    update, resurrect the deleted row or duplicate a moved one. The probe inserts the row
    (NEW for an update, OLD for a delete, which is deleted again right away) with
    ``ON CONFLICT (dst_key) DO NOTHING``: PostgreSQL raises 40001 (serialization failure)
    when the conflicting row is not visible to a REPEATABLE READ or SERIALIZABLE snapshot,
    so the application gets a retryable error and nothing changes; otherwise the insert
    is the exact effect (the row was not there). A visible conflict after a by-key miss
    means the tables already diverged: it fails loudly. The probe runs only when the
    by-key statement found nothing, so the common path costs what it did.

    ``recheck`` (distributed mode): dst is a Citus table, each statement on it runs in the
    worker's own snapshot, and a row the backfill committed can become visible between the
    by-key statement and the probe (seen under the workload). A visible conflict is then
    not a divergence: the by-key statement runs once more, in a newer snapshot, and only if
    it still finds nothing do the tables differ.

    ``two_phase`` (distributed mode): Citus commits a transaction that wrote one shard with
    one phase, on the worker, in the coordinator's pre-commit, before the writer's own
    commit. A SERIALIZABLE writer whose commit then fails (40001, "identification as a
    pivot, during commit attempt": PostgreSQL checks after pre-commit), or a coordinator that
    dies in between, would leave in the twin a write the application never committed.
    Once per transaction the function first runs a zero-row INSERT .. SELECT into dst:
    Citus executes it through its COPY path, which marks the transaction for two-phase
    commit, so the worker only prepares before the writer commits and rolls back with it.
    """
    target = name(dst)
    columns = cols(shape.columns)
    new_vals, old_vals = fields("NEW", shape.columns), fields("OLD", shape.columns)
    insert = SQL("INSERT INTO {} ({}) OVERRIDING SYSTEM VALUE VALUES ({});").format(target, columns, new_vals)
    rest = [c for c in shape.columns if c not in shape.twin_key]
    # Every column is part of the key: an update that keeps the key is a no-op.
    sets = SQL(", ").join(SQL("{} = {}").format(col(c), field("NEW", c)) for c in (rest or [shape.key]))
    arbiter = cols(dst_key or shape.twin_key)

    def by_old(stmt: Composed) -> Composed:
        if shape.key_nullable:
            return SQL("IF {k} IS NULL THEN {s} WHERE {null}; ELSE {s} WHERE {match}; END IF;").format(
                k=field("OLD", shape.key), s=stmt, null=_key_match_null(shape, "OLD"), match=key_match(shape, "OLD"))
        return SQL("{} WHERE {};").format(stmt, key_match(shape, "OLD"))

    def probe_insert(vals: Composed, again: Composed) -> Composed:
        differ = SQL("RAISE EXCEPTION 'orchestrate: % of a row of %: no row with its key in %, but one "
                     "conflicts with it (the tables differ)', TG_OP, TG_TABLE_NAME, {};").format(Literal(str(dst)))
        if recheck:
            differ = SQL("{} IF NOT FOUND THEN {} END IF;").format(again, differ)
        return SQL("INSERT INTO {} ({}) OVERRIDING SYSTEM VALUE VALUES ({}) ON CONFLICT ({}) DO NOTHING; "
                   "IF NOT FOUND THEN {} END IF;").format(target, columns, vals, arbiter, differ)

    delete_old = by_old(SQL("DELETE FROM {}").format(target))
    update_old = by_old(SQL("UPDATE {} SET {}").format(target, sets))
    if probe:
        # OLD is inserted and deleted again: a no-op when the row is not in dst yet, a
        # 40001 when dst holds a version this snapshot cannot see.
        delete_old += SQL("\n      IF NOT FOUND THEN {} {} END IF;").format(probe_insert(old_vals, delete_old),
                                                                           delete_old)
        update_old += SQL("\n      IF NOT FOUND THEN {} END IF;").format(probe_insert(new_vals, update_old))
    prologue = SQL("")
    if two_phase:
        prologue = SQL("""IF pg_catalog.current_setting('orchestrate.two_phase', true) IS DISTINCT FROM
       pg_catalog.txid_current()::text THEN
    INSERT INTO {} ({}) OVERRIDING SYSTEM VALUE SELECT {} WHERE false;
    PERFORM pg_catalog.set_config('orchestrate.two_phase', pg_catalog.txid_current()::text, true);
  END IF;
  """).format(target, columns, new_vals)
    return with_body(SQL("""CREATE OR REPLACE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS {q}
BEGIN
  {prologue}IF TG_OP = 'INSERT' THEN
    {insert}
  ELSIF TG_OP = 'UPDATE' THEN
    IF {changed} THEN
      {delete_old}
      {insert}
    ELSE
      {update_old}
    END IF;
  ELSIF TG_OP = 'DELETE' THEN
    {delete_old}
  END IF;
  RETURN NULL;
END
{q}"""), fn=name(fn), prologue=prologue, insert=insert, changed=key_changed(shape), delete_old=delete_old,
        update_old=update_old)


def truncate_function(fn: QualifiedName, dst: QualifiedName) -> Composed:
    # No two-phase prologue (see sync_function): Citus commits a TRUNCATE of a distributed
    # table with two phases by itself (checked with citus.log_remote_commands, Citus 13.2).
    return with_body(SQL("""CREATE OR REPLACE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS {q}
BEGIN
  TRUNCATE {dst};
  RETURN NULL;
END
{q}"""), fn=name(fn), dst=name(dst))


def create_sync_triggers(table: QualifiedName, trigger: str, fn: QualifiedName,
                         truncate_fn: QualifiedName, switch: QualifiedName | None = None) -> list[Composed]:
    """Row trigger for I/U/D plus a statement trigger that mirrors TRUNCATE, both ENABLE ALWAYS.

    Why ALWAYS: a trigger created plainly does not fire for sessions with
    ``session_replication_role = replica`` (logical replication apply workers,
    ``pg_restore --disable-triggers``, bulk loaders); their writes would be missing from
    the other table without a word. ENABLE ALWAYS takes the same SHARE ROW EXCLUSIVE lock
    as CREATE TRIGGER and runs in the same transaction, so no write slips in between.

    With ``switch`` (see :func:`sync_switch`), both fire only while that function returns
    true: the trigger can be created long before it is needed and turned on in O(1).

    Warning: CREATE TRIGGER takes SHARE ROW EXCLUSIVE on the table: it waits for writers in
    flight and blocks new ones while it waits. Run it under a short lock_timeout with retries.
    On a partitioned table it is cloned onto every partition: O(partitions).
    """
    when = SQL("WHEN ({}()) ").format(name(switch)) if switch is not None else SQL("")
    row, stmt = col(trigger), col(trigger + "_truncate")
    return [
        SQL("CREATE TRIGGER {} AFTER INSERT OR UPDATE OR DELETE ON {} FOR EACH ROW {}EXECUTE FUNCTION {}()").format(
            row, name(table), when, name(fn)),
        SQL("CREATE TRIGGER {} AFTER TRUNCATE ON {} FOR EACH STATEMENT {}EXECUTE FUNCTION {}()").format(
            stmt, name(table), when, name(truncate_fn)),
        SQL("ALTER TABLE {} ENABLE ALWAYS TRIGGER {}").format(name(table), row),
        SQL("ALTER TABLE {} ENABLE ALWAYS TRIGGER {}").format(name(table), stmt),
    ]


def sync_switch(fn: QualifiedName, on: bool) -> Composed:
    """The function a staged trigger's WHEN clause calls: true once the trigger is to fire.

    A one-line STABLE SQL function with no SET clause is inlined into the WHEN clause when a
    statement starts, so while it says false the trigger costs nothing per row (no call, no
    queued event), and replacing it is one catalog row, whatever the number of partitions the
    trigger was cloned onto. Its body names nothing, so search_path cannot reach it.
    """
    return with_body(SQL("CREATE OR REPLACE FUNCTION {fn}() RETURNS boolean LANGUAGE sql STABLE PARALLEL SAFE "
                         "AS {q}SELECT {value}{q}"), fn=name(fn), value=SQL("true" if on else "false"))


def drop_sync_triggers(table: QualifiedName, trigger: str) -> list[Composed]:
    return [SQL("DROP TRIGGER IF EXISTS {} ON {}").format(col(t), name(table))
            for t in (trigger, trigger + "_truncate")]


# --------------------------------------------------------------------------- reads

TO_REGCLASS_OID = SQL("SELECT pg_catalog.to_regclass(%s)::oid")
# Does the function (regprocedure text) exist without sync_function's two-phase prologue?
LACKS_TWO_PHASE = SQL("SELECT pg_catalog.strpos(p.prosrc, 'orchestrate.two_phase') = 0 FROM pg_catalog.pg_proc p "
                      "WHERE p.oid = pg_catalog.to_regprocedure(%s)")
TO_REGCLASS = SQL("SELECT to_regclass(%s)")

# Is the reverse trigger staged (a WHEN clause: the switch) on the table? Parameters: table, trigger.
STAGED_TRIGGER = SQL("SELECT count(*) FROM pg_catalog.pg_trigger WHERE tgrelid = pg_catalog.to_regclass(%s) "
                     "AND tgname = %s AND NOT tgisinternal AND tgqual IS NOT NULL")

# The publications that publish a table (listed, FOR TABLES IN SCHEMA, FOR ALL TABLES).
# Parameters: schema, table.
PUBLICATIONS_OF = SQL(
    "SELECT DISTINCT p.pubname, p.puballtables, p.pubviaroot FROM pg_catalog.pg_publication p "
    "JOIN pg_catalog.pg_publication_tables t ON t.pubname = p.pubname "
    "WHERE t.schemaname = %s AND t.tablename = %s ORDER BY 1")

# The subscriptions of this database that write into a table.
SUBSCRIPTIONS_INTO = SQL(
    "SELECT s.subname, s.subenabled FROM pg_catalog.pg_subscription_rel r "
    "JOIN pg_catalog.pg_subscription s ON s.oid = r.srsubid WHERE r.srrelid = %s::regclass ORDER BY 1")
