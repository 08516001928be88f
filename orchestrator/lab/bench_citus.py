"""`orchestrate bench --distributed`: one distributed migration against Citus' two-step path.

Both paths start from the same heap table (the sample orders table keyed by (customer_id,
id), the same rows) on the same local Citus cluster (coordinator + 2 workers), each in its
own database, in one run, under the same writer:

- one step: `orchestrate apply` with `distribute:` (the twin is distributed while empty);
- two steps: `orchestrate apply` without it (a partitioned heap table on the coordinator),
  `orchestrate finalize` (Citus distributes no table with triggers: the reverse trigger
  goes), then Citus' `create_distributed_table_concurrently` on the result (and, where
  Citus refuses that, the blocking `create_distributed_table`, recorded as such).

Measured for each: the wall time, and the longest single write of an application writer
(one INSERT and one UPDATE by key per loop, autocommit) during it: the write stall.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone

import psycopg

from orchestrator import runner
from orchestrator.lab.citus_cluster import CitusCluster
from orchestrator.lab.sample import create_orders
from orchestrator.plan import parse_plan


class StallWriter(threading.Thread):
    """One application writer; remembers its slowest statement and counts errors."""

    def __init__(self, dsn: str):
        super().__init__(daemon=True)
        self.dsn, self.stop_event = dsn, threading.Event()
        self.max_ms, self.writes, self.errors, self.samples = 0.0, 0, 0, []

    def run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            i = 0
            while not self.stop_event.is_set():
                i += 1
                t0 = time.monotonic()
                try:
                    rid = conn.execute("INSERT INTO public.orders (customer_id, amount) VALUES (%s, 1) RETURNING id",
                                       (10**9 + i % 97,)).fetchone()[0]
                    conn.execute("UPDATE public.orders SET note = 'bench' WHERE customer_id = %s AND id = %s",
                                 (10**9 + i % 97, rid))
                    self.writes += 2
                except psycopg.Error as e:
                    self.errors += 1
                    if len(self.samples) < 3:
                        self.samples.append(str(e).splitlines()[0])
                self.max_ms = max(self.max_ms, (time.monotonic() - t0) * 1000)
                time.sleep(0.002)

    def finish(self) -> dict:
        self.stop_event.set()
        self.join(30)
        return {"longest_write_ms": round(self.max_ms, 1), "writes": self.writes, "errors": self.errors,
                "error_samples": self.samples}


def _plan(days: int, distribute: bool):
    start = (datetime.now(timezone.utc) - timedelta(days=days)).date()
    data = {"table": "public.orders",
            "partition_by": {"column": "created_at", "interval": "1 month", "premake": 1, "start": str(start)},
            "backfill": {"range": "1 week", "workers": 2},
            "cutover": {"lock_timeout": "200ms", "attempts": 50}}
    if distribute:
        data["distribute"] = {"column": "customer_id", "shard_count": 8, "accept_no_rollback_after_cutover": True}
    return parse_plan(data, "bench plan")


def compare(rows: int = 200_000, days: int = 90, say=print) -> dict:
    """Run both paths on one fresh Citus cluster; their figures side by side."""
    import os
    import platform

    out: dict = {"rows": rows, "machine": f"{os.cpu_count()} CPU(s), {platform.machine()}",
                 "load_before": round(os.getloadavg()[0], 1)}
    say("bench --distributed: starting a local Citus coordinator and two workers")
    with CitusCluster() as cluster:
        for mode in ("one_step", "two_step"):
            dsn = cluster.create_database(f"bench_{mode}")
            with psycopg.connect(dsn, autocommit=True) as conn:
                create_orders(conn, rows=rows, days=days, seed=3)
                conn.execute("ALTER TABLE public.orders DROP CONSTRAINT orders_pkey, "
                             "ADD PRIMARY KEY (customer_id, id)")
            writer = StallWriter(dsn)
            writer.start()
            time.sleep(0.5)
            t0 = time.monotonic()
            runner.apply(_plan(days, distribute=mode == "one_step"), dsn)
            migrated = time.monotonic() - t0
            extra: dict = {}
            if mode == "two_step":
                # Citus distributes no table with triggers: the reverse trigger (and so the
                # way back) must go first.
                runner.finalize(_plan(days, distribute=False), dsn)
                with psycopg.connect(dsn, autocommit=True) as conn:
                    try:
                        conn.execute("SELECT create_distributed_table_concurrently('public.orders', 'customer_id', "
                                     "shard_count => 8)")
                        extra["second_step"] = "create_distributed_table_concurrently"
                    except psycopg.Error as e:
                        # Measured with Citus 13.2.2: refused on any partitioned table with a CHECK
                        # constraint ("child table is missing constraint ..."). Then the blocking
                        # create_distributed_table is what is left: its lock stalls the writers.
                        extra["concurrently_error"] = str(e).splitlines()[0]
                        extra["second_step"] = "create_distributed_table (blocking)"
                        conn.execute("SELECT create_distributed_table('public.orders', 'customer_id', "
                                     "shard_count => 8)")
            wall = time.monotonic() - t0
            time.sleep(0.5)
            result = {"wall_s": round(wall, 2), "migration_s": round(migrated, 2), **extra, **writer.finish()}
            with psycopg.connect(dsn, autocommit=True) as conn:
                result["distributed"] = conn.execute(
                    "SELECT count(*) FROM pg_dist_partition WHERE logicalrelid = 'public.orders'::regclass"
                ).fetchone()[0] == 1
            out[mode] = result
            say(f"  {mode}: {result}")
        with psycopg.connect(cluster.dsn("postgres"), autocommit=True) as conn:
            out["citus"] = conn.execute("SELECT default_version FROM pg_available_extensions "
                                        "WHERE name = 'citus'").fetchone()[0]
            out["postgres"] = conn.execute("SHOW server_version").fetchone()[0]
    out["load_after"] = round(os.getloadavg()[0], 1)
    return out


LABELS = (("one_step", "one step (distribute:)"),
          ("two_step", "two steps (+ create_distributed_table_concurrently)"))


def render_markdown(res: dict) -> str:
    """docs/benchmarks-distributed.md: both paths' figures, the machine and its load."""
    lines = ["# The distributed migration against the two-step path", "",
             "Written by `orchestrate bench --distributed`; both paths on one local Citus cluster "
             "(coordinator + 2 workers), the same table and rows, in one run, under one application "
             "writer (an INSERT and an UPDATE by key per loop, autocommit).", "",
             f"Rows: {res['rows']:,}. Machine: {res.get('machine', '?')}; load average "
             f"{res.get('load_before', '?')} before, {res.get('load_after', '?')} after. "
             f"Citus {res.get('citus', '?')} on PostgreSQL {res.get('postgres', '?')}.", "",
             "| path | wall time | longest application write | writes | errors | second step |",
             "|---|---|---|---|---|---|"]
    for mode, label in LABELS:
        r = res[mode]
        second = r.get("second_step", "-")
        if "concurrently_error" in r:
            second += f" (concurrently refused: {r['concurrently_error']})"
        lines.append(f"| {label} | {r['wall_s']:.1f} s | {r['longest_write_ms']:,.1f} ms | {r['writes']:,} | "
                     f"{r['errors']} | {second} |")
    return "\n".join(lines) + "\n"
