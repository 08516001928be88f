"""maintain between cutover and finalize: moving rows out of the default partition is not a
delete. The reverse trigger (cloned onto the default partition) must not remove the moved
rows from the retired table, or a rollback after that pass would lose them.
"""

from __future__ import annotations

from datetime import datetime

import psycopg

from orchestrator import runner
from orchestrator.maintain import maintain_pass
from orchestrator.plan import parse_plan


def _diff(conn: psycopg.Connection, a: str, b: str) -> int:
    return conn.execute(
        f"SELECT count(*) FROM ((SELECT * FROM {a} EXCEPT ALL SELECT * FROM {b}) UNION ALL "
        f"(SELECT * FROM {b} EXCEPT ALL SELECT * FROM {a})) d").fetchone()[0]


def test_default_move_after_cutover_keeps_the_retired_table_and_rollback_exact(dsn: str,
                                                                               conn: psycopg.Connection) -> None:
    conn.execute("CREATE TABLE public.ev (id bigserial PRIMARY KEY, at timestamptz NOT NULL, v text)")
    conn.execute("INSERT INTO ev (at, v) SELECT timestamptz '2026-01-01' + g * interval '1 hour', 'x' "
                 "FROM generate_series(1, 500) g")
    plan = parse_plan({"table": "public.ev", "partition_by": {"column": "at", "interval": "1 month", "premake": 1}})
    runner.apply(plan, dsn, now=datetime(2026, 1, 5))
    # Rows beyond the last partition land in the default (through the reverse trigger, in
    # the retired table too).
    conn.execute("INSERT INTO ev (at, v) SELECT timestamptz '2026-05-01' + g * interval '1 hour', 'late' "
                 "FROM generate_series(1, 30) g")
    assert conn.execute("SELECT count(*) FROM ev_default").fetchone()[0] == 30
    assert _diff(conn, "ev", "ev_retired") == 0
    r = maintain_pass(plan, dsn, now=datetime(2026, 5, 3))
    assert r["moved"] == {"ev_p2026_05": 30}, r
    assert _diff(conn, "ev", "ev_retired") == 0, "the move deleted rows from the retired table"
    # The reverse trigger fires again, on the default and on the new partitions.
    modes = {r[0] for r in conn.execute(
        "SELECT t.tgenabled FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
        "WHERE t.tgname = 'orchestrate_reverse' AND c.relname IN ('ev', 'ev_default', 'ev_p2026_05')")}
    assert modes == {"A"}, modes
    conn.execute("UPDATE ev SET v = 'after' WHERE at >= '2026-05-01'")
    conn.execute("DELETE FROM ev WHERE id = (SELECT min(id) FROM ev WHERE at >= '2026-05-01')")
    conn.execute("INSERT INTO ev (at, v) VALUES ('2026-05-20', 'newest'), ('2027-01-01', 'far')")
    assert _diff(conn, "ev", "ev_retired") == 0
    expected = conn.execute("SELECT * FROM ev ORDER BY id").fetchall()
    runner.rollback(plan, dsn)
    assert conn.execute("SELECT relkind FROM pg_class WHERE oid = 'public.ev'::regclass").fetchone()[0] == "r"
    assert conn.execute("SELECT * FROM ev ORDER BY id").fetchall() == expected
