"""maintain: partitions keep coming, old ones leave, rows in the default move out. Real PostgreSQL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import psycopg
import pytest
import yaml

from helpers import REPO_ROOT, run_cli, wait_until
from orchestrator.errors import PreflightError
from orchestrator.lab.sample import create_orders
from orchestrator.lab.workload import Workload
from orchestrator.maintain import maintain_pass, maintenance_preview, partman_handover
from orchestrator.plan import Interval, parse_plan

MONTHS_2026 = [datetime(2026, m, 1) for m in range(1, 13)]


def plan_data(**over) -> dict:
    data = {
        "table": "public.orders",
        "partition_by": {"column": "created_at", "interval": "1 month", "premake": 2},
        "retention": {"keep": 3, "action": "detach"},
        "cutover": {"lock_timeout": "200ms", "attempts": 100, "backoff_max": "200ms"},
        "maintenance": {"interval": "1 hour"},
    }
    for k, v in over.items():
        data[k] = {**data.get(k, {}), **v} if isinstance(v, dict) else v
    return data


def make_plan(**over):
    return parse_plan(plan_data(**over))


def build_orders(conn: psycopg.Connection, months: list[datetime], default: bool = True) -> None:
    """A partitioned `orders` like the one cutover leaves: monthly partitions + default."""
    conn.execute(
        """CREATE TABLE orders (
               id bigserial, created_at timestamptz NOT NULL, amount numeric(12,2) NOT NULL DEFAULT 1,
               note text, payload jsonb, PRIMARY KEY (id, created_at)) PARTITION BY RANGE (created_at)"""
    )
    conn.execute("CREATE INDEX orders_created_at_idx ON orders (created_at)")
    for m in months:
        nxt = datetime(m.year + m.month // 12, m.month % 12 + 1, 1)
        conn.execute(
            f"CREATE TABLE orders_p{m:%Y_%m} PARTITION OF orders FOR VALUES FROM ('{m:%Y-%m-%d}') TO ('{nxt:%Y-%m-%d}')"
        )
    if default:
        conn.execute("CREATE TABLE orders_default PARTITION OF orders DEFAULT")


def add_rows(conn: psycopg.Connection, start: str, end: str, n: int) -> None:
    conn.execute(
        "INSERT INTO orders (created_at, amount, note, payload) "
        "SELECT %s::timestamptz + (%s::timestamptz - %s::timestamptz) * (g::float8 / %s), g %% 500, "
        "'n' || g, jsonb_build_object('g', g) FROM generate_series(0, %s - 1) g",
        (start, end, start, n, n),
    )


def partitions(conn: psycopg.Connection, schema: str = "public", parent: str = "orders") -> dict[str, str]:
    rows = conn.execute(
        "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i "
        "JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = to_regclass(%s)",
        (f"{schema}.{parent}",),
    ).fetchall()
    return dict(rows)


def relkind(conn: psycopg.Connection, qualified: str) -> str | None:
    row = conn.execute(
        "SELECT c.relkind::text, c.relispartition FROM pg_class c WHERE c.oid = to_regclass(%s)", (qualified,)
    ).fetchone()
    if row is None:
        return None
    return f"{row[0]}{'(partition)' if row[1] else ''}"


def count(conn: psycopg.Connection, rel: str, where: str = "true") -> int:
    return conn.execute(f"SELECT count(*) FROM {rel} WHERE {where}").fetchone()[0]


# ------------------------------------------------------------------ create + retention


@pytest.mark.parametrize("action", ["drop", "detach", "archive"])
def test_clock_forward_creates_missing_and_retires_expired(conn, dsn, action):
    build_orders(conn, MONTHS_2026[:6])  # Jan..Jun 2026 + default
    add_rows(conn, "2026-01-01", "2026-07-01", 600)
    add_rows(conn, "2026-08-01", "2026-08-31", 40)  # land in the default: August has no partition
    conn.execute("INSERT INTO orders (created_at) VALUES ('1999-05-05')")  # old: stays in the default
    total = count(conn, "orders")
    plan = make_plan(retention={"keep": 3, "action": action, "archive_schema": "old_orders"})

    t0 = time.monotonic()
    r = maintain_pass(plan, dsn, now=datetime(2026, 7, 15, 9, 30))
    wall_ms = (time.monotonic() - t0) * 1000

    # (a) current interval (July) + premake 2: July, August, September.
    assert r["created"] == ["orders_p2026_07", "orders_p2026_08", "orders_p2026_09"]
    assert r["moved"] == {"orders_p2026_08": 40}
    parts = partitions(conn)
    assert parts["orders_p2026_08"] == (
        "FOR VALUES FROM ('2026-08-01 00:00:00+00') TO ('2026-09-01 00:00:00+00')"
    )
    assert count(conn, "orders_p2026_08") == 40
    assert count(conn, "orders_default") == 1 and r["default_rows"] == 1
    assert r["default_ranges"][0]["range"] == "p1999_05"
    # (b) cutoff = July - 3 months = April 1st: Jan, Feb, Mar leave; April stays.
    expired = ["orders_p2026_01", "orders_p2026_02", "orders_p2026_03"]
    assert r["detached"] == expired
    assert set(r["detach_method"].values()) == {"plain"}  # a default partition exists
    for name in expired:
        assert name not in parts
    assert {"orders_p2026_04", "orders_p2026_05", "orders_p2026_06", "orders_default"} <= set(parts)
    if action == "drop":
        assert r["dropped"] == expired and r["archived"] == []
        assert all(relkind(conn, f"public.{n}") is None for n in expired)
    elif action == "detach":
        assert r["dropped"] == [] and r["archived"] == []
        assert all(relkind(conn, f"public.{n}") == "r" for n in expired)
        gone = sum(count(conn, f"public.{n}") for n in expired)
        assert count(conn, "orders") + gone == total
    else:
        assert r["archived"] == [f"old_orders.{n}" for n in expired]
        assert all(relkind(conn, f"public.{n}") is None for n in expired)
        assert all(relkind(conn, f"old_orders.{n}") == "r" for n in expired)
        gone = sum(count(conn, f"old_orders.{n}") for n in expired)
        assert count(conn, "orders") + gone == total
    # Every DDL that locked live tables reports how long.
    assert set(r["lock_held_ms"]) >= {f"attach {n}" for n in r["created"]} | {f"detach {n}" for n in expired}
    # Each is a measured hold, and all of them fit in the pass that made them.
    assert all(isinstance(v, float) and v >= 0 for v in r["lock_held_ms"].values()), r["lock_held_ms"]
    assert sum(r["lock_held_ms"].values()) < wall_ms, (r["lock_held_ms"], wall_ms)


def test_second_pass_changes_nothing(conn, dsn):
    build_orders(conn, MONTHS_2026[:3])
    add_rows(conn, "2026-01-01", "2026-06-01", 300)  # March..May rows in the default
    plan = make_plan(retention={"keep": 2, "action": "drop"})
    now = datetime(2026, 5, 10)
    first = maintain_pass(plan, dsn, now=now)
    assert first["created"] == ["orders_p2026_04", "orders_p2026_05", "orders_p2026_06", "orders_p2026_07"]
    assert first["moved"]["orders_p2026_04"] > 0 and first["moved"]["orders_p2026_05"] > 0
    assert first["dropped"] == ["orders_p2026_01", "orders_p2026_02"]
    snapshot = partitions(conn), count(conn, "orders"), count(conn, "orders_default")

    second = maintain_pass(plan, dsn, now=now)

    assert second["created"] == [] and second["moved"] == {} and second["detached"] == []
    assert second["dropped"] == [] and second["lock_held_ms"] == {}
    assert (partitions(conn), count(conn, "orders"), count(conn, "orders_default")) == snapshot


def test_retention_never_touches_the_window_nor_the_default(conn, dsn):
    build_orders(conn, MONTHS_2026[:2])  # Jan, Feb
    # A hand-made partition straddling the cutoff (March 15 .. April 15).
    conn.execute("CREATE TABLE orders_odd PARTITION OF orders FOR VALUES FROM ('2026-03-15') TO ('2026-04-15')")
    conn.execute("CREATE TABLE orders_p2026_04_15 PARTITION OF orders FOR VALUES FROM ('2026-04-15') TO ('2026-05-01')")
    add_rows(conn, "2026-01-01", "2026-05-01", 200)  # March 1..15 lands in the default
    plan = make_plan(partition_by={"premake": 0}, retention={"keep": 1, "action": "drop"})

    # Now is the very first instant of May: cutoff = April 1st.
    r = maintain_pass(plan, dsn, now=datetime(2026, 5, 1, 0, 0, 0))

    assert r["dropped"] == ["orders_p2026_01", "orders_p2026_02"]  # end on or before April 1st
    parts = partitions(conn)
    assert "orders_odd" in parts and "orders_p2026_04_15" in parts  # overlaps the window: kept
    assert "orders_default" in parts and count(conn, "orders_default") > 0  # default never touched
    assert r["created"] == ["orders_p2026_05"]
    # A longer window keeps everything that is left.
    r2 = maintain_pass(make_plan(partition_by={"premake": 0}, retention={"keep": 6, "action": "drop"}), dsn,
                       now=datetime(2026, 5, 1))
    assert r2["dropped"] == [] and r2["created"] == []


def test_detach_concurrently_without_default_plain_with_default(conn, dsn):
    # PostgreSQL itself refuses CONCURRENTLY when a default partition exists:
    build_orders(conn, MONTHS_2026[:4])
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="default partition exists"):
        conn.execute("ALTER TABLE orders DETACH PARTITION orders_p2026_01 CONCURRENTLY")
    conn.execute("DROP TABLE orders_default")
    plan = make_plan(partition_by={"premake": 0}, retention={"keep": 2, "action": "drop"})
    r = maintain_pass(plan, dsn, now=datetime(2026, 4, 20))
    assert r["detach_method"] == {"orders_p2026_01": "concurrently"}
    assert r["dropped"] == ["orders_p2026_01"] and relkind(conn, "public.orders_p2026_01") is None
    conn.execute("CREATE TABLE orders_default PARTITION OF orders DEFAULT")
    r = maintain_pass(plan, dsn, now=datetime(2026, 5, 20))
    assert r["detach_method"] == {"orders_p2026_02": "plain"}
    assert r["created"] == ["orders_p2026_05"]


def test_dry_run_and_preview_change_nothing(conn, dsn, tmp_path):
    build_orders(conn, MONTHS_2026[:3])
    add_rows(conn, "2026-04-01", "2026-04-30", 25)
    plan = make_plan(retention={"keep": 1, "action": "drop"})
    before = partitions(conn)
    pv = maintenance_preview(plan, conn, datetime(2026, 4, 2))
    assert [c["partition"] for c in pv["create"]] == [
        "public.orders_p2026_04", "public.orders_p2026_05", "public.orders_p2026_06"]
    assert pv["create"][0]["default_rows_to_move"] == 25
    assert [x["partition"] for x in pv["remove"]] == ["public.orders_p2026_01", "public.orders_p2026_02"]
    assert {x["action"] for x in pv["remove"]} == {"drop"}

    plan_file = _plan_file(tmp_path, retention={"keep": 1, "action": "drop"})
    code, out, err = run_cli("maintain", str(plan_file), "--dsn", dsn, "--now", "2026-04-02T00:00:00Z",
                             "--dry-run", "--output", "json")
    assert code == 0, err
    data = json.loads(out)
    assert data["dry_run"] is True and data["created"] == []
    assert [c["partition"] for c in data["preview"]["create"]] == [c["partition"] for c in pv["create"]]
    assert partitions(conn) == before and count(conn, "orders_default") == 25


def test_leftover_staging_table_is_rebuilt_and_foreign_name_refused(conn, dsn):
    build_orders(conn, MONTHS_2026[:1])
    add_rows(conn, "2026-02-01", "2026-02-20", 10)
    # What a pass that crashed between staging and attach leaves behind.
    conn.execute("CREATE TABLE orders_p2026_02 (LIKE orders)")
    conn.execute("INSERT INTO orders_p2026_02 SELECT * FROM orders_default LIMIT 3")
    conn.execute("COMMENT ON TABLE orders_p2026_02 IS "
                 "'orchestrate maintain: staging partition, not attached yet; safe to drop'")
    conn.execute("CREATE TABLE orders_p2026_03 (x int)")  # someone else's table
    plan = make_plan(partition_by={"premake": 1}, retention={"keep": None})
    with pytest.raises(PreflightError, match="orders_p2026_03.*already exists"):
        maintain_pass(plan, dsn, now=datetime(2026, 2, 5))
    # February was rebuilt and attached with its 10 rows before March was refused.
    assert relkind(conn, "public.orders_p2026_02") == "r(partition)"
    assert count(conn, "orders_p2026_02") == 10 and count(conn, "orders_default") == 0


# ------------------------------------------------------------------ moving out of the default under load


def test_rows_in_default_move_out_under_write_workload(conn, dsn):
    """The workload writes (inserts, updates, key moves, deletes) into the default's range
    while the pass copies, reconciles and attaches: no row lost, duplicated or altered."""
    build_orders(conn, MONTHS_2026[:3])  # Jan..Mar; April..June rows live in the default
    add_rows(conn, "2026-01-01", "2026-06-30", 30_000)
    in_default = count(conn, "orders_default")
    assert in_default > 10_000
    plan = make_plan(partition_by={"premake": 2}, retention={"keep": None}, backfill={"batch_size": 2000})
    wl = Workload(dsn, "public.orders", "created_at", clients=4, seed=3)
    wl.setup()
    wl.start()
    try:
        time.sleep(1.0)
        r = maintain_pass(plan, dsn, now=datetime(2026, 4, 3))
        time.sleep(1.0)
    finally:
        report = wl.stop()
    assert report.errors == 0, report.error_samples
    assert report.ops["insert"] > 50 and report.ops["move_key"] > 10 and report.ops["delete"] > 10
    cmp = wl.compare()
    assert cmp.ok, str(cmp)

    assert r["created"] == ["orders_p2026_04", "orders_p2026_05", "orders_p2026_06"]
    assert sum(r["moved"].values()) > 10_000
    assert sum(r["precopied"].values()) > 10_000  # copied in batches before the lock
    for name in r["created"]:
        assert r["lock_held_ms"][f"attach {name}"] < 5_000
    # Nothing of April..June is left in the default; the new partitions took it.
    assert count(conn, "orders_default", "created_at >= '2026-04-01' AND created_at < '2026-07-01'") == 0
    assert count(conn, "orders_p2026_05") > 3_000


def test_insert_waiting_during_the_swap_lands_in_the_new_partition(conn, dsn, monkeypatch):
    """An INSERT of the new range that arrives while the swap holds its locks must wait and
    then go to the new partition. With only SHARE UPDATE EXCLUSIVE on the parent it would
    route to the default with the old partition descriptor and fail its new constraint."""
    import threading

    import orchestrator.maintain as maintain

    build_orders(conn, MONTHS_2026[:1])
    add_rows(conn, "2026-02-01", "2026-02-20", 20)
    outcome: dict = {}

    def insert() -> None:
        try:
            with psycopg.connect(dsn, autocommit=True) as c:
                outcome["row"] = c.execute(
                    "INSERT INTO orders (created_at) VALUES ('2026-02-25') RETURNING tableoid::regclass::text"
                ).fetchone()[0]
        except psycopg.Error as e:
            outcome["error"] = str(e)

    threads = []

    def hook(cur) -> None:
        t = threading.Thread(target=insert)
        t.start()
        threads.append(t)
        wait_until(lambda: conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE 'INSERT INTO orders%'"
        ).fetchone()[0] == 1, timeout=10, message="the INSERT did not wait for the swap")

    monkeypatch.setattr(maintain, "on_attach_locked", hook)
    r = maintain_pass(make_plan(partition_by={"premake": 0}, retention={"keep": None}), dsn,
                      now=datetime(2026, 2, 26))
    threads[0].join(timeout=30)
    assert outcome == {"row": "orders_p2026_02"}
    assert r["moved"] == {"orders_p2026_02": 20} and count(conn, "orders_p2026_02") == 21


def test_apply_then_maintain(conn, dsn, tmp_path):
    """The real flow: migrate a sample table, then maintain it with the clock moved forward."""
    end = datetime(2026, 3, 20, 12)
    create_orders(conn, "public.orders", rows=3_000, days=70, end=end)
    plan_file = tmp_path / "orders.yaml"
    plan_file.write_text(yaml.safe_dump({
        "table": "public.orders",
        "partition_by": {"column": "created_at", "interval": "1 month", "premake": 1},
        "retention": {"keep": 2, "action": "drop"},
    }))
    code, out, err = run_cli("apply", str(plan_file), "--dsn", dsn)
    assert code == 0, err
    made = set(partitions(conn)) - {"orders_default"}
    assert made  # apply made partitions up to the real now + premake
    # Five months later: the cutoff (keep 2) is 3 months ahead of the real month.
    iv = Interval.parse("1 month")
    month = iv.floor(datetime.utcnow())
    later = iv.add(month, 5) + timedelta(days=9)
    code, out, err = run_cli("maintain", str(plan_file), "--dsn", dsn, "--now", later.isoformat() + "+00:00",
                             "--output", "json")
    assert code == 0, err
    r = json.loads(out)
    assert r["created"] == [f"orders_p{iv.add(month, k):%Y_%m}" for k in (3, 4, 5, 6)]
    assert sorted(r["dropped"]) == sorted(made)  # every one of them ends before the cutoff
    assert set(partitions(conn)) == {"orders_default", *r["created"]}


# ------------------------------------------------------------------ daemon


def _plan_file(tmp_path: Path, **over) -> Path:
    p = tmp_path / "plan.yaml"
    p.write_text(yaml.safe_dump(plan_data(**over)))
    return p


def _start_daemon(tmp_path: Path, dsn: str, *plans: Path) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / "daemon.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "NO_COLOR": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "maintain", *map(str, plans), "--dsn", dsn, "--daemon"],
        stdout=subprocess.DEVNULL, stderr=log.open("w"), stdin=subprocess.DEVNULL, cwd=REPO_ROOT, env=env,
    )
    return proc, log


def test_daemon_runs_passes_and_stops_on_sigterm(conn, dsn, tmp_path):
    now = datetime.utcnow()
    this_month = datetime(now.year, now.month, 1)
    build_orders(conn, [Interval.parse("1 month").add(this_month, -1)], default=True)
    conn.execute("CREATE TABLE other (id int, at date NOT NULL) PARTITION BY RANGE (at)")
    p1 = _plan_file(tmp_path, partition_by={"premake": 1}, retention={"keep": None}, maintenance={"interval": "1 s"})
    p2 = tmp_path / "other.yaml"
    p2.write_text(yaml.safe_dump(plan_data(table="public.other", partition_by={"column": "at", "interval": "1 day",
                                                                                 "premake": 2},
                                           retention={"keep": None}, maintenance={"interval": "1 s"})))
    proc, log = _start_daemon(tmp_path, dsn, p1, p2)
    try:
        wait_until(lambda: log.read_text().count("pass 2 for public.orders done") == 1
                   and "pass 2 for public.other done" in log.read_text(), timeout=60,
                   message="the daemon did not run two passes")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert "maintain daemon: stopped" in text
    parts = partitions(conn)
    assert f"orders_p{this_month:%Y_%m}" in parts and len(parts) == 4  # last month + this + next + default
    assert len(partitions(conn, parent="other")) == 3  # today + 2 premade days


def test_daemon_survives_a_database_restart(cluster, conn, dsn, tmp_path):
    now = datetime.utcnow()
    build_orders(conn, [datetime(now.year, now.month, 1)])
    plan = _plan_file(tmp_path, partition_by={"premake": 1}, retention={"keep": None}, maintenance={"interval": "1 s"})
    proc, log = _start_daemon(tmp_path, dsn, plan)
    try:
        wait_until(lambda: "pass 1 for public.orders done" in log.read_text(), timeout=60)
        cluster.stop_primary()
        try:
            wait_until(lambda: "failed, retrying at the next interval" in log.read_text(), timeout=30)
        finally:
            cluster.start_primary()
        failed = log.read_text().count("failed, retrying")
        n_done = log.read_text().count(" done: ")
        wait_until(lambda: log.read_text().count(" done: ") > n_done, timeout=60,
                   message="no successful pass after the restart")
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert failed >= 1


# ------------------------------------------------------------------ pg_partman


@pytest.mark.partman
def test_partman_handover_registers(conn, dsn):
    """Needs pg_partman on the server (CI installs it for PostgreSQL 15; the PostgreSQL 18
    pass deselects the partman marker): a missing extension fails here, never skips.
    Without the extension in the database: test_partman_missing_is_a_clear_error."""
    month = Interval.parse("1 month").floor(datetime.utcnow())
    build_orders(conn, [*MONTHS_2026[:2], month] if month > MONTHS_2026[1] else MONTHS_2026[:2])
    add_rows(conn, "2026-01-01", "2026-02-28", 50)
    conn.execute("INSERT INTO orders (created_at) VALUES ('1999-05-05'), (now() + interval '30 days')")
    total = count(conn, "orders")
    plan = make_plan(retention={"keep": 6, "action": "drop"})
    conn.execute("CREATE SCHEMA partman")
    conn.execute("CREATE EXTENSION pg_partman SCHEMA partman")
    out = partman_handover(plan, conn)
    cfg = conn.execute(
        "SELECT control, partition_interval, premake, retention, retention_keep_table FROM partman.part_config "
        "WHERE parent_table = 'public.orders'").fetchone()
    assert cfg[0] == "created_at" and cfg[2] == 2
    assert cfg[3] == "6 months" and cfg[4] is False
    assert out["already_registered"] is False
    assert partman_handover(plan, conn)["already_registered"] is True  # idempotent
    # Our partitions and rows survived (partman skips the names it would have made itself).
    parts = set(partitions(conn))
    assert {"orders_p2026_01", "orders_p2026_02", "orders_default"} <= parts
    assert f"orders_p{Interval.parse('1 month').add(month, 1):%Y_%m}" in parts
    assert count(conn, "orders") == total
    assert count(conn, "orders_p2026_01") + count(conn, "orders_p2026_02") == 50


def test_partman_missing_is_a_clear_error(conn):
    build_orders(conn, MONTHS_2026[:1])
    with pytest.raises(PreflightError, match="pg_partman is not installed in this database"):
        partman_handover(make_plan(), conn)
