"""Verification hashes by type only where that is exact, and checks ranges in parallel.

``sql.verify.range_digest`` hashes a column with its type's own hash function only when equal
values of that type are identical images; every other column is hashed as its text. These
tests change twin rows in ways that equality cannot see (1.5 -> 1.50, 0 -> -0, case under
citext or a case-insensitive collation, jsonb key order is normalised so not a case) and
require verify to name every such range.
"""

from __future__ import annotations

import json
from pathlib import Path

import psycopg
import pytest
import yaml

from helpers import run_cli
from orchestrator.phases.verify import exact_hash_columns
from orchestrator.sql import QualifiedName

DAYS = 6


def _table(conn: psycopg.Connection) -> bool:
    """The test table; True when the server has ICU, so ``name`` is under a case-insensitive
    (nondeterministic) collation. A build without ICU (the embedded PostgreSQL 18) cannot
    make one: there ``name`` is plain text and that one case is left out."""
    conn.execute("CREATE EXTENSION IF NOT EXISTS citext")
    try:
        conn.execute("CREATE COLLATION IF NOT EXISTS public.ci (provider = icu, locale = 'und-u-ks-level2', "
                     "deterministic = false)")
        icu = True
    except psycopg.errors.FeatureNotSupported:
        icu = False
    conn.execute(f"""
        CREATE TABLE public.things (
          id bigint PRIMARY KEY, created_at timestamptz NOT NULL, n int, flag bool, u uuid, b bytea,
          label text, amount numeric, ratio float8, email public.citext, name text {"COLLATE public.ci" if icu else ""},
          doc jsonb, tags int[])""")
    conn.execute(f"""
        INSERT INTO public.things
        SELECT g, timestamptz '2025-03-01 00:00+00' + (g % {DAYS}) * interval '1 day' + g * interval '1 second',
               g, g % 2 = 0, md5(g::text)::uuid, decode(md5(g::text), 'hex'), 'label ' || g, 1.5, 0,
               'user' || g || '@example.com', 'Name ' || g, jsonb_build_object('g', g), ARRAY[g, g + 1]
        FROM generate_series(1, 3000) g""")
    return icu


def _plan(tmp_path: Path, workers: int, capture_mode: str = "sync") -> Path:
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump({
        "table": "public.things",
        "partition_by": {"column": "created_at", "interval": "1 day", "start": "2025-03-01", "premake": 0},
        "backfill": {"range": "1 day", "batch_size": 500},
        "verify": {"workers": workers},
        "capture": {"mode": capture_mode},
    }))
    return path


def test_only_equal_image_types_are_hashed_by_type(conn: psycopg.Connection) -> None:
    icu = _table(conn)
    exact = exact_hash_columns(conn, QualifiedName("public", "things"))
    # Equal values of these are identical bytes: hashing them by type loses nothing.
    assert {"id", "created_at", "n", "flag", "u", "b", "label"} <= exact, exact
    # Equality hides differences a person can see: 1.5 = 1.50, 0 = -0, 'A' = 'a' (citext, the
    # case-insensitive collation); jsonb, arrays and anything unknown go in as text too.
    assert not exact & {"amount", "ratio", "email", "doc", "tags"}, exact
    assert ("name" in exact) is not icu, exact  # plain text is exact; under the ICU collation it is not


# Async (the digest leaves out the keys pending in the log): one worker count is enough.
@pytest.mark.parametrize(("workers", "capture_mode"), [(1, "sync"), (3, "sync"), (3, "async")])
def test_verify_names_every_range_with_a_difference_equality_cannot_see(
        conn: psycopg.Connection, dsn: str, tmp_path: Path, workers: int, capture_mode: str) -> None:
    icu = _table(conn)
    plan = _plan(tmp_path, workers, capture_mode)
    code, out, err = run_cli("apply", plan, "--dsn", dsn, "--until", "backfill")
    assert code == 0, err
    # One change per day; each row still compares equal to the original under `=`.
    changes = {
        "amount = 1.50": 1,
        "ratio = '-0'::float8": 2,
        "email = upper(email::text)::public.citext": 3,
        **({"name = upper(name)": 4} if icu else {}),
    }
    days = []
    for change, g in changes.items():
        n = conn.execute(f"UPDATE public.things_partitioned SET {change} WHERE id = %s", (g,)).rowcount
        assert n == 1
        day = conn.execute("SELECT to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD') FROM public.things "
                           "WHERE id = %s", (g,)).fetchone()[0]
        days.append(day)
        same = conn.execute("SELECT count(*) FROM public.things t JOIN public.things_partitioned p USING (id) "
                            "WHERE t.id = %s AND (t.amount, t.ratio, t.email, t.name) = "
                            "(p.amount, p.ratio, p.email, p.name)", (g,)).fetchone()[0]
        assert same == 1, f"{change}: the tampered row should still be equal under ="
    assert len(set(days)) == len(changes)
    code, out, err = run_cli("apply", plan, "--dsn", dsn, "--until", "verify")
    assert code == 6, (code, out, err)
    assert f"{len(changes)} range(s)" in err, err
    for day in days:
        assert day in err, (day, err)
    code, out, _ = run_cli("status", plan, "--dsn", dsn, "-o", "json")
    status = json.loads(out)
    assert sorted(status["ranges"]["mismatched_labels"]) == sorted(days), status["ranges"]
    # Every other range was checked and passed: all ranges have a verdict.
    assert status["ranges"]["verified"] + status["ranges"]["mismatched"] == status["ranges"]["total"], status
    # Repaired, the same parallel verify passes.
    code, out, err = run_cli("apply", plan, "--dsn", dsn, "--until", "verify", "--recopy", "all")
    assert code == 0, err
    assert json.loads(run_cli("status", plan, "--dsn", dsn, "-o", "json")[1])["phases"]["verify"]["detail"][
        "workers"] == workers
