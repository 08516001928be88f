"""Every table shape people have, each migrated under a write workload and checked exactly.

Each case creates a table (about 3,000 rows over 40 days), starts the golden-record
workload, runs the whole migration (prepare .. cutover) while it writes, writes a
little more on the new table, then compares the live table with the golden copy.
Shape-specific checks follow (identity continuation, user triggers firing once, ...).
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import psycopg
import pytest

from orchestrator import runner
from orchestrator.lab.workload import Workload
from orchestrator.plan import parse_plan

START = (datetime.now(timezone.utc) - timedelta(days=45)).strftime("%Y-%m-01")
ROWS = "generate_series(1, 3000) AS g"
AT = "now() - g * interval '20 minutes'"  # 3000 rows over ~42 days

# name: (table as written in the plan, partition key, DDL + data)
CASES: dict[str, tuple[str, str, str]] = {
    "composite_pk": ("public.lines", "created_at", f"""
CREATE TABLE public.lines (tenant int NOT NULL, line bigint NOT NULL, created_at timestamptz NOT NULL,
                           qty int NOT NULL, note text, PRIMARY KEY (tenant, line));
INSERT INTO public.lines SELECT g % 5, g, {AT}, g % 17, 'n' || g FROM {ROWS};
CREATE INDEX ON public.lines (created_at);"""),
    "identity_always": ("public.ident", "created_at", f"""
CREATE TABLE public.ident (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, created_at timestamptz NOT NULL,
                           v text);
INSERT INTO public.ident (created_at, v) SELECT {AT}, 'v' || g FROM {ROWS};
CREATE INDEX ON public.ident (created_at);"""),
    "generated_dropped_check": ("public.gen", "created_at", f"""
CREATE TABLE public.gen (id bigserial PRIMARY KEY, gone1 text, created_at timestamptz NOT NULL,
                         qty int NOT NULL CHECK (qty BETWEEN 0 AND 1000), gone2 int,
                         price numeric(10, 2) NOT NULL CHECK (price >= 0),
                         total numeric GENERATED ALWAYS AS (qty * price) STORED,
                         CONSTRAINT sane CHECK (qty < 1000 OR price < 5));
INSERT INTO public.gen (gone1, created_at, qty, price, gone2) SELECT 'x', {AT}, g % 100, (g % 500) / 3.0, g FROM {ROWS};
ALTER TABLE public.gen DROP COLUMN gone1;
ALTER TABLE public.gen DROP COLUMN gone2;
ALTER TABLE public.gen ADD COLUMN late text DEFAULT 'late';
CREATE INDEX ON public.gen (created_at);"""),
    "types_timestamp_key": ("public.typed", "at", f"""
CREATE TYPE public.mood AS ENUM ('happy', 'sad', 'it''s complicated');
CREATE TABLE public.typed (id bigint PRIMARY KEY, at timestamp NOT NULL, doc jsonb, tags text[], nums int[],
                           amount numeric(20, 6), ratio double precision, blob bytea, mood public.mood NOT NULL,
                           body text, day date);
INSERT INTO public.typed SELECT g, (now() AT TIME ZONE 'UTC') - g * interval '20 minutes',
    jsonb_build_object('g', g, 'q', 'it''s "x" \\ é', 'a', jsonb_build_array(1, null, 'b')),
    ARRAY['a', 'b"c', 'd''e', 'é', NULL], ARRAY[g, -g], g * 1.000001, g / 7.0, decode(md5(g::text), 'hex'),
    (enum_range(NULL::public.mood))[1 + g % 3],
    (ARRAY['O''Brien', 'say "hi"', 'back\\slash \\N', '日本語', 'emoji 🚀', E'tab\\tnl\\n', ''])[1 + g % 7],
    current_date - g % 40
FROM {ROWS};
CREATE INDEX ON public.typed (at);"""),
    "date_key_nullable": ("public.daily", "day", f"""
CREATE TABLE public.daily (id int PRIMARY KEY, day date, total numeric NOT NULL, label varchar(20));
INSERT INTO public.daily SELECT g, CASE WHEN g % 100 = 0 THEN NULL ELSE current_date - g % 40 END, g * 2.5,
    'l' || g FROM {ROWS};
CREATE INDEX ON public.daily (day);"""),
    "mixed_case_schema": ('"Sales"."Order Items"', "Created At", f"""
CREATE SCHEMA "Sales";
CREATE TABLE "Sales"."Order Items" ("Item ID" bigint PRIMARY KEY, "Created At" timestamptz NOT NULL,
                                    "Qty" int NOT NULL, "select" text, "Note's" text);
INSERT INTO "Sales"."Order Items" SELECT g, {AT}, g % 9, 'kw' || g, 'it''s "' || g || '"' FROM {ROWS};
CREATE INDEX "Order Items By Time" ON "Sales"."Order Items" ("Created At");
CREATE UNIQUE INDEX "Order Items Select" ON "Sales"."Order Items" ("select");"""),
    "user_triggers": ("public.audited", "created_at", f"""
CREATE TABLE public.audit_log (seq bigserial PRIMARY KEY, op text NOT NULL, row_id bigint NOT NULL);
CREATE TABLE public.audited (id bigserial PRIMARY KEY, created_at timestamptz NOT NULL, v text,
                             touched int NOT NULL DEFAULT 0);
INSERT INTO public.audited (created_at, v) SELECT {AT}, 'v' || g FROM {ROWS};
CREATE INDEX ON public.audited (created_at);
CREATE FUNCTION public.audit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO public.audit_log (op, row_id) VALUES (TG_OP, CASE WHEN TG_OP = 'DELETE' THEN OLD.id ELSE NEW.id END);
  RETURN NULL;
END $$;
CREATE FUNCTION public.touch() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN NEW.touched := OLD.touched + 1; RETURN NEW; END $$;
CREATE TRIGGER audit AFTER INSERT OR UPDATE OR DELETE ON public.audited FOR EACH ROW EXECUTE FUNCTION public.audit();
CREATE TRIGGER touch BEFORE UPDATE ON public.audited FOR EACH ROW EXECUTE FUNCTION public.touch();"""),
}


def migrate_under_load(dsn: str, table: str, key: str, clients: int = 3,
                       capture_mode: str = "sync") -> tuple[Workload, object]:
    plan = parse_plan({
        "table": table,
        "capture": {"mode": capture_mode},
        "partition_by": {"column": key, "interval": "1 month", "premake": 1, "start": START},
        # ~70 rows a day in batches of 20: every day range is copied in several windows, so
        # the windowed path (cursor and upper bound on (key, pk...)) runs for every shape.
        "backfill": {"range": "1 day", "batch_size": 20, "fixed_batch_size": True, "sleep_ratio": 0.2},
        "cutover": {"lock_timeout": "300ms", "attempts": 50, "backoff_max": "500ms"},
    })
    wl = Workload(dsn, table, key, clients=clients, seed=7)
    wl.setup()
    wl.start()
    try:
        time.sleep(0.3)
        outcome = runner.apply(plan, dsn)
        assert outcome.data["status"] == "cut_over", outcome.message
        time.sleep(0.7)  # and on the new table
    finally:
        report = wl.stop()
    return wl, report


@pytest.mark.parametrize("case", list(CASES))
def test_shape_migrates_exactly_under_load(conn: psycopg.Connection, dsn: str, case: str, capture_mode: str) -> None:
    """Each shape in both capture modes (async: the change log's keys, replayed, for every key type)."""
    table, key, ddl = CASES[case]
    conn.execute(ddl)
    wl, report = migrate_under_load(dsn, table, key, capture_mode=capture_mode)
    assert report.errors == 0, report.error_samples
    assert report.ops["insert"] > 0 and report.ops["update"] > 0 and report.ops["delete"] > 0, report.ops
    cmp = wl.compare()
    assert cmp.ok, str(cmp)
    assert conn.execute("SELECT relkind FROM pg_class WHERE oid = %s::regclass", (table,)).fetchone()[0] == "p"
    multi = conn.execute("SELECT count(*) FILTER (WHERE batches >= 3), count(*), sum(batches) "
                         "FROM orchestrate.ranges").fetchone()
    # ~40 days hold rows (the other ranges are empty, one batch each): nearly all in 3+ windows
    assert multi[0] >= 30 and multi[2] > multi[1] + 60, f"too few multi-window ranges: {multi}"
    check = CHECKS.get(case)
    if check:
        check(conn)


def _identity_continues(conn: psycopg.Connection) -> None:
    top = conn.execute("SELECT max(id) FROM ident_retired").fetchone()[0]
    new = [conn.execute("INSERT INTO ident (created_at, v) VALUES (now(), 'after') RETURNING id").fetchone()[0]
           for _ in range(3)]
    assert min(new) > top, (new, top)
    assert conn.execute("SELECT count(*) = count(DISTINCT id) FROM ident").fetchone()[0]
    assert conn.execute("SELECT attidentity FROM pg_attribute WHERE attrelid = 'ident'::regclass "
                        "AND attname = 'id'").fetchone()[0] == "a"


def _generated_and_checks(conn: psycopg.Connection) -> None:
    assert conn.execute("SELECT count(*) FROM gen WHERE total IS DISTINCT FROM qty * price").fetchone()[0] == 0
    assert {r[0] for r in conn.execute("SELECT conname FROM pg_constraint WHERE conrelid = 'gen'::regclass "
                                       "AND contype = 'c'")} >= {"sane", "gen_qty_check", "gen_price_check"}
    with pytest.raises(psycopg.errors.CheckViolation):
        conn.execute("INSERT INTO gen (created_at, qty, price) VALUES (now(), 5000, 1)")


def _triggers_fire_once(conn: psycopg.Connection) -> None:
    states = dict(conn.execute("SELECT c.relname || '.' || t.tgname, t.tgenabled FROM pg_trigger t "
                               "JOIN pg_class c ON c.oid = t.tgrelid WHERE NOT t.tgisinternal AND t.tgparentid = 0 "
                               "AND t.tgname IN ('audit', 'touch')").fetchall())
    assert states == {"audited.audit": "O", "audited.touch": "O", "audited_retired.audit": "D",
                      "audited_retired.touch": "D"}, states
    seq0 = conn.execute("SELECT coalesce(max(seq), 0) FROM audit_log").fetchone()[0]
    rid = conn.execute("INSERT INTO audited (created_at, v) VALUES (now(), 'new') RETURNING id").fetchone()[0]
    conn.execute("UPDATE audited SET v = 'changed' WHERE id = %s", (rid,))
    # A key move inside its partition (the month's first hour: never another month, whatever the date).
    conn.execute("UPDATE audited SET created_at = date_trunc('month', created_at) + interval '1 hour' "
                 "WHERE id = %s", (rid,))
    assert conn.execute("SELECT touched FROM audited WHERE id = %s", (rid,)).fetchone()[0] == 2
    assert conn.execute("SELECT touched FROM audited_retired WHERE id = %s", (rid,)).fetchone()[0] == 2
    # A move into another partition: PostgreSQL fires the row's DELETE and INSERT triggers, not
    # UPDATE (README "Table shapes"); the BEFORE UPDATE trigger still runs once.
    conn.execute("UPDATE audited SET created_at = created_at - interval '1 month' WHERE id = %s", (rid,))
    assert conn.execute("SELECT touched FROM audited WHERE id = %s", (rid,)).fetchone()[0] == 3
    conn.execute("DELETE FROM audited WHERE id = %s", (rid,))
    ops = conn.execute("SELECT op, row_id FROM audit_log WHERE seq > %s ORDER BY seq", (seq0,)).fetchall()
    assert ops == [("INSERT", rid), ("UPDATE", rid), ("UPDATE", rid), ("DELETE", rid), ("INSERT", rid),
                   ("DELETE", rid)], ops


def _mixed_case(conn: psycopg.Connection) -> None:
    names = {r[0] for r in conn.execute("SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = "
                                        "c.relnamespace WHERE n.nspname = 'Sales' AND c.relkind IN ('r', 'p')")}
    assert {"Order Items", "Order Items_retired", "Order Items_default"} <= names, names


CHECKS = {"identity_always": _identity_continues, "generated_dropped_check": _generated_and_checks,
          "user_triggers": _triggers_fire_once, "mixed_case_schema": _mixed_case}


@pytest.mark.pg18
def test_vector_column_with_hnsw_index_on_pg18(dsn18: str) -> None:
    with psycopg.connect(dsn18, autocommit=True) as conn:
        assert conn.info.server_version >= 180000
        conn.execute("CREATE EXTENSION vector")
        conn.execute(f"""
CREATE TABLE public.docs (id bigserial PRIMARY KEY, created_at timestamptz NOT NULL, embedding vector(3),
                          body text);
INSERT INTO public.docs (created_at, embedding, body)
SELECT {AT}, ARRAY[g % 13, g % 7, g % 5]::real[]::vector, 'doc ' || g FROM {ROWS};
CREATE INDEX docs_embedding_hnsw ON public.docs USING hnsw (embedding vector_l2_ops);
CREATE INDEX ON public.docs (created_at);""")
        wl, report = migrate_under_load(dsn18, "public.docs", "created_at")
        assert report.errors == 0, report.error_samples
        cmp = wl.compare()
        assert cmp.ok, str(cmp)
        assert conn.execute("SELECT relkind FROM pg_class WHERE oid = 'public.docs'::regclass").fetchone()[0] == "p"
        idx = conn.execute("SELECT indexdef FROM pg_indexes WHERE tablename = 'docs' AND indexdef LIKE '%hnsw%'"
                           ).fetchall()
        assert len(idx) == 1 and "vector_l2_ops" in idx[0][0], idx
        near = conn.execute("SELECT embedding::text FROM docs ORDER BY embedding <-> '[1,1,1]' LIMIT 1").fetchone()
        assert near is not None and near[0] == "[1,1,1]"
