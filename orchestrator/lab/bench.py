"""`orchestrate bench`: the costs of a migration, measured side by side in one run.

One command starts its own throwaway PostgreSQL (``LocalCluster``, no replica), builds
the sample ``orders`` table (``sample.create_orders``: realistic width, primary key and
four secondary indexes) and measures, always next to a baseline taken in the same run:

1. backfill: the ceiling (one ``INSERT INTO twin SELECT ... FROM orders`` into the
   migration's own partitioned twin, same partitions and indexes) against orchestrate's
   backfill (no throttling) with one worker and with two; pg_partman's
   ``partition_data_proc`` on a copy of the same rows when the extension is installed;
2. dual-write overhead: pgbench, 4 clients, one INSERT + one UPDATE per transaction,
   without and with the capture trigger, alternated (A B A B), medians;
3. cutover: how long ACCESS EXCLUSIVE was held, and the worst pgbench write latency
   across the cutover, against the plan's lock_timeout;
4. verification rate and the orchestrator's own peak RSS (each ``orchestrate apply``
   runs as a child process; its ru_maxrss comes from wait4) at N and 5N rows.

Results go to ``benchmarks.json`` (machine-readable) and ``benchmarks.md`` in the
output directory, with the machine, the PostgreSQL version and the date. The server
runs with the harness's settings (fsync=off, full_page_writes=off): these figures are
CPU and memory costs, not storage costs.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import psycopg
import yaml

from orchestrator.errors import OrchestrateError
from orchestrator.lab.sample import create_orders
from orchestrator.phases import FORWARD_TRIGGER
from orchestrator.plan import parse_duration, parse_plan
from orchestrator.sql import ident
from orchestrator.sql.compose import cols, text

TABLE = "public.orders"

#: Server settings on top of the harness's: fewer, predictable checkpoints.
SERVER_SETTINGS = {
    "max_wal_size": "8GB",
    "checkpoint_timeout": "30min",
    "maintenance_work_mem": "256MB",
}

TARGETS = {
    "backfill_single": 0.85,
    "backfill_two_workers": 1.0,
    "dual_write": 0.80,
    "async_capture": 0.90,
    "cutover_lock_ms": 100.0,
    "latency_margin_ms": 100.0,
    "peak_rss_mb": 150.0,
    "verify_vs_backfill": 3.0,
    "cutover_lock_ms_1000_partitions": 30.0,
    "cutover_partition_scaling": 4.0,
}

#: The cutover-scaling run: the same small table cut over with about 40 and about 1,000
#: partitions (interval, expected partitions), so the hold is measured against the count alone.
PARTITION_COUNTS = (("25 days", 40), ("1 day", 1000))

PGBENCH_SCRIPT = """\\set id random(1, :maxid)
\\set cust random(1, 100000)
BEGIN;
INSERT INTO public.orders (customer_id, status, amount, currency, note, payload, created_at)
  VALUES (:cust, 'new', 12.50, 'EUR', 'bench', '{"items": 1, "channel": "web"}', now());
UPDATE public.orders SET amount = amount + 1, updated_at = now() WHERE id = :id;
END;
"""


class BenchError(OrchestrateError):
    """The benchmark could not run a step."""


# --------------------------------------------------------------------------- helpers


def machine_info() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram_gb = None
    try:
        m = re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text())
        ram_gb = round(int(m.group(1)) / 1024 / 1024, 1) if m else None
    except OSError:
        pass
    return {"cpu_model": cpu, "cores": os.cpu_count(), "ram_gb": ram_gb,
            "os": f"{platform.system()} {platform.release()}", "python": platform.python_version()}


def _rate(rows: int, seconds: float) -> float:
    return round(rows / seconds, 1) if seconds > 0 else 0.0


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


class LoadSampler(threading.Thread):
    """Samples the 1-minute load average: a shared machine makes every figure noisy."""

    def __init__(self, every_s: float = 2.0):
        super().__init__(daemon=True, name="bench-load")
        self.every_s = every_s
        self.samples: list[float] = []
        self._stop_event = threading.Event()

    @staticmethod
    def read() -> float | None:
        try:
            return float(Path("/proc/loadavg").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def run(self) -> None:
        while not self._stop_event.wait(self.every_s):
            v = self.read()
            if v is not None:
                self.samples.append(v)

    def stop(self) -> dict:
        self._stop_event.set()
        self.join(timeout=5)
        s = self.samples or [self.read() or 0.0]
        cores = os.cpu_count() or 1
        mean = statistics.mean(s)
        return {"loadavg_1m_mean": round(mean, 2), "loadavg_1m_max": round(max(s), 2), "cores": cores,
                # The load average counts the benchmark's own clients and server processes
                # (up to ~4 busy at once): judged on the mean, not on one peak.
                "quiet": mean <= cores + 0.5}


HELD = "async, replay waits on load"


class _HeldReplay:
    """apply's Replayer (orchestrator/changelog.py) under a Throttler whose one signal, a flag
    file, is present for the whole run: an operator (or a cron job) marking peak hours. The
    server's own figures (max_active_sessions, the throttle query, replica lag) hold it the
    same way; on this machine pgbench's client shares the 2 cores, so its sessions mostly wait
    for it (idle in transaction) and a count of active sessions does not see the load.
    stop() returns the changes it replayed."""

    def __init__(self, dsn: str, plan, mid: int, flag: Path):
        from types import SimpleNamespace

        from orchestrator.changelog import Replayer
        from orchestrator.plan import Throttle
        from orchestrator.sql import QualifiedName
        from orchestrator.throttle import Throttler

        self.flag = flag
        flag.touch()
        ctx = SimpleNamespace(dsn=dsn, plan=plan, function=lambda kind: QualifiedName("orchestrate", f"{kind}_{mid}"))
        self.throttle = Throttler(Throttle(flag_file=str(flag), heartbeat=False), dsn)
        self.replayer = Replayer(ctx, plan.capture.replay_batch, throttle=self.throttle).start()
        self.waited_s = 0.0

    def stop(self) -> int:
        self.replayer.stop()
        self.throttle.stop()
        self.flag.unlink(missing_ok=True)
        self.waited_s = self.replayer.waited_s
        return self.replayer.replayed


class Consumer:
    """A session looping over ``statements`` beside pgbench (each returns how many changes it
    took: a count, or an INSERT's row count), napping briefly when a loop took fewer than
    ``full``; ``idle`` once a whole loop found nothing. Async capture's replay as apply runs it,
    and bench --decoding's slot readers; stop() returns the changes taken."""

    def __init__(self, dsn: str, statements: list[str], full: int = 2000):
        self.dsn, self.statements, self.full = dsn, statements, full
        self.consumed, self.idle = 0, False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-consumer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while not self._stop.is_set():
                got = 0
                for s in self.statements:
                    cur = conn.execute(s)
                    got += cur.rowcount if s.startswith("INSERT") else int(cur.fetchone()[0] or 0)
                self.consumed += got
                self.idle = got == 0
                if got < self.full:
                    self._stop.wait(0.05)

    def catch_up(self, timeout_s: float = 600) -> None:
        """Wait until a whole loop found nothing left."""
        self.idle = False
        deadline = time.monotonic() + timeout_s
        while not self.idle and time.monotonic() < deadline:
            time.sleep(0.02)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(timeout=60)
        return self.consumed


class Bench:
    """One benchmark run against its own local cluster."""

    def __init__(self, rows: int, quick: bool, workdir: Path, say=print, pg_bin: str | None = None):
        self.rows = rows
        self.quick = quick
        self.workdir = workdir
        self._t0 = time.monotonic()
        self.say = lambda msg: say(f"[{time.monotonic() - self._t0:6.1f}s] {msg}")
        self.pg_bin_choice = pg_bin
        self.pgbench_seconds = 2.0 if quick else 10.0
        self.cutover_window_s = 6.0 if quick else 12.0
        self.big_rows = rows * (2 if quick else 5)
        self.results: dict = {}
        self.rss: dict[str, list[float]] = {}
        self.rss_steps: list[dict] = []
        self.plan_data = {
            "version": 1,
            "table": TABLE,
            "partition_by": {"column": "created_at", "interval": "1 month", "premake": 3},
            # Throttling off: no sleeps, nothing watched; batches adapt toward 0.5 s.
            "backfill": {"range": "1 day", "batch_size": 50_000, "sleep_ratio": 0},
            "throttle": {"heartbeat": False},
            "cutover": {"lock_timeout": "200ms"},
        }
        self.plan = parse_plan(self.plan_data, "bench plan")
        self.plan_file = workdir / "plan.yaml"
        self.plan_file.write_text(yaml.safe_dump(self.plan_data, sort_keys=False))
        (workdir / "bench.pgbench").write_text(PGBENCH_SCRIPT)

    # -- plumbing
    def sql(self, dsn: str, query: str, params=None, fetch: bool = False):
        with psycopg.connect(dsn, autocommit=True) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if fetch else None

    def timed_sql(self, dsn: str, statements: list[str]) -> float:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CHECKPOINT")
            t0 = time.monotonic()
            with conn.transaction():
                conn.execute("SET LOCAL synchronous_commit = off")
                for s in statements:
                    conn.execute(s)
            return time.monotonic() - t0

    def split_copies(self, dsn: str, columns: str) -> dict:
        """The ceiling's copy split into the backfill's ranges, one INSERT .. SELECT and one
        transaction per range: without row locks, then with FOR SHARE. Together with the
        ceiling and the backfill they say where the single worker's time goes: the access
        path and per-statement cost of ranges, the race-free lock, the engine's own work."""
        interval = self.plan_data["backfill"]["range"]
        out = {}
        with psycopg.connect(dsn, autocommit=True) as conn:
            ranges = conn.execute(
                f"SELECT d, d + %s::interval FROM generate_series((SELECT date_trunc('day', min(created_at)) "
                f"FROM {TABLE}), (SELECT max(created_at) FROM {TABLE}), %s::interval) d",
                (interval, interval)).fetchall()
            conn.execute("SET synchronous_commit = off")
            runs: dict[str, list[float]] = {"plain": [], "for_share": []}
            for _round in range(2):  # alternated A B A B: one run of each is too noisy on 2 cores
                for key, lock in (("plain", ""), ("for_share", " FOR SHARE")):
                    conn.execute(f"TRUNCATE {self.plan.twin}")
                    conn.execute("CHECKPOINT")
                    t0 = time.monotonic()
                    for lo, hi in ranges:
                        conn.execute(f"INSERT INTO {self.plan.twin} ({columns}) OVERRIDING SYSTEM VALUE "
                                     f"SELECT {columns} FROM {TABLE} WHERE created_at >= %s AND created_at < %s{lock}",
                                     (lo, hi))
                    runs[key].append(round(time.monotonic() - t0, 3))
                    self.say(f"split into {len(ranges)} ranges, {key}: {runs[key][-1]:.2f}s")
        for key, seconds in runs.items():
            median = statistics.median(seconds)
            out[key] = {"seconds": round(median, 3), "runs": seconds, "rows_per_s": _rate(self.rows, median)}
        out["ranges"] = len(ranges)
        return out

    def apply(self, dsn: str, label: str, *args: str, plan_file: Path | None = None) -> dict:
        """`orchestrate apply` in a child process; returns its JSON outcome and records peak RSS."""
        cmd = [sys.executable, "-m", "orchestrator", "--log-level", "WARNING", "apply",
               str(plan_file or self.plan_file), "--dsn", dsn, "-o", "json", *args]
        out_path = self.workdir / f"apply-{label}-{len(self.rss.get(label, []))}.out"
        with open(out_path, "w+b") as out, open(str(out_path) + ".err", "w+b") as err:
            t0 = time.monotonic()
            proc = subprocess.Popen(cmd, stdout=out, stderr=err, env={**os.environ, "ORCHESTRATE_LOG_FORMAT": "text"})
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            elapsed = time.monotonic() - t0
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
        self.rss.setdefault(label, []).append(usage.ru_maxrss / 1024.0)  # Linux: KiB
        self.rss_steps.append({"run": label, "args": " ".join(args) or "(to the end)",
                               "peak_rss_mb": round(usage.ru_maxrss / 1024.0, 1), "wall_s": round(elapsed, 2)})
        if proc.returncode != 0:
            raise BenchError(f"orchestrate apply {' '.join(args)} failed ({proc.returncode}): "
                             f"{(stderr.strip().splitlines() or ['?'])[-1]}")
        data = json.loads(stdout)
        data["_wall_s"] = elapsed
        return data

    def rollback(self, dsn: str) -> None:
        from orchestrator.runner import rollback

        rollback(self.plan, dsn)

    def phase(self, dsn: str, name: str) -> dict:
        rows = self.sql(dsn, "SELECT p.seconds, p.detail FROM orchestrate.phases p "
                             "JOIN orchestrate.migrations m ON m.id = p.migration_id "
                             "WHERE m.table_name = %s AND p.name = %s ORDER BY m.id DESC LIMIT 1",
                        (str(self.plan.table_name), name), fetch=True)
        if not rows:
            raise BenchError(f"no {name} phase recorded")
        return {"seconds": float(rows[0][0]), "detail": rows[0][1] or {}}

    def batches(self, dsn: str) -> dict:
        """The newest migration's backfill batches and ranges (a span of ranges is one batch)."""
        batches, ranges = self.sql(dsn, "SELECT coalesce(sum(batches), 0), count(*) FROM orchestrate.ranges "
                                        "WHERE migration_id = (SELECT max(id) FROM orchestrate.migrations)",
                                   fetch=True)[0]
        return {"batches": int(batches), "ranges": int(ranges)}

    def cutover_event(self, dsn: str) -> dict:
        rows = self.sql(dsn, "SELECT e.data FROM orchestrate.events e JOIN orchestrate.migrations m "
                             "ON m.id = e.migration_id WHERE m.table_name = %s AND e.kind = 'cutover' "
                             "ORDER BY e.id DESC LIMIT 1", (str(self.plan.table_name),), fetch=True)
        return rows[0][0] if rows else {}

    def twin_columns(self, dsn: str) -> str:
        with psycopg.connect(dsn, autocommit=True) as conn:
            names = [r[0] for r in conn.execute(
                "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 "
                "AND NOT attisdropped AND attgenerated = '' ORDER BY attnum", (TABLE,)).fetchall()]
        return text(cols(names))

    def count(self, dsn: str, table: str) -> int:
        return self.sql(dsn, f"SELECT count(*) FROM {table}", fetch=True)[0][0]

    def vacuum(self, dsn: str) -> None:
        self.sql(dsn, f"VACUUM ANALYZE {TABLE}")

    # -- pgbench
    def pgbench(self, dsn: str, seconds: float, maxid: int, log_prefix: Path | None = None) -> dict:
        cmd = [str(self.pg_bin / "pgbench"), "-n", "-c", "4", "-j", "2", "-T", str(max(1, round(seconds))),
               "-f", str(self.workdir / "bench.pgbench"), "-D", f"maxid={maxid}"]
        if log_prefix is not None:
            cmd += ["-l", f"--log-prefix={log_prefix}"]
        cmd.append(dsn)
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=self.workdir, timeout=seconds + 120)
        out = res.stdout + res.stderr
        m = re.search(r"tps = ([\d.]+) \(without initial connection time\)", out) or re.search(r"tps = ([\d.]+)", out)
        failed = re.search(r"number of failed transactions: (\d+)", out)
        aborted = "aborted" in out
        if res.returncode not in (0, 2) or not m:  # 2: some clients aborted (reported below)
            raise BenchError(f"pgbench failed ({res.returncode}): {out.strip()[-400:]}")
        processed = re.search(r"number of transactions actually processed: (\d+)", out)
        return {"tps": float(m.group(1)), "transactions": int(processed.group(1)) if processed else None,
                "failed": int(failed.group(1)) if failed else 0, "clients_aborted": aborted,
                "exit_code": res.returncode, "tail": out.strip().splitlines()[-3:] if aborted else []}

    @staticmethod
    def latencies(log_prefix: Path) -> list[tuple[float, float]]:
        """(epoch seconds at the end of the transaction, latency ms) from pgbench's logs."""
        out = []
        for f in log_prefix.parent.glob(log_prefix.name + ".*"):
            for line in f.read_text().splitlines():
                parts = line.split()
                if len(parts) >= 6 and parts[2].isdigit():
                    out.append((int(parts[4]) + int(parts[5]) / 1e6, int(parts[2]) / 1000.0))
        return out

    # -- the run
    def run(self) -> dict:
        sampler = LoadSampler()
        sampler.start()
        try:
            return self._run()
        finally:
            self.results["load"] = sampler.stop()

    def _run(self) -> dict:
        from orchestrator.lab.cluster import LocalCluster, find_pg_bin

        started = time.monotonic()
        with LocalCluster(pg_bin=find_pg_bin(self.pg_bin_choice), replica=False, settings=SERVER_SETTINGS) as cl:
            self.pg_bin = cl.pg_bin
            dsn = cl.create_database("bench")
            version = self.sql(dsn, "SHOW server_version", fetch=True)[0][0]
            settings = dict(self.sql(dsn, "SELECT name, setting FROM pg_settings WHERE name = ANY(%s)",
                                     (["fsync", "full_page_writes", "synchronous_commit", "shared_buffers",
                                       "max_wal_size", "autovacuum", "wal_level"],), fetch=True))
            self.results.update({
                "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "machine": machine_info(),
                "postgres": {"version": version, "settings": settings},
                "rows": self.rows, "quick": self.quick,
                "plan": self.plan_data,
            })
            self.say(f"PostgreSQL {version}; building {self.rows:,} rows")
            with psycopg.connect(dsn, autocommit=True) as conn:
                create_orders(conn, TABLE, rows=self.rows, days=365)
            self.vacuum(dsn)
            self.results["backfill"] = backfill = {"rows": self.rows}
            backfill["pg_partman"] = self.partman(dsn)

            # Migration 1: ceiling #1, then the single-worker backfill.
            self.apply(dsn, "m1", "--until", "prepare")
            cols = self.twin_columns(dsn)
            ceiling_sql = (f"INSERT INTO {self.plan.twin} ({cols}) OVERRIDING SYSTEM VALUE "
                           f"SELECT {cols} FROM {TABLE}")
            ceilings = []
            c1 = self.timed_sql(dsn, [ceiling_sql])
            ceilings.append({"seconds": round(c1, 3), "rows_per_s": _rate(self.rows, c1)})
            self.say(f"ceiling #1: {c1:.2f}s")
            backfill["split"] = self.split_copies(dsn, cols)
            self.vacuum(dsn)  # the backfill below starts from a vacuumed table, as the ceiling did
            self.sql(dsn, f"TRUNCATE {self.plan.twin}")
            self.apply(dsn, "m1", "--until", "capture")
            self.sql(dsn, "CHECKPOINT")
            self.apply(dsn, "m1", "--until", "backfill", "--workers", "1")
            b1 = self.phase(dsn, "backfill")
            b1.update(self.batches(dsn))
            self.say(f"backfill, 1 worker: {b1['seconds']:.2f}s")

            # Dual-write overhead on the full twin: the trigger's UPDATE finds its row.
            self.results["dual_write"] = self.dual_write(dsn)
            self.rollback(dsn)
            self.sql(dsn, f"DELETE FROM {TABLE} WHERE id > %s", (self.rows,))
            self.vacuum(dsn)
            # The same pgbench with async capture (change log + replay in this server).
            self.results["dual_write"]["async"] = self.async_capture(dsn)
            self.sql(dsn, f"DELETE FROM {TABLE} WHERE id > %s", (self.rows,))
            self.vacuum(dsn)

            # Migration 2: ceiling #2, two workers, verify, cutover under pgbench.
            self.apply(dsn, "m2", "--until", "prepare")
            c2 = self.timed_sql(dsn, [ceiling_sql])
            ceilings.append({"seconds": round(c2, 3), "rows_per_s": _rate(self.rows, c2)})
            self.say(f"ceiling #2: {c2:.2f}s")
            self.sql(dsn, f"TRUNCATE {self.plan.twin}")
            self.apply(dsn, "m2", "--until", "capture")
            self.sql(dsn, "CHECKPOINT")
            self.apply(dsn, "m2", "--until", "backfill", "--workers", "2")
            b2 = self.phase(dsn, "backfill")
            b2.update(self.batches(dsn))
            self.say(f"backfill, 2 workers: {b2['seconds']:.2f}s")
            self.apply(dsn, "m2", "--until", "verify")
            v = self.phase(dsn, "verify")
            self.results["cutover"] = self.cutover(dsn)

            ceiling_rate = statistics.median(c["rows_per_s"] for c in ceilings)
            backfill["ceiling"] = {"runs": ceilings, "rows_per_s": round(ceiling_rate, 1),
                                   "seconds": round(self.rows / ceiling_rate, 3),
                                   "what": "one INSERT INTO twin SELECT ... FROM orders (median of 2)"}
            for key, ph, workers, target, adj in (
                    ("single_worker", b1, 1, TARGETS["backfill_single"], ceilings[0]),
                    ("two_workers", b2, 2, TARGETS["backfill_two_workers"], ceilings[1])):
                rate = _rate(self.rows, ph["seconds"])
                ratio = round(rate / ceiling_rate, 3)
                backfill[key] = {"workers": workers, "seconds": round(ph["seconds"], 3), "rows_per_s": rate,
                                 "rows_copied": ph["detail"].get("rows"), "batches": ph["batches"],
                                 "ranges": ph["ranges"], "ratio": ratio, "target": target,
                                 "pass": ratio >= target,
                                 "ratio_to_adjacent_ceiling": round(rate / adj["rows_per_s"], 3)}
            for x in (backfill["split"]["plain"], backfill["split"]["for_share"]):
                x["ratio"] = round(x["rows_per_s"] / ceiling_rate, 3)
            if backfill["pg_partman"].get("seconds"):
                pm = backfill["pg_partman"]
                pm["ratio"] = round(pm["rows_per_s"] / ceiling_rate, 3)

            sizes = [{"rows": self.rows, "verify_seconds": round(v["seconds"], 3),
                      "verify_rows_per_s": _rate(int(v["detail"].get("rows") or self.rows), v["seconds"]),
                      "peak_rss_mb": round(max(self.rss["m2"]), 1)}]
            self.say(f"building {self.big_rows:,} rows for the RSS / verify scaling run")
            big = cl.create_database("bench_big")
            with psycopg.connect(big, autocommit=True) as conn:
                create_orders(conn, TABLE, rows=self.big_rows, days=365)
            self.vacuum(big)
            for step in ("prepare", "capture", "backfill", "verify"):
                self.apply(big, "big", "--until", step, *(["--workers", "2"] if step == "backfill" else []))
            self.apply(big, "big")
            vb = self.phase(big, "verify")
            sizes.append({"rows": self.big_rows, "verify_seconds": round(vb["seconds"], 3),
                          "verify_rows_per_s": _rate(int(vb["detail"].get("rows") or self.big_rows), vb["seconds"]),
                          "peak_rss_mb": round(max(self.rss["big"]), 1)})
            peak = max(s["peak_rss_mb"] for s in sizes)
            growth = round(sizes[1]["peak_rss_mb"] / sizes[0]["peak_rss_mb"], 3)
            self.results["verify_speed"] = {
                "backfill_seconds": round(b1["seconds"], 3), "verify_seconds": round(v["seconds"], 3),
                "verify_workers": v["detail"].get("workers"),
                "ratio": round(b1["seconds"] / v["seconds"], 2) if v["seconds"] else 0.0,
                "target": TARGETS["verify_vs_backfill"],
                "what": "the 1-worker backfill's seconds / verify's seconds (plan defaults), same table"}
            vs = self.results["verify_speed"]
            vs["pass"] = vs["ratio"] >= TARGETS["verify_vs_backfill"]
            self.results["cutover_scaling"] = self.cutover_scaling(cl)
            self.results["verify_rss"] = {
                "sizes": sizes, "peak_rss_mb": peak, "rss_growth": growth,
                "flat": growth <= 1.10, "target_mb": TARGETS["peak_rss_mb"], "pass": peak < TARGETS["peak_rss_mb"],
                "how": "ru_maxrss of each `orchestrate apply` child (os.wait4); max over prepare..cutover",
                "steps": self.rss_steps,
            }
        self.results["duration_s"] = round(time.monotonic() - started, 1)
        self.results["targets"] = self.targets()
        return self.results

    def cutover_scaling(self, cl) -> dict:
        """The ACCESS EXCLUSIVE hold of the same table's cutover at ~40 and ~1,000 partitions.

        One table of 1,000 days; a plan per partition width; each migration runs to the end
        and is rolled back before the next, so both swaps see the same rows and indexes."""
        rows = 20_000 if self.quick else 100_000
        dsn = cl.create_database("bench_parts")
        with psycopg.connect(dsn, autocommit=True) as conn:
            create_orders(conn, TABLE, rows=rows, days=1000)
            start = conn.execute(f"SELECT min(created_at)::date::text FROM {TABLE}").fetchone()[0]
        self.vacuum(dsn)
        runs = []
        for interval, expected in PARTITION_COUNTS:
            data = {**self.plan_data,
                    "partition_by": {"column": "created_at", "interval": interval, "premake": 1, "start": start,
                                     "max_partitions": 1200},
                    "backfill": {**self.plan_data["backfill"], "range": interval}}
            plan_file = self.workdir / f"plan-{expected}.yaml"
            plan_file.write_text(yaml.safe_dump(data, sort_keys=False))
            self.apply(dsn, f"parts-{expected}", plan_file=plan_file)
            parts = self.sql(dsn, f"SELECT count(*) FROM pg_inherits WHERE inhparent = '{TABLE}'::regclass",
                             fetch=True)[0][0]
            held = float(self.phase(dsn, "cutover")["detail"].get("lock_held_ms") or 0)
            runs.append({"interval": interval, "partitions": parts, "lock_held_ms": round(held, 1)})
            self.say(f"cutover at {parts} partitions: ACCESS EXCLUSIVE held {held:.1f} ms")
            from orchestrator.runner import rollback

            rollback(parse_plan(data, "bench plan"), dsn)
        small, large = runs
        ratio = round(large["lock_held_ms"] / small["lock_held_ms"], 2) if small["lock_held_ms"] else 0.0
        return {"rows": rows, "runs": runs, "ratio": ratio, "target_ratio": TARGETS["cutover_partition_scaling"],
                "target_ms": TARGETS["cutover_lock_ms_1000_partitions"],
                "pass_ms": large["lock_held_ms"] < TARGETS["cutover_lock_ms_1000_partitions"],
                "pass_ratio": ratio <= TARGETS["cutover_partition_scaling"]}

    def partman(self, dsn: str) -> dict:
        avail = self.sql(dsn, "SELECT default_version FROM pg_available_extensions WHERE name = 'pg_partman'",
                         fetch=True)
        if not avail:
            return {"status": "not installed"}
        src, parent = "public.orders_partman_src", "public.orders_partman"
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE SCHEMA partman")
            conn.execute("CREATE EXTENSION pg_partman SCHEMA partman")
            pm_version = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'pg_partman'").fetchone()[0]
            conn.execute(f"CREATE TABLE {src} AS SELECT * FROM {TABLE}")
            conn.execute(f"ALTER TABLE {src} ADD PRIMARY KEY (id)")
            conn.execute(f"CREATE INDEX ON {src} (created_at)")
            conn.execute(f"VACUUM ANALYZE {src}")
            conn.execute(f"CREATE TABLE {parent} (LIKE {TABLE} INCLUDING DEFAULTS INCLUDING CONSTRAINTS) "
                         "PARTITION BY RANGE (created_at)")
            # The same indexes as orchestrate's twin: the primary key gains the partition key.
            conn.execute(f"ALTER TABLE {parent} ADD PRIMARY KEY (id, created_at)")
            conn.execute(f"CREATE INDEX ON {parent} (created_at)")
            conn.execute(f"CREATE INDEX ON {parent} (customer_id)")
            conn.execute(f"CREATE INDEX ON {parent} (status) WHERE status IN ('new', 'paid')")
            conn.execute(f"CREATE INDEX ON {parent} (customer_id, created_at)")
            start = conn.execute(f"SELECT date_trunc('month', min(created_at))::text FROM {src}").fetchone()[0]
            conn.execute("SELECT partman.create_parent(%s, 'created_at', 'native', 'monthly', p_premake := 3, "
                         "p_start_partition := %s, p_jobmon := false)", (parent, start))
            conn.execute("CHECKPOINT")
            t0 = time.monotonic()
            conn.execute("SET synchronous_commit = off")
            conn.execute("CALL partman.partition_data_proc(%s, p_interval := '1 day', p_wait := 0, "
                         "p_source_table := %s, p_quiet := true)", (parent, src))
            secs = time.monotonic() - t0
            conn.execute("RESET synchronous_commit")
            moved = conn.execute(f"SELECT count(*) FROM {parent}").fetchone()[0]
            conn.execute(f"DROP TABLE {parent}, {src} CASCADE")
            conn.execute("DELETE FROM partman.part_config WHERE parent_table = %s", (parent,))
            for t in conn.execute("SELECT n.nspname || '.' || c.relname FROM pg_class c JOIN pg_namespace n "
                                  "ON n.oid = c.relnamespace WHERE n.nspname = 'partman' AND c.relkind = 'r' "
                                  "AND c.relname LIKE 'template_%'").fetchall():
                conn.execute(f"DROP TABLE IF EXISTS {t[0]}")
        self.say(f"pg_partman {pm_version}: {secs:.2f}s for {moved:,} rows")
        return {"status": f"pg_partman {pm_version}", "seconds": round(secs, 3), "rows": moved,
                "rows_per_s": _rate(moved, secs),
                "what": "partition_data_proc(p_interval '1 day', p_wait 0) from a copy of the table "
                        "(moves rows: DELETE ... RETURNING + INSERT per day)"}

    def dual_write(self, dsn: str) -> dict:
        runs = []
        for i, mode in enumerate(("without", "with", "without", "with")):
            state = "ENABLE" if mode == "with" else "DISABLE"
            self.sql(dsn, f"ALTER TABLE {TABLE} {state} TRIGGER {ident(FORWARD_TRIGGER)}")
            self.sql(dsn, "CHECKPOINT")
            r = self.pgbench(dsn, self.pgbench_seconds, self.rows)
            runs.append({"round": i // 2 + 1, "trigger": mode, "tps": r["tps"], "failed": r["failed"]})
            self.say(f"pgbench {mode} trigger: {r['tps']:.0f} tps")
        self.sql(dsn, f"ALTER TABLE {TABLE} DISABLE TRIGGER {ident(FORWARD_TRIGGER)}")
        without = statistics.median(r["tps"] for r in runs if r["trigger"] == "without")
        with_ = statistics.median(r["tps"] for r in runs if r["trigger"] == "with")
        ratio = round(with_ / without, 3) if without else 0.0
        return {"clients": 4, "seconds_per_run": self.pgbench_seconds, "runs": runs,
                "tps_without_trigger": round(without, 1), "tps_with_trigger": round(with_, 1), "ratio": ratio,
                "target": TARGETS["dual_write"], "pass": ratio >= TARGETS["dual_write"],
                "script": "BEGIN; INSERT one order; UPDATE a random existing order by id; END",
                "state": "after backfill (the twin holds every row, so the trigger's UPDATE finds it)"}

    def async_capture(self, dsn: str) -> dict:
        """pgbench with no capture, an empty trigger, sync capture, async capture and async
        capture with its replay waiting on the load, alternated A B C D E three times (twice with
        --quick), on one migration of its own (capture.mode async, backfilled), so they share the
        table, the twin and the moment. Sync: the dual-write trigger as capture installs it (under
        another name). Async: while its trigger is on, a replay loop like apply's
        (orchestrator/changelog.py) runs in the same server, and the log is drained after each
        run, so the figure includes the replay's cost."""
        from orchestrator.inspect import inspect_table
        from orchestrator.phases import Context
        from orchestrator.sql import QualifiedName
        from orchestrator.sql.sync import create_sync_triggers, sync_function

        data = {**self.plan_data, "capture": {"mode": "async"}}
        plan = parse_plan(data, "bench plan")
        plan_file = self.workdir / "plan-async.yaml"
        plan_file.write_text(yaml.safe_dump(data, sort_keys=False))
        for step in ("prepare", "capture", "backfill"):
            self.apply(dsn, "async", "--until", step, plan_file=plan_file)
        mid = int(self.sql(dsn, "SELECT max(id) FROM orchestrate.migrations", fetch=True)[0][0])
        replay = f"SELECT orchestrate.replay_{mid}(2000)"
        sync_fn, sync_trigger = QualifiedName("orchestrate", f"bench_sync_{mid}"), "orchestrate_bench_sync"
        empty_fn, empty_trigger = QualifiedName("orchestrate", f"bench_empty_{mid}"), "orchestrate_bench_empty"
        with psycopg.connect(dsn, autocommit=True) as conn:
            shape = Context(plan=plan, dsn=dsn, conn=conn, store=None,  # type: ignore[arg-type]
                            migration=None).shape(inspect_table(conn, plan.table_name))
            conn.execute(sync_function(sync_fn, plan.twin, shape))
            for stmt in create_sync_triggers(plan.table_name, sync_trigger, sync_fn, sync_fn)[:1]:
                conn.execute(stmt)
            # The floor of any trigger-based capture: a PL/pgSQL row trigger declared like
            # capture's (AFTER, FOR EACH ROW, search_path pinned) whose body does nothing.
            conn.execute(f"CREATE FUNCTION {empty_fn}() RETURNS trigger LANGUAGE plpgsql "
                         "SET search_path = pg_catalog, pg_temp AS $$BEGIN RETURN NULL; END$$")
            conn.execute(f"CREATE TRIGGER {ident(empty_trigger)} AFTER INSERT OR UPDATE OR DELETE ON {TABLE} "
                         f"FOR EACH ROW EXECUTE FUNCTION {empty_fn}()")
        # "async, replay waits on load": the same trigger, replayed by apply's own Replayer
        # under a throttle that holds it (capture.replay_throttled; _HeldReplay): what the
        # writers pay in their own transactions while the twin's writes wait for a quieter moment.
        triggers = {"without": (), "empty trigger": (empty_trigger,), "sync": (sync_trigger,),
                    "async": (FORWARD_TRIGGER,), HELD: (FORWARD_TRIGGER,)}
        runs = []
        try:
            rounds = 2 if self.quick else 3
            for i, mode in enumerate(tuple(triggers) * rounds):
                for name in (sync_trigger, FORWARD_TRIGGER, empty_trigger):
                    state = "ENABLE ALWAYS" if name in triggers[mode] else "DISABLE"
                    self.sql(dsn, f"ALTER TABLE {TABLE} {state} TRIGGER {ident(name)}")
                # The previous run's dead rows (its updates, the drained log's upserts) are
                # vacuumed now, so no autovacuum worker takes the CPUs during this run.
                self.sql(dsn, f"VACUUM {TABLE}, {plan.twin}, public.orders_changes")
                self.sql(dsn, "CHECKPOINT")
                loop: Consumer | _HeldReplay | None = None
                if mode == "async":
                    loop = Consumer(dsn, [replay])
                elif mode == HELD:
                    loop = _HeldReplay(dsn, plan, mid, self.workdir / "peak")
                try:
                    r = self.pgbench(dsn, self.pgbench_seconds, self.rows)
                finally:
                    replayed = loop.stop() if loop else 0
                pending = self.count(dsn, "public.orders_changes")
                runs.append({"round": i // len(triggers) + 1, "capture": mode, "tps": r["tps"], "failed": r["failed"],
                             "replayed_during_run": replayed, "pending_after_run": pending,
                             "replay_waited_s": round(getattr(loop, "waited_s", 0.0), 1)})
                self.say(f"pgbench {mode} capture: {r['tps']:.0f} tps" +
                         (f" (replayed {replayed:,} changes, {pending:,} pending at the end)" if loop else ""))
                while self.sql(dsn, replay, fetch=True)[0][0]:
                    pass
        finally:
            from orchestrator.runner import rollback

            self.sql(dsn, f"DROP TRIGGER IF EXISTS {ident(sync_trigger)} ON {TABLE}")
            self.sql(dsn, f"DROP TRIGGER IF EXISTS {ident(empty_trigger)} ON {TABLE}")
            self.sql(dsn, f"DROP FUNCTION IF EXISTS {sync_fn}()")
            self.sql(dsn, f"DROP FUNCTION IF EXISTS {empty_fn}()")
            rollback(plan, dsn)
        med = {m: statistics.median(r["tps"] for r in runs if r["capture"] == m) for m in triggers}
        ratio = round(med["async"] / med["without"], 3) if med["without"] else 0.0
        held = med[HELD]
        empty = med["empty trigger"]
        return {"runs": runs, "tps_without": round(med["without"], 1), "tps_sync": round(med["sync"], 1),
                "tps_async": round(med["async"], 1), "ratio": ratio, "tps_async_held": round(held, 1),
                "held_ratio": round(held / med["without"], 3) if med["without"] else 0.0,
                "tps_empty_trigger": round(empty, 1),
                "empty_trigger_ratio": round(empty / med["without"], 3) if med["without"] else 0.0,
                "sync_ratio": round(med["sync"] / med["without"], 3) if med["without"] else 0.0,
                "target": TARGETS["async_capture"], "pass": ratio >= TARGETS["async_capture"],
                "replay": "one session, batches of 2,000 log rows, looping while pgbench runs"}

    def cutover(self, dsn: str) -> dict:
        prefix = self.workdir / "cutover-lat"
        result: dict = {}

        def bench() -> None:
            result["pgbench"] = self.pgbench(dsn, self.cutover_window_s, self.rows, log_prefix=prefix)

        t = threading.Thread(target=bench)
        t0 = time.time()
        t.start()
        time.sleep(1.0)
        c0 = time.time()
        self.apply(dsn, "m2")  # verified: this runs the cutover
        c1 = time.time()
        t.join()
        t1 = time.time()
        if "pgbench" not in result:
            raise BenchError("pgbench across the cutover did not finish")
        lats = self.latencies(prefix)
        if not lats:
            raise BenchError("pgbench wrote no latency log")
        worst = max(lats, key=lambda x: x[1])
        ordered = sorted(x[1] for x in lats)
        p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
        ev = self.cutover_event(dsn)
        held = float(ev.get("lock_held_ms") or self.phase(dsn, "cutover")["detail"].get("lock_held_ms") or 0)
        lock_timeout_ms = parse_duration(self.plan.cutover.lock_timeout) * 1000
        latency_limit = lock_timeout_ms + TARGETS["latency_margin_ms"]
        attempts = self.sql(dsn, "SELECT count(*) FROM orchestrate.events WHERE kind = 'lock_attempt' "
                                 "AND message LIKE 'cutover%%'", fetch=True)[0][0]
        self.say(f"cutover: lock held {held:.1f} ms, worst write latency {worst[1]:.1f} ms")
        return {
            "rows": self.rows, "lock_held_ms": round(held, 1), "lock_target_ms": TARGETS["cutover_lock_ms"],
            "lock_pass": held < TARGETS["cutover_lock_ms"], "lock_attempts": attempts,
            "lock_timeout_ms": lock_timeout_ms, "worst_write_latency_ms": round(worst[1], 1),
            "p99_write_latency_ms": round(p99, 1), "latency_target_ms": latency_limit,
            "latency_pass": worst[1] < latency_limit,
            "cutover_inside_window": t0 < c0 and c1 < t1 - 0.5,
            "worst_at_s_after_pgbench_start": round(worst[0] - t0, 2),
            "cutover_process_s": [round(c0 - t0, 2), round(c1 - t0, 2)],
            "pgbench": {"tps": result["pgbench"]["tps"], "transactions": len(lats),
                        "failed": result["pgbench"]["failed"], "clients_aborted": result["pgbench"]["clients_aborted"]},
        }

    def targets(self) -> list[dict]:
        r = self.results
        b, d, c, v = r["backfill"], r["dual_write"], r["cutover"], r["verify_rss"]
        return [
            {"name": "backfill, 1 worker / ceiling", "value": b["single_worker"]["ratio"], "target": ">= 0.85x",
             "pass": b["single_worker"]["pass"]},
            {"name": "backfill, 2 workers / ceiling", "value": b["two_workers"]["ratio"], "target": ">= 1.00x",
             "pass": b["two_workers"]["pass"]},
            {"name": "dual-write tps / no trigger", "value": d["ratio"], "target": ">= 0.80x", "pass": d["pass"]},
            {"name": "async capture tps (replay running) / no capture", "value": d["async"]["ratio"],
             "target": ">= 0.90x", "pass": d["async"]["pass"]},
            {"name": f"cutover ACCESS EXCLUSIVE held (ms, {c['rows']:,} rows)", "value": c["lock_held_ms"],
             "target": "< 100 ms", "pass": c["lock_pass"]},
            {"name": "worst write latency across cutover (ms)", "value": c["worst_write_latency_ms"],
             "target": f"< lock_timeout + 100 = {c['latency_target_ms']:.0f} ms", "pass": c["latency_pass"]},
            {"name": "orchestrator peak RSS (MB)", "value": v["peak_rss_mb"], "target": "< 150 MB",
             "pass": v["pass"]},
            {"name": "verify speed: backfill seconds / verify seconds", "value": r["verify_speed"]["ratio"],
             "target": ">= 3.00x", "pass": r["verify_speed"]["pass"]},
            {"name": f"cutover hold at {r['cutover_scaling']['runs'][1]['partitions']} partitions (ms)",
             "value": r["cutover_scaling"]["runs"][1]["lock_held_ms"], "target": "< 30 ms",
             "pass": r["cutover_scaling"]["pass_ms"]},
            {"name": "cutover hold, ~1,000 / ~40 partitions", "value": r["cutover_scaling"]["ratio"],
             "target": "<= 4.00x", "pass": r["cutover_scaling"]["pass_ratio"]},
        ]


# --------------------------------------------------------------------------- output


def _pages_mb(value) -> str:
    return f"{int(value) * 8 // 1024} MB" if str(value).isdigit() else str(value)


def render_markdown(r: dict) -> str:
    m, pg, b, d, c, v = r["machine"], r["postgres"], r["backfill"], r["dual_write"], r["cutover"], r["verify_rss"]
    s = pg["settings"]
    lines = [
        "# Benchmarks",
        "",
        f"Measured by `orchestrate bench{' --quick' if r['quick'] else ''} --rows {r['rows']}` on {r['date']}, "
        f"in one run of {r['duration_s']:.0f} s. Every ratio compares two figures taken in that same run. "
        f"Load average during the run: {(r.get('load') or {}).get('loadavg_1m_mean', '?')} mean, "
        f"{(r.get('load') or {}).get('loadavg_1m_max', '?')} max.",
        "",
        f"- Machine: {m['cpu_model']}, {m['cores']} cores, {m['ram_gb']} GB RAM ({m['os']})",
        f"- PostgreSQL {pg['version']}, a throwaway local cluster: fsync={s.get('fsync')}, "
        f"full_page_writes={s.get('full_page_writes')}, shared_buffers={_pages_mb(s.get('shared_buffers'))}, "
        f"max_wal_size={s.get('max_wal_size')} MB, autovacuum={s.get('autovacuum')}. fsync is off as the "
        "test harness sets it: the figures are CPU and memory costs, not disk flush costs.",
        f"- Table: `sample.create_orders`, {r['rows']:,} rows over 365 days, primary key + 4 secondary "
        "indexes; partitioned by month on `created_at`, backfilled in 1-day ranges.",
        "",
        "## Targets",
        "",
        "| Measure | Value | Target | |",
        "|---|---:|---|---|",
    ]
    for t in r["targets"]:
        val = f"{t['value']:.2f}x" if "/" in t["name"] else f"{t['value']:.1f}"
        lines.append(f"| {t['name']} | {val} | {t['target']} | {verdict(t['pass'])} |")
    lines += [
        "",
        "## 1. Backfill",
        "",
        "| Method | Seconds | Rows/s | vs ceiling (median) | vs the ceiling run just before it |",
        "|---|---:|---:|---:|---:|",
        f"| Ceiling: one `INSERT INTO twin SELECT * FROM orders` (median of {len(b['ceiling']['runs'])}: "
        + ", ".join(f"{x['seconds']:.2f} s" for x in b["ceiling"]["runs"])
        + f") | {b['ceiling']['seconds']:.2f} | {b['ceiling']['rows_per_s']:,.0f} | 1.00x | |",
    ]
    sp = b.get("split")
    if sp:
        for key, label in (("plain", "no row locks"), ("for_share", "FOR SHARE")):
            x = sp[key]
            runs = ", ".join(f"{r:.2f} s" for r in x.get("runs", []))
            lines.append(f"| The same copy split into the backfill's {sp['ranges']} ranges, one statement and one "
                         f"transaction each, {label} (median of {runs}) | {x['seconds']:.2f} | "
                         f"{x['rows_per_s']:,.0f} | {x['ratio']:.2f}x | |")
    for key, label in (("single_worker", "orchestrate backfill, 1 worker"),
                       ("two_workers", "orchestrate backfill, 2 workers")):
        x = b[key]
        spans = f"{x['ranges']} ranges in {x['batches']} batches, " if x.get("batches") else ""
        lines.append(f"| {label} ({spans}FOR SHARE, checkpoint per batch, synchronous_commit off) | "
                     f"{x['seconds']:.2f} | {x['rows_per_s']:,.0f} | {x['ratio']:.2f}x ({verdict(x['pass'])}, target "
                     f"{x['target']:.2f}x) | {x.get('ratio_to_adjacent_ceiling', 0):.2f}x |")
    pm = b["pg_partman"]
    if pm.get("seconds"):
        lines.append(f"| {pm['status']} `partition_data_proc` (1 day, no wait; moves the rows) | {pm['seconds']:.2f} | "
                     f"{pm['rows_per_s']:,.0f} | {pm['ratio']:.2f}x | |")
    else:
        lines.append(f"| pg_partman `partition_data_proc` | {pm['status']} | | | |")
    lines += [
        "",
        "The ceiling copies into the migration's own twin (same partitions, same indexes), with no capture "
        "trigger. The two split rows divide the single worker's gap: ranges read through the key's index, one "
        "statement each (no locks); then the `FOR SHARE` row locks that close the resurrection race. "
        "orchestrate pays its per-batch work (the count or boundary query, the twin probe, the owner's "
        "executor, the checkpoint written in the same transaction) once per batch, not once per range: "
        "adjacent ranges smaller than a batch are copied as one span (README, \"Spans\").",
        "",
        "## 2. Dual-write overhead (pgbench)",
        "",
        f"{d['clients']} clients, {d['seconds_per_run']:.0f} s per run, one INSERT + one UPDATE per transaction, "
        f"{d['state']}; runs alternated A B A B.",
        "",
        "| Run | Capture trigger | tps |",
        "|---:|---|---:|",
    ]
    for i, x in enumerate(d["runs"], 1):
        lines.append(f"| {i} | {x['trigger']} | {x['tps']:,.0f} |")
    lines += [
        f"| median | without | {d['tps_without_trigger']:,.0f} |",
        f"| median | with | {d['tps_with_trigger']:,.0f} |",
        "",
        f"Ratio with / without: **{d['ratio']:.2f}x** ({verdict(d['pass'])}, target {d['target']:.2f}x).",
        "",
        "No capture, sync capture and async capture (`capture: {mode: async}`) side by side: the same script on "
        "a migration of its own, alternated A B C D E, three times (twice with --quick), each run after a VACUUM "
        "of the table, the twin and the log. Async: the trigger only appends keys to the "
        "change log while a replay loop (apply's, one session) syncs them into the twin in the same server; "
        "the log is drained after each run. \"Async, replay waits on load\": the same trigger, replayed by "
        "apply's own replay thread under a throttle that holds it for the run (`capture.replay_throttled`; the "
        "signal is a flag file, as an operator marks peak hours; replica lag, `max_active_sessions` or the "
        "throttle query hold it the same way): the figure is what the writers pay in their own transactions "
        "while the twin's writes wait for a quieter moment. "
        "\"Empty trigger\": a PL/pgSQL row trigger declared like capture's (AFTER, FOR EACH ROW, "
        "search_path pinned) whose body only returns: the floor of any trigger-based capture.",
        "",
        "| Run | Capture | tps | replayed during the run | replay held (s) | pending at its end |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for i, x in enumerate(d["async"]["runs"], 1):
        lines.append(f"| {i} | {x['capture']} | {x['tps']:,.0f} | {x['replayed_during_run']:,} | "
                     f"{x.get('replay_waited_s', 0):g} | {x['pending_after_run']:,} |")
    lines += [
        "",
        f"Ratio async / without: **{d['async']['ratio']:.2f}x** ({verdict(d['async']['pass'])}, target "
        f"{d['async']['target']:.2f}x); sync / without in the same rounds: {d['async']['sync_ratio']:.2f}x; "
        f"async with the replay waiting on the load / without: {d['async'].get('held_ratio', 0):.2f}x; "
        f"an empty trigger / without: {d['async'].get('empty_trigger_ratio', 0):.2f}x.",
        "",
        "## 3. Cutover",
        "",
        "| Measure | Value | Target |",
        "|---|---:|---|",
        f"| ACCESS EXCLUSIVE held ({c['rows']:,} rows) | {c['lock_held_ms']:.1f} ms | < {c['lock_target_ms']:.0f} ms "
        f"({verdict(c['lock_pass'])}) |",
        f"| lock attempts | {c['lock_attempts']} | |",
        f"| worst pgbench write latency across the cutover | {c['worst_write_latency_ms']:.1f} ms | "
        f"< {c['latency_target_ms']:.0f} ms ({verdict(c['latency_pass'])}) |",
        f"| p99 write latency in the same window | {c['p99_write_latency_ms']:.1f} ms | |",
        f"| pgbench in the window | {c['pgbench']['tps']:,.0f} tps, {c['pgbench']['failed']} failed | |",
        "",
        f"lock_timeout is {c['lock_timeout_ms']:.0f} ms. The pgbench script above ran with 4 clients while "
        "`orchestrate apply` cut over; latencies are pgbench's per-transaction log.",
        "",
        "## 4. Verification rate and orchestrator memory",
        "",
        "| Rows | Verify seconds | Verify rows/s | Peak RSS of `orchestrate apply` |",
        "|---:|---:|---:|---:|",
    ]
    for x in v["sizes"]:
        lines.append(f"| {x['rows']:,} | {x['verify_seconds']:.2f} | {x['verify_rows_per_s']:,.0f} | "
                     f"{x['peak_rss_mb']:.1f} MB |")
    lines += [
        "",
        f"RSS at {v['sizes'][1]['rows']:,} / at {v['sizes'][0]['rows']:,} rows: {v['rss_growth']:.2f}x "
        f"({'flat' if v['flat'] else 'NOT flat'}); peak {v['peak_rss_mb']:.1f} MB, target < {v['target_mb']:.0f} MB "
        f"({verdict(v['pass'])}). Rows never pass through Python: verify hashes ranges server side.",
        "",
    ]
    vs, cs = r.get("verify_speed"), r.get("cutover_scaling")
    if vs and cs:
        lines += [
            "## 5. Verify against the backfill, and the cutover against the partition count",
            "",
            f"Verify ({vs['verify_workers']} sessions, plan default) took {vs['verify_seconds']:.2f} s where the "
            f"1-worker backfill of the same table took {vs['backfill_seconds']:.2f} s: **{vs['ratio']:.2f}x** "
            f"({verdict(vs['pass'])}, target {vs['target']:.2f}x).",
            "",
            "| Partitions | Interval | ACCESS EXCLUSIVE held |",
            "|---:|---|---:|",
        ]
        for x in cs["runs"]:
            lines.append(f"| {x['partitions']:,} | {x['interval']} | {x['lock_held_ms']:.1f} ms |")
        lines += [
            "",
            f"The same {cs['rows']:,}-row table, cut over (then rolled back) once per partition width. "
            f"Ratio {cs['ratio']:.2f}x ({verdict(cs['pass_ratio'])}, target <= {cs['target_ratio']:.0f}x); "
            f"hold at the larger count {verdict(cs['pass_ms'])} (target < {cs['target_ms']:.0f} ms).",
            "",
        ]
    load = r.get("load") or {}
    if load and not load.get("quiet"):
        lines += ["## Caveat: a busy machine", "",
                  f"The 1-minute load average during this run was {load['loadavg_1m_mean']:.1f} on average "
                  f"(max {load['loadavg_1m_max']:.1f}) on {load['cores']} cores, above the bench's rule for a quiet "
                  "machine (the cores plus 0.5). Its own pgbench clients, servers and copies load the machine too; if "
                  "other work shared the CPUs, absolute figures are low and ratios noisy. Ratios compare runs of "
                  "this one run, alternated; re-run on a quiet machine for reference numbers.",
                  ""]
    if r.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in r["notes"]] + [""]
    return "\n".join(lines)


def write_outputs(results: dict, output_dir: Path) -> tuple[Path, Path]:
    output_dir.mkdir(parents=True, exist_ok=True)
    jpath, mpath = output_dir / "benchmarks.json", output_dir / "benchmarks.md"
    existing_notes = None
    if jpath.exists():
        try:
            existing_notes = json.loads(jpath.read_text()).get("notes")
        except (OSError, ValueError):
            existing_notes = None
    if existing_notes and "notes" not in results:
        results["notes"] = existing_notes
    jpath.write_text(json.dumps(results, indent=2, default=str) + "\n")
    mpath.write_text(render_markdown(results))
    return jpath, mpath


def run_bench(rows: int, quick: bool, output_dir: Path | None, pg_bin: str | None = None, say=print) -> dict:
    with tempfile.TemporaryDirectory(prefix="orchestrate-bench-") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o755)
        results = Bench(rows, quick, work, say=say, pg_bin=pg_bin).run()
        if output_dir is not None:
            out = output_dir
        elif quick:
            out = Path(tempfile.mkdtemp(prefix="orchestrate-bench-out-"))
        else:
            out = Path("docs")
        jpath, mpath = write_outputs(results, out)
    results["_outputs"] = [str(jpath), str(mpath)]
    return results
