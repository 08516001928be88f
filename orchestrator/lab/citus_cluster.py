"""A throwaway local Citus cluster (a coordinator and two workers) for tests and the demo.

Each node is a :class:`orchestrator.lab.cluster.LocalCluster` without a replica, started the
same way (as the ``postgres`` OS user, on a free loopback port, ``fsync=off``) with
Citus preloaded. Citus keeps its metadata (``pg_dist_node``) per database, so every
database is created on all three nodes, gets ``CREATE EXTENSION citus`` on each, and is
registered on the coordinator (``citus_set_coordinator_host`` + ``citus_add_node``):
:meth:`CitusCluster.create_database`.

Citus is not packaged for Debian's PostgreSQL 15: ``../shared/citus/build.sh`` (beside the
project, outside the repository) builds and installs it; :func:`citus_installed` says
whether that happened.
"""

from __future__ import annotations

from pathlib import Path

from orchestrator.lab.cluster import ClusterError, LocalCluster, find_pg_bin

__all__ = ["CitusCluster", "citus_installed", "CITUS_MISSING"]

CITUS_MISSING = ("Citus is not installed for this PostgreSQL (no citus.so / citus.control): "
                 "run `bash ../shared/citus/build.sh` from the project root (.ci/run does)")


def citus_installed(pg_bin: Path) -> bool:
    """Is the Citus extension installed for the server in ``pg_bin``?"""
    import subprocess

    cfg = pg_bin / "pg_config"
    if cfg.exists():
        libdir = subprocess.run([str(cfg), "--pkglibdir"], capture_output=True, text=True).stdout.strip()
        share = subprocess.run([str(cfg), "--sharedir"], capture_output=True, text=True).stdout.strip()
    else:  # Debian: /usr/lib/postgresql/15/bin -> lib beside it, share under /usr/share
        libdir = str(pg_bin.parent / "lib")
        share = f"/usr/share/postgresql/{pg_bin.parent.name}"
    return Path(libdir, "citus.so").exists() and Path(share, "extension", "citus.control").exists()


def _describes(pg_bin: Path, setting: str) -> bool:
    """Does this server know ``setting`` (``postgres --describe-config``)? 15.18 refuses to
    start with output_plugin_libraries, 15.19+ needs it for create_distributed_table_concurrently."""
    import subprocess

    out = subprocess.run([str(pg_bin / "postgres"), "--describe-config"], capture_output=True, text=True,
                         check=False).stdout
    return any(line.split("\t", 1)[0] == setting for line in out.splitlines())


class CitusCluster:
    """A coordinator and ``workers`` workers, each a LocalCluster with Citus preloaded
    (``worker_replicas``: every worker with a streaming standby, as a worker's HA setup has)."""

    def __init__(self, pg_bin: Path | None = None, workers: int = 2, worker_replicas: bool = False):
        self.pg_bin = Path(pg_bin) if pg_bin else find_pg_bin("15")
        if not citus_installed(self.pg_bin):
            raise ClusterError(CITUS_MISSING)
        settings = {
            "shared_preload_libraries": "citus",
            "wal_level": "logical",
            # The capture commits every writing transaction with two phases (plan refuses
            # fewer than the coordinator's max_connections); Citus' own default is 2x.
            "max_prepared_transactions": "600",
            "max_connections": "300",
            "shared_buffers": "128MB",
            "citus.log_remote_commands": "off",
            # The workload tells a deadlock among its own clients (retried, like an
            # application) from one with anybody else by the pids in PostgreSQL's message;
            # Citus' distributed detector names none. Before the cutover every cycle forms on
            # the coordinator's heap table (the twin's rows are written only by the trigger,
            # behind the heap row's lock), where PostgreSQL's own detector names them.
            "citus.distributed_deadlock_detection_factor": "-1",
        }
        if _describes(self.pg_bin, "output_plugin_libraries"):
            settings["output_plugin_libraries"] = "pgoutput, test_decoding, citus"
        self.settings = settings
        self.n_workers = workers
        self.worker_replicas = worker_replicas  # each worker with a streaming standby of its own
        self.coordinator: LocalCluster | None = None
        self.workers: list[LocalCluster] = []

    def __enter__(self) -> CitusCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> CitusCluster:
        try:
            self.coordinator = LocalCluster(pg_bin=self.pg_bin, replica=False, settings=self.settings).start()
            for _ in range(self.n_workers):
                self.workers.append(LocalCluster(pg_bin=self.pg_bin, replica=self.worker_replicas,
                                                 settings=self.settings).start())
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for node in [*self.workers, self.coordinator]:
            if node is not None:
                node.stop()
        self.workers, self.coordinator = [], None

    @property
    def nodes(self) -> list[LocalCluster]:
        assert self.coordinator is not None
        return [self.coordinator, *self.workers]

    def dsn(self, dbname: str = "postgres") -> str:
        """The coordinator's DSN: where the application and orchestrate connect."""
        assert self.coordinator is not None
        return self.coordinator.primary_dsn(dbname)

    def worker_dsns(self, dbname: str = "postgres") -> list[str]:
        return [w.primary_dsn(dbname) for w in self.workers]

    def worker_ports(self) -> list[int]:
        return [w.primary_port for w in self.workers]

    def create_database(self, name: str, *, register_workers: bool = True) -> str:
        """The database on every node with the extension; the workers registered on the
        coordinator (unless ``register_workers`` is false: a coordinator without workers)."""
        import psycopg

        for node in self.nodes:
            node.create_database(name)
            with psycopg.connect(node.primary_dsn(name), autocommit=True) as conn:
                conn.execute("CREATE EXTENSION citus")
        assert self.coordinator is not None
        with psycopg.connect(self.dsn(name), autocommit=True) as conn:
            conn.execute("SELECT citus_set_coordinator_host('127.0.0.1', %s)", (self.coordinator.primary_port,))
            if register_workers:
                for port in self.worker_ports():
                    conn.execute("SELECT citus_add_node('127.0.0.1', %s)", (port,))
        return self.dsn(name)

    def drop_database(self, name: str) -> None:
        for node in self.nodes:
            node.ensure_running()
            node.drop_database(name)


if __name__ == "__main__":  # python -m orchestrator.lab.citus_cluster: start one by hand; Ctrl-C or kill stops it
    import signal
    import time

    def _stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)  # also when started in the background (SIGINT ignored there)
    with CitusCluster() as c:
        c.create_database("app")
        print(c.dsn("app"), *c.worker_dsns("app"), sep="\n", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
