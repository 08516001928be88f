"""Async capture (``capture: {mode: async}``): the change log and its replay, deterministically.

Each test drives the pieces one at a time against the real server: ``apply`` with the
replay thread off (``options={"replay": False}``) leaves changes pending in the log; the
test then calls the owner's replay function itself (``orchestrate.replay_<id>(n)``),
in batches as small as one row, and compares the twin with the live table column by column.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime, timezone

import psycopg
import pytest

from helpers import drain, wait_until
from orchestrator import runner
from orchestrator.lab.sample import create_orders
from orchestrator.plan import parse_plan
from orchestrator.sql import backfill as backfill_sql
from orchestrator.sql.compose import SQL, cols, text

END = datetime(2026, 10, 20, 12, tzinfo=timezone.utc)
TABLE, TWIN, LOG = "public.orders", "public.orders_partitioned", "public.orders_changes"


def _plan(**capture):
    return parse_plan({"table": TABLE, "partition_by": {"column": "created_at", "interval": "1 month"},
                       "backfill": {"range": "1 day", "batch_size": 50, "fixed_batch_size": True},
                       "cutover": {"lock_timeout": "300ms", "attempts": 20, "backoff_max": "200ms",
                                   "gate_timeout": "20s"},
                       "capture": {"mode": "async", **capture}})


def _diff(conn: psycopg.Connection, a: str = TABLE, b: str = TWIN) -> int:
    return conn.execute(
        f"SELECT count(*) FROM ((SELECT * FROM {a} EXCEPT ALL SELECT * FROM {b}) UNION ALL "
        f"(SELECT * FROM {b} EXCEPT ALL SELECT * FROM {a})) d").fetchone()[0]


def _mid(conn: psycopg.Connection) -> int:
    return conn.execute("SELECT max(id) FROM orchestrate.migrations").fetchone()[0]


def _replay(conn: psycopg.Connection, n: int = 1000) -> int:
    """Replay the whole log, ``n`` rows per batch; returns the number of batches."""
    batches = 0
    while conn.execute(f"SELECT orchestrate.replay_{_mid(conn)}(%s)", (n,)).fetchone()[0]:
        batches += 1
    return batches


def _pending(conn: psycopg.Connection) -> int:
    return conn.execute(f"SELECT count(*) FROM {LOG}").fetchone()[0]


@pytest.fixture
def copied(dsn: str, conn: psycopg.Connection):
    """orders (400 rows over 10 days), async capture on, backfill done, no replay thread."""
    create_orders(conn, TABLE, rows=400, days=10, end=END, seed=5)
    plan = _plan()
    runner.apply(plan, dsn, until="backfill", options={"replay": False})
    assert _diff(conn) == 0
    return plan


def _ids(conn: psycopg.Connection) -> list[int]:
    return [r[0] for r in conn.execute("SELECT id FROM orders ORDER BY id")]


def test_capture_writes_only_the_log(copied, conn: psycopg.Connection) -> None:
    ids = _ids(conn)
    twin_before = conn.execute(f"SELECT count(*) FROM {TWIN}").fetchone()[0]
    conn.execute("UPDATE orders SET amount = amount + 1 WHERE id = %s", (ids[0],))
    conn.execute("DELETE FROM orders WHERE id = %s", (ids[1],))
    # The twin is untouched in the writer's transaction; the log holds the keys.
    assert conn.execute(f"SELECT count(*) FROM {TWIN}").fetchone()[0] == twin_before
    assert _diff(conn) == 3  # the updated row differs (one on each side), the deleted one is still there
    assert _pending(conn) == 2
    # The trigger is ENABLE ALWAYS and its function the owner's, SECURITY DEFINER, path pinned.
    assert conn.execute("SELECT tgenabled FROM pg_trigger WHERE tgrelid = 'public.orders'::regclass "
                        "AND tgname = 'orchestrate_capture'").fetchone()[0] == "A"
    assert conn.execute(f"SELECT prosecdef, proconfig FROM pg_proc WHERE oid = 'orchestrate.capture_{_mid(conn)}'"
                        "::regproc").fetchone() == (True, ["search_path=pg_catalog, pg_temp"])
    _replay(conn)
    assert _diff(conn) == 0 and _pending(conn) == 0


def test_replay_of_every_kind_of_change_in_batches_of_one(copied, conn: psycopg.Connection) -> None:
    ids = _ids(conn)
    with conn.transaction():
        conn.execute("UPDATE orders SET amount = amount + 1 WHERE id = %s", (ids[0],))
        conn.execute("UPDATE orders SET amount = amount + 1, note = NULL WHERE id = %s", (ids[0],))  # logged twice
        # A key move across a month: OLD and NEW keys logged.
        conn.execute("UPDATE orders SET created_at = created_at - interval '40 days' WHERE id = %s", (ids[2],))
        # A primary-key move.
        conn.execute("UPDATE orders SET id = id + 1000000 WHERE id = %s", (ids[3],))
    conn.execute("UPDATE orders SET status = 'paid' WHERE id = %s", (ids[4],))
    conn.execute("DELETE FROM orders WHERE id = %s", (ids[4],))  # update then delete
    conn.execute("INSERT INTO orders (customer_id, amount, created_at) VALUES (1, 2, %s)", (END,))
    conn.execute("DELETE FROM orders WHERE id = ANY(%s)", (ids[100:120],))  # bulk
    conn.execute("INSERT INTO orders SELECT * FROM orders WHERE id = %s ON CONFLICT (id) DO UPDATE "
                 "SET amount = 77", (ids[5],))  # upsert
    with conn.cursor().copy("COPY orders (customer_id, amount, note, created_at) FROM STDIN") as cp:
        for i in range(5):
            cp.write_row((9, i, f"copied {i}", datetime(2026, 10, 12, i, tzinfo=timezone.utc)))
    assert _diff(conn) > 0
    pending = _pending(conn)
    assert _replay(conn, 1) == pending  # one log row per batch, every batch idempotent
    assert _diff(conn) == 0
    # Replaying a key again changes nothing (a pk logged twice, a batch redone after a crash).
    conn.execute(f"INSERT INTO {LOG} (id, created_at) SELECT id, created_at FROM orders WHERE id = ANY(%s)",
                 (ids[:50],))
    _replay(conn, 7)
    assert _diff(conn) == 0


def test_truncate_between_logged_rows(copied, conn: psycopg.Connection) -> None:
    ids = _ids(conn)
    conn.execute("UPDATE orders SET amount = 1 WHERE id = ANY(%s)", (ids[:3],))
    conn.execute("TRUNCATE orders")
    conn.execute("INSERT INTO orders (customer_id, amount, created_at) "
                 "SELECT g, g, %s::timestamptz - g * interval '1 hour' FROM generate_series(1, 30) g", (END,))
    conn.execute("UPDATE orders SET amount = 0, note = 'after' WHERE customer_id < 5")
    assert conn.execute(f"SELECT count(*) FROM {LOG} WHERE orchestrate_truncate").fetchone()[0] == 1
    # Batches of 2: the marker arrives in the middle of a batch, rows logged before and after it.
    _replay(conn, 2)
    assert _diff(conn) == 0
    assert conn.execute(f"SELECT count(*) FROM {TWIN}").fetchone()[0] == 30


def test_replay_killed_mid_batch_then_replayed(copied, dsn: str, conn: psycopg.Connection) -> None:
    ids = _ids(conn)
    conn.execute("UPDATE orders SET amount = amount * 2 WHERE id = ANY(%s)", (ids[:40],))
    conn.execute("DELETE FROM orders WHERE id = ANY(%s)", (ids[40:60],))
    before = _pending(conn)
    victim = psycopg.connect(dsn)
    pid = victim.info.backend_pid
    victim.execute(f"SELECT orchestrate.replay_{_mid(conn)}(1000)")  # the batch, not committed
    conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
    with pytest.raises(psycopg.OperationalError):
        victim.execute("SELECT 1")
    victim.close()
    # Nothing of the batch survived the crash: the log still holds it, the twin is as it was.
    assert _pending(conn) == before
    assert _diff(conn) == 100  # 40 updated rows (one on each side) and 20 deleted ones
    _replay(conn)
    assert _diff(conn) == 0


def test_change_committed_after_the_batch_read_the_table_is_replayed_again(copied, dsn: str,
                                                                           conn: psycopg.Connection) -> None:
    """The one ordering replay relies on: a change that commits after the batch read the live
    row has its own log row, which the batch does not take (it deletes its log rows by
    sequence number, never by key). The interleaving is forced with an advisory lock that a
    trigger on the twin's partition waits for, between replay's read and its write."""
    ids = _ids(conn)
    victim = ids[7]
    conn.execute("UPDATE orders SET amount = 1 WHERE id = %s", (victim,))  # pending: v1
    part = conn.execute("SELECT tableoid::regclass::text FROM orders_partitioned WHERE id = %s",
                        (victim,)).fetchone()[0]
    conn.execute("CREATE FUNCTION public.hold() RETURNS trigger LANGUAGE plpgsql AS "
                 "$$BEGIN PERFORM pg_advisory_xact_lock(4242); RETURN NEW; END$$")
    conn.execute(f"CREATE TRIGGER hold BEFORE INSERT ON {part} FOR EACH ROW EXECUTE FUNCTION public.hold()")
    holder = psycopg.connect(dsn)
    holder.execute("BEGIN")
    holder.execute("SELECT pg_advisory_xact_lock(4242)")
    result: dict = {}

    def replay() -> None:
        with psycopg.connect(dsn, autocommit=True) as r:
            result["n"] = r.execute(f"SELECT orchestrate.replay_{_mid(conn)}(1000)").fetchone()[0]

    t = threading.Thread(target=replay)
    t.start()
    deadline = time.monotonic() + 30
    while not conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                           ).fetchone()[0]:
        assert time.monotonic() < deadline, "replay never reached the twin"
        time.sleep(0.02)
    # Replay has read v1 from the live table; v2 commits now.
    conn.execute("UPDATE orders SET amount = 2 WHERE id = %s", (victim,))
    holder.rollback()
    holder.close()
    t.join(timeout=30)
    assert result["n"] == 1
    conn.execute(f"DROP TRIGGER hold ON {part}")
    assert conn.execute("SELECT amount FROM orders_partitioned WHERE id = %s", (victim,)).fetchone()[0] == 1
    assert _pending(conn) == 1  # v2's log row is still there
    _replay(conn)
    assert conn.execute("SELECT amount FROM orders_partitioned WHERE id = %s", (victim,)).fetchone()[0] == 2
    assert _diff(conn) == 0


def test_verify_excludes_pending_keys_and_passes(copied, dsn: str, conn: psycopg.Connection) -> None:
    ids = _ids(conn)
    conn.execute("UPDATE orders SET amount = amount + 5 WHERE id = ANY(%s)", (ids[:30],))
    conn.execute("DELETE FROM orders WHERE id = ANY(%s)", (ids[30:40],))
    conn.execute("UPDATE orders SET created_at = created_at - interval '40 days' WHERE id = ANY(%s)", (ids[40:45],))
    assert _diff(conn) > 0 and _pending(conn) > 0
    # No replay at all: the differing rows are exactly the pending ones; verify passes.
    runner.apply(copied, dsn, until="verify", options={"replay": False})
    assert runner.status(copied, dsn).data["phases"]["verify"]["state"] == "done"
    assert _diff(conn) > 0


def test_cutover_replays_the_rest_under_the_lock(copied, dsn: str, conn: psycopg.Connection) -> None:
    """No replay thread at all: everything pending is replayed inside the cutover's lock."""
    runner.apply(copied, dsn, until="verify", options={"replay": False})
    ids = _ids(conn)
    conn.execute("UPDATE orders SET amount = amount + 5 WHERE id = ANY(%s)", (ids[:30],))
    conn.execute("DELETE FROM orders WHERE id = ANY(%s)", (ids[30:40],))
    golden = conn.execute("SELECT * FROM orders ORDER BY id").fetchall()
    plan = _plan(max_pending_at_cutover=1000)
    runner.apply(plan, dsn, options={"replay": False})
    assert conn.execute("SELECT relkind FROM pg_class WHERE oid = 'public.orders'::regclass").fetchone()[0] == "p"
    assert conn.execute("SELECT * FROM orders ORDER BY id").fetchall() == golden
    facts = conn.execute("SELECT facts FROM orchestrate.migrations WHERE id = %s", (_mid(conn),)).fetchone()[0]
    assert facts["replayed_under_lock"] == 40
    # The log and the replay functions are gone with the capture.
    assert conn.execute(f"SELECT to_regclass('{LOG}')").fetchone()[0] is None
    assert conn.execute("SELECT count(*) FROM pg_proc WHERE pronamespace = 'orchestrate'::regnamespace "
                        "AND proname ~ '^(replay|capture)'").fetchone()[0] == 0


def test_cutover_refuses_a_drain_beyond_the_lock_budget(copied, dsn: str, conn: psycopg.Connection) -> None:
    runner.apply(copied, dsn, until="verify", options={"replay": False})
    conn.execute("UPDATE orders SET amount = amount + 5")
    plan = _plan(max_pending_at_cutover=100000, max_lock_replay=10).model_copy(
        update={"cutover": _plan().cutover.model_copy(update={"attempts": 2})})
    from orchestrator.errors import LockNotAcquired

    with pytest.raises(LockNotAcquired, match="max_lock_replay"):
        runner.apply(plan, dsn, options={"replay": False})
    assert conn.execute("SELECT relkind FROM pg_class WHERE oid = 'public.orders'::regclass").fetchone()[0] == "r"
    assert _pending(conn) == 400


def test_rollback_after_capture_drops_the_log(dsn: str, conn: psycopg.Connection) -> None:
    create_orders(conn, TABLE, rows=100, days=5, end=END, seed=3)
    conn.execute("CREATE TABLE public.orders_changes_keep (x int)")
    runner.apply(_plan(), dsn, until="capture", options={"replay": False})
    conn.execute("UPDATE orders SET amount = 1")
    assert _pending(conn) == 100
    runner.rollback(_plan(), dsn)
    assert conn.execute(f"SELECT to_regclass('{LOG}')").fetchone()[0] is None
    assert conn.execute("SELECT to_regclass('public.orders_changes_keep')").fetchone()[0] is not None
    assert conn.execute("SELECT array_agg(proname) FROM pg_proc WHERE pronamespace = 'orchestrate'::regnamespace"
                        ).fetchone()[0] is None
    assert conn.execute("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'public.orders'::regclass "
                        "AND NOT tgisinternal").fetchone()[0] == 0


# --- the isolation-level cases (tests/integration/test_isolation.py) in async mode -------------
# A REPEATABLE READ / SERIALIZABLE writer whose snapshot predates the copy changes rows after
# it. The sync trigger must refuse that with 40001 (its by-key write cannot see the copied
# row); async capture only appends keys, so the writer commits, and replay, which re-reads
# the committed row, makes the twin exact.

OPS = {
    "update": ["UPDATE orders SET amount = amount + 1000, note = NULL WHERE id = %(a)s"],
    "delete": ["DELETE FROM orders WHERE id = %(b)s"],
    "move": ["UPDATE orders SET created_at = created_at - interval '40 days' WHERE id = %(c)s"],
    "all three": ["UPDATE orders SET amount = amount + 1000, note = NULL WHERE id = %(a)s",
                  "DELETE FROM orders WHERE id = %(b)s",
                  "UPDATE orders SET created_at = created_at - interval '40 days' WHERE id = %(c)s"],
}


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("level", ["REPEATABLE READ", "SERIALIZABLE"])
def test_old_snapshot_writer_after_the_copy_commits_and_is_replayed_exactly(dsn: str, conn: psycopg.Connection,
                                                                              level: str, op: str) -> None:
    create_orders(conn, TABLE, rows=400, days=10, end=END, seed=5)
    plan = _plan()
    runner.apply(plan, dsn, until="capture", options={"replay": False})
    ids = _ids(conn)
    victims = {"a": ids[10], "b": ids[200], "c": ids[300]}
    app = psycopg.connect(dsn)
    try:
        app.execute(f"BEGIN ISOLATION LEVEL {level}")
        app.execute("SELECT 1").fetchone()  # the snapshot, before the copy
        runner.apply(plan, dsn, until="backfill", options={"replay": False})
        for s in OPS[op]:
            app.execute(s, victims)
        app.commit()
    finally:
        app.close()
    assert _diff(conn) > 0
    drain(conn)
    assert _diff(conn) == 0


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


@pytest.mark.parametrize("level", ["READ COMMITTED", "SERIALIZABLE"])
def test_composite_key_null_keys_identity_generated(dsn: str, conn: psycopg.Connection, level: str) -> None:
    """Replay matches a composite primary key exactly (tenant 1 id 5 is not tenant 2 id 5),
    finds NULL-key rows in the default partition, copies identity values, computes the
    generated column; NULL keys moving to dates and back."""
    conn.execute(SHAPED)
    plan = parse_plan({"table": "public.events", "partition_by": {"column": "at", "interval": "1 month"},
                       "backfill": {"batch_size": 20, "fixed_batch_size": True}, "capture": {"mode": "async"}})
    runner.apply(plan, dsn, until="backfill", options={"replay": False})
    twin = "public.events_partitioned"
    assert _diff(conn, "public.events", twin) == 0
    with psycopg.connect(dsn) as app:
        app.execute(f"BEGIN ISOLATION LEVEL {level}")
        app.execute("UPDATE events SET body = body || '!' WHERE at IS NULL AND tenant = 1")
        app.execute("UPDATE events SET at = NULL WHERE id IN (3, 4)")
        app.execute("UPDATE events SET at = timestamptz '2026-10-02 00:00+00' WHERE id = 10")
        app.execute("DELETE FROM events WHERE tenant = 2 AND id IN (5, 20)")  # (0, 20) etc. stay
        app.execute("UPDATE events SET tenant = 7 WHERE tenant = 0 AND id = 6")  # a primary-key move
        app.execute("INSERT INTO events (tenant, at, body) VALUES (1, NULL, 'n'), (1, '2026-10-03', 'd')")
        app.commit()
    assert _diff(conn, "public.events", twin) > 0
    drain(conn)
    assert _diff(conn, "public.events", twin) == 0


# --- the resurrection race (tests/integration/test_race.py) in async mode ----------------------

WRITES = {
    "delete": "DELETE FROM orders WHERE id = %s",
    "update": "UPDATE orders SET amount = amount + 1000, note = NULL, status = 'refunded' WHERE id = %s",
    "move_out": "UPDATE orders SET created_at = created_at - interval '3 days', amount = amount + 1 WHERE id = %s",
    "move_within": "UPDATE orders SET created_at = created_at + interval '1 second', amount = amount + 2 WHERE id = %s",
}


@pytest.fixture
def captured_async(dsn: str, conn: psycopg.Connection):
    create_orders(conn, TABLE, rows=3000, days=20, end=END, seed=3)
    plan = _plan()
    runner.apply(plan, dsn, until="capture", options={"replay": False})
    from orchestrator.inspect import inspect_table
    from orchestrator.phases import Context

    info = inspect_table(conn, plan.table_name)
    shape = Context(plan=plan, dsn=dsn, conn=conn, store=None, migration=None).shape(info)  # type: ignore[arg-type]
    where, params = backfill_sql.range_predicate(shape, "2026-10-10 00:00:00", "2026-10-11 00:00:00", False)
    where = text(where)
    ids = [r[0] for r in conn.execute(f"SELECT id FROM orders WHERE {where} ORDER BY created_at, id", params)]
    return plan, shape, where, params, ids[len(ids) // 2]


def _window_diff(conn: psycopg.Connection, where: str, params: list) -> int:
    return conn.execute(
        f"SELECT count(*) FROM ((SELECT * FROM orders WHERE {where} EXCEPT ALL "
        f"SELECT * FROM orders_partitioned WHERE {where}) UNION ALL "
        f"(SELECT * FROM orders_partitioned WHERE {where} EXCEPT ALL SELECT * FROM orders WHERE {where})) d",
        params * 4).fetchone()[0]


@pytest.mark.parametrize("write", list(WRITES))
def test_naive_copy_with_replay_in_between_resurrects(captured_async, dsn: str, conn: psycopg.Connection,
                                                     write: str) -> None:
    """The race exists in async mode too: a copy without row locks whose snapshot predates a
    write, committing after replay already synced that write's key, brings the old row back."""
    plan, shape, where, params, victim = captured_async
    c = text(cols(shape.columns))
    with psycopg.connect(dsn) as copier:
        copier.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        copier.execute("SELECT count(*) FROM orders").fetchone()
        conn.execute(WRITES[write], (victim,))
        drain(conn)  # the write's key is synced (nothing in the twin yet) and its log row gone
        if write == "update":
            # Replay inserted the updated row: the stale copy collides instead of winning.
            with pytest.raises(psycopg.errors.UniqueViolation):
                copier.execute(f"INSERT INTO {TWIN} ({c}) SELECT {c} FROM orders WHERE {where}", params)
            return
        copier.execute(f"INSERT INTO {TWIN} ({c}) SELECT {c} FROM orders WHERE {where}", params)
        copier.commit()
    drain(conn)  # nothing left to replay: the stale row stays
    live = conn.execute("SELECT count(*) FROM orders WHERE id = %s", (victim,)).fetchone()[0]
    twin = conn.execute(f"SELECT count(*) FROM {TWIN} WHERE id = %s", (victim,)).fetchone()[0]
    assert (live, twin) == ((0, 1) if write == "delete" else (1, 2)), "the interleaving is not the race"


@pytest.mark.parametrize("write", list(WRITES))
def test_backfill_batch_with_replay_in_between_is_exact(captured_async, dsn: str, conn: psycopg.Connection,
                                                       write: str) -> None:
    """Our batch (FOR SHARE) waits for the uncommitted write and copies its outcome; replay
    runs at the worst moment (after the write commits, while the batch is in flight) and
    again afterwards: the window is exact."""
    plan, shape, where, params, victim = captured_async
    stmt = backfill_sql.backfill_copy(plan.table_name, plan.twin, shape, SQL(where), False, False, False, True)
    result: dict = {}
    with psycopg.connect(dsn) as writer, psycopg.connect(dsn, autocommit=True) as copier:
        writer.execute(WRITES[write], (victim,))  # uncommitted, row lock held, key logged

        def batch() -> None:
            try:
                with copier.transaction():
                    copier.execute(stmt, params)
            except BaseException as e:  # noqa: BLE001 - reported below
                result["error"] = e

        t = threading.Thread(target=batch, daemon=True)
        t.start()
        wait_until(lambda: not t.is_alive() or conn.execute(
            "SELECT %s = ANY (pg_blocking_pids(%s))", (writer.info.backend_pid, copier.info.backend_pid)
        ).fetchone()[0], timeout=10, message="the batch neither blocked nor finished")
        assert t.is_alive(), "the batch did not wait for the uncommitted write"
        writer.commit()
        drain(conn)
        t.join(timeout=30)
    assert "error" not in result, result
    drain(conn)
    assert _window_diff(conn, where, params) == 0


def test_a_column_added_mid_migration_is_replayed_too(copied, dsn: str, conn: psycopg.Connection) -> None:
    """DDL drift: the carried column reaches the twin and the re-rendered replay function, so
    changes logged after it carry its values; verify then passes and the cutover is exact."""
    conn.execute("ALTER TABLE orders ADD COLUMN channel text")
    ids = _ids(conn)
    conn.execute("UPDATE orders SET channel = 'web' WHERE id = ANY(%s)", (ids[:50],))
    runner.apply(copied, dsn, until="backfill", options={"replay": False})  # carries it, re-copies
    conn.execute("UPDATE orders SET channel = 'app' WHERE id = ANY(%s)", (ids[50:60],))
    drain(conn)
    assert conn.execute(f"SELECT count(*) FROM {TWIN} WHERE channel = 'app'").fetchone()[0] == 10
    assert _diff(conn) == 0
    runner.apply(copied, dsn)
    assert conn.execute("SELECT relkind FROM pg_class WHERE oid = 'public.orders'::regclass").fetchone()[0] == "p"
    assert _diff(conn, "public.orders", "public.orders_retired") == 0


def test_status_and_metrics_show_the_replay_lag(copied, dsn: str, conn: psycopg.Connection) -> None:
    from orchestrator.metrics import render

    conn.execute("UPDATE orders SET amount = amount + 1 WHERE id = ANY(%s)", (_ids(conn)[:25],))
    time.sleep(0.2)
    replay = runner.status(copied, dsn).data["replay"]
    assert replay["pending"] == 25 and replay["oldest_s"] >= 0.2  # no apply running: the log waits
    text = render({"replay_pending": 25, "replay_lag_s": 1.5, "replayed": 3}, TABLE)
    assert 'orchestrate_replay_pending{table="public.orders"} 25.0' in text
    assert 'orchestrate_replay_lag_seconds{table="public.orders"} 1.5' in text
    drain(conn)
    assert runner.status(copied, dsn).data["replay"]["pending"] == 0


def test_replay_lag_of_a_large_log_is_read_from_its_bounds(copied, dsn: str, conn: psycopg.Connection) -> None:
    """Exact while the sequence numbers waiting span less than LAG_EXACT_SPAN; beyond, their
    distance (an upper bound), without a scan of the log; the age is the next change's."""
    from orchestrator.sql.changelog import LAG_EXACT_SPAN

    conn.execute("UPDATE orders SET amount = amount + 1 WHERE id = ANY(%s)", (_ids(conn)[:30],))
    time.sleep(0.3)
    assert runner.status(copied, dsn).data["replay"]["pending"] == 30
    first = conn.execute(f"SELECT min(orchestrate_seq) FROM {LOG}").fetchone()[0]
    conn.execute(f"ALTER TABLE {LOG} ALTER COLUMN orchestrate_seq RESTART WITH {first + LAG_EXACT_SPAN + 10}")
    conn.execute("UPDATE orders SET amount = amount + 1 WHERE id = ANY(%s)", (_ids(conn)[:5],))
    replay = runner.status(copied, dsn).data["replay"]
    assert replay["pending"] == LAG_EXACT_SPAN + 10 + 5  # 35 rows: the bound, not the count
    assert replay["oldest_s"] >= 0.3  # the first of the 30, by sequence number
    drain(conn)
    assert runner.status(copied, dsn).data["replay"] == {"pending": 0, "oldest_s": 0.0}


def _apply_with_replay(tmp_path, path, dsn: str, conn: psycopg.Connection):
    """``apply --until backfill`` in the background, once it reports its replay thread."""
    from helpers import apply_log, live, start_apply, stop

    proc = start_apply(tmp_path, path, dsn, "--until", "backfill")
    try:
        wait_until(lambda: proc.poll() is not None or live(conn).get("replay_pending") is not None, timeout=90,
                   message="apply never reported the replay")
        assert proc.poll() is None, apply_log(proc)
    except BaseException:
        stop(proc)
        raise
    return proc


def test_pause_holds_the_backfill_not_the_replay(dsn: str, conn: psycopg.Connection, tmp_path) -> None:
    import yaml

    from helpers import apply_log, live, rows_copied, run_cli, stop

    create_orders(conn, TABLE, rows=3000, days=20, end=END, seed=4)
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump({"table": TABLE, "partition_by": {"column": "created_at", "interval": "1 month"},
                                    "backfill": {"batch_size": 50, "fixed_batch_size": True, "sleep_ratio": 2},
                                    "capture": {"mode": "async"}}))
    code, out, err = run_cli("pause", str(path), "--dsn", dsn)
    assert code == 0, err
    proc = _apply_with_replay(tmp_path, path, dsn, conn)
    try:
        before = rows_copied(conn)
        ids = _ids(conn)
        conn.execute("UPDATE orders SET note = 'while paused' WHERE id = ANY(%s)", (ids[:40],))
        # The replay syncs the keys into the twin while the backfill stays paused.
        wait_until(lambda: conn.execute(f"SELECT count(*) FROM {TWIN} WHERE note = 'while paused'").fetchone()[0]
                   == 40 and _pending(conn) == 0, timeout=60, message="the replay did not run while paused")
        assert rows_copied(conn) == before, "the backfill copied while paused"
        assert live(conn)["paused"] is True
        code, out, err = run_cli("resume", str(path), "--dsn", dsn)
        assert code == 0, err
        assert proc.wait(180) == 0, apply_log(proc)
    finally:
        stop(proc)
    drain(conn)
    assert _diff(conn) == 0


@pytest.mark.parametrize("throttled", [True, False])
def test_load_signals_hold_the_replay_and_nothing_is_lost(dsn: str, conn: psycopg.Connection, tmp_path,
                                                          throttled: bool) -> None:
    """The throttle's flag file (a load signal) holds the replay too, unless
    capture.replay_throttled is off (the control run: the same flag, the replay syncs)."""
    import yaml

    from helpers import apply_log, live, rows_copied, stop

    create_orders(conn, TABLE, rows=3000, days=20, end=END, seed=4)
    flag = tmp_path / "overloaded"
    flag.touch()
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump({"table": TABLE, "partition_by": {"column": "created_at", "interval": "1 month"},
                                    "backfill": {"batch_size": 50, "fixed_batch_size": True},
                                    "throttle": {"flag_file": str(flag), "backoff_max_s": 1},
                                    "capture": {"mode": "async", "replay_throttled": throttled}}))
    proc = _apply_with_replay(tmp_path, path, dsn, conn)
    try:
        ids = _ids(conn)
        conn.execute("UPDATE orders SET note = 'under load' WHERE id = ANY(%s)", (ids[:40],))
        in_twin = f"SELECT count(*) FROM {TWIN} WHERE note = 'under load'"
        if throttled:
            wait_until(lambda: (live(conn).get("replay_waiting") or "").startswith("flag file"), timeout=60,
                       message="status never said why the replay waits")
            time.sleep(3)  # several replay rounds' worth of waiting
            assert conn.execute(in_twin).fetchone()[0] == 0, "the replay ran while the flag held it"
            assert _pending(conn) >= 40 and live(conn)["replay_pending"] >= 40
        else:
            wait_until(lambda: conn.execute(in_twin).fetchone()[0] == 40 and _pending(conn) == 0, timeout=60,
                       message="the replay did not run under the flag with replay_throttled off")
            assert live(conn).get("replay_waiting") is None
        assert rows_copied(conn) == 0, "the backfill copied under the flag"
        flag.unlink()
        wait_until(lambda: conn.execute(in_twin).fetchone()[0] == 40, timeout=60,
                   message="the replay did not resume once the flag was gone")
        assert proc.wait(180) == 0, apply_log(proc)
    finally:
        stop(proc)
    drain(conn)
    assert _diff(conn) == 0


def test_plan_shows_the_capture_mode_and_its_steps(dsn: str, conn: psycopg.Connection) -> None:
    create_orders(conn, TABLE, rows=100, days=5, end=END, seed=3)
    data = runner.make_plan(_plan(), dsn).data
    assert data["capture"]["mode"] == "async" and "orders_changes" in data["capture"]["how"]
    capture = [s for s in data["steps"] if s["phase"] == "capture"]
    assert any('CREATE TABLE "public"."orders_changes"' in s["sql"] for s in capture)  # sql.Identifier quoting
    assert runner.make_plan(parse_plan({"table": TABLE, "partition_by": {"column": "created_at",
                                                                          "interval": "1 month"}}),
                            dsn).data["capture"]["mode"] == "sync"
    # Nothing was created by looking.
    assert conn.execute(f"SELECT to_regclass('{LOG}')").fetchone()[0] is None


def test_sigkill_mid_backfill_then_rollback_leaves_no_log(dsn: str, conn: psycopg.Connection, tmp_path) -> None:
    import signal

    import yaml

    from helpers import apply_log, run_cli, start_apply, stop

    create_orders(conn, TABLE, rows=3000, days=20, end=END, seed=6)
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump({"table": TABLE, "partition_by": {"column": "created_at", "interval": "1 month"},
                                    "backfill": {"batch_size": 50, "fixed_batch_size": True, "sleep_ratio": 2},
                                    "capture": {"mode": "async"}}))
    proc = start_apply(tmp_path, path, dsn)
    try:
        wait_until(lambda: proc.poll() is not None or (conn.execute(
            "SELECT to_regclass('orchestrate.migrations') IS NOT NULL").fetchone()[0] and conn.execute(
            "SELECT coalesce((SELECT phase FROM orchestrate.migrations) = 'backfill', false)").fetchone()[0]),
            timeout=90,
            message="apply never reached the backfill")
        assert proc.poll() is None, apply_log(proc)
        conn.execute("UPDATE orders SET amount = amount + 1 WHERE id = ANY(%s)", (_ids(conn)[:30],))
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        stop(proc)
    assert conn.execute(f"SELECT to_regclass('{LOG}')").fetchone()[0] is not None  # left behind by the crash
    wait_until(lambda: conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE "
                                    "'orchestrate:%%' AND datname = current_database()").fetchone()[0] == 0,
               timeout=60, message="the killed apply's sessions stay")
    code, out, err = run_cli("rollback", str(path), "--dsn", dsn)
    assert code == 0, err
    assert conn.execute(f"SELECT to_regclass('{LOG}'), to_regclass('{TWIN}')").fetchone() == (None, None)
    assert conn.execute("SELECT array_agg(proname) FROM pg_proc WHERE pronamespace = 'orchestrate'::regnamespace"
                        ).fetchone()[0] is None
    assert conn.execute("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'public.orders'::regclass "
                        "AND NOT tgisinternal").fetchone()[0] == 0


def test_a_replay_that_falls_behind_holds_the_backfill(dsn: str, conn: psycopg.Connection, tmp_path) -> None:
    """Replay lag is a throttle signal: with the replay stuck behind a lock on a twin row, the
    oldest logged change ages past throttle.max_replay_lag_s and the backfill waits, saying why;
    once the replay catches up the backfill goes on."""
    import yaml

    from helpers import apply_log, live, start_apply, stop

    create_orders(conn, TABLE, rows=3000, days=20, end=END, seed=6)
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump({"table": TABLE, "partition_by": {"column": "created_at", "interval": "1 month"},
                                    "backfill": {"batch_size": 50, "fixed_batch_size": True, "sleep_ratio": 2},
                                    "throttle": {"max_replay_lag_s": 1, "backoff_max_s": 1},
                                    "capture": {"mode": "async"}}))
    proc = start_apply(tmp_path, path, dsn, "--until", "backfill")
    holder = psycopg.connect(dsn)
    try:
        def a_range_copied() -> bool:
            if not conn.execute("SELECT to_regclass('orchestrate.ranges') IS NOT NULL").fetchone()[0]:
                return False
            return conn.execute("SELECT EXISTS (SELECT 1 FROM orchestrate.ranges WHERE state = 'copied' "
                                "AND rows_copied > 0)").fetchone()[0]

        wait_until(lambda: proc.poll() is not None or a_range_copied(), timeout=90, interval=0.1,
                   message="no range was copied")
        assert proc.poll() is None, apply_log(proc)
        # The backfill cannot end while the newest row is held (its batch yields to the lock),
        # however fast the machine: the throttle decision is seen before the phase could end.
        newest = conn.execute("SELECT id FROM orders ORDER BY created_at DESC, id DESC LIMIT 1").fetchone()[0]
        holder.execute("SELECT 1 FROM orders WHERE id = %s FOR UPDATE", (newest,))
        rid = conn.execute(f"SELECT id FROM {TWIN} WHERE id <> %s ORDER BY id LIMIT 1", (newest,)).fetchone()[0]
        holder.execute(f"SELECT 1 FROM {TWIN} WHERE id = %s FOR UPDATE", (rid,))  # the replay will wait here
        conn.execute("UPDATE orders SET note = 'behind' WHERE id = %s", (rid,))
        wait_until(lambda: "replay" in (live(conn).get("throttle_reason") or "") or proc.poll() is not None,
                   timeout=60, message="the backfill was not held by the replay's lag")
        assert proc.poll() is None, apply_log(proc)
        reason = live(conn)["throttle_reason"]
        assert "behind" in reason and "change log" in reason and "> 1s" in reason, reason
        held = conn.execute("SELECT sum(rows_copied) FROM orchestrate.ranges").fetchone()[0]
        holder.rollback()  # the replay catches up, the throttle lets the backfill go on to its end
        assert proc.wait(180) == 0, apply_log(proc)
    finally:
        holder.close()
        stop(proc)
    assert conn.execute("SELECT sum(rows_copied) FROM orchestrate.ranges").fetchone()[0] > held
    assert conn.execute("SELECT count(*) FROM orchestrate.events WHERE kind = 'throttle' "
                        "AND message LIKE '%%replay%%behind%%'").fetchone()[0] >= 1
    drain(conn)
    assert _diff(conn) == 0
