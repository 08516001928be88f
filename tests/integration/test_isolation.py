"""Capture at every isolation level, reproduced deterministically with two connections.

A REPEATABLE READ or SERIALIZABLE application transaction takes its snapshot; then the
backfill copies its rows into the twin (``apply --until backfill``); then the old
transaction updates a row, deletes one or moves one's key, and commits. The capture
trigger's UPDATE/DELETE by key runs in that old snapshot and cannot see the copied row.

- ours: the trigger's probe (``INSERT ... ON CONFLICT DO NOTHING`` after a by-key miss)
  makes PostgreSQL raise 40001: the application's transaction fails with a retryable
  serialization failure and changes nothing; retried, it applies exactly.
- control (the function rendered with ``probe=False``, the old trigger): the transaction
  commits, the twin silently keeps the old row (lost update, resurrected delete,
  duplicated move). This proves the interleaving really is the bug.

The same for the reverse trigger after cutover: the retired table's row is rewritten
after the writer's snapshot (a state we construct directly), then the writer changes the
row through the new table.
"""

from __future__ import annotations

from datetime import datetime, timezone

import psycopg
import pytest

from orchestrator import runner, sql
from orchestrator.inspect import inspect_table
from orchestrator.lab.sample import create_orders
from orchestrator.phases import Context
from orchestrator.plan import parse_plan
from orchestrator.sql import sync as sync_sql

END = datetime(2026, 10, 20, 12, tzinfo=timezone.utc)
TABLE = "public.orders"
TWIN = "public.orders_partitioned"
RETIRED = "public.orders_retired"
LEVELS = ["REPEATABLE READ", "SERIALIZABLE"]

OPS = {
    "update": ["UPDATE orders SET amount = amount + 1000, note = NULL WHERE id = %(a)s"],
    "delete": ["DELETE FROM orders WHERE id = %(b)s"],
    # across a month boundary: the row moves to another partition of the twin
    "move": ["UPDATE orders SET created_at = created_at - interval '40 days' WHERE id = %(c)s"],
    "all three": ["UPDATE orders SET amount = amount + 1000, note = NULL WHERE id = %(a)s",
                  "DELETE FROM orders WHERE id = %(b)s",
                  "UPDATE orders SET created_at = created_at - interval '40 days' WHERE id = %(c)s"],
}


def _plan():
    return parse_plan({"table": TABLE, "partition_by": {"column": "created_at", "interval": "1 month"},
                       "backfill": {"range": "1 day", "batch_size": 50, "fixed_batch_size": True}})


@pytest.fixture
def captured(dsn: str, conn: psycopg.Connection):
    """orders (400 rows over 10 days), twin and capture trigger in place, twin still empty."""
    create_orders(conn, TABLE, rows=400, days=10, end=END, seed=5)
    plan = _plan()
    runner.apply(plan, dsn, until="capture")
    assert conn.execute(f"SELECT count(*) FROM {TWIN}").fetchone()[0] == 0
    return plan


def _shape(conn: psycopg.Connection, plan) -> sql.Shape:
    info = inspect_table(conn, plan.table_name, allow_partitioned=True)  # after cutover too
    return Context(plan=plan, dsn="", conn=conn, store=None, migration=None).shape(info)  # type: ignore[arg-type]


def _victims(conn: psycopg.Connection) -> dict[str, int]:
    ids = [r[0] for r in conn.execute("SELECT id FROM orders ORDER BY id")]
    return {"a": ids[10], "b": ids[200], "c": ids[300]}


def _diff(conn: psycopg.Connection, a: str, b: str) -> int:
    """Rows in one table and not the other, both ways, every column compared."""
    return conn.execute(
        f"SELECT count(*) FROM ((SELECT * FROM {a} EXCEPT ALL SELECT * FROM {b}) UNION ALL "
        f"(SELECT * FROM {b} EXCEPT ALL SELECT * FROM {a})) d").fetchone()[0]


def _snapshot(dsn: str, level: str) -> psycopg.Connection:
    """An application session whose transaction has taken its snapshot (touching no table)."""
    app = psycopg.connect(dsn)
    app.execute(f"BEGIN ISOLATION LEVEL {level}")
    app.execute("SELECT 1").fetchone()
    return app


def _without_probe(conn: psycopg.Connection, plan, kind: str, dst: str, dst_key: tuple[str, ...] | None) -> None:
    """Replace the installed trigger function with the old one (no probe): the control."""
    mid = conn.execute("SELECT max(id) FROM orchestrate.migrations").fetchone()[0]
    fn = sql.QualifiedName("orchestrate", f"{kind}_{mid}")
    dst_name = sql.parse_qualified(dst)
    conn.execute(sync_sql.sync_function(fn, dst_name, _shape(conn, plan), dst_key=dst_key, probe=False))


def _run(app: psycopg.Connection, stmts: list[str], victims: dict[str, int]) -> BaseException | None:
    try:
        for s in stmts:
            app.execute(s, victims)
        app.commit()
    except psycopg.errors.SerializationFailure as e:
        app.rollback()
        return e
    return None


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("level", LEVELS)
def test_old_snapshot_write_after_copy_fails_with_40001(captured, dsn: str, conn: psycopg.Connection,
                                                        level: str, op: str) -> None:
    """Rows copied after the writer's snapshot: 40001, nothing changed; the retry applies exactly."""
    plan = captured
    victims = _victims(conn)
    before = conn.execute("SELECT * FROM orders ORDER BY id").fetchall()
    app = _snapshot(dsn, level)
    try:
        runner.apply(plan, dsn, until="backfill")  # copies every row after the app's snapshot
        assert _diff(conn, TABLE, TWIN) == 0
        err = _run(app, OPS[op], victims)
        assert err is not None, f"{level} {op}: committed although the twin's row was invisible to it"
        assert err.sqlstate == "40001"
        assert conn.execute("SELECT * FROM orders ORDER BY id").fetchall() == before, "the failed write left a trace"
        assert _diff(conn, TABLE, TWIN) == 0
        # What an application does next: retry in a new transaction, which now applies exactly.
        app.execute(f"BEGIN ISOLATION LEVEL {level}")
        assert _run(app, OPS[op], victims) is None
    finally:
        app.close()
    assert conn.execute("SELECT * FROM orders ORDER BY id").fetchall() != before
    assert _diff(conn, TABLE, TWIN) == 0, "twin and table differ after the retried write"


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("level", LEVELS)
def test_control_without_probe_diverges_silently(captured, dsn: str, conn: psycopg.Connection,
                                                 level: str, op: str) -> None:
    """The old trigger: the same interleaving commits and the twin silently differs."""
    plan = captured
    victims = _victims(conn)
    _without_probe(conn, plan, "capture", TWIN, None)
    app = _snapshot(dsn, level)
    try:
        runner.apply(plan, dsn, until="backfill")
        assert _run(app, OPS[op], victims) is None
    finally:
        app.close()
    assert _diff(conn, TABLE, TWIN) > 0, "the old trigger did not diverge: the interleaving is not the bug"


@pytest.mark.parametrize("level", ["READ COMMITTED", *LEVELS])
def test_write_before_copy_is_applied_exactly(captured, dsn: str, conn: psycopg.Connection, level: str) -> None:
    """A row not copied yet (at any level): the by-key statement finds nothing, the probe is
    exact (the new version inserted, a deleted row inserted and deleted again), and the
    backfill that runs afterwards leaves the twin equal to the table."""
    plan = captured
    victims = _victims(conn)
    app = _snapshot(dsn, level)
    try:
        assert _run(app, OPS["all three"], victims) is None
    finally:
        app.close()
    twin_ids = {r[0] for r in conn.execute(f"SELECT id FROM {TWIN}")}
    assert twin_ids == {victims["a"], victims["c"]}  # the update's and the move's new versions; not b
    runner.apply(plan, dsn, until="backfill")
    assert _diff(conn, TABLE, TWIN) == 0


@pytest.mark.parametrize("level", LEVELS)
def test_write_with_snapshot_after_copy_is_applied_exactly(captured, dsn: str, conn: psycopg.Connection,
                                                           level: str) -> None:
    """The common case: the copied row is visible to the writer; no probe, no error."""
    plan = captured
    runner.apply(plan, dsn, until="backfill")
    app = _snapshot(dsn, level)
    try:
        assert _run(app, OPS["all three"], _victims(conn)) is None
    finally:
        app.close()
    assert _diff(conn, TABLE, TWIN) == 0


@pytest.fixture
def cut_over(dsn: str, conn: psycopg.Connection):
    """orders migrated through cutover: the reverse trigger keeps orders_retired in sync."""
    create_orders(conn, TABLE, rows=400, days=10, end=END, seed=6)
    plan = _plan()
    runner.apply(plan, dsn)
    assert conn.execute("SELECT relkind FROM pg_class WHERE oid = 'public.orders'::regclass").fetchone()[0] == "p"
    assert _diff(conn, TABLE, RETIRED) == 0
    return plan


def _take_out(conn: psycopg.Connection, ids: list[int]) -> None:
    """Move rows out of the retired table (directly: no trigger writes back) into a side table."""
    with conn.transaction():
        conn.execute(f"CREATE TABLE public.taken_out AS SELECT * FROM {RETIRED} WITH NO DATA")
        conn.execute(f"WITH d AS (DELETE FROM {RETIRED} WHERE id = ANY(%s) RETURNING *) "
                     "INSERT INTO public.taken_out SELECT * FROM d", (ids,))


def _put_back(conn: psycopg.Connection) -> None:
    """Re-insert them: the retired table again equals the table, but these versions are
    newer than the writer's snapshot. The only way a row can be invisible to a snapshot
    that sees it in the new table; constructed here, it is the state the probe must catch."""
    with conn.transaction():
        conn.execute(f"INSERT INTO {RETIRED} OVERRIDING SYSTEM VALUE SELECT * FROM public.taken_out")


@pytest.mark.parametrize("probe", [True, False], ids=["probe", "control"])
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("level", LEVELS)
def test_reverse_trigger_old_snapshot(cut_over, dsn: str, conn: psycopg.Connection, level: str, op: str,
                                      probe: bool) -> None:
    """After cutover: 40001 and nothing changed with the probe; silent divergence without it."""
    plan = cut_over
    if not probe:
        _without_probe(conn, plan, "reverse", RETIRED, _shape(conn, plan).pk)
    victims = _victims(conn)
    before = conn.execute("SELECT * FROM orders ORDER BY id").fetchall()
    _take_out(conn, list(victims.values()))
    app = _snapshot(dsn, level)
    try:
        _put_back(conn)
        assert _diff(conn, TABLE, RETIRED) == 0
        try:
            err = _run(app, OPS[op], victims)
        except psycopg.errors.UniqueViolation as e:  # the old trigger's key move: see below
            err = e
    finally:
        app.close()
    if probe:
        assert err is not None and err.sqlstate == "40001", f"{level} {op}: the reverse trigger missed silently"
        assert conn.execute("SELECT * FROM orders ORDER BY id").fetchall() == before
        assert _diff(conn, TABLE, RETIRED) == 0
    elif any("created_at -" in w for w in OPS[op]):
        # The old trigger's DELETE missed, its INSERT hit the retired table's primary key:
        # a non-retryable error for the application, where the probe gives a 40001.
        assert isinstance(err, psycopg.errors.UniqueViolation), err
    else:
        assert err is None
        assert _diff(conn, TABLE, RETIRED) > 0, "the old reverse trigger did not diverge"


SHAPED = """
CREATE TABLE public.events (
    tenant int NOT NULL,
    id bigint GENERATED ALWAYS AS IDENTITY,
    at timestamptz,
    body text,
    body_len int GENERATED ALWAYS AS (length(body)) STORED,
    PRIMARY KEY (tenant, id)
);
INSERT INTO public.events (tenant, at, body)
SELECT g % 3, CASE WHEN g % 10 = 0 THEN NULL ELSE timestamptz '2026-10-01 00:00+00' + g * interval '1 hour' END,
       'b' || g
FROM generate_series(1, 120) g;
"""


@pytest.mark.parametrize("level", LEVELS)
def test_nullable_key_composite_pk_identity_generated(dsn: str, conn: psycopg.Connection, level: str) -> None:
    """The probe's ON CONFLICT infers the twin's UNIQUE NULLS NOT DISTINCT (pk..., key) and
    inserts identity values and no generated column: a NULL-key row and a dated row, each
    written before their copy (applied) and after it from an old snapshot (40001)."""
    conn.execute(SHAPED)
    plan = parse_plan({"table": "public.events", "partition_by": {"column": "at", "interval": "1 month"},
                       "backfill": {"batch_size": 20, "fixed_batch_size": True}})
    runner.apply(plan, dsn, until="capture")
    nulls = conn.execute("SELECT tenant, id FROM events WHERE at IS NULL ORDER BY id LIMIT 3").fetchall()
    dates = conn.execute("SELECT tenant, id FROM events WHERE at IS NOT NULL ORDER BY id LIMIT 3").fetchall()
    null_row, dated = nulls[0], dates[0]
    writes = ["UPDATE events SET body = body || '!' WHERE (tenant, id) = (%s, %s)",
              "DELETE FROM events WHERE (tenant, id) = (%s, %s)"]
    # before the copy: applied exactly
    app = _snapshot(dsn, level)
    stale = []
    try:
        app.execute(writes[0], null_row)
        app.execute(writes[0], dated)
        app.commit()
        stale = [_snapshot(dsn, level) for _ in range(4)]  # one old snapshot per write below
        runner.apply(plan, dsn, until="backfill")
        assert _diff(conn, "public.events", "public.events_partitioned") == 0
        # after the copy, from an older snapshot: 40001, for the NULL key as for a date
        cases = [(writes[0], nulls[1]), (writes[0], dates[1]), (writes[1], nulls[2]), (writes[1], dates[2])]
        for s, (w, row) in zip(stale, cases, strict=True):
            with pytest.raises(psycopg.errors.SerializationFailure):
                s.execute(w, row)
    finally:
        app.close()
        for s in stale:
            s.close()
    assert _diff(conn, "public.events", "public.events_partitioned") == 0


def test_cutover_waits_for_snapshots_older_than_the_copy(captured, dsn: str, conn: psycopg.Connection) -> None:
    """A REPEATABLE READ transaction open across the backfill would see the new table
    without the rows copied after its snapshot (its UPDATE touching nothing, silently). The
    cutover waits for it (gate), gives up after gate_timeout with nothing changed (exit 8),
    and cuts over once it has ended; a transaction opened after the copy does not hold it."""
    from orchestrator.errors import StateConflict

    plan = captured
    app = _snapshot(dsn, "REPEATABLE READ")
    try:
        runner.apply(plan, dsn, until="verify")
        fresh = _snapshot(dsn, "REPEATABLE READ")  # after the copy: harmless
        short = parse_plan({**plan.model_dump(mode="json", exclude_none=True),
                            "cutover": {"gate_timeout": "2s"}})
        with pytest.raises(StateConflict, match="no snapshot older than the copy.*pid "
                           f"{app.info.backend_pid}"):
            runner.apply(short, dsn)
        assert conn.execute("SELECT relkind FROM pg_class WHERE oid = 'public.orders'::regclass").fetchone()[0] == "r"
        app.commit()
        runner.apply(short, dsn)
        fresh.commit()
    finally:
        app.close()
    assert conn.execute("SELECT relkind FROM pg_class WHERE oid = 'public.orders'::regclass").fetchone()[0] == "p"
    assert _diff(conn, TABLE, RETIRED) == 0
