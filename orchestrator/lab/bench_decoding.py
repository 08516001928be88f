"""`orchestrate bench --decoding`: async capture's change log against logical decoding.

The question the async capture design had to answer (issue: "logical decoding from a slot,
or a narrow append-only change log: measure both"): which costs the application's writes
less on the same server, replay included? Both feed the same replay (orchestrator/changelog.py:
it syncs logged keys from the live table), so the difference is only how the changed keys
are captured:

- ``without``: no capture (the baseline);
- ``log``: the change log's trigger, no replay while pgbench runs (the writer's tax alone);
- ``async``: the change log's trigger and the replay running beside the writers, as `apply`
  runs it;
- ``decode``: no trigger; a logical slot (test_decoding, always shipped with PostgreSQL)
  consumed beside the writers and thrown away (the decoding's tax alone);
- ``logical``: no trigger; the slot consumed beside the writers, its keys fed into the log
  and replayed by the same replay (what a decoding-based async capture would cost).

The server runs with ``wal_level = logical`` for every variant, so the level's own WAL is in
the baseline. Each variant runs pgbench (the main benchmark's script: one INSERT and one
UPDATE per transaction, 4 clients) for the same time, alternated in rotating order, with
the table reset in between. Two figures per run: the transactions per second while
pgbench ran, and the *sustained* rate, which also counts the time the consumer needed
afterwards to catch up (a consumer that falls behind only defers its work).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import psycopg
import yaml

from orchestrator.lab.bench import PGBENCH_SCRIPT, SERVER_SETTINGS, TABLE, Bench, Consumer, machine_info
from orchestrator.lab.cluster import LocalCluster, find_pg_bin
from orchestrator.lab.sample import create_orders
from orchestrator.phases import FORWARD_TRIGGER
from orchestrator.sql import ident

MODES = ("without", "log", "async", "decode", "logical")
SLOT = "orchestrate_bench_decoding"
# The sample table's twin key (id, created_at), parsed from test_decoding's text output.
_INGEST = (
    "INSERT INTO public.orders_changes (id, created_at) SELECT "
    "substring(data FROM 'id\\[bigint\\]:(\\d+)')::bigint, "
    "substring(data FROM 'created_at\\[timestamp with time zone\\]:''([^'']+)''')::timestamptz "
    f"FROM pg_catalog.pg_logical_slot_get_changes('{SLOT}', NULL, 5000) "
    "WHERE data LIKE 'table public.orders: %'")
_DECODE = f"SELECT count(*) FROM pg_catalog.pg_logical_slot_get_changes('{SLOT}', NULL, 5000)"
_DISCARD = f"SELECT count(*) FROM pg_catalog.pg_logical_slot_get_changes('{SLOT}', NULL, NULL)"


def compare(rows: int = 200_000, seconds: float = 10.0, rounds: int = 3, pg_bin: str | None = None,
            say=print) -> dict:
    """Every mode ``rounds`` times on one fresh server; medians and ratios to ``without``."""
    workdir = Path(tempfile.mkdtemp(prefix="orchestrate-bench-decoding-"))
    b = Bench(rows, False, workdir, say=say, pg_bin=pg_bin)
    settings = {**SERVER_SETTINGS, "wal_level": "logical", "max_replication_slots": "4", "max_wal_senders": "4"}
    out: dict = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine_info(),
                 "rows": rows, "seconds_per_run": seconds, "rounds": rounds, "load_before": os.getloadavg()[0]}
    with LocalCluster(pg_bin=find_pg_bin(pg_bin), replica=False, settings=settings) as cl:
        b.pg_bin = cl.pg_bin
        (workdir / "bench.pgbench").write_text(PGBENCH_SCRIPT)
        dsn = cl.create_database("decoding")
        out["postgres"] = b.sql(dsn, "SHOW server_version", fetch=True)[0][0]
        say(f"bench --decoding: PostgreSQL {out['postgres']}, {rows:,} rows")
        with psycopg.connect(dsn, autocommit=True) as conn:
            create_orders(conn, TABLE, rows=rows, days=365)
        b.vacuum(dsn)
        plan_file = workdir / "plan-async.yaml"
        plan_file.write_text(yaml.safe_dump({**b.plan_data, "capture": {"mode": "async"}}, sort_keys=False))
        for step in ("prepare", "capture", "backfill"):
            b.apply(dsn, "async", "--until", step, plan_file=plan_file)
        mid = int(b.sql(dsn, "SELECT max(id) FROM orchestrate.migrations", fetch=True)[0][0])
        replay = f"SELECT orchestrate.replay_{mid}(2000)"
        b.sql(dsn, f"SELECT pg_catalog.pg_create_logical_replication_slot('{SLOT}', 'test_decoding')")
        trigger = f"ALTER TABLE {TABLE} {{}} TRIGGER {ident(FORWARD_TRIGGER)}"
        runs = []
        try:
            for rnd in range(rounds):
                for mode in MODES[rnd % len(MODES):] + MODES[:rnd % len(MODES)]:
                    b.sql(dsn, trigger.format("ENABLE ALWAYS" if mode in ("log", "async") else "DISABLE"))
                    b.sql(dsn, _DISCARD, fetch=True)  # the slot starts at this run
                    b.sql(dsn, "CHECKPOINT")
                    reads = {"async": [replay], "decode": [_DECODE], "logical": [_INGEST, replay]}.get(mode)
                    consumer = Consumer(dsn, reads, full=1000) if reads else None
                    r = b.pgbench(dsn, seconds, rows)
                    t0 = time.monotonic()
                    if consumer is not None:
                        consumer.catch_up()
                        consumer.stop()
                    else:
                        while b.sql(dsn, replay, fetch=True)[0][0]:  # log: the replay's work, afterwards
                            pass
                    behind = time.monotonic() - t0
                    run = {"round": rnd + 1, "mode": mode, "tps": round(r["tps"], 1),
                           "sustained_tps": round(r["tps"] * seconds / (seconds + behind), 1),
                           "catch_up_s": round(behind, 2)}
                    runs.append(run)
                    say(f"  {mode}: {run['tps']:.0f} tps, {run['sustained_tps']:.0f} sustained "
                        f"(caught up in {behind:.1f} s)")
                    while b.sql(dsn, replay, fetch=True)[0][0]:
                        pass
                    # The same start for every run: pgbench's rows go, both tables vacuumed.
                    b.sql(dsn, trigger.format("DISABLE"))
                    b.sql(dsn, f"DELETE FROM {TABLE} WHERE id > %s", (rows,))
                    b.sql(dsn, "DELETE FROM public.orders_partitioned WHERE id > %s", (rows,))
                    b.sql(dsn, _DISCARD, fetch=True)
                    b.vacuum(dsn)
                    b.sql(dsn, "VACUUM (ANALYZE) public.orders_partitioned")
        finally:
            b.sql(dsn, f"SELECT pg_catalog.pg_drop_replication_slot('{SLOT}')")
    out["load_after"] = os.getloadavg()[0]
    out["runs"] = runs
    for fig in ("tps", "sustained_tps"):
        med = {m: statistics.median(x[fig] for x in runs if x["mode"] == m) for m in MODES}
        out[f"median_{fig}"] = med
        out[f"ratio_{fig}"] = {m: round(v / med["without"], 3) if med["without"] else 0.0 for m, v in med.items()}
    return out


def render_markdown(res: dict) -> str:
    lines = ["# Async capture: the change log against logical decoding", "",
             "Written by `orchestrate bench --decoding` (see orchestrator/lab/bench_decoding.py for what "
             "each mode is). pgbench, 4 clients, one INSERT and one UPDATE per transaction, "
             f"{res['seconds_per_run']:g} s per run, {res['rounds']} rounds in rotating order; medians; "
             "wal_level = logical in every mode. Sustained: also counting the time the consumer needed "
             "to catch up after pgbench stopped.", "",
             f"Rows: {res['rows']:,}. PostgreSQL {res['postgres']}. Machine: {res['machine'].get('cores')} core(s), "
             f"{res['machine'].get('cpu_model')}; load average {res['load_before']:.1f} before, "
             f"{res['load_after']:.1f} after.", "",
             "| mode | tps | vs none | sustained tps | vs none |", "|---|---|---|---|---|"]
    for m in MODES:
        lines.append(f"| {m} | {res['median_tps'][m]:,.0f} | {res['ratio_tps'][m]:.2f}x | "
                     f"{res['median_sustained_tps'][m]:,.0f} | {res['ratio_sustained_tps'][m]:.2f}x |")
    return "\n".join(lines) + "\n"
