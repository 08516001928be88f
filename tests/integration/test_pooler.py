"""orchestrate and the application behind PgBouncer (Debian's package), started by the tests.

Three poolers in front of the session cluster's primary, all on loopback:
  tx_pooler        transaction mode: orchestrate must refuse it, cleanly, before it records anything
                   (stmt_pooler, statement mode, too);
  session_pooler   session mode with ``server_reset_query = ''``: a pool that hands a server session
                   to the next client exactly as the last one left it, so whatever orchestrate left
                   behind (a setting, a prepared statement, a lock) the next client would see;
  ignoring_pooler  the same, with ``ignore_startup_parameters = options``: it accepts libpq's
                   ``options`` and silently drops them.
The application's side: writers through the transaction pool while orchestrate, connected
directly, migrates the table, with a golden copy written in the writers' own transactions.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg
import pytest
import yaml

from helpers import run_cli
from orchestrator import db
from orchestrator.errors import BadEndpoint
from orchestrator.lab.cluster import LocalCluster
from orchestrator.lab.pooler import LocalPooler, PgBouncerNotFound
from orchestrator.lab.sample import create_orders

END = datetime.now(timezone.utc)
START = (END - timedelta(days=31)).strftime("%Y-%m-01")


def _pooler(cluster: LocalCluster, mode: str, **settings: str) -> Iterator[LocalPooler]:
    try:
        pooler = LocalPooler(cluster, mode, settings)
    except PgBouncerNotFound as e:
        pytest.fail(f"{e}: the pooler tests need PgBouncer (bash .ci/run installs Debian's pgbouncer)")
    with pooler:
        yield pooler


@pytest.fixture(scope="session")
def tx_pooler(cluster: LocalCluster) -> Iterator[LocalPooler]:
    """PgBouncer in transaction mode in front of the session cluster's primary."""
    yield from _pooler(cluster, "transaction")


@pytest.fixture(scope="session")
def session_pooler(cluster: LocalCluster) -> Iterator[LocalPooler]:
    """PgBouncer in session mode that resets nothing between clients (server_reset_query empty)."""
    yield from _pooler(cluster, "session", server_reset_query="")


@pytest.fixture(scope="session")
def stmt_pooler(cluster: LocalCluster) -> Iterator[LocalPooler]:
    """PgBouncer in statement mode (no multi-statement transactions at all)."""
    yield from _pooler(cluster, "statement")


@pytest.fixture(scope="session")
def ignoring_pooler(cluster: LocalCluster) -> Iterator[LocalPooler]:
    """Session mode, resets nothing, and accepts libpq ``options`` only to ignore them."""
    yield from _pooler(cluster, "session", server_reset_query="", ignore_startup_parameters="options")


@pytest.fixture
def dbname(dsn: str) -> str:
    return psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]


@pytest.fixture(autouse=True)
def _forget_checked_endpoints() -> Iterator[None]:
    """Each test probes its endpoints afresh (db caches the probe per endpoint and process)."""
    db._checked.clear()
    yield
    db._checked.clear()


def write_plan(tmp_path: Path, **backfill) -> Path:
    plan = {
        "table": "public.orders",
        "partition_by": {"column": "created_at", "interval": "1 month", "premake": 2, "start": START},
        # Small pinned batches with a pause after each: the run takes a few seconds, so the
        # other clients really run beside every phase.
        "backfill": {"range": "1 day", "batch_size": 300, "fixed_batch_size": True, "sleep_ratio": 0.5, **backfill},
        "cutover": {"lock_timeout": "300ms", "attempts": 50, "backoff_max": "1s"},
    }
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    return path


def catalog(conn: psycopg.Connection) -> dict:
    """Everything a refused run could have left in the database: objects, state, sessions' locks."""
    q = lambda sql: sorted(tuple(r) for r in conn.execute(sql).fetchall())  # noqa: E731
    return {
        "schemas": q("SELECT nspname FROM pg_namespace"),
        "relations": q("SELECT n.nspname, c.relname, c.relkind FROM pg_class c "
                       "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname NOT LIKE 'pg_%'"),
        "functions": q("SELECT n.nspname, p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
                       "WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')"),
        "triggers": q("SELECT tgrelid::regclass::text, tgname FROM pg_trigger WHERE NOT tgisinternal"),
        "advisory_locks": q("SELECT objid FROM pg_locks WHERE locktype = 'advisory'"),
        "orders": q("SELECT count(*), sum(hashtext(o::text)) FROM public.orders o"),
        "state": {t: q(f"SELECT to_jsonb(x)::text FROM orchestrate.{t} x")
                  for t in ("migrations", "phases", "ranges", "events", "controls", "heartbeat")
                  if conn.execute("SELECT to_regclass(%s)", (f"orchestrate.{t}",)).fetchone()[0]},
    }


# ------------------------------------------------------------------ detection, settings


def test_connect_tells_the_endpoints_apart(cluster, dsn, dbname, tx_pooler, session_pooler, ignoring_pooler,
                                           stmt_pooler):
    """Direct: settings are connection parameters. Session pools (refusing or ignoring ``options``):
    settings in force all the same. Transaction and statement pools: refused, one line, exit code 2."""
    want = ("pg_catalog, pg_temp", "UTC", "5s", "on")
    show = ("SELECT current_setting('search_path'), current_setting('TimeZone'), "
            "current_setting('statement_timeout'), current_setting('default_transaction_read_only')")
    settings = {"statement_timeout": 5000, "default_transaction_read_only": "on"}
    with db.connect(dsn, "t", settings=settings) as conn:
        assert conn.execute(show).fetchone() == want
        assert not conn.pooled
        # Connection parameters (source 'client'), not a SET that could outlive the session.
        assert conn.execute("SELECT count(*) FROM pg_settings WHERE source = 'session'").fetchone()[0] == 0
    # libpq's PGTZ arrives after our options and would win: the session is UTC all the same.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PGTZ", "Asia/Tokyo")
        with db.connect(dsn, "t") as conn:
            assert conn.execute("SELECT current_setting('TimeZone')").fetchone()[0] == "UTC"
    # The user's own options are kept beside ours.
    with db.connect(f"{dsn} options='-c work_mem=7MB'", "t") as conn:
        assert conn.execute("SELECT current_setting('work_mem'), current_setting('search_path')").fetchone() == \
            ("7MB", "pg_catalog, pg_temp")
    for pooler in (session_pooler, ignoring_pooler):
        with db.connect(pooler.dsn(dbname), "t", settings=settings) as conn:
            assert conn.execute(show).fetchone() == want, pooler
            assert conn.pooled
    with pytest.raises(BadEndpoint) as refused:
        db.connect(tx_pooler.dsn(dbname), "t")
    assert refused.value.exit_code == 2
    assert "transaction or statement mode" in str(refused.value) and "session-mode pool" in str(refused.value)
    with pytest.raises(BadEndpoint, match="statement pooling"):
        db.connect(stmt_pooler.dsn(dbname), "t")


def test_probe_finds_a_busy_transaction_pool(cluster, dsn, dbname, tx_pooler):
    """With other clients keeping the pool busy, the probe still sees the multiplexing, every time."""
    stop = threading.Event()
    errors: list[str] = []

    def busy(i: int) -> None:
        try:
            with psycopg.connect(tx_pooler.dsn(dbname), autocommit=True, prepare_threshold=None) as c:
                while not stop.is_set():
                    c.execute("SELECT pg_sleep(random() * 0.01)")
        except psycopg.Error as e:
            errors.append(str(e))

    threads = [threading.Thread(target=busy, args=(i,), daemon=True) for i in range(6)]
    for t in threads:
        t.start()
    try:
        for _ in range(15):
            db._checked.clear()
            with pytest.raises(BadEndpoint):
                db.connect(tx_pooler.dsn(dbname), "t")
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert not errors, errors[:3]


def test_no_server_side_prepared_statements(dsn, dbname, session_pooler):
    """A statement run many times is never prepared on the server, direct or through a pool."""
    for target in (dsn, session_pooler.dsn(dbname)):
        with db.connect(target, "t") as conn:
            for i in range(12):
                conn.execute("SELECT %s::int + 1", (i,)).fetchone()
            assert conn.execute("SELECT count(*) FROM pg_prepared_statements").fetchone()[0] == 0, target


# ------------------------------------------------------------------ transaction pool: refused


def test_every_verb_refuses_a_transaction_pool_and_leaves_nothing(conn, dsn, dbname, tx_pooler, tmp_path):
    create_orders(conn, "public.orders", rows=2_000, days=30, end=END, seed=3)
    plan = write_plan(tmp_path)
    before = catalog(conn)
    pooled = tx_pooler.dsn(dbname)
    verbs = [("apply",), ("rollback",), ("finalize", "--yes"), ("maintain",), ("set", "batch_size=100"),
             ("pause",), ("resume",), ("plan",), ("status",)]

    def refused_by_all() -> None:
        for verb, *extra in verbs:
            code, out, err = run_cli(verb, str(plan), *extra, "--dsn", pooled)
            lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
            assert code == 2, f"{verb} exited {code}\nstdout:\n{out}\nstderr:\n{err[-2000:]}"
            assert "Traceback" not in err and len(lines) == 1, err[-2000:]
            assert "transaction or statement mode" in lines[0] and "connect directly" in lines[0], lines[0]
            assert catalog(conn) == before, f"{verb} left something behind"

    refused_by_all()  # nothing recorded yet: no state schema appears
    assert "state" in before and not before["state"]
    # A replica DSN through the pool is refused as well, before apply records anything.
    code, out, err = run_cli("apply", str(plan), "--dsn", dsn, "--replica-dsn", pooled)
    assert code == 2 and "transaction or statement mode" in err and "Traceback" not in err, err[-2000:]
    assert catalog(conn) == before
    # A migration recorded and under way (run directly): its state is left exactly as it was.
    code, out, err = run_cli("apply", str(plan), "--dsn", dsn, "--until", "capture")
    assert code == 0, err[-2000:]
    before = catalog(conn)
    assert before["state"]["migrations"]
    refused_by_all()


# ------------------------------------------------------------------ session pool: works, leaks nothing


SHARED_SETTINGS = ("search_path", "TimeZone", "lock_timeout", "statement_timeout", "default_transaction_read_only",
                   "session_replication_role", "application_name", "synchronous_commit",
                   "idle_in_transaction_session_timeout", "transaction_isolation", "DateStyle", "work_mem")


class Bystander(threading.Thread):
    """Another client of the same session pool: connects, looks at what its server session
    carries, disconnects, again and again, picking up server sessions orchestrate let go of."""

    def __init__(self, dsn: str):
        super().__init__(daemon=True, name="bystander")
        self.dsn = dsn
        self.stop = threading.Event()
        self.baseline: dict | None = None
        self.seen: list[dict] = []
        self.pids: set[int] = set()
        self.errors: list[str] = []
        self.drained = 0

    def connect(self) -> psycopg.Connection:
        # Defaults of a typical application connection: prepared statements after 5 executions.
        return psycopg.connect(self.dsn, autocommit=True, application_name="bystander")

    def look(self, c: psycopg.Connection | None = None) -> dict:
        """What the server session behind a fresh client connection carries."""
        if c is None:
            with self.connect() as c:
                return self.look(c)
        row = c.execute(
            "SELECT pg_backend_pid(), " + ", ".join(f"current_setting('{s}')" for s in SHARED_SETTINGS) +
            ", (SELECT count(*) FROM pg_prepared_statements), "
            "(SELECT count(*) FROM pg_locks WHERE pid = pg_backend_pid() AND locktype = 'advisory'), "
            # Set by a SET anywhere: only pgbouncer's own application_name may be. (The
            # transaction_* entries describe the current transaction only: a SET TRANSACTION
            # in an earlier one leaves their source at 'session', never their value.)
            "(SELECT array_agg(name || '=' || setting ORDER BY name) FROM pg_settings "
            " WHERE source = 'session' AND name <> 'application_name' AND name NOT LIKE 'transaction\\_%')"
        ).fetchone()
        self.pids.add(row[0])
        return {"settings": dict(zip(SHARED_SETTINGS, row[1:-3], strict=True)), "prepared": row[-3],
                "advisory_locks": row[-2], "session_set": row[-1]}

    def drain(self, pooler: LocalPooler, dbname: str) -> None:
        """Look at every server session the pool holds for the database: as many clients at
        once as it has idle server sessions, so each of those goes to one of them."""
        pools = [p for p in pooler.show("POOLS") if p["database"] == dbname and p["user"] == "postgres"]
        n = sum(p["sv_idle"] + p["sv_used"] for p in pools)
        clients = [self.connect() for _ in range(n)]
        try:
            self.drained += n
            self.seen.extend(self.look(c) for c in clients)
        finally:
            for c in clients:
                c.close()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.seen.append(self.look())
            except psycopg.Error as e:
                self.errors.append(str(e))
            self.stop.wait(0.02)


class SessionWatch(threading.Thread):
    """Records, directly on the primary, the server sessions that served orchestrate's clients."""

    def __init__(self, dsn: str):
        super().__init__(daemon=True, name="watch")
        self.dsn = dsn
        self.stop = threading.Event()
        self.pids: set[int] = set()

    def run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as c:
            while not self.stop.is_set():
                for (pid,) in c.execute("SELECT pid FROM pg_stat_activity WHERE application_name LIKE "
                                        "'orchestrate:%' AND application_name NOT LIKE '%-probe'").fetchall():
                    self.pids.add(pid)
                self.stop.wait(0.02)


def test_full_migration_through_a_session_pool_leaks_nothing_to_the_next_client(
        conn, dsn, dbname, session_pooler, tmp_path):
    create_orders(conn, "public.orders", rows=20_000, days=30, end=END, seed=5)
    plan = write_plan(tmp_path, workers=2)
    pooled = session_pooler.dsn(dbname)
    oid = conn.execute("SELECT 'public.orders'::regclass::oid").fetchone()[0]
    rows = conn.execute("SELECT count(*), sum(hashtext(o::text)) FROM public.orders o").fetchone()
    by = Bystander(pooled)
    by.baseline = by.look()
    watch = SessionWatch(dsn)
    watch.start()
    by.start()

    def cli(*args: str) -> str:
        code, out, err = run_cli(*args, "--dsn", pooled)
        assert code == 0, f"{args} exited {code}\nstdout:\n{out}\nstderr:\n{err[-3000:]}"
        by.drain(session_pooler, dbname)  # every server session the command let go of
        return out

    try:
        cli("apply", str(plan))
        assert conn.execute("SELECT relkind FROM pg_class WHERE oid = 'public.orders'::regclass").fetchone()[0] == "p"
        assert json.loads(cli("status", str(plan), "--output", "json"))["status"] == "cut_over"
        cli("maintain", str(plan))
        cli("rollback", str(plan))
        assert conn.execute("SELECT 'public.orders'::regclass::oid").fetchone()[0] == oid
        cli("set", str(plan), "batch_size=500")
        cli("apply", str(plan))
        cli("finalize", str(plan), "--yes")
        time.sleep(0.5)  # a few more looks at the server sessions the last commands let go of
    finally:
        by.stop.set()
        watch.stop.set()
        by.join(10)
        watch.join(10)

    assert conn.execute("SELECT count(*), sum(hashtext(o::text)) FROM public.orders o").fetchone() == rows
    assert conn.execute("SELECT to_regclass('public.orders_retired')").fetchone()[0] is None
    assert conn.execute("SELECT status FROM orchestrate.migrations ORDER BY id DESC LIMIT 1").fetchone()[0] \
        == "finalized"
    assert not by.errors, by.errors[:3]
    assert len(by.seen) > 20 and by.drained >= 6, (len(by.seen), by.drained)
    # The bystander really was handed server sessions orchestrate had used (and set up).
    reused = by.pids & watch.pids
    assert reused, f"no server session was shared: bystander {sorted(by.pids)}, orchestrate {sorted(watch.pids)}"
    base = by.baseline
    assert base["prepared"] == 0 and base["advisory_locks"] == 0
    for i, look in enumerate(by.seen):
        assert look == base, f"look {i} of {len(by.seen)} differs from the bystander's baseline:\n{look}\n{base}"


# ------------------------------------------------------------------ the application through a transaction pool


GOLDEN = "app_golden.orders"


class Writer(threading.Thread):
    """An application client through the transaction pool: one write per transaction, its
    effect mirrored into a golden copy in the same transaction; owns ids with id % n == i."""

    def __init__(self, dsn: str, index: int, clients: int, max_id: int):
        super().__init__(daemon=True, name=f"writer-{index}")
        self.dsn, self.index, self.clients, self.max_id = dsn, index, clients, max_id
        self.rng = random.Random(index)
        self.stop = threading.Event()
        self.ops = 0
        self.errors: list[str] = []
        self.mine: list[int] = []

    def pick(self) -> int:
        if self.mine and self.rng.random() < 0.5:
            return self.rng.choice(self.mine)
        return self.rng.randrange(self.index or self.clients, self.max_id + 1, self.clients)

    def once(self, c: psycopg.Connection) -> None:
        op = self.rng.choice(("insert", "update", "move", "null", "delete"))
        if op == "insert":
            ts = END - timedelta(days=self.rng.uniform(0, 29))
            (new_id,) = c.execute(
                "WITH w AS (INSERT INTO public.orders (customer_id, amount, note, payload, created_at) "
                "VALUES (%s, %s, %s, %s, %s) RETURNING *) INSERT INTO app_golden.orders SELECT * FROM w RETURNING id",
                (self.index, self.rng.randint(1, 999), "it's \\ é", json.dumps({"w": self.index}), ts),
            ).fetchone()
            self.mine.append(new_id)
            return
        sets = {"update": "amount = amount + 1, status = 'paid', updated_at = now()",
                "move": "created_at = created_at - interval '9 days'",
                "null": "note = NULL, payload = NULL"}
        if op == "delete":
            c.execute("WITH w AS (DELETE FROM public.orders WHERE id = %s RETURNING id) "
                      "DELETE FROM app_golden.orders g USING w WHERE g.id = w.id", (self.pick(),))
            return
        c.execute(f"WITH w AS (UPDATE public.orders SET {sets[op]} WHERE id = %s RETURNING *) "
                  "UPDATE app_golden.orders g SET status = w.status, amount = w.amount, note = w.note, "
                  "payload = w.payload, created_at = w.created_at, updated_at = w.updated_at "
                  "FROM w WHERE g.id = w.id", (self.pick(),))

    def run(self) -> None:
        # What an application behind a transaction pool runs with: no server-side prepared statements.
        c = psycopg.connect(self.dsn, prepare_threshold=None)
        try:
            while not self.stop.is_set():
                try:
                    self.once(c)
                    c.commit()
                    self.ops += 1
                except psycopg.Error as e:
                    self.errors.append(" ".join(str(e).split()))
                    if c.broken:
                        c = psycopg.connect(self.dsn, prepare_threshold=None)
                    else:
                        c.rollback()
                self.stop.wait(0.005)
        finally:
            c.close()


def test_application_through_a_transaction_pool_sees_no_error(conn, dsn, dbname, tx_pooler, tmp_path):
    create_orders(conn, "public.orders", rows=20_000, days=30, end=END, seed=7)
    conn.execute("CREATE SCHEMA app_golden")
    conn.execute(f"CREATE TABLE {GOLDEN} AS SELECT * FROM public.orders")
    conn.execute(f"ALTER TABLE {GOLDEN} ADD PRIMARY KEY (id)")
    # Smaller batches, longer pauses: on a quiet machine the default plan ran in 1.6 s, too
    # short for the writers to be sure to overlap every phase.
    plan = write_plan(tmp_path, batch_size=100, sleep_ratio=4)
    writers = [Writer(tx_pooler.dsn(dbname), i, 4, 20_000) for i in range(4)]
    for w in writers:
        w.start()
    t0 = time.monotonic()
    try:
        code, out, err = run_cli("apply", str(plan), "--dsn", dsn)  # orchestrate itself: direct
        assert code == 0, f"apply exited {code}\n{err[-3000:]}"
        took = time.monotonic() - t0
        time.sleep(0.5)  # writes on the partitioned table, through the pool
    finally:
        for w in writers:
            w.stop.set()
        for w in writers:
            w.join(30)
    assert took > 2, f"the migration took only {took:.1f}s: the writers did not overlap it"
    assert conn.execute("SELECT relkind FROM pg_class WHERE oid = 'public.orders'::regclass").fetchone()[0] == "p"
    errors = [e for w in writers for e in w.errors]
    assert not errors, errors[:5]
    assert sum(w.ops for w in writers) > 200, [w.ops for w in writers]
    for a, b in (("public.orders", GOLDEN), (GOLDEN, "public.orders")):
        diff = conn.execute(f"SELECT count(*) FROM (SELECT * FROM {a} EXCEPT ALL SELECT * FROM {b}) x").fetchone()[0]
        assert diff == 0, f"{diff} rows of {a} are not in {b}"
