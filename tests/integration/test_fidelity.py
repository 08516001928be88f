"""The twin is the table: shapes real schemas have, each migrated and checked exactly.

DEFERRABLE unique constraints, NOT VALID CHECKs and foreign keys, timestamp(3) keys,
'infinity' keys, 63-byte table names, primary keys of extension types (citext, ltree).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import psycopg
import pytest
import yaml

from helpers import drain, run_cli

NOW = datetime.now(timezone.utc)


def write_plan(tmp_path: Path, table: str, key: str = "created_at", **extra) -> Path:
    d = {"table": table, "partition_by": {"column": key, "interval": "1 month", "premake": 1},
         # Small pinned batches: every shape below goes through the multi-window path (a
         # window's cursor over its key and primary key), not one window per range.
         "backfill": {"range": "1 month", "batch_size": 16, "fixed_batch_size": True},
         "cutover": {"lock_timeout": "200ms", "attempts": 50, "backoff_max": "300ms"}}
    for k, v in extra.items():
        if isinstance(v, dict):
            d.setdefault(k, {}).update(v)
        else:
            d[k] = v
    p = tmp_path / "plan.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def apply(plan: Path, dsn: str, *args: str) -> str:
    code, out, err = run_cli("apply", plan, "--dsn", dsn, *args)
    assert code == 0, err
    with psycopg.connect(dsn, autocommit=True) as c:
        if c.execute("SELECT to_regclass('orchestrate.ranges') IS NOT NULL").fetchone()[0]:
            rows, most = c.execute("SELECT coalesce(sum(rows_copied), 0), coalesce(max(batches), 0) "
                                   "FROM orchestrate.ranges").fetchone()
            assert rows < 48 or most >= 3, f"{rows} rows copied, at most {most} windows in a range"
    return out


def same_rows(conn: psycopg.Connection, a: str, b: str) -> None:
    n = conn.execute(f"SELECT count(*) FROM ((TABLE {a} EXCEPT ALL TABLE {b}) UNION ALL "
                     f"(TABLE {b} EXCEPT ALL TABLE {a})) d").fetchone()[0]
    assert n == 0, f"{a} and {b} differ in {n} rows"


def test_deferred_slot_swap_stays_legal(conn, dsn, tmp_path):
    """UNIQUE (slot) DEFERRABLE INITIALLY DEFERRED: swapping two slots in two statements is
    legal on the table. Without the mechanism the twin's copy is an immediate unique index
    and the swap fails at its first statement (in the capture trigger)."""
    conn.execute("""CREATE TABLE public.seats (id int PRIMARY KEY, created_at timestamptz NOT NULL, slot int NOT NULL,
                                               CONSTRAINT seats_slot UNIQUE (slot) DEFERRABLE INITIALLY DEFERRED)""")
    conn.execute("INSERT INTO public.seats SELECT g, %s::timestamptz - g * interval '1 hour', g "
                 "FROM generate_series(1, 100) g", (NOW,))
    plan = write_plan(tmp_path, "public.seats")
    apply(plan, dsn, "--until", "backfill")
    # A same-created_at pair, so the twin's (slot, created_at) constraint sees the clash.
    conn.execute("UPDATE public.seats SET created_at = (SELECT created_at FROM public.seats WHERE id = 1) "
                 "WHERE id = 2")

    def swap(table: str) -> None:
        with conn.transaction():
            conn.execute(f"UPDATE {table} SET slot = (SELECT slot FROM {table} WHERE id = 2) WHERE id = 1")
            conn.execute(f"UPDATE {table} SET slot = 1 WHERE id = 2 AND slot = 2")

    swap("public.seats")
    assert conn.execute("SELECT slot FROM public.seats_partitioned WHERE id IN (1, 2) ORDER BY id").fetchall() == \
        [(2,), (1,)]
    apply(plan, dsn)
    row = conn.execute("SELECT condeferrable, condeferred FROM pg_constraint WHERE conrelid = 'public.seats'::regclass "
                       "AND contype = 'u'").fetchone()
    assert row == (True, True)
    with conn.transaction():  # and back, on the new table (the reverse trigger mirrors it)
        conn.execute("UPDATE public.seats SET slot = 1 WHERE id = 1")
        conn.execute("UPDATE public.seats SET slot = 2 WHERE id = 2")
    same_rows(conn, "public.seats", "public.seats_retired")


def test_deferrable_primary_key_is_refused_by_plan_and_apply(conn, dsn, tmp_path):
    conn.execute("CREATE TABLE public.dpk (id int PRIMARY KEY DEFERRABLE, created_at timestamptz NOT NULL)")
    plan = write_plan(tmp_path, "public.dpk")
    for verb in ("plan", "apply"):
        code, _, err = run_cli(verb, plan, "--dsn", dsn)
        assert code == 3, err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "DEFERRABLE" in errors[0] and "Traceback" not in err
    assert conn.execute("SELECT to_regclass('public.dpk_partitioned')").fetchone()[0] is None


def test_not_valid_constraints(conn, dsn, tmp_path, pg_version):
    """Legacy rows violate a NOT VALID CHECK and a NOT VALID foreign key. Without the
    mechanism the twin's CHECK is validated (the backfill fails on the legacy rows) and, on
    PostgreSQL < 18, prepare fails adding the NOT VALID foreign key, while plan exits 0."""
    conn.execute("""
        CREATE TABLE public.ref (id int PRIMARY KEY);
        INSERT INTO public.ref VALUES (1);
        CREATE TABLE public.legacy (id int PRIMARY KEY, created_at timestamptz NOT NULL, qty int, ref_id int);""")
    conn.execute("INSERT INTO public.legacy SELECT g, %s::timestamptz - g * interval '1 hour', g - 50, "
                 "CASE WHEN g %% 2 = 0 THEN 1 ELSE 99 END FROM generate_series(1, 200) g", (NOW,))
    conn.execute("""
        ALTER TABLE public.legacy ADD CONSTRAINT qty_pos CHECK (qty > 0) NOT VALID;
        ALTER TABLE public.legacy ADD CONSTRAINT legacy_ref FOREIGN KEY (ref_id) REFERENCES public.ref (id)
            NOT VALID;""")
    plan = write_plan(tmp_path, "public.legacy")
    code, out, err = run_cli("plan", plan, "--dsn", dsn, "-o", "json")
    assert code == 0, err
    warnings = json.loads(out)["warnings"]
    if pg_version < 18:
        assert any("legacy_ref is NOT VALID" in w for w in warnings), warnings
    apply(plan, dsn)
    checks = conn.execute("SELECT conname, convalidated FROM pg_constraint WHERE conrelid = 'public.legacy'::regclass "
                          "AND contype = 'c'").fetchall()
    assert checks == [("qty_pos", False)]
    with pytest.raises(psycopg.errors.CheckViolation):
        conn.execute("INSERT INTO public.legacy VALUES (1000, now(), -1, 1)")
    fks = conn.execute("SELECT conname, convalidated FROM pg_constraint WHERE conrelid = 'public.legacy'::regclass "
                       "AND contype = 'f'").fetchall()
    assert fks == ([] if pg_version < 18 else [("legacy_ref", False)])
    same_rows(conn, "public.legacy", "public.legacy_retired")


@pytest.mark.parametrize("start", [None, "2020-01-01"])
def test_infinite_and_typmod_keys(conn, dsn, tmp_path, start):
    """'infinity' / '-infinity' keys (timestamp(3) column): prepare, partition planning and
    backfill ranges work; those rows go to the default partition. Without the mechanism:
    exit 1 in prepare ('timestamp too small'); a timestamp(3) key was refused (exit 3)."""
    conn.execute("CREATE TABLE public.ev (id int PRIMARY KEY, at timestamp(3) NOT NULL, v text)")
    conn.execute("INSERT INTO public.ev SELECT g, (%s::timestamptz AT TIME ZONE 'UTC') - g * interval '7 hours', "
                 "'v' || g FROM generate_series(1, 300) g", (NOW,))
    conn.execute("INSERT INTO public.ev VALUES (1001, 'infinity', 'inf'), (1002, '-infinity', '-inf')")
    conn.execute("CREATE INDEX ON public.ev (at)")
    extra = {"partition_by": {"start": start}} if start else {}
    plan = write_plan(tmp_path, "public.ev", key="at", **extra)
    code, out, err = run_cli("plan", plan, "--dsn", dsn, "-o", "json")
    assert code == 0, err
    assert json.loads(out)["estimates"]["rows_to_default_partition"] >= 2
    apply(plan, dsn)
    inf = conn.execute("SELECT id FROM public.ev_default ORDER BY id").fetchall()
    assert (1001,) in inf and (1002,) in inf
    same_rows(conn, "public.ev", "public.ev_retired")
    assert conn.execute("SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = "
                        "'public.ev'::regclass AND attname = 'at'").fetchone()[0] == "timestamp(3) without time zone"


def test_63_byte_table_name(conn, dsn, tmp_path):
    """A 63-byte table name: twin, retired, default, partition and index names all fit in 63
    bytes and stay distinct. Without the mechanism the plan is refused (derived names too
    long) and partition names would truncate to the same identifier."""
    name = "t" * 55 + "_events1"
    assert len(name) == 63
    conn.execute(f"CREATE TABLE public.{name} (id int PRIMARY KEY, created_at timestamptz NOT NULL, "
                 f"a int, b int)")
    conn.execute(f"CREATE INDEX {'i' * 58}_aaaa ON public.{name} (a)")
    conn.execute(f"CREATE INDEX {'i' * 58}_bbbb ON public.{name} (b)")
    conn.execute(f"INSERT INTO public.{name} SELECT g, %s::timestamptz - g * interval '6 hours', g, g "
                 "FROM generate_series(1, 400) g", (NOW,))
    plan = write_plan(tmp_path, f"public.{name}")
    apply(plan, dsn)
    parts = conn.execute("SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                         f"WHERE i.inhparent = 'public.{name}'::regclass").fetchall()
    assert len(parts) >= 4 and len({p[0] for p in parts}) == len(parts)
    assert all(len(p[0].encode()) <= 63 for p in parts)
    idx = conn.execute("SELECT count(*) FROM pg_index WHERE indrelid = %s::regclass", (f"public.{name}",)).fetchone()
    assert idx[0] == 3
    conn.execute(f"INSERT INTO public.{name} VALUES (100000, now(), 1, 1)")
    retired = conn.execute("SELECT relname FROM pg_class WHERE relname LIKE 'ttt%retired'").fetchone()[0]
    same_rows(conn, f"public.{name}", f"public.{retired}")


def _ext_keys_backfilled_then_written(conn, dsn, plan, ext, typ, values) -> list:
    """public.ext keyed by an extension type, backfilled; then an UPDATE, a DELETE, a move to
    another partition and five new rows through the capture. Returns the three touched keys."""
    conn.execute(f"CREATE EXTENSION IF NOT EXISTS {ext}")
    conn.execute(f"CREATE TABLE public.ext (id {typ} PRIMARY KEY, created_at timestamptz NOT NULL, v int)")
    conn.execute(f"INSERT INTO public.ext SELECT {values[0]}, %s::timestamptz - g * interval '5 hours', g "
                 "FROM generate_series(1, 300) g", (NOW,))
    apply(plan, dsn, "--until", "backfill")
    first = conn.execute("SELECT id::text FROM public.ext ORDER BY created_at DESC LIMIT 3").fetchall()
    conn.execute("UPDATE public.ext SET v = -1 WHERE id = %s::" + typ, (first[0][0],))
    conn.execute("DELETE FROM public.ext WHERE id = %s::" + typ, (first[1][0],))
    conn.execute("UPDATE public.ext SET created_at = created_at - interval '40 days' WHERE id = %s::" + typ,
                 (first[2][0],))
    conn.execute(f"INSERT INTO public.ext SELECT {values[1]}, now(), g FROM generate_series(1, 5) g")
    return first


@pytest.mark.parametrize("ext,typ,values", [
    ("citext", "public.citext", ["'Alpha-' || g", "'BETA-' || g"]),
    ("ltree", "public.ltree", ["('top.a' || g)::public.ltree", "('top.b' || g)::public.ltree"]),
])
def test_extension_type_primary_keys(conn, dsn, tmp_path, ext, typ, values):
    """UPDATE and DELETE through the capture trigger (search_path pinned to pg_catalog) find
    the row with the type's own equality operator. Without the mechanism ltree fails
    (operator does not exist: public.ltree = public.ltree) and citext compares as text
    (no index: a scan of the partition for every write)."""
    plan = write_plan(tmp_path, "public.ext")
    first = _ext_keys_backfilled_then_written(conn, dsn, plan, ext, typ, values)
    same_rows(conn, "public.ext", "public.ext_partitioned")
    # The trigger's match uses the key's index (search_path as in the function).
    with conn.transaction():
        conn.execute("SET LOCAL search_path = pg_catalog")
        conn.execute("SET LOCAL enable_seqscan = off")
        src = conn.execute("SELECT prosrc FROM pg_proc WHERE proname LIKE 'capture\\_%' AND prosrc LIKE '%UPDATE%'"
                           ).fetchone()[0]
        assert "OPERATOR(public.=)" in src
        explain = "\n".join(r[0] for r in conn.execute(
            f"EXPLAIN SELECT 1 FROM public.ext_partitioned WHERE id OPERATOR(public.=) %s::{typ} "
            "AND created_at = now()", (first[0][0],)).fetchall())
        assert "Index" in explain, explain
    apply(plan, dsn)
    same_rows(conn, "public.ext", "public.ext_retired")


@pytest.mark.parametrize("ext,typ,values", [
    ("citext", "public.citext", ["'Alpha-' || g", "'BETA-' || g"]),
    ("ltree", "public.ltree", ["('top.a' || g)::public.ltree", "('top.b' || g)::public.ltree"]),
])
def test_extension_type_primary_keys_in_async_mode(conn, dsn, tmp_path, ext, typ, values):
    """The same keys through async capture: the log's trigger records them and the replay
    (search_path pinned to pg_catalog) matches them with the type's own operators; an UPDATE,
    a DELETE, a move to another partition and new rows, replayed, then the cutover."""
    plan = write_plan(tmp_path, "public.ext", capture={"mode": "async"})
    _ext_keys_backfilled_then_written(conn, dsn, plan, ext, typ, values)
    assert drain(conn) >= 8  # 1 + 1 + 2 (the move: its old and new key) + 5 logged changes
    same_rows(conn, "public.ext", "public.ext_partitioned")
    src = conn.execute("SELECT prosrc FROM pg_proc WHERE proname LIKE 'replay\\_%'").fetchone()[0]
    assert "OPERATOR(public.=)" in src
    apply(plan, dsn)
    same_rows(conn, "public.ext", "public.ext_retired")


def test_windows_over_an_extension_type_key_follow_its_own_order(conn, dsn, tmp_path):
    """Rows that share one key value are windowed by the primary key. For citext the window's
    cursor must compare with citext's operators (case-insensitive, the index's and ORDER BY's
    order): compared as text (what `>` means under search_path = pg_catalog) the windows and
    the order disagree: windows of any size (a batch may lock far more rows than asked) and
    rows copied twice. All 300 rows share created_at."""
    conn.execute("CREATE EXTENSION IF NOT EXISTS citext")
    # COLLATE "C": text compares bytes (upper case first), citext lower-cases first: two orders.
    conn.execute('CREATE TABLE public.tags (id public.citext COLLATE "C" PRIMARY KEY, '
                 "created_at timestamptz NOT NULL, v int)")
    # Case flips every row: 'a001', 'B002', 'c003', 'D004', ...
    conn.execute("INSERT INTO public.tags SELECT CASE WHEN g %% 2 = 0 THEN upper(chr(97 + g %% 26)) "
                 "ELSE chr(97 + g %% 26) END || lpad(g::text, 3, '0'), %s::timestamptz, g "
                 "FROM generate_series(1, 300) g", (NOW,))
    plan = write_plan(tmp_path, "public.tags")
    apply(plan, dsn, "--until", "verify")
    same_rows(conn, "public.tags", "public.tags_partitioned")
    windows = conn.execute("SELECT max(batches) FROM orchestrate.ranges").fetchone()[0]
    # 300 rows in one range, 16 a window: 19 windows, each exactly as ORDER BY counted it.
    # Ordered by the ::text output column instead, or compared as text, the windows disagree
    # with the order and come out uneven (11 here).
    assert windows == 19, windows
