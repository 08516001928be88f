"""The sample ``orders`` table used by the demo, the integration tests and the benchmarks.

:func:`create_orders` builds a realistic OLTP table (serial key, CHECK constraints,
defaults, nullable columns, jsonb, awkward text) with the objects that usually hang off
such a table in production (secondary and partial indexes, a view, a grant to a
reporting role, a comment), and fills it entirely server side with ``generate_series``
so a million rows take seconds, not minutes.
"""

from __future__ import annotations

from datetime import datetime, timezone

import psycopg
from loguru import logger

from orchestrator.sql import MAX_IDENT, ident, literal, parse_qualified

#: Notes written into ``note``: quotes, backslashes, non-ASCII, emoji, control chars.
NOTES = [
    "Leave at the door",
    'Customer said: "call me first"',
    "O'Brien's second order",
    "path C:\\temp\\orders\\ and a \\N that is not NULL",
    "Café crème, déjà vu, naïve résumé",
    "日本からの注文です",
    "gift wrap please 🎁🎉",
    "tab\tand\nnewline",
    "mixed 'single' \"double\" \\back\\slash",
    "Ünïcödé ñ ß Ωμέγα Привет",
    "",
    "   leading and trailing spaces   ",
]

STATUSES = ("new", "paid", "shipped", "cancelled", "refunded")


def _name(base: str, suffix: str) -> str:
    """``base + suffix`` cut to PostgreSQL's identifier limit (bytes, not characters)."""
    room = MAX_IDENT - len(suffix.encode())
    raw = base.encode()[:room]
    return raw.decode(errors="ignore") + suffix


def create_orders(
    conn: psycopg.Connection,
    table: str = "public.orders",
    rows: int = 1_000_000,
    days: int = 365,
    end: datetime | None = None,
    seed: int = 1,
    *,
    width: str = "normal",
    replace: bool = False,
) -> None:
    """Create and fill the sample orders table ``table`` (schema-qualified).

    Rows are spread evenly (with jitter) over the ``days`` days ending at ``end``
    (default: now), ``id`` increasing with ``created_at`` like a real append-mostly
    table. ``width="wide"`` adds a ``details`` text column of 1-1.4 KB per row (below
    the TOAST threshold, so rows really are large). ``replace=True`` drops an existing
    table of that name first (CASCADE). Deterministic for a given ``seed`` and ``end``.
    Works in autocommit or not: everything runs in one transaction.
    """
    if width not in ("normal", "wide"):
        raise ValueError(f"width must be 'normal' or 'wide', not {width!r}")
    if rows < 0 or days <= 0:
        raise ValueError("rows must be >= 0 and days > 0")
    qn = parse_qualified(table)
    t = str(qn)
    view = qn.with_name(_name(qn.name, "_daily"))
    end = end or datetime.now(timezone.utc)
    if end.tzinfo is None:
        end = end.replace(tzinfo=timezone.utc)
    ncust = max(100, rows // 10)
    wide_col = ",\n    details text" if width == "wide" else ""
    wide_val = ",\n    repeat(md5(g::text), 32 + (g %% 13)::int)" if width == "wide" else ""

    with conn.transaction(), conn.cursor() as cur:
        cur.execute("SET LOCAL maintenance_work_mem = '256MB'")
        cur.execute("SET LOCAL synchronous_commit = off")
        cur.execute(f"CREATE SCHEMA IF NOT EXISTS {ident(qn.schema)}")
        if replace:
            cur.execute(f"DROP TABLE IF EXISTS {t} CASCADE")
        # The primary key is added after the load: building it once is far faster
        # than maintaining it row by row. The constraint still gets the usual name.
        cur.execute(
            f"""
CREATE TABLE {t} (
    id bigserial NOT NULL,
    customer_id bigint NOT NULL,
    status text NOT NULL DEFAULT 'new'
        CHECK (status IN ('new', 'paid', 'shipped', 'cancelled', 'refunded')),
    amount numeric(12,2) NOT NULL CHECK (amount >= 0),
    currency char(3) NOT NULL DEFAULT 'EUR',
    note text,
    payload jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz{wide_col}
)"""
        )
        cur.execute("SELECT setseed(%s)", ((seed % 1_000_003) / 1_000_003.0,))
        cur.execute(
            f"""
INSERT INTO {t} (id, customer_id, status, amount, currency, note, payload,
                 created_at, updated_at{', details' if width == 'wide' else ''})
SELECT
    g,
    1 + floor(power(r1, 1.6) * %(ncust)s)::bigint,
    st,
    round((1 + power(r2, 3) * 2500)::numeric, 2),
    CASE WHEN r3 < 0.70 THEN 'EUR' WHEN r3 < 0.90 THEN 'USD' WHEN r3 < 0.95 THEN 'GBP'
         ELSE 'JPY' END,
    CASE WHEN r4 < 0.55 THEN NULL
         ELSE (%(notes)s::text[])[1 + floor(r5 * cardinality(%(notes)s::text[]))::int] END,
    CASE WHEN r5 < 0.08 THEN NULL
         ELSE jsonb_build_object(
            'items', 1 + floor(r6 * 6)::int,
            'channel', (ARRAY['web', 'app', 'phone', 'store'])[1 + floor(r6 * 4)::int],
            'gift', r6 < 0.1,
            'coupon', CASE WHEN r6 > 0.85 THEN 'SAVE' || (g %% 50)::text END,
            'tags', CASE WHEN r4 < 0.3 THEN jsonb_build_array('prio', 'été', '東京')
                         ELSE '[]'::jsonb END) END,
    ts,
    CASE WHEN st = 'new' THEN NULL
         ELSE least(ts + r7 * interval '10 days', %(end)s::timestamptz) END{wide_val}
FROM (
    SELECT g, r1, r2, r3, r4, r5, r6, r7,
           CASE WHEN r0 < 0.10 THEN 'new' WHEN r0 < 0.30 THEN 'paid'
                WHEN r0 < 0.80 THEN 'shipped' WHEN r0 < 0.92 THEN 'cancelled'
                ELSE 'refunded' END AS st,
           %(end)s::timestamptz
             - (%(days)s * interval '1 day') * ((%(rows)s - g + r8) / %(rows)s::float8) AS ts
    FROM (
        SELECT g, random() AS r0, random() AS r1, random() AS r2, random() AS r3,
               random() AS r4, random() AS r5, random() AS r6, random() AS r7,
               random() AS r8
        FROM generate_series(1, %(rows)s::bigint) AS g
        OFFSET 0
    ) AS rnd
    OFFSET 0
) AS src""",
            {"ncust": ncust, "notes": NOTES, "end": end, "days": days, "rows": max(rows, 1)},
        )
        if rows:
            cur.execute("SELECT setval(pg_get_serial_sequence(%s, 'id'), %s)", (t, rows))
        cur.execute(
            f"ALTER TABLE {t} ADD CONSTRAINT {ident(_name(qn.name, '_pkey'))} PRIMARY KEY (id)"
        )
        cur.execute(f"CREATE INDEX {ident(_name(qn.name, '_created_at_idx'))} ON {t} (created_at)")
        cur.execute(f"CREATE INDEX {ident(_name(qn.name, '_customer_id_idx'))} ON {t} (customer_id)")
        cur.execute(
            f"CREATE INDEX {ident(_name(qn.name, '_open_status_idx'))} ON {t} (status) "
            "WHERE status IN ('new', 'paid')"
        )
        cur.execute(
            f"CREATE INDEX {ident(_name(qn.name, '_customer_created_idx'))} "
            f"ON {t} (customer_id, created_at)"
        )
        cur.execute(
            f"""
CREATE VIEW {view} AS
SELECT created_at::date AS day, count(*) AS orders, sum(amount) AS revenue,
       count(*) FILTER (WHERE status = 'cancelled') AS cancelled
FROM {t}
GROUP BY created_at::date"""
        )
        # Roles are cluster-wide: two test databases may race to create it.
        cur.execute(
            """
DO $$
BEGIN
    CREATE ROLE reporting NOLOGIN;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL;
END
$$"""
        )
        cur.execute(f"GRANT SELECT ON {t}, {view} TO reporting")
        cur.execute(
            f"COMMENT ON TABLE {t} IS "
            + literal(f"Sample orders ({rows} rows over {days} days), created by orchestrate")
        )
        cur.execute(f"ANALYZE {t}")
    logger.debug("created {} with {} rows ({} days to {}, width={})", t, rows, days, end, width)
