"""cutover: swap the twin into the live table's name in one short transaction.

Order inside the transaction (all of it commits or none of it does):
 1. LOCK the live table, then the twin, ACCESS EXCLUSIVE, each wait capped by lock_timeout
    (a waiting ACCESS EXCLUSIVE request blocks every later query, reads included, so we
    never wait long: we give up, back off with jitter and try again);
 2. drop the capture trigger; rename live -> retired, twin -> live name;
 3. move what is bound to the old table: sequence ownership, identity continuation,
    dependent views (re-created from their definitions, which now resolve to the new
    table), owner, grants, comment, RLS policies, replica identity, publications,
    statistics targets, user triggers (re-created; disabled on the retired table);
 4. install the reverse trigger: every write to the new table reaches the retired one,
    so a rollback after cutover loses nothing;
 5. record the phase as done.
Every statement is catalog-only: the lock is held for milliseconds, measured and reported.
The same swap, run the other way, is the rollback after cutover.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from datetime import datetime, timezone
from typing import TYPE_CHECKING

import psycopg
from loguru import logger

from orchestrator import changelog, drift, fidelity, horizon
from orchestrator.db import LockAttempt, connect, lock_both, own_pids, with_lock_retry
from orchestrator.db import close_quietly as _close
from orchestrator.distribute import local_ddl
from orchestrator.errors import OrchestrateError, StateConflict
from orchestrator.inspect import TableInfo, catalog_fingerprint, inspect_table
from orchestrator.owner import MONITOR_HINT, sees_all_sessions
from orchestrator.phases import FORWARD_TRIGGER, REVERSE_TRIGGER, Context, Step
from orchestrator.state.store import MigrationStatus, PhaseName
from orchestrator.throttle import dsn_label, primary_lag, replica_lag_s

if TYPE_CHECKING:
    from orchestrator.context import Preflight
from orchestrator.phases.capture import arm_reverse, drop_sync, install_sync, reverse_staged
from orchestrator.phases.prepare import fmt
from orchestrator.plan import utc_now
from orchestrator.sql import QualifiedName, ident, parse_qualified, swap
from orchestrator.sql import sync as sync_sql
from orchestrator.sql.compose import Composed, text
from orchestrator.sql.twin import twin_index_name


def carry_objects(cur: psycopg.Cursor, old: TableInfo, new: QualifiedName, retired: QualifiedName,
                  new_is_partitioned: bool) -> list[str]:
    """Move what is bound to ``old`` (now renamed ``retired``) onto ``new`` (now live).

    Runs inside the swap transaction, after the renames: names in saved definitions
    (views, triggers) now resolve to the new table. Returns what it did, for the log.
    """
    done: list[str] = []
    # The owner first: OWNED BY needs the sequence and the table to have the same owner.
    cur.execute(swap.owner_to(new, old.owner))
    # Normally none: prepare made the partitions the owner's and Cutover.prepare_partitions
    # caught any added since; only a straggler costs a statement here, under the lock.
    for part in _partitions(cur, new, not_owned_by=old.owner) if new_is_partitioned else []:
        cur.execute(swap.owner_to(part, old.owner))
    for seq in old.sequences:
        if seq.identity:
            continue  # identity sequences belong to their column; continued below
        cur.execute(swap.sequence_owned_by(seq.name, new, seq.column))
        done.append(f"sequence {seq.name} owned by {new}.{seq.column}")
    for col in old.columns:
        if col.identity:
            # The new table's identity sequence must continue where the old one stands.
            cur.execute(swap.SERIAL_SEQUENCES, (str(retired), col.name, str(new), col.name))
            old_seq, new_seq = cur.fetchone()
            # pg_get_serial_sequence's text is a quoted schema.name: parsed back into a name.
            cur.execute(swap.sequence_state(parse_qualified(old_seq)))
            last, called = cur.fetchone()
            # Qualified, arguments cast: no setval(text, smallint, boolean) elsewhere can match.
            cur.execute(swap.SETVAL, (new_seq, last, called))
            done.append(f"identity {col.name} continues at {last}")
    for grantee, priv, grantable in old.acl:
        cur.execute(swap.grant(priv, new, grantee, grantable))
    for column, grantee, priv in old.column_acl:
        cur.execute(swap.grant_column(priv, column, new, grantee))
    if old.acl or old.column_acl:
        done.append(f"{len(old.acl) + len(old.column_acl)} grants")
    # Utility statements take no bound parameters: the comment goes in as a quoted literal.
    cur.execute(swap.comment_on_table(new, old.comment))
    for col in old.columns:
        if col.stattarget is not None:
            cur.execute(swap.set_statistics(new, col.name, col.stattarget))
    for view in old.dependents:
        if view.kind != "v":
            continue
        cur.execute(swap.replace_view(view.name, view.definition, view.options))
        done.append(f"view {view.name} re-created")
    cur.execute(swap.POLICY_NAMES, (str(new),))
    existing = {r[0] for r in cur.fetchall()}
    for p in old.policies:
        if p.name not in existing:
            cur.execute(swap.create_policy(new, p.name, p.permissive, p.command, p.roles, p.using, p.check))
    if old.policies:
        done.append(f"{len(old.policies)} RLS policies")
    if old.rls_enabled:
        cur.execute(swap.row_level_security(new))
    if old.rls_forced:
        cur.execute(swap.row_level_security(new, force=True))
    done += _carry_replica_identity(cur, old, new, retired, new_is_partitioned)
    done += _carry_publications(cur, old, new, retired)
    for trig in old.triggers:
        if trig.name in (FORWARD_TRIGGER, REVERSE_TRIGGER) or trig.name.startswith("orchestrate_"):
            continue
        cur.execute(swap.drop_trigger(new, trig.name))
        cur.execute(swap.create_trigger(trig.definition))  # its text names the live table, which is now `new`
        if trig.enabled != "O":
            cur.execute(swap.trigger_state(new, trig.name, trig.enabled))
        # The retired table only receives mirrored writes now: its own triggers must not fire twice.
        cur.execute(swap.trigger_state(retired, trig.name, "D"))
        done.append(f"trigger {trig.name}" + ("" if trig.enabled == "O" else f" (state {trig.enabled})"))
    return done


def _carry_replica_identity(cur: psycopg.Cursor, old: TableInfo, new: QualifiedName, retired: QualifiedName,
                            partitioned: bool) -> list[str]:
    """REPLICA IDENTITY does not recurse to partitions: set it on the parent and on each one
    (with a publication, logical decoding of a partition's UPDATE uses the partition's)."""
    if old.replica_identity in ("f", "n"):
        mode = "FULL" if old.replica_identity == "f" else "NOTHING"
        # Partitions set before the lock (Cutover.prepare_partitions) are skipped.
        todo = _partitions(cur, new, replica_identity_not=old.replica_identity) if partitioned else []
        for t in [new, *todo]:
            cur.execute(swap.replica_identity(t, old.replica_identity))
        return [f"replica identity {mode}"]
    if old.replica_identity != "i" or not partitioned:
        return []  # 'd' is the default; swapping back, the heap table kept its own
    cur.execute(swap.REPLICA_IDENTITY_INDEX, (str(retired),))
    row = cur.fetchone()
    if row is None:
        return []
    if row[1]:
        cur.execute(swap.PRIMARY_KEY_INDEX, (str(new),))
    else:
        cur.execute(swap.INDEX_IN_SCHEMA, (ident(new.schema), twin_index_name(row[0])))
    found = cur.fetchone()
    if found is None:
        logger.warning("cutover: replica identity index {} has no counterpart on {}; left at DEFAULT", row[0], new)
        return [f"replica identity index {row[0]}: no counterpart, left DEFAULT"]
    cur.execute(swap.RELNAME, (found[0],))
    cur.execute(swap.replica_identity_index(new, cur.fetchone()[0]))
    cur.execute(swap.PARTITION_INDEXES_NOT_REPLIDENT, (found[0],))
    for schema, table, index in cur.fetchall():
        cur.execute(swap.replica_identity_index(QualifiedName(schema, table), index))
    return [f"replica identity index {row[0]}"]


def _carry_publications(cur: psycopg.Cursor, old: TableInfo, new: QualifiedName,
                        retired: QualifiedName) -> list[str]:
    """Publication membership, with the row filter and column list (PostgreSQL 15+)."""
    if not old.publications:
        return []
    extra = {}
    if cur.connection.info.server_version >= 150000:
        cur.execute(swap.PUBLICATION_FILTERS, (str(retired),))
        extra = {r[0]: (r[1], r[2]) for r in cur.fetchall()}
    out = []
    partitioned = new_is_partitioned(cur, new)  # read once: this runs under the lock
    for pub in old.publications:
        if partitioned:
            # Without it the publication would publish the partitions under their own names
            # after the swap: subscribers and CDC consumers keyed on the table break.
            cur.execute(swap.PUBLISH_VIA_ROOT, (pub,))
            row = cur.fetchone()
            if row is not None and not row[0]:
                cur.execute(swap.publish_via_partition_root(pub))
                out.append(f"publication {pub}: publish_via_partition_root = true")
        qual, cols = extra.get(pub, (None, None))
        cur.execute(swap.publication_drop_table(pub, retired))
        cur.execute(swap.publication_add_table(pub, new, cols, qual))
        out.append(f"publication {pub}")
    return out


def new_is_partitioned(cur: psycopg.Cursor, table: QualifiedName) -> bool:
    cur.execute(swap.IS_PARTITIONED, (str(table),))
    return bool(cur.fetchone()[0])


def _partitions(cur: psycopg.Cursor, parent: QualifiedName, not_owned_by: str | None = None,
                replica_identity_not: str | None = None) -> list[QualifiedName]:
    """The partitions of ``parent``; only those whose owner is not ``not_owned_by``, or whose
    replica identity (pg_class.relreplident) is not ``replica_identity_not``, when given."""
    cur.execute(swap.PARTITIONS,
                (str(parent), not_owned_by, not_owned_by, replica_identity_not, replica_identity_not))
    return [QualifiedName(r[0], r[1]) for r in cur.fetchall()]


def record_attempt(ctx: Context, what: str):
    """Kept for callers that only want the event; the cutover uses :class:`LockReport`."""
    return LockReport(ctx, what)


# Lock modes that only read. A session holding anything else on the table wrote to it (ROW
# EXCLUSIVE), reserved rows to write (ROW SHARE: SELECT FOR UPDATE) or runs DDL: never cancelled.
READ_ONLY_MODES = frozenset({"AccessShareLock"})


def lock_holders(conn: psycopg.Connection, tables: list[QualifiedName]) -> list[dict]:
    """Client sessions in a transaction holding a granted lock on any of ``tables``, oldest
    transaction first. This process's own sessions are left out, known by backend pid
    (application_name proves nothing: anyone can set it)."""
    oids = [r[0] for r in conn.execute(swap.RELATION_OIDS, ([str(t) for t in tables],)).fetchall()]
    if not oids:
        return []
    rows = conn.execute(swap.LOCK_HOLDERS, (oids, own_pids())).fetchall()
    return [{"pid": r[0], "application_name": r[1], "state": r[2], "age_s": round(float(r[3]), 3), "query": r[4],
             "modes": sorted(r[5]), "tables": sorted(r[6])} for r in rows]


def _describe(h: dict) -> str:
    app = f" ({h['application_name']})" if h["application_name"] else ""
    return (f"pid {h['pid']}{app} {h['state'] or 'in transaction'} for {h['age_s']:.1f}s holding "
            f"{', '.join(h['modes'])} on {', '.join(h['tables'])}: {h['query'] or '?'}")


class LockReport:
    """Accounting of a short-lock transaction, one record per attempt: how long it waited for
    the lock and how long it held ACCESS EXCLUSIVE on the live table (an attempt that got the
    first lock and then timed out on the second held it too: the application waited then as
    well). Logged, recorded as ``lock_attempt`` events, and summed up for the phase detail.

    With ``cancel`` (plan ``cutover.cancel_blockers``), after ``cancel_after`` failed attempts
    the read-only sessions that kept the lock from being granted are cancelled: see
    :func:`cancel_blockers`."""

    def __init__(self, ctx: Context, what: str, cancel: bool = False, tables: list[QualifiedName] | None = None):
        self.ctx = ctx
        self.what = what
        self.cancel = cancel
        self.tables = tables or []
        self.marks: dict[str, float] = {}
        self.attempts: list[dict] = []
        self.cancelled: list[dict] = []
        self._spared: set[int] = set()
        self._waited_s = 0.0

    def begin(self) -> None:
        """Call first thing in the transaction body."""
        self.marks.clear()

    def __call__(self, a: LockAttempt) -> None:
        end = time.monotonic()
        began = end - a.waited_s
        first = self.marks.get("first")
        if first is not None and first >= began:
            waited_ms, held_ms = (first - began) * 1000, (end - first) * 1000
        else:
            waited_ms, held_ms = a.waited_s * 1000, 0.0
        rec = {"attempt": a.attempt, "ok": a.ok, "waited_ms": round(waited_ms, 1), "held_ms": round(held_ms, 1)}
        if a.error:
            rec["error"] = a.error
        self.attempts.append(rec)
        msg = (f"{self.what} attempt {a.attempt}: {'ok' if a.ok else a.error}; waited {waited_ms:.1f} ms, "
               f"ACCESS EXCLUSIVE held {held_ms:.1f} ms")
        logger.info(msg)
        self.ctx.store.event(self.ctx.mid, "lock_attempt", msg, what=self.what, **rec)
        if not a.ok:
            self._waited_s += a.waited_s
        if not a.ok and self.cancel and a.attempt >= self.ctx.plan.cutover.cancel_after:
            # Only transactions open for longer than all our lock waits so far: a short
            # application transaction that happened to hold the lock for a moment is spared.
            try:
                self.cancelled += cancel_blockers(self.ctx, self.tables, min_age_s=self._waited_s,
                                                  spared=self._spared)
            except psycopg.Error as e:
                logger.warning("{}: could not cancel blockers: {}", self.what, str(e).strip().splitlines()[0])

    @property
    def held_ms(self) -> float | None:
        ok = [r for r in self.attempts if r["ok"]]
        return ok[-1]["held_ms"] if ok else None

    def detail(self) -> dict:
        return {"lock_attempts": len(self.attempts),
                "lock_waited_ms": round(sum(r["waited_ms"] for r in self.attempts), 1),
                "lock_held_ms_all_attempts": [r["held_ms"] for r in self.attempts][-50:],
                "lock_attempt_log": self.attempts[-50:],
                **({"blockers_cancelled": self.cancelled} if self.cancelled else {})}


def cancel_blockers(ctx: Context, tables: list[QualifiedName], *, min_age_s: float,
                    spared: set[int] | None = None) -> list[dict]:
    """Cancel the sessions holding a lock on ``tables`` that blocked the attempt just failed.

    A blocker is a client session whose transaction was open for the whole failed attempt
    (older than ``min_age_s``) and still holds a lock on the table or the twin. Only read-only
    holders (ACCESS SHARE alone) are touched: a running query is cancelled
    (``pg_cancel_backend``: the aborted transaction releases its locks), a session idle in
    transaction is terminated (``pg_terminate_backend``: cancelling it would do nothing).
    Sessions that wrote to the table (ROW EXCLUSIVE or any stronger mode) and orchestrate's
    own sessions are never touched; each decision is logged with the pid and the query."""
    spared = spared if spared is not None else set()
    out = []
    for h in lock_holders(ctx.conn, tables):
        if h["age_s"] < min_age_s:
            continue
        if set(h["modes"]) - READ_ONLY_MODES:
            if h["pid"] not in spared:
                spared.add(h["pid"])
                logger.warning("cutover: not cancelling {} (it wrote to or may write the table)", _describe(h))
                ctx.store.event(ctx.mid, "blocker_spared", f"not cancelled (writer): {_describe(h)}", **h)
            continue
        idle = h["state"].startswith("idle in transaction")
        fn = "pg_terminate_backend" if idle else "pg_cancel_backend"
        signalled = ctx.conn.execute(swap.SIGNAL_BACKEND[fn], (h["pid"],)).fetchone()[0]
        verb = "terminated" if idle else "cancelled"
        logger.warning("cutover: {} {} blocking the lock ({}): {}", verb, _describe(h), fn,
                       "ok" if signalled else "not signalled")
        ctx.store.event(ctx.mid, "blocker_cancelled", f"{verb}: {_describe(h)}", action=fn, signalled=signalled, **h)
        out.append({"pid": h["pid"], "action": fn, "query": h["query"], "modes": h["modes"],
                    "application_name": h["application_name"], "signalled": bool(signalled)})
    return out


class LagProbe:
    """Replica lag for the readiness gate, on sessions kept open while apply waits; measured
    with the throttle's queries (throttle.replica_lag_s / primary_lag), not a copy of them.

    For each replica DSN (``--replica-dsn`` plus ``throttle.replicas``):
    ``now() - pg_last_xact_replay_timestamp()``, or 0 when everything received is replayed;
    an unreachable replica fails the gate (fail closed). Without replica DSNs:
    ``pg_stat_replication.replay_lag`` on the primary (0 for a standby that has replayed
    everything: the view keeps the last burst's figure). The threshold is the throttle's
    pause threshold (changed at run time by ``orchestrate set``), else the plan's
    ``throttle.max_replica_lag_s``."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.replicas = tuple(dict.fromkeys([*ctx.plan.throttle.all_replicas, *ctx.replica_dsns]))
        self.conns: dict[str, psycopg.Connection] = {}

    @property
    def limit(self) -> float:
        shared = self.ctx.options.get("throttle")
        gate = getattr(shared, "gate", None)
        return float(getattr(gate, "pause", None) or self.ctx.plan.throttle.max_replica_lag_s)

    def measure(self) -> tuple[bool, str]:

        limit = self.limit
        if not self.replicas:
            lag, _behind, n = primary_lag(self.ctx.conn)
            if not n:
                return True, "no standby attached (pg_stat_replication is empty)"
            return lag <= limit, f"{lag:.1f}s (pg_stat_replication, {n} standby), threshold {limit:g}s"
        worst, where, bad = 0.0, "", []
        for dsn in self.replicas:
            try:
                conn = self.conns.get(dsn)
                if conn is None or conn.closed:
                    conn = self.conns[dsn] = connect(dsn, "gate-replica", settings={"statement_timeout": 5000})
                lag = replica_lag_s(conn)
            except (psycopg.Error, OrchestrateError) as e:
                _close(self.conns.pop(dsn, None))
                bad.append(f"replica {dsn_label(dsn)} unreachable: "
                           f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}")
                continue
            if lag >= worst:
                worst, where = lag, dsn_label(dsn)
        if bad:
            return False, "; ".join(bad)
        return worst <= limit, f"{worst:.1f}s on {where}, threshold {limit:g}s"

    def close(self) -> None:
        for c in self.conns.values():
            _close(c)
        self.conns.clear()



GATE_BACKFILL = "backfill complete"
GATE_VERIFY = "verification passed"
GATE_LAG = "replica lag below threshold"
GATE_PARTITIONS = "partitions exist up to now + premake"
GATE_BLOCKERS = "no old transaction holding a lock on the table"
GATE_SNAPSHOTS = "no snapshot older than the copy"
GATE_DRAINED = "change log drained (async capture)"


def cutover_gates(ctx: Context, probe: LagProbe | None = None) -> list[dict]:
    """The readiness gates, evaluated now, in order: ``{gate, ok, detail, waits}`` each
    (``waits``: apply waits for this one; the others cannot change by waiting). Reads only;
    works without a migration (``plan``: the phase gates then say "not started")."""
    plan, m = ctx.plan, ctx.migration
    out: list[dict] = []

    def add(gate: str, ok: bool, detail: str, waits: bool) -> None:
        out.append({"gate": gate, "ok": bool(ok), "detail": detail, "waits": waits})

    add(GATE_BACKFILL, m is not None and m.done("backfill"), m.phase_state("backfill") if m else "not started", False)
    add(GATE_VERIFY, m is not None and m.done("verify"), m.phase_state("verify") if m else "not started", False)
    own = probe is None
    probe = probe or LagProbe(ctx)
    try:
        ok, detail = probe.measure()
    except psycopg.Error as e:
        ok, detail = False, f"lag could not be read: {str(e).strip().splitlines()[0]}"
    finally:
        if own:
            probe.close()
    add(GATE_LAG, ok, detail, True)
    iv = plan.partition_by.interval_value
    need = fmt(iv.add(iv.floor(ctx.now or utc_now()), plan.partition_by.premake + 1))
    parts = ctx.facts.get("partitions") or []
    have = parts[-1][1] if parts else None
    add(GATE_PARTITIONS, bool(have and have >= need), f"up to {have}, need {need}", False)
    if changelog.is_async(ctx) and m is not None and changelog.exists(ctx.conn, ctx):
        # Async capture: the lock is asked for only once the log is nearly drained, so the
        # replay left for under the lock is short (changelog.drain_locked bounds it).
        pending, oldest = changelog.lag(ctx.conn, ctx)
        cap = plan.capture.max_pending_at_cutover
        replayer = ctx.options.get("replayer")
        why = f"; replay: {replayer.error}" if replayer is not None and replayer.error else ""
        if replayer is not None and replayer.waiting:
            why += f"; replay waits: {replayer.waiting}"
        add(GATE_DRAINED, pending <= cap,
            f"{pending} change(s) pending (oldest {oldest:.1f}s), at most {cap} wanted{why}", True)
    limit = plan.cutover.max_blocker_age_s
    if not sees_all_sessions(ctx.conn):
        # Without pg_read_all_stats other roles' xact_start reads NULL: the gate would pass blind.
        add(GATE_BLOCKERS, False, f"cannot see other roles' transactions: {MONITOR_HINT}", False)
        return out
    old = [h for h in lock_holders(ctx.conn, [plan.table_name, plan.twin]) if h["age_s"] > limit]
    add(GATE_BLOCKERS, not old,
        (f"{_describe(old[0])}" + (f" (and {len(old) - 1} more)" if len(old) > 1 else "") +
         f"; older than {plan.cutover.max_blocker_age}") if old else f"none older than {plan.cutover.max_blocker_age}",
        True)
    stale = old_snapshots(ctx)
    add(GATE_SNAPSHOTS, not stale,
        f"{stale[0]} (and {len(stale) - 1} more) holds a snapshot older than the copy: after the swap it would see "
        "the table without the rows copied since, and its updates and deletes of them would touch nothing"
        if stale else "none", True)
    return out


def old_snapshots(ctx: Context) -> list[str]:
    """Sessions of this database whose snapshot predates the end of the backfill.

    Why: the twin's rows were written by the backfill's transactions. A REPEATABLE READ or
    SERIALIZABLE transaction whose snapshot is older than some of them, and which first
    touches the table after the swap, finds the new table without those rows; its UPDATE
    or DELETE of one silently affects nothing (PostgreSQL's own limit for any table swap).
    Snapshots taken after the check see every copied row, so checking before the lock is
    enough. ``copied_xid`` is recorded by the backfill when it finishes (a transaction newer
    than every batch); without it (a run recorded by an older version) nothing is checked.
    """
    m = ctx.migration
    xid = ((m.phases.get("backfill") or {}).get("detail") or {}).get("copied_xid") if m else None
    if xid is None:
        return []
    rows = ctx.conn.execute(swap.OLD_SNAPSHOTS, (xid,)).fetchall()
    return [f"pid {pid} ({state}, transaction open {age} s)" for pid, state, age in rows]


def record_gates(ctx: Context, gates: list[dict]) -> None:
    """The latest gate results into ``migrations.facts["gates"]`` (status shows them)."""
    if ctx.migration is None:
        return
    with ctx.conn.transaction(), ctx.conn.cursor() as cur:
        ctx.store.set_facts(cur, ctx.mid, gates={
            "checked_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "ok": all(g["ok"] for g in gates), "gates": gates})


def hold_for_tests(point: str) -> None:
    """Crash tests only: with ``ORCHESTRATE_TEST_HOLD=<point>`` the process logs the point and
    stops there, so a test can SIGKILL it at a moment no lock wait reaches (right after the
    renames inside the cutover transaction). Unset, it does nothing."""
    if os.environ.get("ORCHESTRATE_TEST_HOLD") == point:
        logger.warning("test hold at {}", point)
        time.sleep(600)


def held(replayer, body):
    """``body`` run with the async replay thread held off (as is, without one)."""
    if replayer is None:
        return body

    def wrapped(cur: psycopg.Cursor):
        with replayer.held():
            return body(cur)

    return wrapped


class Cutover:
    """Swaps the twin in under the table's name in one short ACCESS EXCLUSIVE transaction
    (gates first, lock_timeout and retries), carrying every object; undo swaps back."""

    name = PhaseName.CUTOVER

    def steps(self, ctx: Context, pf: Preflight | None = None) -> list[Step]:
        p = ctx.plan
        lock = (f"ACCESS EXCLUSIVE on {p.table_name} and {p.twin}, lock_timeout {p.cutover.lock_timeout}, "
                f"up to {p.cutover.attempts} attempts with jittered backoff (cap {p.cutover.backoff_max})")
        drain = []
        if changelog.is_async(ctx):
            log = changelog.log_table(p)
            drain = [Step(self.name, f"async capture: a readiness gate waits until at most "
                          f"{p.capture.max_pending_at_cutover} changes wait in {log}; under the lock the rest is "
                          f"replayed (more than {p.capture.max_lock_replay}: the attempt rolls back and retries), "
                          "then the log is dropped", f"SELECT orchestrate.replay_<id>(n); DROP TABLE {log}",
                          "same transaction as the swap")]
        return drain + [
            Step(self.name, "readiness gates: backfill complete, verification passed, replica lag below "
                 f"{p.throttle.max_replica_lag_s:g}s, partitions up to now + premake, no transaction older than "
                 f"{p.cutover.max_blocker_age} holding a lock on the table, no snapshot older than the copy "
                 f"(waits up to {p.cutover.gate_timeout})",
                 "(state and catalog reads)", "none"),
            Step(self.name, "storage parameters of the table onto each partition (a partitioned parent takes none)",
                 # Before the lock: the same statement per partition, with the table's reloptions.
                 text(swap.set_storage_parameters(p.twin.with_name("<partition>"), pf.info.reloptions))
                 if pf is not None and pf.info.reloptions else "(none: the table has no storage parameters)",
                 "SHARE UPDATE EXCLUSIVE on each partition of the twin, before the lock"),
            Step(self.name, "lock both tables, drop the capture trigger, swap the names",
                 # The statements run() executes (lock_both, then the renames), from the same renderers.
                 "; ".join(text(s) for s in [swap.lock_table(p.table_name), swap.lock_table(p.twin),
                                             *swap.renames(p.table_name, p.twin, p.retired.name)]), lock),
            Step(self.name, "move sequences, identity, views, owner, grants, comment, policies, publications, "
                 "statistics targets, user triggers", "(catalog statements)", "same transaction"),
            Step(self.name, "reverse trigger (staged at prepare, switched off): its function is rendered again "
                 "from the table as it is now, and switched on; writes to the new table reach the retired one "
                 "(rollback keeps them)",
                 # What arm_reverse executes, with the migration's id left open.
                 "; ".join(text(s) for s in [
                     sync_sql.sync_function(QualifiedName("orchestrate", "reverse_<id>"), p.retired, ctx.shape(),
                                            dst_key=ctx.shape().pk),
                     sync_sql.sync_switch(QualifiedName("orchestrate", "reverse_on_<id>"), True)]),
                 "same transaction") if p.distribute is None else
            Step(self.name, "distributed: NO reverse trigger (it would run on the workers' shards); a rollback after "
                 "this loses the writes made since; refused unless distribute.accept_no_rollback_after_cutover"
                 + (" (acknowledged)" if p.distribute.accept_no_rollback_after_cutover else " (NOT acknowledged: "
                    "apply stops here with exit 8)"), "(none)", "same transaction"),
        ]

    def gates(self, ctx: Context, probe: LagProbe | None = None) -> list[tuple[str, bool, str]]:
        """(gate, passed, detail) for each readiness gate, in order (see :func:`cutover_gates`)."""
        return [(g["gate"], g["ok"], g["detail"]) for g in cutover_gates(ctx, probe)]

    def wait_for_gates(self, ctx: Context) -> list[dict]:
        """Evaluate the gates every second until all pass; record each evaluation in facts.

        A gate that waiting cannot change (phases, partitions) fails at once; the others fail
        after ``cutover.gate_timeout``. Either way: StateConflict (exit 8) naming the gate,
        before any lock on the table was requested."""
        c = ctx.plan.cutover
        probe = LagProbe(ctx)
        deadline = time.monotonic() + c.gate_timeout_s
        last_key: tuple | None = None
        last_log = 0.0
        try:
            while True:
                ctx.refresh()
                gates = cutover_gates(ctx, probe)
                record_gates(ctx, gates)
                failed = [g for g in gates if not g["ok"]]
                if not failed:
                    if last_key is not None:
                        logger.info("cutover: readiness gates met")
                        ctx.store.event(ctx.mid, "gate", "readiness gates met")
                    return gates
                final = [g for g in failed if not g["waits"]]
                if final:
                    raise StateConflict(f"cutover gate not met: {final[0]['gate']} ({final[0]['detail']})")
                now = time.monotonic()
                first = failed[0]
                if now >= deadline:
                    raise StateConflict(
                        f"cutover gate not met after waiting {c.gate_timeout}: {first['gate']} ({first['detail']}); "
                        "nothing changed, run apply again")
                key = tuple(g["gate"] for g in failed)
                if key != last_key or now - last_log >= 10:
                    logger.warning("cutover waits: gate '{}' not met: {} (gives up in {:.0f}s)", first["gate"],
                                   first["detail"], deadline - now)
                    ctx.store.event(ctx.mid, "gate", f"waiting: {first['gate']}: {first['detail']}",
                                    failed=[g["gate"] for g in failed])
                    last_key, last_log = key, now
                time.sleep(min(1.0, max(0.05, deadline - now)))
        finally:
            probe.close()

    def carry_storage_parameters(self, ctx: Context) -> None:
        """The table's storage parameters (fillfactor, autovacuum_*, ...) onto each partition of
        the twin, before the swap: a partitioned parent accepts none. Idempotent; takes SHARE
        UPDATE EXCLUSIVE on each partition, which writers do not conflict with."""
        info = ctx.info or inspect_table(ctx.conn, ctx.plan.table_name)
        opts = list(info.reloptions)
        if not opts:
            return

        def body(cur: psycopg.Cursor) -> list[str]:
            parts = _partitions(cur, ctx.plan.twin)
            for part in parts:
                cur.execute(swap.set_storage_parameters(part, opts))
            ctx.store.set_facts(cur, ctx.mid, storage_parameters=opts)
            return [str(p) for p in parts]

        parts = with_lock_retry(ctx.conn, body, what="storage parameters on the partitions",
                                policy=ctx.plan.locks)
        logger.info("cutover: storage parameters ({}) set on {} partitions", ", ".join(opts), len(parts))

    def prepare_partitions(self, ctx: Context) -> None:
        """Owner and replica identity onto the twin's partitions, before the lock.

        Both are per-partition catalog work (11 ms at 41 partitions, 169 ms at 1,106 when
        they were done under the swap's ACCESS EXCLUSIVE lock). Done here, a few partitions
        per short transaction (each ALTER locks only its partition, which only the capture
        trigger writes), the swap itself finds nothing left to do for them. Idempotent."""
        info = ctx.info or inspect_table(ctx.conn, ctx.plan.table_name)
        twin = ctx.plan.twin
        ident_mode = info.replica_identity in ("f", "n")
        with ctx.conn.cursor() as cur:
            owner = _partitions(cur, twin, not_owned_by=info.owner)
            replident = _partitions(cur, twin, replica_identity_not=info.replica_identity) if ident_mode else []
        work = [swap.owner_to(p, info.owner) for p in owner]
        work += [swap.replica_identity(p, info.replica_identity) for p in replident]

        def chunk(stmts: list[Composed]):
            def body(c: psycopg.Cursor) -> None:
                for stmt in stmts:
                    c.execute(stmt)
            return body

        for i in range(0, len(work), 50):
            with_lock_retry(ctx.conn, chunk(work[i:i + 50]), what="prepare the partitions for the swap",
                            policy=ctx.plan.locks)
        if info.replica_identity == "i":
            # USING INDEX: the per-partition indexes are found as the swap finds them.
            with_lock_retry(ctx.conn, lambda c: _carry_replica_identity(c, info, twin, ctx.plan.table_name, True),
                            what="replica identity on the partitions", policy=ctx.plan.locks)
        if work:
            logger.info("cutover: {} partition(s) given their owner and replica identity before the lock", len(work))

    def ensure_partitions(self, ctx: Context) -> None:
        """Create partitions that became due while the migration ran (a long backfill can
        cross a month boundary), moving the rows the twin's default partition took for them
        (see orchestrator/horizon.py): the partition gate can then always be met."""
        horizon.extend(ctx)
        ctx.refresh()

    def run(self, ctx: Context) -> None:
        ctx.refresh()
        self.ensure_partitions(ctx)
        ctx.refresh()
        self.wait_for_gates(ctx)
        replayer = ctx.options.get("replayer")
        if replayer is None:
            self.lock_and_swap(ctx)
            return
        # The gates waited for the load to pass; from here the replay drains whatever it is
        # (held, every lock attempt would find too much to replay and roll back). Until the
        # swap fails or a drift sends the run back to the backfill: then it waits again.
        replayer.draining = True
        try:
            self.lock_and_swap(ctx)
        except BaseException:
            replayer.draining = False
            raise

    def lock_and_swap(self, ctx: Context) -> None:
        """After the gates: what the partitions need before the lock, then the lock attempts."""
        self.carry_storage_parameters(ctx)
        self.prepare_partitions(ctx)
        fidelity.add_not_valid_checks(ctx)
        plan = ctx.plan
        t0 = time.monotonic()
        report = LockReport(ctx, "cutover", cancel=plan.cutover.cancel_blockers, tables=[plan.table_name, plan.twin])
        # Inspect BEFORE asking for the lock (fingerprint first): under the lock only one
        # cheap query confirms nothing changed; the full inspection is repeated there only
        # if something did. This keeps the ACCESS EXCLUSIVE hold to catalog statements.
        oid = ctx.facts.get("table_oid")
        fingerprint = catalog_fingerprint(ctx.conn, oid)
        inspected = inspect_table(ctx.conn, plan.table_name)
        drift.assert_unchanged(ctx, inspected)  # a change since the last check: carried first

        def body(cur: psycopg.Cursor) -> list[str]:
            report.begin()
            lock_both(cur, plan.table_name, plan.twin, report.marks)
            # Under the lock nothing can change the table's shape from here on.
            unchanged = catalog_fingerprint(ctx.conn, oid) == fingerprint
            old = inspected if unchanged else inspect_table(ctx.conn, plan.table_name)
            if not unchanged:
                drift.assert_unchanged(ctx, old)
            if old.oid != ctx.facts.get("table_oid"):
                raise StateConflict(f"{plan.table_name} is not the table this migration started on")
            # Never swap in a twin whose columns differ from the table's (an ALTER that landed
            # after the last check): roll back this attempt; the runner carries it and retries.
            differs = drift.columns_differ(cur, plan.table_name, plan.twin)
            if differs:
                logger.warning("cutover: the table's columns changed ({}); carrying it first", differs)
                raise drift.ShapeChanged(differs)
            ctx.info = old
            if changelog.is_async(ctx) and changelog.exists(cur, ctx):
                # No writer can add to the log now: replay the rest into the twin, in this
                # transaction, before the capture (and the log) is dropped.
                ctx.store.set_facts(cur, ctx.mid, replayed_under_lock=changelog.drain_locked(cur, ctx))
            # What the rollback after cutover needs to restore that the catalog will not say.
            ctx.store.set_facts(cur, ctx.mid, cutover_objects={
                "triggers": {t.name: t.enabled for t in old.triggers},
                "dropped_foreign_keys": [{"table": [fk.table.schema, fk.table.name], "name": fk.name,
                                          "definition": fk.definition} for fk in old.incoming_fks]})
            drop_sync(cur, ctx, plan.table_name, FORWARD_TRIGGER, "capture")
            for fk in old.incoming_fks:
                cur.execute(swap.drop_constraint(fk.table, fk.name))
            for stmt in swap.renames(plan.table_name, plan.twin, plan.retired.name):
                cur.execute(stmt)
            hold_for_tests("cutover-renamed")
            # Distributed: the serial sequences stay owned by the retired heap table until
            # finalize (distribute.own_sequences): Citus never lets a sequence owned by a
            # distributed table be given back, which a rollback would have to do.
            carried = replace(old, sequences=[]) if plan.distribute is not None else old
            done = carry_objects(cur, carried, plan.table_name, plan.retired, new_is_partitioned=True)
            if plan.distribute is not None:
                pass  # no reverse sync in distributed mode: the plan acknowledged it (distribute.py)
            elif reverse_staged(cur, ctx, plan.table_name):
                arm_reverse(cur, ctx, True)  # staged at prepare: one catalog row, not one per partition
            else:
                install_sync(cur, ctx, plan.table_name, plan.retired, REVERSE_TRIGGER, "reverse")
            if plan.distribute is None and not drift.column_guard_matches(cur, plan.table_name, REVERSE_TRIGGER,
                                                                          old.writable_columns):
                # Staged at prepare; re-made here only when a column was carried since.
                drift.install_column_guard(cur, plan.table_name, REVERSE_TRIGGER, old.writable_columns,
                                           ctx.function("reverse_columns"))
            ctx.store.set_status(cur, ctx.mid, "cut_over", "cutover")
            ctx.store.phase_done(cur, ctx.mid, self.name, time.monotonic() - t0, carried=done)
            return done

        replayer = ctx.options.get("replayer")
        try:
            # The replay thread stays out of each attempt (it would queue behind our lock), and
            # catches up between attempts.
            done = with_lock_retry(ctx.conn, held(replayer, body), what="cutover",
                                   policy=plan.locks,
                                   on_attempt=report)
        except OrchestrateError:
            ctx.store.phase_add_time(ctx.mid, self.name, 0, **report.detail())
            raise
        held_ms = report.held_ms or 0.0
        ctx.store.phase_add_time(ctx.mid, self.name, 0, lock_held_ms=held_ms, **report.detail())
        ctx.store.event(ctx.mid, "cutover", f"cut over; ACCESS EXCLUSIVE held {held_ms:.1f} ms "
                        f"(attempt {len(report.attempts)})", lock_held_ms=held_ms, carried=done,
                        lock_attempts=len(report.attempts))
        logger.info("cutover: lock held {:.1f} ms after {} attempt(s); carried: {}", held_ms, len(report.attempts),
                    "; ".join(done) or "nothing")

    def undo(self, ctx: Context) -> None:
        """Swap back: the retired heap table (kept exact by the reverse trigger) becomes live
        again, under the same lock discipline; the partitioned table is dropped afterwards.
        Before a cutover there is nothing to swap back."""
        if ctx.migration is None or ctx.migration.status != MigrationStatus.CUT_OVER:
            return
        plan = ctx.plan
        t0 = time.monotonic()
        saved = ctx.facts.get("cutover_objects") or {}
        report = LockReport(ctx, "rollback", cancel=plan.cutover.cancel_blockers,
                            tables=[plan.table_name, plan.retired])
        restored_fks: list[tuple[QualifiedName, str]] = []

        live_oid = ctx.conn.execute(swap.REGCLASS_OID, (str(plan.table_name),)).fetchone()[0]
        retired_oid = ctx.conn.execute(swap.REGCLASS_OID, (str(plan.retired),)).fetchone()[0]
        fingerprints = (catalog_fingerprint(ctx.conn, live_oid), catalog_fingerprint(ctx.conn, retired_oid))
        inspected = (inspect_table(ctx.conn, plan.table_name, allow_partitioned=True),
                     inspect_table(ctx.conn, plan.retired))

        def body(cur: psycopg.Cursor) -> list[str]:
            report.begin()
            restored_fks.clear()
            lock_both(cur, plan.table_name, plan.retired, report.marks)
            # As in run(): inspected before the lock, re-inspected only if the catalog moved.
            if (catalog_fingerprint(ctx.conn, live_oid), catalog_fingerprint(ctx.conn, retired_oid)) == fingerprints:
                current, ctx.info = inspected
            else:
                current = inspect_table(ctx.conn, plan.table_name, allow_partitioned=True)
                ctx.info = inspect_table(ctx.conn, plan.retired)
            if plan.distribute is not None:
                pass  # no reverse trigger was made; Citus refuses even DROP TRIGGER IF EXISTS there
            elif reverse_staged(cur, ctx, plan.table_name):
                # Switched off, not dropped: dropping clones the DROP onto every partition
                # under this lock; the trigger goes with the partitioned table afterwards.
                arm_reverse(cur, ctx, False)
            else:
                drop_sync(cur, ctx, plan.table_name, REVERSE_TRIGGER, "reverse")
            for stmt in swap.renames(plan.table_name, plan.retired, plan.twin.name):
                cur.execute(stmt)
            # Triggers on the partitioned table are re-created on the heap with their current
            # state by carry_objects; any other trigger of the heap gets back the state it had
            # before the cutover disabled it (enabled ones enabled, disabled ones left disabled).
            before = saved.get("triggers") or {}
            recreated = {t.name for t in current.triggers}
            for trig in ctx.info.triggers:
                if trig.name not in recreated and not trig.name.startswith("orchestrate_"):
                    cur.execute(swap.trigger_state(plan.table_name, trig.name, before.get(trig.name, "O")))
            if plan.distribute is not None:
                # Everything carried back lands on the coordinator's local heap table: nothing
                # to propagate, and Citus would refuse a distributed view over a local table.
                with local_ddl(cur):
                    done = carry_objects(cur, current, plan.table_name, plan.twin, new_is_partitioned=False)
            else:
                done = carry_objects(cur, current, plan.table_name, plan.twin, new_is_partitioned=False)
            # Incoming foreign keys dropped at cutover come back NOT VALID (catalog only, under
            # the lock); they are validated after the commit, without blocking writers.
            for fk in saved.get("dropped_foreign_keys") or []:
                table = QualifiedName(*fk["table"])
                if cur.execute(swap.TO_REGCLASS, (str(table),)).fetchone()[0] is None:
                    continue
                cur.execute(swap.CONSTRAINT_EXISTS, (str(table), fk["name"]))
                if cur.fetchone():
                    continue
                cur.execute(swap.add_foreign_key_not_valid(table, fk["name"], fk["definition"]))
                restored_fks.append((table, fk["name"]))
                done.append(f"foreign key {table}.{fk['name']} (NOT VALID)")
            return done

        done = with_lock_retry(ctx.conn, body, what="rollback swap", policy=plan.locks,
                               on_attempt=report)
        held_ms = report.held_ms or 0.0
        ctx.store.event(ctx.mid, "rollback", f"swapped back; ACCESS EXCLUSIVE held {held_ms:.1f} ms",
                        lock_held_ms=held_ms, carried=done, seconds=time.monotonic() - t0,
                        lock_attempts=len(report.attempts))
        logger.info("rollback: lock held {:.1f} ms; restored: {}", held_ms, "; ".join(done) or "nothing")
        for table, name in restored_fks:
            self._validate_fk(ctx, table, name)

    @staticmethod
    def _validate_fk(ctx: Context, table: QualifiedName, name: str) -> None:
        """VALIDATE CONSTRAINT takes SHARE UPDATE EXCLUSIVE (writers go on). Rows written while
        the constraint was gone may violate it: then it stays NOT VALID, with a warning."""
        def body(cur: psycopg.Cursor) -> None:
            cur.execute(swap.validate_constraint(table, name))

        try:
            with_lock_retry(ctx.conn, body, what=f"validate {table}.{name}",
                            policy=ctx.plan.locks)
        except (psycopg.Error, OrchestrateError) as e:
            msg = f"foreign key {table}.{name} restored NOT VALID; validation failed: {str(e).strip().splitlines()[0]}"
            logger.warning(msg)
            ctx.store.event(ctx.mid, "warning", msg)
