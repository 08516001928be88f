"""The runner: drives the phases as a resumable state machine. One function per verb.

States of a migration row: ``running`` (phases prepare..verify in progress) ->
``cut_over`` -> ``finalized``; or ``rolled_back`` from either live state. Each phase
records itself done in the same transaction as its effect, so `apply` after a crash
simply continues with the first phase not done. An advisory lock (held on its own
session for the whole command) keeps two orchestrate processes off one table.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import psycopg
from loguru import logger

from orchestrator import changelog, distribute, drift, horizon
from orchestrator.context import _state_tables, session  # noqa: F401 - runner.session: the verbs' session
from orchestrator.control import steering
from orchestrator.db import check_endpoints, connect, is_connection_error, with_lock_retry
from orchestrator.errors import ConnectionFailed, OrchestrateError, PreflightError, StateConflict
from orchestrator.inspect import inspect_table, resolve
from orchestrator.maintain import maintenance_preview
from orchestrator.owner import EXECUTOR, MONITOR_HINT, sees_all_sessions
from orchestrator.phases import REVERSE_TRIGGER, Context
from orchestrator.phases.capture import drop_sync, install_capture, refresh_distributed_capture, replication_warnings
from orchestrator.phases.cutover import cutover_gates
from orchestrator.phases.order import ordered
from orchestrator.phases.prepare import Preflight, describe_names, preflight
from orchestrator.plan import Plan
from orchestrator.sql import QualifiedName, ident
from orchestrator.sql import runner as runner_sql
from orchestrator.state.store import (
    PHASES,
    MigrationStatus,
    Store,
    ensure_schema,
)
from orchestrator.status import Status


@dataclass
class Outcome:
    """What a verb did, for the CLI to print (text or JSON)."""

    message: str
    data: dict = field(default_factory=dict)


def make_plan(plan: Plan, dsn: str | None) -> Outcome:
    """Validate the plan (against the live table when a DSN is given) and list the steps."""
    data: dict = {"table": str(plan.table_name), "plan_hash": plan.shape_hash(), "steps": [], "warnings": []}
    if dsn is None:
        data["validated_against_database"] = False
        data["names"] = {"table": str(plan.table_name), "twin": str(plan.twin), "retired": str(plan.retired),
                         "default_partition": str(plan.default_partition)}
        return Outcome("plan is valid (no --dsn: not checked against the database)", data)
    conn = connect(dsn, "plan")
    try:
        store = Store(conn)
        ctx = Context(plan=plan, dsn=dsn, conn=conn, store=store, migration=None)
        if _state_tables(conn):
            ctx.migration = store.live(str(plan.table_name))
        if ctx.migration is not None:
            data["in_progress"] = {"id": ctx.migration.id, "status": ctx.migration.status,
                                   "phase": ctx.migration.phase}
        found = resolve(conn.cursor(), plan.table_name)
        if found is not None and found[1] == "p":
            # Already partitioned (cut over, or made by hand): the plan is the next maintain pass.

            data["validated_against_database"] = True
            data["maintenance"] = maintenance_preview(plan, conn)
            mp = data["maintenance"]
            return Outcome(f"{plan.table_name} is partitioned: the next maintain pass would create "
                           f"{len(mp['create'])} and remove {len(mp['remove'])} partition(s)", data)
        pf: Preflight = preflight(ctx, resuming=ctx.migration is not None)
        ctx.info = pf.info
        data["validated_against_database"] = True
        data["server_version"] = pf.server_version
        data["estimates"] = pf.estimates
        data["warnings"] = (pf.warnings + privilege_warnings(ctx, pf.info)
                            + replication_warnings(conn, plan.table_name, plan.twin))
        if plan.guard_ddl and not drift.can_guard_ddl(conn)[0]:
            data["warnings"].append(drift.can_guard_ddl(conn)[1])
        data["names"] = describe_names(ctx)
        data["capture"] = capture_summary(plan)
        data["partitions"] = [{"name": plan.partition_name(__import__("datetime").datetime.fromisoformat(lo)).name,
                               "from": lo, "to": hi} for lo, hi in pf.partitions]
        steps = []
        for ph in ordered():
            steps += ph.steps(ctx, pf)
        data["steps"] = [s.as_dict() for s in steps]
        if ctx.migration is not None:

            data["gates"] = cutover_gates(ctx)
        return Outcome(f"plan for {plan.table_name}: {len(steps)} steps, "
                       f"{len(pf.partitions) + 1} partitions, ~{pf.info.estimated_rows} rows", data)
    finally:
        conn.close()


def apply(plan: Plan, dsn: str, *, until: str | None = None, replica_dsns: tuple[str, ...] = (),
          cutover: bool | None = None, recopy: tuple[str, ...] = (), progress=None, options: dict | None = None,
          now=None) -> Outcome:
    """Run or resume the migration up to `until` (or through cutover)."""
    if until is not None and until not in PHASES:
        raise StateConflict(f"--until must be one of {', '.join(PHASES)}")
    from contextlib import ExitStack


    # Replicas through a transaction-mode pooler: refused before anything is recorded.
    check_endpoints([*plan.throttle.all_replicas, *replica_dsns], "replica-check")
    # The state schema is created only once preflight passed: a refused apply leaves nothing.
    with session(plan, dsn, state=False) as ctx, ExitStack() as running:
        ctx.replica_dsns = replica_dsns
        ctx.progress = progress
        ctx.now = now
        ctx.options.update(options or {})
        table = str(plan.table_name)
        m = ctx.store.live(table) if _state_tables(ctx.conn) else None
        if m is None:
            last = ctx.store.latest(table) if _state_tables(ctx.conn) else None
            if last is not None and last.status == MigrationStatus.FINALIZED and last.plan_hash == plan.shape_hash():
                return Outcome(f"{table} was already migrated and finalized; nothing to do",
                               {"status": "finalized", "migration_id": last.id})
            # Every check that can refuse runs before anything is recorded; prepare reuses it.
            pf = ctx.options["preflight"] = preflight(ctx)
            pf.warnings += privilege_warnings(ctx, pf.info)  # refuses what apply could not do
            ensure_schema(ctx.conn)
            m = ctx.store.create(table, plan.shape_hash(), plan.for_state())
            ctx.migration = m
            logger.info("migration {} started for {}", m.id, table)
        else:
            ensure_schema(ctx.conn)  # an upgrade, if this version's schema is newer
            ctx.migration = m
        if m.plan_hash != plan.shape_hash():
            raise StateConflict(
                f"the plan changed since migration {m.id} started (shape {plan.shape_hash()} != {m.plan_hash}); "
                "restore the original plan or roll back first"
            )
        if m.status == MigrationStatus.CUT_OVER:
            return Outcome(f"{table} is already cut over; nothing to do (finalize or rollback next)",
                           {"status": "cut_over", "migration_id": m.id})
        # Throttle, operator controls, live figures and metrics: ctx.options "throttle", "controls".
        running.enter_context(steering(ctx))
        # Async capture: the replay thread runs beside every phase (pause holds only the backfill).
        running.enter_context(changelog.replaying(ctx))
        if recopy:
            _mark_recopy(ctx, recopy)
        ctx.refresh()
        started = time.monotonic()
        rounds = 0
        refreshed = False
        phases = ordered()
        while phases:
            phase = phases.pop(0)
            ctx.refresh()
            if ctx.migration.done(phase.name):
                continue
            # The application may have changed the table since the last look (DDL drift):
            # carry it to the twin first; a carried column re-opens backfill and verify.
            if drift.check(ctx, install_capture):
                ctx.info = None
                phases = ordered()
                continue
            horizon.extend(ctx)  # partitions that became due while the migration ran
            if plan.distribute is not None and not refreshed and ctx.migration.done("capture"):
                refreshed = True  # once per run, after the drift check: the twin has the table's columns
                if ctx.info is None:
                    ctx.info = preflight(ctx, resuming=True).info
                with ctx.conn.transaction(), ctx.conn.cursor() as cur:
                    if refresh_distributed_capture(cur, ctx):
                        ctx.store.event(m.id, "capture", "dual-write function rendered again: its writers' "
                                        "transactions commit with two phases on the Citus workers from now on")
            if phase.name == "cutover":
                postpone = plan.cutover.postpone if cutover is None else not cutover
                if postpone:
                    return Outcome(f"{table}: verified and ready; cutover postponed (run `apply --cutover`)",
                                   {"status": "ready", "migration_id": m.id})
                refusal = distribute.cutover_refusal(ctx)
                if refusal:
                    ctx.store.event(m.id, "refused", refusal)
                    raise StateConflict(refusal)
            try:
                _run_phase(ctx, phase)
            except drift.ShapeChanged as e:
                rounds += 1
                if rounds > 20:
                    raise drift.DriftRefused(f"{table} keeps changing while it is being migrated ({e}); "
                                             "run apply again once the schema changes are deployed") from None
                if not drift.check(ctx, install_capture):
                    raise drift.DriftRefused(f"{phase.name}: the twin's columns differ from the table's ({e}) "
                                             "and the difference is not a change orchestrate can carry; "
                                             "nothing was cut over") from None
                ctx.info = None
                phases = ordered()
                continue
            if until == phase.name:
                return Outcome(f"{table}: stopped after {phase.name} as asked (--until)",
                               {"status": "running", "phase": phase.name, "migration_id": m.id})
        return Outcome(f"{table} is partitioned: cut over in {time.monotonic() - started:.1f}s of this run",
                       {"status": "cut_over", "migration_id": m.id})


def capture_summary(plan: Plan) -> dict:
    """What ``plan`` shows about the capture mode and its cost (README "Capture modes")."""
    if plan.capture.mode == "async":
        return {"mode": "async", "how": f"change log {changelog.log_table(plan)} (the changed rows' keys), "
                "replayed into the twin by apply; drained at cutover",
                "write_cost": "one narrow insert per changed row (about 0.9x of the write throughput without "
                "capture), plus the replay's work in the same server",
                "works_on": "every server (no wal_level = logical, no replication slot)"}
    return {"mode": "sync", "how": "dual-write trigger: the twin is written in the writer's transaction",
            "write_cost": "a second write into an equally indexed table (0.5x-0.75x of the write throughput "
            "without capture); no lag, no drain at cutover", "alternative": "capture: {mode: async}"}


def _check_lock(ctx: Context, phase: str) -> None:
    """Stop if the advisory lock is gone (its session terminated or timed out): a second
    apply could have started, and two runners must never act on one table."""
    held = ctx.options.get("lock")
    if held is not None and not held.held():
        raise ConnectionFailed(f"lost the migration lock of {ctx.plan.table_name} (its session ended); "
                               f"stopped before {phase}. Run apply again to resume")


def privilege_warnings(ctx: Context, info) -> list[str]:
    """What the running role lacks for a whole migration (README "Security model"): the
    monitoring grant (warned: those checks fail closed), CREATE where apply creates things
    (refused: PreflightError, exit 3)."""
    out = []
    conn = ctx.conn
    if not sees_all_sessions(conn):
        out.append(f"no pg_monitor: the cutover's blocker gate refuses (exit 8) and throttle.max_xact_age_s / "
                   f"max_xmin_age hold the backfill; {MONITOR_HINT}")
    row = conn.execute(runner_sql.PRIVILEGES,
                       (ctx.plan.table_name.schema, info.owner, ctx.plan.table_name.schema)).fetchone()
    superuser, create_db, create_schema, owner_create, has_state = row
    if superuser:
        return out
    if not has_state and not create_db:
        raise PreflightError(f"the role running orchestrate ({conn.info.user}) cannot create the state schema "
                             "orchestrate: GRANT CREATE ON DATABASE to it (or create the schema as that role)")
    if not create_schema:
        raise PreflightError(f"the role running orchestrate ({conn.info.user}) cannot create the twin in schema "
                             f"{ctx.plan.table_name.schema}: GRANT CREATE ON SCHEMA {ident(ctx.plan.table_name.schema)}"
                             " to it")
    views = [d for d in info.dependents if d.kind == "v"]
    if views:
        row = conn.execute(runner_sql.VIEW_NOT_OURS, ([d.oid for d in views],)).fetchone()
        if row:  # the cutover re-creates each view on the new table: only its owner may
            raise PreflightError(f"view {row[0]} depends on {info.name} and belongs to a role the one running "
                                 f"orchestrate ({conn.info.user}) cannot act as; the cutover must re-create it. "
                                 f"ALTER VIEW {row[0]} OWNER TO {ident(info.owner)}")
    if not owner_create and conn.info.user != info.owner:
        raise PreflightError(f"the table owner {info.owner} has no CREATE on schema {ctx.plan.table_name.schema}: "
                             "a non-superuser can only give it the twin if it does. Run as the owner, or GRANT "
                             f"CREATE ON SCHEMA {ident(ctx.plan.table_name.schema)} TO {ident(info.owner)}")
    return out


def _run_phase(ctx: Context, phase) -> None:
    _check_lock(ctx, phase.name)
    logger.info("phase {}: starting", phase.name)
    ctx.store.phase_started(ctx.mid, phase.name)
    t0 = time.monotonic()
    try:
        if ctx.info is None and phase.name != "prepare":
            ctx.info = preflight(ctx, resuming=True).info
        phase.run(ctx)
    except OrchestrateError as e:
        _record_failure(ctx, phase.name, t0, str(e))
        raise
    except psycopg.Error as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if not is_connection_error(e) and _drifted(ctx):
            # The phase failed because the application changed the table under it (a column
            # it reads is gone, say): not a bug; the runner carries the change and goes on.
            logger.warning("phase {}: {}; the table's shape changed, carrying it", phase.name, msg)
            raise drift.ShapeChanged(msg) from None
        _record_failure(ctx, phase.name, t0, msg)
        if is_connection_error(e):
            raise ConnectionFailed(
                f"{phase.name}: lost the database connection ({msg}); run apply again to resume") from None
        raise OrchestrateError(f"{phase.name} failed: {msg}") from None
    except KeyboardInterrupt:
        _record_failure(ctx, phase.name, t0, "interrupted")
        raise
    logger.info("phase {}: done in {:.1f}s", phase.name, time.monotonic() - t0)


def _drifted(ctx: Context) -> bool:
    try:
        return drift.moved(ctx)
    except psycopg.Error:
        return False


def _record_failure(ctx: Context, phase: str, t0: float, message: str) -> None:
    try:
        ctx.store.phase_add_time(ctx.mid, phase, time.monotonic() - t0)
        ctx.store.set_error(ctx.mid, f"{phase}: {message}")
        ctx.store.event(ctx.mid, "error", f"{phase}: {message}")
    except psycopg.Error:
        pass  # the connection itself is gone; the next run finds the phase still open


def _mark_recopy(ctx: Context, labels: tuple[str, ...]) -> None:
    ranges = ctx.store.ranges(ctx.mid)
    if "all" in labels:
        chosen = [r for r in ranges if r["verify_state"] == "mismatch"] or ranges
    else:
        by_label = {r["label"]: r for r in ranges}
        unknown = [lbl for lbl in labels if lbl not in by_label]
        if unknown:
            raise StateConflict(f"no range named {unknown[0]!r} (see `orchestrate status`)")
        chosen = [by_label[lbl] for lbl in labels]
    with ctx.conn.transaction(), ctx.conn.cursor() as cur:
        ctx.store.ranges_to_repair(cur, ctx.mid, [r["idx"] for r in chosen])
    ctx.store.event(ctx.mid, "recopy", f"{len(chosen)} range(s) marked for re-copy",
                    labels=[r["label"] for r in chosen])


def rollback(plan: Plan, dsn: str) -> Outcome:
    """Back to the original heap table under its original name, from any phase."""
    with session(plan, dsn) as ctx:
        m = ctx.migration
        table = str(plan.table_name)
        if m is None:
            return Outcome(f"no migration in progress for {table}; nothing to roll back", {"status": "none"})
        # Each phase takes back what it did, the last one first: the cutover swaps back (only
        # after one), capture drops its triggers (only before one), verify and backfill have
        # nothing of their own, and prepare drops the twin (the partitioned table, after a swap
        # back), then the migration's functions and change log.
        for phase in reversed(ordered()):
            phase.undo(ctx)
        with ctx.conn.transaction(), ctx.conn.cursor() as cur:
            ctx.store.set_status(cur, m.id, MigrationStatus.ROLLED_BACK)
        ctx.store.event(m.id, "rolled_back", f"rolled back from {m.status}/{m.phase}")
        lost = ""
        if m.status == MigrationStatus.CUT_OVER and plan.distribute is not None:
            # Acknowledged in the plan (distribute.accept_no_rollback_after_cutover): said again here.
            lost = ("; distributed mode has no reverse sync: writes made since the cutover are NOT in it")
            ctx.store.event(m.id, "warning", f"rollback after a distributed cutover: {distribute.NO_ROLLBACK}")
        return Outcome(f"{table} rolled back (was {m.status}, phase {m.phase}); the original table is live{lost}",
                       {"status": "rolled_back", "migration_id": m.id,
                        **({"writes_since_cutover_lost": True} if lost else {})})


def finalize(plan: Plan, dsn: str) -> Outcome:
    """Drop the retired table and the reverse trigger. Destroys the way back."""
    with session(plan, dsn) as ctx:
        m = ctx.migration
        table = str(plan.table_name)
        if m is None:
            last = ctx.store.latest(table) if _state_tables(ctx.conn) else None
            if last is not None and last.status == MigrationStatus.FINALIZED:
                return Outcome(f"{table} is already finalized; nothing to do", {"status": "finalized"})
            raise StateConflict(f"no migration of {table} to finalize")
        if m.status != MigrationStatus.CUT_OVER:
            raise StateConflict(f"{table} is not cut over yet (phase {m.phase}); finalize comes after cutover")

        def body(cur: psycopg.Cursor) -> None:
            if plan.distribute is None:
                drop_sync(cur, ctx, plan.table_name, REVERSE_TRIGGER, "reverse")
            elif resolve(cur, plan.retired) is not None:

                distribute.own_sequences(cur, inspect_table(ctx.conn, plan.retired), str(plan.table_name))
            if resolve(cur, plan.retired) is not None:
                cur.execute(runner_sql.drop_table(plan.retired))
            changelog.drop(cur, ctx)
            cur.execute(runner_sql.drop_function(ctx.function(EXECUTOR), "text"))
            ctx.store.set_status(cur, m.id, MigrationStatus.FINALIZED)

        with_lock_retry(ctx.conn, body, what="finalize", policy=plan.locks)
        ctx.store.event(m.id, "finalized", f"dropped {plan.retired} and the reverse trigger")
        return Outcome(f"{table} finalized: {plan.retired} and the reverse trigger are dropped",
                       {"status": "finalized", "migration_id": m.id})


def status(plan: Plan, dsn: str) -> Outcome:
    """Phase, per-range progress, last checkpoint, phase states and durations."""
    conn = connect(dsn, "status")
    try:
        if not _state_tables(conn):
            return Outcome(f"no migration recorded for {plan.table_name}",
                           Status(status="none", table=str(plan.table_name)).data())
        store = Store(conn)
        table = str(plan.table_name)
        m = store.live(table) or store.latest(table)
        if m is None:
            return Outcome(f"no migration recorded for {table}", Status(status="none", table=table).data())
        ranges = store.range_summary(m.id)
        mismatched = [r["label"] for r in store.ranges(m.id) if r["verify_state"] == "mismatch"]
        phases = {}
        for name in PHASES:
            p = m.phases.get(name, {})
            phases[name] = {
                "state": p.get("state", "pending"),
                "duration_s": round(float(p.get("seconds") or 0), 3),
                "started_at": p["started_at"].isoformat() if p.get("started_at") else None,
                "finished_at": p["finished_at"].isoformat() if p.get("finished_at") else None,
                "detail": p.get("detail") or {},
            }
        controls = store.controls(table)
        data = {
            "table": table, "migration_id": m.id, "status": m.status, "phase": m.phase, "error": m.error,
            "plan_hash": m.plan_hash, "plan_matches": m.plan_hash == plan.shape_hash(),
            "started_at": m.created_at.isoformat(), "updated_at": m.updated_at.isoformat(),
            "phases": phases,
            "ranges": {**ranges, "mismatched_labels": mismatched[:50]},
            "last_checkpoint": ranges["last_checkpoint"],
            "controls": controls,
            "warnings": m.facts.get("warnings", []) + (
                replication_warnings(conn, plan.table_name, plan.twin)
                if m.status in (MigrationStatus.RUNNING, MigrationStatus.CUT_OVER)
                and resolve(conn.cursor(), plan.table_name) else []),
            "gates": m.facts.get("gates"),
            "recent_events": [{"at": e["at"].isoformat(), "kind": e["kind"], "message": e["message"]}
                              for e in store.events(m.id, limit=10)],
        }
        live = m.facts.get("live") or {}
        if live:
            data["live"] = live
        if m.status == MigrationStatus.RUNNING and plan.capture.mode == "async":
            # Read now, running apply or not: the log grows while no apply replays it.
            try:
                pending, oldest = conn.execute(
                    runner_sql.replay_lag(QualifiedName("orchestrate", f"replay_lag_{m.id}"))).fetchone()
                data["replay"] = {"pending": int(pending), "oldest_s": round(float(oldest), 3)}
            except psycopg.Error as e:
                data["replay"] = {"error": str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}
        return Outcome(f"{table}: {m.status}, phase {m.phase}", Status(**data).data())
    finally:
        conn.close()
