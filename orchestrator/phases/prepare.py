"""prepare: check the live table, then create the partitioned twin and its partitions.

Everything is created in one transaction, together with the record that says so: a crash
leaves either nothing or a complete twin. The twin is empty, so its indexes and
constraints cost nothing to build; partitions cover the oldest row's interval up to
now + premake, and a DEFAULT partition takes NULL and out-of-range keys.
"""

from __future__ import annotations

import time
from datetime import datetime

import psycopg
from loguru import logger

from orchestrator import changelog, distribute, drift, fidelity, sql, statements
from orchestrator.context import Preflight  # noqa: F401 - re-exported: prepare's result
from orchestrator.db import with_lock_retry
from orchestrator.errors import PreflightError
from orchestrator.horizon import partition_bounds
from orchestrator.inspect import KEY_TYPES, TableInfo, base_type, exists, has_index_on, inspect_table, key_bounds
from orchestrator.owner import EXECUTOR, acting_mode, install_executor
from orchestrator.phases import REVERSE_TRIGGER, Context, Step
from orchestrator.phases.capture import stage_reverse
from orchestrator.sql import QualifiedName, ident
from orchestrator.sql import twin as twin_sql
from orchestrator.sql.compose import SQL, Composed, col, name, text
from orchestrator.sql.twin import twin_index_name
from orchestrator.state.store import PhaseName

fmt = sql.timestamp_text  # the one formatting of a bound (maintain uses it too)
# partition_bounds lives with the horizon (orchestrator/horizon.py): prepare and the moving
# horizon compute the same partitions.


def preflight(ctx: Context, resuming: bool = False) -> Preflight:
    """All checks that can refuse the migration before anything is changed."""
    plan, conn = ctx.plan, ctx.conn
    version = conn.info.server_version // 10000
    if version < 14:
        raise PreflightError(f"PostgreSQL {version} is not supported: orchestrate needs 14 or later")
    info = inspect_table(conn, plan.table_name)
    with conn.cursor() as cur:
        mode = acting_mode(cur, info.owner)  # refuses (exit 3) a role that cannot act as the owner
        if mode == "member" and info.rls_enabled:
            cur.execute(twin_sql.CURRENT_ROLE_BYPASSES_RLS)
            if not cur.fetchone()[0]:
                # Our reads (window bounds, verify) run as us, and the policies would apply to us.
                raise PreflightError(
                    f"table {info.name} has row level security and the role running orchestrate "
                    f"({conn.info.user}) is not its owner and lacks BYPASSRLS: run as the owner "
                    f"({info.owner}) or a superuser")
        if info.rls_forced:
            cur.execute(twin_sql.ROLE_BYPASSES_RLS, (info.owner,))
            if not cur.fetchone()[0]:
                # The copies run as the owner; FORCE makes the owner's own policies filter them.
                raise PreflightError(
                    f"table {info.name} has FORCE ROW LEVEL SECURITY and its owner {info.owner} lacks BYPASSRLS: "
                    "copied as the owner, the policies would hide rows. ALTER ROLE "
                    f"{ident(info.owner)} BYPASSRLS for the migration, or ALTER TABLE {info.name} "
                    "NO FORCE ROW LEVEL SECURITY")
    # psycopg reads every % of a statement's text as a placeholder once parameters are bound,
    # and the copy and verify statements bind them: a name with % would fail mid-migration.
    pct = [n for n in (plan.table_name.schema, plan.table_name.name, *info.all_columns) if "%" in n]
    if pct:
        raise PreflightError(f"{info.name}: the name {ident(pct[0])} contains '%', which orchestrate cannot "
                             "migrate yet (maintain can): rename it for the migration")
    key = plan.partition_by.column
    col = info.column(key)
    if col is None:
        raise PreflightError(f"column {ident(key)} does not exist in {info.name}")
    if base_type(col.type) not in KEY_TYPES:
        raise PreflightError(
            f"column {ident(key)} of {info.name} is of type {col.type}; the partition key must be "
            "timestamp, timestamptz or date"
        )
    if col.generated:
        raise PreflightError(f"column {ident(key)} is a generated column and cannot be the partition key")
    if not info.primary_key:
        raise PreflightError(
            f"table {info.name} has no primary key: rows cannot be matched between the tables; add one first"
        )
    if col.not_null is False and version < 15:
        raise PreflightError(
            f"a nullable key column needs PostgreSQL 15 (UNIQUE NULLS NOT DISTINCT); {ident(key)} is nullable")
    warnings: list[str] = fidelity.check(conn, info, version)
    warnings += statements.check(conn, info, key, plan.acknowledge_statements)
    with conn.cursor() as cur:
        cur.execute(twin_sql.IN_INHERITANCE, (info.oid, info.oid))
        if cur.fetchone()[0]:
            raise PreflightError(f"table {info.name} takes part in table inheritance; not supported")
        cur.execute(twin_sql.RULES, (info.oid,))
        if cur.fetchone()[0]:
            raise PreflightError(f"table {info.name} has rules; they would not follow the rename")
        cur.execute(twin_sql.EXCLUSION_CONSTRAINTS, (info.oid,))
        if cur.fetchone()[0]:
            raise PreflightError(f"table {info.name} has an exclusion constraint; "
                                 "a partitioned table cannot enforce it across partitions")
    if info.incoming_fks and plan.cutover.incoming_foreign_keys == "refuse":
        refs = ", ".join(f"{fk.table}.{fk.name}" for fk in info.incoming_fks)
        raise PreflightError(
            f"foreign keys reference {info.name} ({refs}); a partitioned table's primary key must include "
            f"{ident(key)}, so they cannot point at it. Set cutover.incoming_foreign_keys: drop to drop them at cutover"
        )
    for fk in info.incoming_fks:
        warnings.append(f"foreign key {fk.table}.{fk.name} references the table and is dropped at cutover")
    mats = [d for d in info.dependents if d.kind == "m"]
    if mats:
        raise PreflightError(
            f"materialized view {mats[0].name} depends on {info.name}; drop it before the migration and "
            "re-create it after (it would keep reading the retired table)"
        )
    if key not in info.primary_key:
        kind = "UNIQUE NULLS NOT DISTINCT" if not col.not_null else "PRIMARY KEY"
        warnings.append(
            f"the primary key ({', '.join(info.primary_key)}) becomes {kind} ({', '.join(info.primary_key)}, {key}) "
            "because a partitioned table's unique indexes must include the partition key; "
            f"ON CONFLICT ({', '.join(info.primary_key)}) in the application must name {key} too after cutover"
        )
    for idx in info.indexes:
        if idx.unique and not idx.primary and key not in idx.columns:
            warnings.append(
                f"unique index {idx.name} becomes unique on its columns plus {key}: uniqueness is then only "
                "enforced within one key value"
            )
    if not has_index_on(info, key):
        warnings.append(f"no index starts with {key}: every backfill range scans the whole table; create one first")
    if plan.distribute is not None:

        warnings += distribute.check(ctx, info)  # refuses (exit 3) what Citus cannot take
    if info.triggers:
        warnings.append(
            "user triggers (" + ", ".join(t.name for t in info.triggers) + ") are re-created on the new table at "
            "cutover and disabled on the retired one"
        )
    if not resuming:
        taken = [n for n in (plan.twin, plan.retired, plan.default_partition) if exists(conn.cursor(), n)]
        if taken:
            raise PreflightError(f"{taken[0]} already exists; choose another name under names:")
    key_min, key_max = key_bounds(conn, info.name, key)
    partitions = partition_bounds(ctx, key_min)
    if not resuming:
        with conn.cursor() as cur:
            for lo, _hi in partitions:
                name = plan.partition_name(datetime.fromisoformat(lo))
                if exists(cur, name):
                    raise PreflightError(f"partition name {name} is already taken")
    query, params = _outside(ctx, info, partitions)
    with conn.cursor() as cur:
        cur.execute(query, params)
        to_default = cur.fetchone()[0]
    if to_default:
        warnings.append(f"{to_default} rows have a NULL key or a key outside the partitions: "
                        "they go to the default partition")
    return Preflight(info, partitions, key_min, key_max, to_default, warnings, version)


def _outside(ctx: Context, info: TableInfo, partitions: list[tuple[str, str]]) -> tuple[Composed, list]:
    """The count of rows the default partition takes, and its parameters."""
    key = ctx.plan.partition_by.column
    query = twin_sql.rows_outside(info.name, key, info.column(key).type, bounded=bool(partitions))
    return query, [partitions[0][0], partitions[-1][1]] if partitions else []


def twin_ddl(ctx: Context, pf: Preflight) -> list[tuple[str, Composed]]:
    """(action, SQL) for the twin, its keys, indexes, partitions and outgoing foreign keys."""
    plan, info = ctx.plan, pf.info
    shape = ctx.shape(info)
    twin = plan.twin
    out = [("create the partitioned twin", twin_sql.create_twin(info.name, twin, shape.key))]
    for lo, hi in pf.partitions:
        part = plan.partition_name(datetime.fromisoformat(lo))
        out.append((f"partition {part.name}", twin_sql.create_partition(part, twin, lo, hi, shape.key_type)))
    out.append(("default partition for NULL and out-of-range keys",
                twin_sql.create_default_partition(plan.default_partition, twin)))
    with ctx.conn.transaction(), ctx.conn.cursor() as cur:
        mode = acting_mode(cur, info.owner)
    if mode != "owner":
        # The owner's from the start, before any index is built or row written: PostgreSQL's
        # own index builds, VACUUM and ANALYZE then run the owner's expressions as the owner,
        # and the cutover has no per-partition ALTER OWNER to do under its lock.
        out.append((f"owner of the twin and its partitions: {info.owner}", twin_sql.owner_to(twin, info.owner)))
        for lo, _hi in pf.partitions:
            part = plan.partition_name(datetime.fromisoformat(lo))
            out.append((f"owner of {part.name}: {info.owner}", twin_sql.owner_to(part, info.owner)))
        out.append((f"owner of {plan.default_partition.name}: {info.owner}",
                    twin_sql.owner_to(plan.default_partition, info.owner)))
    out.append(("its primary key, extended with the partition key", twin_sql.twin_primary_key(twin, shape)))
    out += fidelity.not_valid_checks(info, twin)
    version = ctx.conn.info.server_version // 10000
    with ctx.conn.transaction(), ctx.conn.cursor() as cur:
        cur.execute(twin_sql.CATALOG_SEARCH_PATH)
        deferrable = fidelity.deferrable_uniques(cur, info.oid)
        for idx in info.indexes:
            if idx.primary:
                continue
            if idx.constraint in deferrable:
                add_key = shape.key if shape.key not in idx.columns else None
                out.append((f"unique constraint like {idx.constraint} (DEFERRABLE kept)", fidelity.unique_constraint(
                    twin, _twin_index_name(idx.name), deferrable[idx.constraint], add_key)))
                continue
            cur.execute(twin_sql.INDEX_HEAD_NAMES, (idx.name, info.oid))
            qname, qtable = cur.fetchone()
            # The head pg_get_indexdef rendered (the server's quoted names), and the twin's.
            prefix = text(twin_sql.index_head(idx.unique, SQL(qname), SQL(qtable)))
            new_prefix = text(twin_sql.index_head(idx.unique, col(_twin_index_name(idx.name)), name(twin)))
            add_key = shape.key if idx.unique and shape.key not in idx.columns else None
            stmt = sql.rewrite_index(idx.definition, prefix, new_prefix, add_key)
            if idx.unique and shape.dist is not None and shape.dist not in (*idx.columns, shape.key):
                # Citus enforces a unique index only when it holds the distribution column.
                stmt = sql.rewrite_index(stmt, new_prefix, new_prefix, shape.dist)
            out.append((f"index like {idx.name}", SQL(stmt)))  # the server's definition, renamed
    for fk in info.outgoing_fks:
        if fidelity.skip_foreign_key(fk.definition, version):
            continue  # warned at preflight (fidelity.check)
        out.append((f"foreign key {fk.name}", twin_sql.add_foreign_key(twin, fk.name, fk.definition)))
    if plan.distribute is not None:

        # Last, while the twin is still empty: Citus creates the shards of every partition
        # and moves no row. In prepare's one transaction, with everything above.
        out.append((f"distribute the twin over the Citus workers by {plan.distribute.column}",
                    distribute.distribute_twin_sql(ctx)))
    return out


def created_oids(cur: psycopg.Cursor, ctx: Context) -> dict:
    """The oids of what prepare made (twin, partitions, functions): rollback drops by these."""
    twin = cur.execute(twin_sql.REGCLASS_OID, (str(ctx.plan.twin),)).fetchone()[0]
    parts = [r[0] for r in cur.execute(twin_sql.PARTITION_OIDS, (twin,)).fetchall()]
    fn = cur.execute(twin_sql.REGPROCEDURE_OID, (f"{ctx.function(EXECUTOR)}(text)",)).fetchone()[0]
    return {"twin": int(twin), "partitions": [int(p) for p in parts], "functions": {EXECUTOR: int(fn)}}


_twin_index_name = twin_index_name  # the name the twin's copy of an index gets (sql/twin.py)


class Prepare:
    """Creates the twin (partitioned, premade partitions, every index and constraint the
    table's shape needs) after a preflight that refuses what cannot be migrated."""

    name = PhaseName.PREPARE

    def steps(self, ctx: Context, pf: Preflight | None = None) -> list[Step]:
        pf = pf or preflight(ctx)
        rows = [Step(self.name, "preflight: table, key type, primary key, references, names", "(catalog reads)",
                     "none", pf.estimates)]
        for action, stmt in twin_ddl(ctx, pf):
            lock = "ACCESS EXCLUSIVE on the new (empty) twin"
            if action.startswith("foreign key"):
                lock = "SHARE ROW EXCLUSIVE on the referenced table (brief; lock_timeout + retry)"
            rows.append(Step(self.name, action, text(stmt), lock))
        if ctx.plan.distribute is not None:
            return rows
        rows.append(Step(self.name, "reverse triggers staged on the twin, switched off until the cutover turns them "
                         "on (so the swap does not clone a trigger onto every partition under its lock)",
                         f"CREATE TRIGGER {REVERSE_TRIGGER} ... ON {ctx.plan.twin} FOR EACH ROW "
                         f"WHEN (orchestrate.reverse_on_<id>()) ...", "ACCESS EXCLUSIVE on the new (empty) twin"))
        return rows

    def run(self, ctx: Context) -> None:
        pf = ctx.options.pop("preflight", None) or preflight(ctx)
        ctx.info = pf.info
        statements = twin_ddl(ctx, pf)
        t0 = time.monotonic()

        def body(cur: psycopg.Cursor) -> None:
            if ctx.plan.distribute is not None:
                # One connection per worker for the whole transaction: Citus refuses the
                # function commands below after a parallel (multi-connection) operation.
                cur.execute(twin_sql.CITUS_SEQUENTIAL)
            for _action, stmt in statements:
                cur.execute(stmt)
            install_executor(cur, ctx.function(EXECUTOR), pf.info.owner)
            if ctx.plan.distribute is None:
                # Distributed: no reverse trigger (it would fire on the workers' shards and
                # cannot write the coordinator's heap table); see orchestrator/distribute.py.
                stage_reverse(cur, ctx)
            ctx.store.set_facts(cur, ctx.mid, partitions=pf.partitions, warnings=pf.warnings,
                                estimates=pf.estimates, table_oid=pf.info.oid, owner=pf.info.owner,
                                created=created_oids(cur, ctx),
                                shape=drift.snapshot(ctx.conn, pf.info, ctx.plan.partition_by.column))
            ctx.store.phase_done(cur, ctx.mid, self.name, time.monotonic() - t0,
                                 partitions=len(pf.partitions) + 1, rows_to_default=pf.rows_to_default)

        # One transaction: the twin and the record of it commit together. Locks here touch
        # only the new objects, plus referenced tables of outgoing foreign keys.
        with_lock_retry(ctx.conn, body, what="prepare", policy=ctx.plan.locks)
        for w in pf.warnings:
            ctx.store.event(ctx.mid, "warning", w)

    def undo(self, ctx: Context) -> None:
        """Drop the twin, only if it is the table this migration created (by its recorded oid):
        a same-named table somebody else made is left alone, with a warning."""
        recorded = (ctx.facts.get("created") or {}).get("twin")

        def body(cur: psycopg.Cursor) -> None:
            found = cur.execute(twin_sql.TO_REGCLASS_OID, (str(ctx.plan.twin),)).fetchone()[0]
            if found is None:
                return
            if recorded is None or int(found) != int(recorded):
                msg = (f"rollback: {ctx.plan.twin} is not the table this migration created "
                       f"(oid {found}, recorded {recorded}); left in place")
                logger.warning(msg)
                ctx.store.event(ctx.mid, "warning", msg)
                return
            cur.execute(twin_sql.drop_table_cascade(ctx.plan.twin))

        # The twin goes in its own short transaction: the application already runs on the heap.
        with_lock_retry(ctx.conn, body, what="drop the twin", policy=ctx.plan.locks)
        # Then the migration's own functions in the state schema (the capture and reverse
        # functions, their guards, the owner's executor) and async capture's change log, even
        # after a crash mid-phase. Last: the staged reverse triggers on the twin used them.
        with ctx.conn.transaction(), ctx.conn.cursor() as cur:
            for kind in ("capture", "reverse"):
                for k in (kind, kind + "_truncate", kind + "_on", kind + "_columns"):
                    cur.execute(twin_sql.drop_function(ctx.function(k)))
            changelog.drop(cur, ctx)
            cur.execute(twin_sql.drop_function(ctx.function(EXECUTOR), "text"))


def describe_names(ctx: Context) -> dict[str, str]:
    p = ctx.plan
    return {"table": str(p.table_name), "twin": str(p.twin), "retired": str(p.retired),
            "default_partition": str(p.default_partition)}


__all__ = ["Prepare", "Preflight", "preflight", "QualifiedName"]
