"""`orchestrate demo --distributed`: partition AND distribute a live table over Citus.

Starts a local Citus coordinator and two workers (orchestrator.lab.citus_cluster; Citus must be
installed, README "When one machine is not enough"), builds the sample orders table keyed
by (customer_id, id) the way a multi-tenant application keys it, and migrates it in one
`apply` into a monthly-partitioned table distributed by customer_id. The write workload
runs from prepare through verify, against the coordinator's heap table while the trigger
writes through into the distributed twin, and the twin is then compared with the
workload's golden record. It stops before the swap: its golden bookkeeping (a modifying
CTE whose RETURNING computes the row's key text) is SQL that Citus refuses on a distributed
table. Prints rows per worker, the shards, and the time of each phase.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import click
import psycopg

from orchestrator import runner
from orchestrator.distribute import shard_rows
from orchestrator.errors import OrchestrateError, VerificationFailed
from orchestrator.lab.citus_cluster import CitusCluster
from orchestrator.lab.demo import PLAN, say
from orchestrator.lab.sample import create_orders
from orchestrator.lab.workload import Workload
from orchestrator.plan import parse_plan


def run(rows: int = 1_000_000, days: int = 365, clients: int = 4, keep: bool = False,
        progress: Callable[[], Any] | None = None) -> None:
    """The demo; ``progress`` makes the live progress printer (the CLI passes its own)."""
    start = (datetime.now(timezone.utc) - timedelta(days=days)).date()
    plan = parse_plan({**PLAN, "partition_by": {**PLAN["partition_by"], "start": start},
                       "distribute": {"column": "customer_id", "shard_count": 8,
                                      "accept_no_rollback_after_cutover": True}}, "demo plan")
    say("starting a local Citus coordinator and two workers")
    cluster = CitusCluster().start()
    try:
        dsn = cluster.create_database("demo")
        say(f"coordinator at {dsn}; workers on ports {', '.join(map(str, cluster.worker_ports()))}")
        t0 = time.monotonic()
        with psycopg.connect(dsn, autocommit=True) as conn:
            create_orders(conn, rows=rows, days=days)
            conn.execute("ALTER TABLE public.orders DROP CONSTRAINT orders_pkey, ADD PRIMARY KEY (customer_id, id)")
        say(f"built public.orders on the coordinator: {rows:,} rows over {days} days, keyed by (customer_id, id) "
            f"({time.monotonic() - t0:.1f}s)")
        workload = Workload(dsn, "public.orders", "created_at", clients=clients, seed=7)
        workload.setup()
        if clients:
            workload.start()
            say(f"write workload running: {clients} clients (until verify; see `orchestrate demo --help`)")
        printer = progress() if progress else None
        t_mig = time.monotonic()
        try:
            runner.apply(plan, dsn, until="verify", progress=printer)
        finally:
            if printer is not None:
                printer.close()
        report = workload.stop() if clients else None
        comparison = workload.compare(table="public.orders_partitioned")
        say("distributed twin == what the workload committed: " + ("yes" if comparison.ok else "NO"))
        outcome = runner.apply(plan, dsn)
        migration_s = time.monotonic() - t_mig
        say(outcome.message)
        status = runner.status(plan, dsn).data
        click.echo()
        click.echo(click.style("Summary", bold=True))
        click.echo(f"  migration wall time           {migration_s:.1f}s")
        for name, p in status["phases"].items():
            extra = (f"   (ACCESS EXCLUSIVE held {p['detail']['lock_held_ms']} ms)"
                     if "lock_held_ms" in p["detail"] else "")
            click.echo(f"    {name:<10} {p['duration_s']:>8.2f}s{extra}")
        if report is not None:
            click.echo(f"  writes during the migration   {report.writes:,} committed, {report.errors} errors")
        with psycopg.connect(dsn, autocommit=True) as conn:
            per_node = shard_rows(conn, "public.orders")
            shards = conn.execute("SELECT count(*) FROM pg_catalog.citus_shards").fetchone()[0]
            parts = conn.execute("SELECT count(*) FROM pg_inherits WHERE inhparent = 'public.orders'::regclass"
                                 ).fetchone()[0]
        click.echo(f"  public.orders: {parts} partitions, {shards} shards (8 for each partition and the parent), "
                   "distributed by customer_id")
        for node, n in per_node.items():
            click.echo(f"    worker {node:<22} {n:>10,} rows")
        if report is not None and report.errors:
            raise OrchestrateError(f"the workload saw {report.errors} write errors: {report.error_samples[:1]}")
        if not comparison.ok:
            raise VerificationFailed(f"the distributed twin differs from what the workload committed: "
                                     f"{comparison.as_dict()}")
        if keep:
            say(f"cluster left running (--keep): {dsn}; stop it with Ctrl-C")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
    finally:
        say("stopping the local Citus cluster")
        cluster.stop()
