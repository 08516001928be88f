"""Distributed mode: the twin is also distributed over Citus workers (plan ``distribute:``).

Role: everything the migration does differently on a Citus coordinator, in one place. The
phases call in here at a few branch points:

- preflight (:func:`check`): the coordinator, its workers and the table can take it, or
  one line naming what is missing (PreflightError, exit 3);
- prepare (:func:`distribute_twin`): the twin is created partitioned as on one node, then
  ``create_distributed_table`` while it is still empty (cheap: no row moves), in the same
  transaction as everything else prepare does;
- verify (:func:`settled_digest`): the digests of a range of both tables, read again, and
  for a busy range under a short SHARE lock (see there why one snapshot is not enough);
- cutover: no reverse trigger (see README "When one machine is not enough"): apply stops
  before the swap unless the plan acknowledges that a rollback after it loses the writes
  made since (:func:`cutover_refusal`).

Capture and backfill need almost no branch: the capture trigger on the coordinator's local
heap table writes into the distributed twin through the coordinator (Citus routes each row
to its shard in the writer's transaction; the trigger makes Citus commit it with two phases,
see sql.sync.sync_function's ``two_phase``), and the backfill's
``INSERT INTO twin SELECT ... FROM heap ... FOR SHARE`` runs the SELECT locally, with its
row locks, and ships the rows to the shards in the same transaction.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import psycopg

from orchestrator.errors import PreflightError
from orchestrator.sql import QualifiedName, ident, parse_qualified
from orchestrator.sql import distribute as dsql
from orchestrator.sql.compose import Composed
from orchestrator.sql.probes import WORKER_SIGNALS_SQL

if TYPE_CHECKING:
    from orchestrator.context import Context
    from orchestrator.inspect import TableInfo

#: How often verify compares a range's two digests without a lock, the pause between
#: attempts, and the attempts at the SHARE lock after that (see settled_digest).
DIGEST_ATTEMPTS = 3
DIGEST_PAUSE_S = 0.1
LOCK_ATTEMPTS = 20

NO_ROLLBACK = ("a rollback after the cutover loses the writes made since the cutover: a trigger on a distributed "
               "table runs on the workers' shards and cannot write the coordinator's retired heap table, so "
               "distributed mode has no reverse sync")


def citus_version(conn: psycopg.Connection) -> str | None:
    row = conn.execute(dsql.CITUS_VERSION).fetchone()
    return row[0] if row else None


def workers(conn: psycopg.Connection) -> list[tuple[str, int]]:
    """The active primary workers that take shards (pg_dist_node; the coordinator is group 0)."""
    return [(r[0], int(r[1])) for r in conn.execute(dsql.ACTIVE_WORKERS).fetchall()]


def on_workers(conn: psycopg.Connection, command: str) -> list[tuple[str, int, bool, str]]:
    """(node, port, success, result) of ``command`` on every worker (Citus' run_command_on_workers)."""
    return [(r[0], int(r[1]), bool(r[2]), r[3]) for r in conn.execute(dsql.ON_WORKERS, (command,)).fetchall()]


# On each worker: its standbys' replay lag (s) and its replication slot holding the most WAL.
def worker_signals(conn: psycopg.Connection) -> list[tuple[str, bool, float | None, str | None, int | None]]:
    """(worker, readable, replica lag s, slot, retained bytes) of every worker, read through
    the coordinator (for the throttler, which merely observes: read-only SELECTs)."""
    out = []
    for host, port, ok, result in on_workers(conn, WORKER_SIGNALS_SQL):
        node = f"{host}:{port}"
        parts = (result or "").split(" ")
        if not ok or len(parts) != 3:
            out.append((node, False, None, None, None))
            continue
        lag, slot, retained = parts
        out.append((node, True, float(lag), None if slot == "-" else slot,
                    None if retained == "-" else int(retained)))
    return out


def check(ctx: Context, info: TableInfo) -> list[str]:
    """Refuse (PreflightError, exit 3) with one line naming what is missing; else warnings."""
    d = ctx.plan.distribute
    assert d is not None
    conn = ctx.conn
    warnings: list[str] = []
    if citus_version(conn) is None:
        raise PreflightError("distribute: the citus extension is not installed in this database: "
                             "CREATE EXTENSION citus on the coordinator and on every worker")
    if not conn.execute(dsql.IS_COORDINATOR).fetchone()[0]:
        raise PreflightError("distribute: this database is not a Citus coordinator: run "
                             "SELECT citus_set_coordinator_host(...) and citus_add_node(...) on it, "
                             "and point --dsn at it")
    nodes = workers(conn)
    if not nodes:
        raise PreflightError("distribute: no active worker is registered on the coordinator "
                             "(SELECT citus_add_node('host', port) for each worker)")
    levels = [("coordinator", conn.execute(dsql.WAL_LEVEL).fetchone()[0])]
    for host, port, ok, result in on_workers(conn, dsql.SHOW_WAL_LEVEL):
        if not ok:
            raise PreflightError(f"distribute: worker {host}:{port} cannot be reached from the coordinator: "
                                 f"{result}")
        levels.append((f"worker {host}:{port}", result))
    for where, level in levels:
        if level != "logical":
            raise PreflightError(f"distribute: wal_level is {level} on the {where}: Citus moves shards (a new "
                                 "worker, citus_rebalance_start) by logical replication; set wal_level = logical "
                                 "and restart it")
    # Every captured writing transaction is prepared on its worker (two-phase commit, see
    # sql.sync.sync_function): as many may be in flight as the coordinator has sessions.
    sessions = conn.execute(dsql.MAX_CONNECTIONS).fetchone()[0]
    for host, port, ok, result in on_workers(conn, dsql.SHOW_MAX_PREPARED):
        if ok and int(result) < sessions:
            raise PreflightError(
                f"distribute: max_prepared_transactions is {result} on the worker {host}:{port}, below the "
                f"coordinator's max_connections ({sessions}): the capture commits every writing transaction "
                f"with two phases, so more concurrent writers would fail; set it to at least {sessions} "
                "(Citus' own default is 2 x max_connections) and restart the worker")
    col = info.column(d.column)
    if col is None:
        raise PreflightError(f"distribute: column {ident(d.column)} does not exist in {info.name}")
    if col.generated:
        raise PreflightError(f"distribute: column {ident(d.column)} is generated; Citus needs a stored value to "
                             "route each row")
    if not col.not_null:
        raise PreflightError(f"distribute: column {ident(d.column)} of {info.name} is nullable: Citus refuses "
                             f"rows with a NULL distribution column (every such write would fail). "
                             f"ALTER TABLE {info.name} ALTER COLUMN {ident(d.column)} SET NOT NULL first")
    hashable = conn.execute(dsql.HASHABLE_TYPE, (col.type,)).fetchone()[0]
    if not hashable:
        raise PreflightError(f"distribute: column {ident(d.column)} is of type {col.type}, which has no hash "
                             "function: Citus cannot hash-distribute by it")
    if info.outgoing_fks:
        fks = ", ".join(fk.name for fk in info.outgoing_fks)
        raise PreflightError(f"distribute: {info.name} has foreign keys ({fks}): a distributed table may only "
                             "reference reference tables or colocated distributed tables. "
                             "Drop them, or convert the referenced tables first")
    if info.triggers:
        raise PreflightError(f"distribute: {info.name} has user triggers ({', '.join(t.name for t in info.triggers)})"
                             ": on a distributed table they would run on the workers' shards (Citus refuses them "
                             "unless citus.enable_unsafe_triggers); move their logic to the application first")
    with conn.cursor() as cur:
        cur.execute(dsql.DEFERRABLE_UNIQUE_COUNT, (info.oid,))
        if cur.fetchone()[0]:
            raise PreflightError(f"distribute: {info.name} has DEFERRABLE unique constraints; Citus does not "
                                 "distribute them")
    if d.colocate_with not in (None, "none", "default"):
        row = conn.execute(dsql.COLOCATION_TYPE, (d.colocate_with,)).fetchone()
        if row is None:
            raise PreflightError(f"distribute.colocate_with: {d.colocate_with} is not a hash-distributed table")
        if row[0] != col.type:
            raise PreflightError(f"distribute.colocate_with: {d.colocate_with} is distributed by a {row[0]} "
                                 f"column, {ident(d.column)} is {col.type}: colocated tables need the same type")
    shape = ctx.shape(info)
    if d.column not in info.primary_key:
        warnings.append(f"distribute: the twin's primary key becomes ({', '.join(shape.twin_key)}): Citus "
                        f"enforces a unique key only when it holds the distribution column {d.column}; "
                        f"ON CONFLICT in the application must name {d.column} too after cutover")
    for idx in info.indexes:
        if idx.unique and not idx.primary and d.column not in idx.columns:
            warnings.append(f"distribute: unique index {idx.name} becomes unique on its columns plus "
                            f"{d.column}: uniqueness is then only enforced within one {d.column}")
    shards = d.shard_count or int(conn.execute(dsql.SHARD_COUNT).fetchone()[0])
    warnings.append(f"distribute: {shards} shard(s) per partition over {len(nodes)} worker(s) "
                    f"({', '.join(f'{h}:{p}' for h, p in nodes)}); replica identity: the twin's primary key; "
                    f"{d.column} cannot change in an UPDATE once cut over (Citus refuses it)")
    if not d.accept_no_rollback_after_cutover:
        warnings.append(f"distribute: {NO_ROLLBACK}. apply stops after verify until the plan sets "
                        "distribute.accept_no_rollback_after_cutover: true (a rollback before the cutover "
                        "loses nothing)")
    else:
        warnings.append(f"distribute: {NO_ROLLBACK} (acknowledged in the plan)")
    return warnings


def distribute_twin_sql(ctx: Context) -> Composed:
    """``create_distributed_table`` for the (empty) twin: its partitions become shards too.

    Warning: takes locks on the twin only (new, empty, nobody else uses it yet); in the
    prepare transaction, so the twin and its distribution commit or vanish together."""
    d = ctx.plan.distribute
    assert d is not None
    return dsql.create_distributed_table(ctx.plan.twin, d.column, d.colocate_with, d.shard_count)


@contextmanager
def local_ddl(cur: psycopg.Cursor) -> Iterator[None]:
    """Run the DDL inside on the coordinator only (``citus.enable_ddl_propagation`` off for
    it, then back to what it was); without Citus loaded, nothing changes.

    For ``ALTER SEQUENCE ... OWNED BY`` at finalize: a sequence that a distributed table's
    default uses is a distributed object, and Citus refuses to alter it ("Altering a
    distributed sequence is currently not supported"). Who owns it matters only on the
    coordinator, where the application's inserts call nextval() and where finalize drops
    the retired table (which must no longer own it)."""
    before = cur.execute(dsql.DDL_PROPAGATION).fetchone()[0]
    if before is None:
        yield
        return
    cur.execute(dsql.DDL_PROPAGATION_OFF)
    try:
        yield
    finally:
        cur.execute(dsql.SET_DDL_PROPAGATION, (before,))


def own_sequences(cur: psycopg.Cursor, retired: TableInfo, table: str | QualifiedName) -> list[str]:
    """At finalize: the serial sequences the retired heap table still owns become the new
    table's, so that DROP TABLE retired keeps them. Not at the cutover: Citus refuses to
    change the owner of a sequence once a distributed table owns it, so a rollback could
    not give it back to the heap table."""
    done = []
    target = _qualified(table)
    for seq in retired.sequences:
        if seq.identity:
            continue
        with local_ddl(cur):
            cur.execute(dsql.owned_by(seq.name, target, seq.column))
        done.append(str(seq.name))
    return done


def is_distributed(conn: psycopg.Connection, table: str) -> bool:
    if citus_version(conn) is None:
        return False
    return bool(conn.execute(dsql.IS_DISTRIBUTED, (table,)).fetchone()[0])


def settled_digest(conn: psycopg.Connection, digest, table: str, lock_timeout_s: float) -> dict:
    """The digests of one range of both tables; equal unless the tables really differ.

    Why not one snapshot, as on one node: a distributed query reads each shard in a
    transaction of its own on the worker, so the coordinator's REPEATABLE READ snapshot
    does not cover the twin; a write committed between the two reads shows in one digest
    and not the other. So the pair is first read DIGEST_ATTEMPTS times without any lock
    (each in a fresh transaction): a quiet range agrees at once. A range that still differs
    (a hot range, the current day say, written every few milliseconds) is read once more
    under a SHARE lock on the coordinator's heap table: it stops its writers, and with them
    the capture trigger, the only writer of the twin before the cutover. A writer that held
    the table has finished its workers' commits before its lock is released (Citus commits
    them in the transaction's commit callbacks, before locks go), so under the lock both
    reads see the same writes: a difference is then a real divergence. The lock waits at
    most ``lock_timeout_s`` (retried), and holds for the two reads of this one range.
    ``digest(cur, locked)`` returns the single-node result dict.
    """
    result: dict = {}
    for attempt in range(DIGEST_ATTEMPTS):
        with conn.transaction(), conn.cursor() as cur:
            result = digest(cur, False)
        if result["ok"]:
            if attempt:
                result["attempts"] = attempt + 1
            return result
        time.sleep(DIGEST_PAUSE_S)
    last: Exception | None = None
    for attempt in range(LOCK_ATTEMPTS):
        try:
            with conn.transaction(), conn.cursor() as cur:
                cur.execute(dsql.lock_timeout(lock_timeout_s))
                # Writers wait from here to the commit: the two reads of one range.
                cur.execute(dsql.lock_share(_qualified(table)))
                result = digest(cur, True)
            result["attempts"] = DIGEST_ATTEMPTS + attempt + 1
            result["locked"] = True
            return result
        except psycopg.errors.LockNotAvailable as e:
            last = e
            time.sleep(min(2.0, DIGEST_PAUSE_S * 2 ** attempt))
    raise PreflightError(f"verify: could not lock {table} in SHARE mode to compare a busy range "
                         f"({LOCK_ATTEMPTS} attempts: {str(last).splitlines()[0] if last else ''}); run apply again")


def cutover_refusal(ctx: Context) -> str | None:
    """Why apply must stop before the swap in distributed mode (None: it may swap)."""
    d = ctx.plan.distribute
    if d is None or d.accept_no_rollback_after_cutover:
        return None
    return (f"{ctx.plan.table_name}: verified and ready, not cut over: in distributed mode {NO_ROLLBACK}. "
            "Set distribute.accept_no_rollback_after_cutover: true in the plan to cut over "
            "(a rollback now loses nothing)")


def shard_rows(conn: psycopg.Connection, table: str) -> dict[str, int]:
    """Rows per worker ("host:port") of a distributed (partitioned) table, from citus_shards'
    placements: a count(*) per shard, run where the shard lives."""
    out: dict[str, int] = {}
    res = conn.execute(dsql.SHARD_ROWS, (table,)).fetchall()
    for host, port, n in res:
        out[f"{host}:{port}"] = int(n)
    return out


def _qualified(table: str | QualifiedName) -> QualifiedName:
    """The callers (runner, verify) pass the table as its rendered name (``str(QualifiedName)``);
    parsed back so that the statements quote it through sql.Identifier."""
    return table if isinstance(table, QualifiedName) else parse_qualified(table)
