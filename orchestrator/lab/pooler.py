"""A throwaway local PgBouncer in front of a LocalCluster's primary, for tests.

Runs the system's ``pgbouncer`` (Debian's package) on 127.0.0.1 and a free port, as the
same unprivileged user as the servers, with a config written to a temporary directory:
every database name maps to the same name on the primary, ``auth_type = trust`` (loopback
only, like the servers). ``pool_mode`` is ``session``, ``transaction`` or ``statement``;
``settings`` adds or overrides ``[pgbouncer]`` settings (``server_reset_query = ""`` for a
pool that hands server sessions on exactly as the last client left them).

Like the clusters, a pooler records its owning process; one left behind by a killed test
run is stopped by the next one.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from orchestrator.lab.cluster import (
    ClusterError,
    LocalCluster,
    _free_port,
    _process_alive,
    _process_start_ticks,
    _server_user,
    _tail,
)

_PREFIX = "orchestrate-pgbouncer-"
_OWNER_FILE = "owner.pid"
_PID_FILE = "pgbouncer.pid"
_live: set[LocalPooler] = set()
_live_lock = threading.Lock()


class PgBouncerNotFound(ClusterError):
    """The pgbouncer binary is not installed."""


def find_pgbouncer() -> Path:
    """The pgbouncer binary (PATH, then Debian's /usr/sbin), or PgBouncerNotFound."""
    found = shutil.which("pgbouncer") or next(
        (p for p in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if os.access(p, os.X_OK)), None)
    if found is None:
        raise PgBouncerNotFound("pgbouncer is not installed: apt-get install pgbouncer (.ci/run installs it)")
    return Path(found)


def _reap_orphans(temp_root: Path) -> None:
    """Stop poolers whose owning process died without stopping them (SIGKILL, OOM)."""
    for base in temp_root.glob(f"{_PREFIX}*"):
        try:
            pid_text, ticks = (base / _OWNER_FILE).read_text().split()
            owner = int(pid_text)
        except (OSError, ValueError):
            continue
        if _process_alive(owner) and _process_start_ticks(owner) == ticks:
            continue
        with contextlib.suppress(OSError, ValueError, IndexError, ProcessLookupError):
            os.kill(int((base / _PID_FILE).read_text().split()[0]), signal.SIGKILL)
        shutil.rmtree(base, ignore_errors=True)


class LocalPooler:
    """A PgBouncer on 127.0.0.1 in front of ``cluster``'s primary, in ``pool_mode``."""

    def __init__(self, cluster: LocalCluster, pool_mode: str = "session", settings: dict[str, str] | None = None):
        if pool_mode not in ("session", "transaction", "statement"):
            raise ValueError(f"pool_mode must be session, transaction or statement, not {pool_mode!r}")
        self.cluster = cluster
        self.pool_mode = pool_mode
        self.settings = dict(settings or {})
        self.binary = find_pgbouncer()
        self.port = 0
        self.base_dir: Path | None = None
        self._proc: subprocess.Popen | None = None
        self._run_as = _server_user()

    def __enter__(self) -> LocalPooler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def dsn(self, dbname: str = "postgres") -> str:
        """libpq keyword DSN of ``dbname`` through the pooler."""
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={dbname}"

    def start(self, attempts: int = 5) -> LocalPooler:
        """Write the config and start pgbouncer; retry on a port race with another process."""
        _reap_orphans(Path(tempfile.gettempdir()))
        base = Path(tempfile.mkdtemp(prefix=_PREFIX))
        (base / _OWNER_FILE).write_text(f"{os.getpid()} {_process_start_ticks(os.getpid())}\n")
        self.base_dir = base
        if self._run_as.switches:
            os.chown(base, self._run_as.uid, self._run_as.gid)  # type: ignore[arg-type]
        os.chmod(base, 0o755)
        with _live_lock:
            _live.add(self)
        try:
            for attempt in range(attempts):
                self.port = _free_port()
                self._write_config()
                if self._launch():
                    return self
                if attempt + 1 == attempts or "Address already in use" not in _tail(base / "pgbouncer.log", 50):
                    break
            raise ClusterError(f"pgbouncer did not start; last lines of its log:\n{_tail(base / 'pgbouncer.log')}")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop pgbouncer (SIGTERM: immediate shutdown, then SIGKILL) and remove its directory."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if self.base_dir is not None:
            shutil.rmtree(self.base_dir, ignore_errors=True)
            self.base_dir = None
        with _live_lock:
            _live.discard(self)

    def _write_config(self) -> None:
        assert self.base_dir is not None
        settings = {
            "listen_addr": "127.0.0.1",
            "listen_port": str(self.port),
            "unix_socket_dir": "",
            "auth_type": "trust",
            "auth_file": str(self.base_dir / "userlist.txt"),
            "pool_mode": self.pool_mode,
            "default_pool_size": "40",
            "max_client_conn": "400",
            "logfile": str(self.base_dir / "pgbouncer.log"),
            "pidfile": str(self.base_dir / _PID_FILE),
            "admin_users": "postgres",
            **self.settings,
        }
        primary = self.cluster.primary_port
        lines = [
            "; Written by orchestrator.lab.pooler: a throwaway test pooler, loopback only.",
            "[databases]",
            f"* = host=127.0.0.1 port={primary}",
            "[pgbouncer]",
            *(f"{k} = {v}" for k, v in settings.items()),
        ]
        files = {"pgbouncer.ini": "\n".join(lines) + "\n", "userlist.txt": '"postgres" ""\n'}
        for name, text in files.items():
            path = self.base_dir / name
            path.write_text(text)
            if self._run_as.switches:
                os.chown(path, self._run_as.uid, self._run_as.gid)  # type: ignore[arg-type]

    def _launch(self) -> bool:
        """Start pgbouncer in the foreground (our child) and wait until it accepts connections."""
        assert self.base_dir is not None
        kwargs: dict[str, object] = {}
        if self._run_as.switches:
            kwargs.update(user=self._run_as.uid, group=self._run_as.gid, extra_groups=[])
        self._proc = subprocess.Popen(
            [str(self.binary), str(self.base_dir / "pgbouncer.ini")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            cwd=str(self.base_dir), env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C"},
            **kwargs,  # type: ignore[arg-type]
        )
        import psycopg

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            try:
                # The admin console answers without touching the server behind the pool.
                with psycopg.connect(self.dsn("pgbouncer"), autocommit=True, connect_timeout=2,
                                     prepare_threshold=None) as conn:
                    _simple_query(conn, "SHOW VERSION")
                return True
            except psycopg.OperationalError:
                time.sleep(0.05)
        log = _tail(self.base_dir / "pgbouncer.log")
        raise ClusterError(f"pgbouncer did not accept connections within 30s:\n{log}")

    def show(self, what: str) -> list[dict]:
        """Rows of the admin console's ``SHOW <what>`` (POOLS, SERVERS, CLIENTS, ...)."""
        import psycopg

        with psycopg.connect(self.dsn("pgbouncer"), autocommit=True, prepare_threshold=None) as conn:
            return _simple_query(conn, f"SHOW {what}")

    def __repr__(self) -> str:
        return f"LocalPooler({self.pool_mode}, port={self.port}, primary={self.cluster.primary_port})"


def _simple_query(conn, query: str) -> list[dict]:
    """Run ``query`` with the simple query protocol (the admin console refuses the extended one)."""
    from psycopg import ClientCursor

    with ClientCursor(conn) as cur:
        cur.execute(query)
        cols = [d.name for d in cur.description or []]
        return [dict(zip(cols, row, strict=True)) for row in cur.fetchall()]


def _stop_all_at_exit() -> None:
    with _live_lock:
        poolers = list(_live)
    for pooler in poolers:
        pooler.stop()


atexit.register(_stop_all_at_exit)
