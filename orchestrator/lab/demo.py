"""`orchestrate demo`: the whole product in one command, on a throwaway local cluster.

Starts a PostgreSQL primary and streaming replica, builds a live `orders` table (a
million rows over a year by default, several indexes, a view, a grant), runs a write
workload against it, migrates it with progress output while the workload keeps writing,
and prints what happened: rows, time per phase, writes made during the migration, write
errors (must be 0), the longest write wait, and the final layout. Cleans up after itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import click
import psycopg

from orchestrator import runner
from orchestrator.errors import OrchestrateError, VerificationFailed
from orchestrator.lab.cluster import LocalCluster
from orchestrator.lab.sample import create_orders
from orchestrator.lab.workload import Workload
from orchestrator.plan import parse_plan

PLAN = {
    "version": 1,
    "table": "public.orders",
    "partition_by": {"column": "created_at", "interval": "1 month", "premake": 3},
    "backfill": {"range": "1 day", "workers": 2},
    "cutover": {"lock_timeout": "200ms", "attempts": 50},
}


def say(text: str) -> None:
    click.echo(click.style("==> ", fg="cyan", bold=True) + text)


def run(rows: int = 1_000_000, days: int = 365, clients: int = 4, keep: bool = False,
        progress: Callable[[], Any] | None = None) -> None:
    """The demo; ``progress`` makes the live progress printer (the CLI passes its own)."""
    # Partitions start with the sample's first day: the workload's rare far-past and
    # far-future keys then show how the default partition catches what no range covers.
    start = (datetime.now(timezone.utc) - timedelta(days=days)).date()
    plan = parse_plan({**PLAN, "partition_by": {**PLAN["partition_by"], "start": start}}, "demo plan")
    say("starting a local PostgreSQL primary and streaming replica")
    cluster = LocalCluster(replica=True)
    cluster.start()
    try:
        dsn = cluster.create_database("demo")
        say(f"PostgreSQL {cluster.version} at {dsn}")
        t0 = time.monotonic()
        with psycopg.connect(dsn, autocommit=True) as conn:
            create_orders(conn, rows=rows, days=days)
        say(f"built public.orders: {rows:,} rows over {days} days, 5 indexes, view orders_daily, "
            f"grant to role reporting ({time.monotonic() - t0:.1f}s)")
        workload = Workload(dsn, "public.orders", "created_at", clients=clients, seed=7)
        workload.setup()
        if clients:
            workload.start()
            say(f"write workload running: {clients} clients inserting, updating, moving keys, deleting")
        printer = progress() if progress else None
        t_mig = time.monotonic()
        try:
            outcome = runner.apply(plan, dsn, replica_dsns=(cluster.replica_dsn("demo"),), progress=printer)
        finally:
            if printer is not None:
                printer.close()
        migration_s = time.monotonic() - t_mig
        time.sleep(1.0)  # a few writes on the new table, through the reverse trigger
        report = workload.stop() if clients else None
        say(outcome.message)
        status = runner.status(plan, dsn).data
        comparison = workload.compare()
        _summary(dsn, status, report, comparison, migration_s)
        if report is not None and report.errors:
            raise OrchestrateError(f"the workload saw {report.errors} write errors: {report.error_samples[:1]}")
        if not comparison.ok:
            raise VerificationFailed(
                f"the migrated table differs from what the workload committed: {comparison.as_dict()}")
        if keep:
            say(f"cluster left running (--keep): {dsn}; stop it with Ctrl-C")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
    finally:
        say("stopping the local cluster")
        cluster.stop()


def _summary(dsn: str, status: dict, report, comparison, migration_s: float) -> None:
    click.echo()
    click.echo(click.style("Summary", bold=True))
    click.echo(f"  rows copied by the backfill   {status['ranges']['rows_copied']:,} "
               f"in {status['ranges']['total']} ranges")
    click.echo(f"  migration wall time           {migration_s:.1f}s")
    for name, p in status["phases"].items():
        extra = f"   (ACCESS EXCLUSIVE held {p['detail']['lock_held_ms']} ms)" if "lock_held_ms" in p["detail"] else ""
        click.echo(f"    {name:<10} {p['duration_s']:>8.2f}s{extra}")
    if report is not None:
        click.echo(f"  writes during the migration   {report.writes:,} committed "
                   f"({', '.join(f'{k} {v}' for k, v in sorted(report.ops.items()))})")
        click.echo(f"  write errors                  {report.errors}")
        lat = report.latency_ms
        click.echo(f"  write latency                 p50 {lat['p50']:.1f} ms, p99 {lat['p99']:.1f} ms, "
                   f"longest {lat['max']:.1f} ms")
    click.echo(f"  final table == committed data {'yes' if comparison.ok else 'NO: ' + str(comparison.as_dict())}")
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            """SELECT c.relname, pg_get_expr(c.relpartbound, c.oid), c.reltuples::bigint
               FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
               WHERE i.inhparent = 'public.orders'::regclass ORDER BY c.relname"""
        ).fetchall()
        total = conn.execute("SELECT count(*) FROM public.orders").fetchone()[0]
        in_default = conn.execute("SELECT count(*) FROM public.orders_default").fetchone()[0]
    click.echo(f"  final layout: public.orders, partitioned by range (created_at), {len(rows)} partitions, "
               f"{total:,} rows")
    for name, bound, _ in rows:
        click.echo(f"    {name:<22} {bound}")
    click.echo(f"  rows in the default partition {in_default} (NULL or out-of-range keys; `orchestrate maintain` "
               "moves them out when their range gets a partition)")
    click.echo("  next: `orchestrate finalize` drops public.orders_retired (kept in sync until then), "
               "or `orchestrate rollback` swaps back")
