"""After cutover nothing breaks quietly: partitions that maintain creates later get the
owner, storage parameters and replica identity that the cutover gave the first ones."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import psycopg
import pytest

from orchestrator import runner
from orchestrator.maintain import maintain_pass
from orchestrator.plan import parse_plan

T0 = datetime(2026, 3, 10, 12, 0)


@pytest.mark.parametrize("identity", ["FULL", "USING INDEX items_uq"])
def test_maintain_partitions_match_the_first_ones(conn: psycopg.Connection, dsn, identity):
    """Without the mechanism maintain's partitions are owned by the role running it (the
    owner's next ALTER TABLE fails), have no storage parameters and replica identity DEFAULT."""
    conn.execute("DROP ROLE IF EXISTS sd_app_owner")
    conn.execute("CREATE ROLE sd_app_owner")
    conn.execute("""CREATE TABLE public.items (id bigint PRIMARY KEY, created_at timestamptz NOT NULL, v text NOT NULL)
                    WITH (fillfactor = 70, autovacuum_vacuum_scale_factor = 0.02)""")
    conn.execute("CREATE UNIQUE INDEX items_uq ON public.items (v, id, created_at)")
    conn.execute(f"ALTER TABLE public.items REPLICA IDENTITY {identity}")
    conn.execute("ALTER TABLE public.items OWNER TO sd_app_owner")
    conn.execute("INSERT INTO public.items SELECT g, %s::timestamptz - g * interval '3 hours', 'v' || g "
                 "FROM generate_series(1, 300) g", (T0.replace(tzinfo=timezone.utc),))
    plan = parse_plan({"table": "public.items",
                       "partition_by": {"column": "created_at", "interval": "1 month", "premake": 1},
                       "backfill": {"range": "1 month"},
                       "cutover": {"lock_timeout": "200ms", "attempts": 50, "backoff_max": "300ms"}})
    runner.apply(plan, dsn, now=T0)
    maintain_pass(plan, dsn, now=T0 + timedelta(days=120))
    rows = conn.execute(
        """SELECT c.relname, pg_get_userbyid(c.relowner), coalesce(c.reloptions, '{}'), c.relreplident::text,
                  (SELECT ic.relname FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid
                   WHERE i.indrelid = c.oid AND i.indisreplident)
           FROM pg_inherits h JOIN pg_class c ON c.oid = h.inhrelid
           WHERE h.inhparent = 'public.items'::regclass AND c.relname <> 'items_default' ORDER BY 1""").fetchall()
    first, last = rows[0], rows[-1]
    assert last[0] == f"items_p{(T0 + timedelta(days=120)).replace(day=1) + timedelta(days=32):%Y_%m}"
    assert first[1] == last[1] == "sd_app_owner"
    assert sorted(last[2]) == sorted(first[2]) == ["autovacuum_vacuum_scale_factor=0.02", "fillfactor=70"]
    assert last[3] == first[3] == ("f" if identity == "FULL" else "i")
    if identity != "FULL":
        assert last[4] is not None and first[4] is not None
    # The owner's ALTER TABLE on the partitioned table reaches every partition.
    conn.execute("SET ROLE sd_app_owner")
    conn.execute("ALTER TABLE public.items ADD COLUMN extra int")
    conn.execute("RESET ROLE")
