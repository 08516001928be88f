"""The resurrection race, reproduced deterministically with two connections.

The capture trigger is installed by the engine itself (`apply --until capture`), so the
twin is empty and every write to the live table is mirrored into it. Then one
connection copies a one-day window into the twin while another one deletes, updates or
moves a row of that window, in a fixed order:

- naive copy (`INSERT INTO twin SELECT ... FROM t WHERE window`, no row locks) in a
  REPEATABLE READ transaction whose snapshot is taken before the concurrent write
  commits: the trigger of the write finds nothing in the twin, then the copy inserts the
  stale version. The deleted row comes back (or the update is lost, or the moved row is
  duplicated). These cases prove that the interleaving really is the race.
- our batch (`sql.backfill.backfill_copy` as the engine renders it for this table, READ COMMITTED
  like the backfill workers): started while the write is uncommitted, it blocks on the
  row lock, the write commits, then the batch finishes: the twin holds exactly what the
  live table holds.
"""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

import psycopg
import pytest

from helpers import wait_until
from orchestrator import runner, sql
from orchestrator.inspect import inspect_table
from orchestrator.lab.sample import create_orders
from orchestrator.phases import Context
from orchestrator.plan import parse_plan
from orchestrator.sql import backfill as backfill_sql
from orchestrator.sql.compose import SQL, cols, text

END = datetime(2026, 10, 20, 12, tzinfo=timezone.utc)
DAY = datetime(2026, 10, 10)  # the window the copy works on (UTC day)
TABLE = "public.orders"
TWIN = "public.orders_partitioned"


@pytest.fixture
def captured(dsn: str, conn: psycopg.Connection):
    """orders (3000 rows over 20 days) with the twin and the capture trigger in place, empty twin."""
    create_orders(conn, TABLE, rows=3000, days=20, end=END, seed=3)
    plan = parse_plan({"table": TABLE, "partition_by": {"column": "created_at", "interval": "1 month"}})
    runner.apply(plan, dsn, until="capture")
    assert conn.execute(f"SELECT count(*) FROM {TWIN}").fetchone()[0] == 0
    assert conn.execute(
        "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'public.orders'::regclass AND tgname = 'orchestrate_capture'"
    ).fetchone()[0] == 1
    info = inspect_table(conn, plan.table_name)
    shape = Context(plan=plan, dsn=dsn, conn=conn, store=None, migration=None).shape(info)  # type: ignore[arg-type]
    return plan, shape


def _window(shape: sql.Shape) -> tuple[str, list[str]]:
    lo, hi = DAY, DAY + timedelta(days=1)
    where, params = backfill_sql.range_predicate(shape, f"{lo:%Y-%m-%d %H:%M:%S}", f"{hi:%Y-%m-%d %H:%M:%S}", False)
    return text(where), params


def _victim(conn: psycopg.Connection, where: str, params: list[str]) -> int:
    """A row in the middle of the window (not its first or last)."""
    ids = [r[0] for r in conn.execute(f"SELECT id FROM orders WHERE {where} ORDER BY created_at, id", params)]
    assert len(ids) > 10
    return ids[len(ids) // 2]


WRITES = {
    # name: (SQL run on the victim, what the twin must hold for it afterwards)
    "delete": "DELETE FROM orders WHERE id = %s",
    "update": "UPDATE orders SET amount = amount + 1000, note = NULL, status = 'refunded' WHERE id = %s",
    "move_out": "UPDATE orders SET created_at = created_at - interval '3 days', amount = amount + 1 WHERE id = %s",
    # Stays in the window: the trigger inserts the moved row into the twin's window.
    "move_within": "UPDATE orders SET created_at = created_at + interval '1 second', amount = amount + 2 WHERE id = %s",
}


def _rows(conn: psycopg.Connection, table: str, victim: int) -> list[tuple]:
    return conn.execute(
        f"SELECT id, created_at, amount, status, note, payload::text FROM {table} WHERE id = %s ORDER BY created_at",
        (victim,),
    ).fetchall()


def _twin_window_equals_live(conn: psycopg.Connection, where: str, params: list[str]) -> None:
    """Within the window, the twin holds exactly the live rows (every column)."""
    diff = conn.execute(
        f"SELECT count(*) FROM ((SELECT * FROM orders WHERE {where} EXCEPT ALL "
        f"SELECT * FROM orders_partitioned WHERE {where}) UNION ALL "
        f"(SELECT * FROM orders_partitioned WHERE {where} EXCEPT ALL SELECT * FROM orders WHERE {where})) d",
        params * 4,
    ).fetchone()[0]
    assert diff == 0, f"{diff} rows differ between the live window and the twin's"


@pytest.mark.parametrize("write", list(WRITES))
def test_naive_copy_resurrects_or_loses_the_write(captured, dsn: str, conn: psycopg.Connection, write: str) -> None:
    """Without row locks, a write that commits after the copy's snapshot is undone in the twin."""
    plan, shape = captured
    where, params = _window(shape)
    victim = _victim(conn, where, params)
    before = _rows(conn, "orders", victim)
    with psycopg.connect(dsn) as copier, psycopg.connect(dsn, autocommit=True) as writer:
        copier.execute("SET TimeZone = 'UTC'")
        copier.commit()
        copier.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        copier.execute("SELECT count(*) FROM orders").fetchone()  # the snapshot is taken here
        writer.execute(WRITES[write], (victim,))  # commits; its trigger finds nothing in the twin
        c = text(cols(shape.columns))
        if write == "update":
            # The trigger's probe (see sql.sync.sync_function) wrote the updated row into the twin
            # when its UPDATE found nothing: the stale copy now collides instead of winning.
            with pytest.raises(psycopg.errors.UniqueViolation):
                copier.execute(f"INSERT INTO {TWIN} ({c}) SELECT {c} FROM orders WHERE {where}", params)
            copier.rollback()
            assert _rows(conn, TWIN, victim) == _rows(conn, "orders", victim)
            return
        copier.execute(f"INSERT INTO {TWIN} ({c}) SELECT {c} FROM orders WHERE {where}", params)
        copier.commit()
    live, twin = _rows(conn, "orders", victim), _rows(conn, TWIN, victim)
    assert twin != live, "the naive copy did not lose the write: the interleaving is not the race"
    if write == "delete":
        assert live == [] and twin == before, f"deleted row {victim} should have come back in the twin: {twin}"
    else:  # the moved row is in the twin twice: its new version (trigger) and the stale one (copy)
        assert len(twin) == 2 and before[0] in twin and live[0] in twin, twin


@pytest.mark.parametrize("on_conflict", [True, False], ids=["on_conflict", "plain"])
@pytest.mark.parametrize("write", list(WRITES))
def test_backfill_batch_waits_for_the_write_and_copies_its_result(captured, dsn: str, conn: psycopg.Connection,
                                                                   write: str, on_conflict: bool) -> None:
    """Our batch statement blocks on the uncommitted write's row lock and copies its outcome.

    Without ON CONFLICT (the backfill's form for a window the twin held nothing of), a row the
    write's trigger put into the window makes the batch fail with a unique violation: the
    engine then redoes the batch with ON CONFLICT. Never a wrong row."""
    plan, shape = captured
    where, params = _window(shape)
    victim = _victim(conn, where, params)
    before = _rows(conn, "orders", victim)
    stmt = backfill_sql.backfill_copy(plan.table_name, plan.twin, shape, SQL(where), False, False, False, on_conflict)
    result: dict = {}
    with psycopg.connect(dsn, autocommit=True) as copier, psycopg.connect(dsn) as writer:
        copier.execute("SET TimeZone = 'UTC'")
        writer.execute(WRITES[write], (victim,))  # uncommitted: holds the row lock; trigger already ran
        copier_pid = copier.info.backend_pid

        def batch() -> None:
            try:
                with copier.transaction(), copier.cursor() as cur:
                    cur.execute(stmt, params)
                    result["rows"] = cur.rowcount
            except BaseException as e:  # noqa: BLE001 - reported below
                result["error"] = e

        t = threading.Thread(target=batch, daemon=True)
        t.start()
        with psycopg.connect(dsn, autocommit=True) as watch:
            blocked = wait_until(
                lambda: not t.is_alive() or watch.execute(
                    "SELECT %s = ANY (pg_blocking_pids(%s))", (writer.info.backend_pid, copier_pid)
                ).fetchone()[0],
                timeout=10,
                message="the batch neither blocked nor finished",
            )
        was_blocked = t.is_alive() and blocked
        writer.commit()
        t.join(timeout=30)
        assert not t.is_alive(), "the batch did not finish after the write committed"
    # The trigger put a row into the window: the moved row, or the updated one (its UPDATE
    # found nothing in the twin, so the probe inserted the new version; see sql.sync.sync_function).
    trigger_wrote = write in ("move_within", "update")
    if trigger_wrote and not on_conflict:
        assert isinstance(result.get("error"), psycopg.errors.UniqueViolation), result
        assert conn.execute(f"SELECT count(*) FROM {TWIN} WHERE {where}", params).fetchone()[0] == 1  # the trigger's
        return
    assert "error" not in result, result
    live, twin = _rows(conn, "orders", victim), _rows(conn, TWIN, victim)
    assert twin == live, (
        f"{write}: the twin holds {twin} for row {victim}, the live table {live} (before: {before}); "
        f"batch blocked on the row lock: {was_blocked}"
    )
    assert was_blocked, "the batch did not wait for the uncommitted write (no row lock taken)"
    if write == "delete":
        assert live == []
    # And the rest of the window was copied exactly, once.
    _twin_window_equals_live(conn, where, params)
    in_window = conn.execute(f"SELECT count(*) FROM orders WHERE {where}", params).fetchone()[0]
    assert result["rows"] == in_window - trigger_wrote  # that row: the trigger's version stands


def test_engine_redoes_a_batch_that_met_a_row_moved_into_its_window(captured, dsn: str, conn: psycopg.Connection,
                                                                    tmp_path) -> None:
    """Through apply: the probe finds the twin's window empty, a key move into the window is
    uncommitted, the batch blocks on it, fails with a unique violation once it commits, and
    is redone with ON CONFLICT; the twin then equals the table."""
    import yaml

    from helpers import apply_log, start_apply, stop

    plan, shape = captured
    where, params = _window(shape)
    victim = _victim(conn, where, params)
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump({"table": TABLE, "partition_by": {"column": "created_at", "interval": "1 month"},
                                    "backfill": {"range": "1 day", "workers": 1}}))
    with psycopg.connect(dsn) as writer:
        writer.execute(WRITES["move_within"], (victim,))  # uncommitted: row lock held, twin row written
        proc = start_apply(tmp_path, path, dsn, "--until", "backfill")
        try:
            wait_until(lambda: proc.poll() is not None or conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'orchestrate:backfill-%%' "
                "AND %s = ANY (pg_blocking_pids(pid))", (writer.info.backend_pid,)).fetchone()[0] == 1,
                timeout=60, message="the backfill never blocked on the moved row")
            assert proc.poll() is None, apply_log(proc)
            writer.commit()
            assert proc.wait(120) == 0, apply_log(proc)
        finally:
            stop(proc)
    _twin_window_equals_live(conn, where, params)
    assert conn.execute(f"SELECT count(*) FROM {TWIN}").fetchone()[0] == \
        conn.execute(f"SELECT count(*) FROM {TABLE}").fetchone()[0]
    detail = conn.execute("SELECT detail FROM orchestrate.phases WHERE name = 'backfill'").fetchone()[0]
    assert detail["batches_redone"] == 1, detail
