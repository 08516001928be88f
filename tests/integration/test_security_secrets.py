"""Secrets: a password given anywhere is found nowhere.

The role running orchestrate must log in with a password here (its pg_hba.conf line asks
for scram-sha-256; every other role keeps trust), so PGPASSWORD and PGPASSFILE are proven to
work, not merely tolerated. The password is then given everywhere it can be: in --dsn, in
PGPASSWORD, in a replica DSN in the plan and on the command line, in a DSN taken from the
variable the plan names (dsn_env), in malformed DSNs. Every stdout and stderr (text and JSON
logs at DEBUG) and every row of every table of the state schema is searched for it.
"""

from __future__ import annotations

import os
import re
import socket
import urllib.request
import uuid
from pathlib import Path

import psycopg
import pytest
import yaml
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from helpers import apply_log, run_cli, start_apply, stop, wait_until
from orchestrator.lab.sample import create_orders

PLAN = {
    "version": 1,
    "table": "public.orders",
    "partition_by": {"column": "created_at", "interval": "1 month", "premake": 1},
    "backfill": {"range": "1 month", "batch_size": 2000},
    "cutover": {"lock_timeout": "300ms", "attempts": 50, "backoff_max": "1s", "gate_timeout": "30s"},
}


def with_params(dsn: str, **params) -> str:
    p = conninfo_to_dict(dsn)
    p.update(params)
    return make_conninfo(**{k: v for k, v in p.items() if v is not None})


@pytest.fixture
def password_role(conn, dsn):
    """(role, password): a non-superuser owner of public.orders that must log in with its password."""
    role, secret = f"pw_{uuid.uuid4().hex[:8]}", f"Pw-{uuid.uuid4().hex}"
    create_orders(conn, rows=2000, days=70)
    conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{secret}'")
    conn.execute(f"GRANT pg_monitor TO {role}; GRANT CREATE ON DATABASE {conn.info.dbname} TO {role}; "
                 f"GRANT CREATE ON SCHEMA public TO {role}; ALTER TABLE public.orders OWNER TO {role}; "
                 f"ALTER VIEW public.orders_daily OWNER TO {role}")
    hba = Path(conn.execute("SHOW hba_file").fetchone()[0])
    original = hba.read_text()
    hba.write_text(f"host all {role} 127.0.0.1/32 scram-sha-256\nlocal all {role} scram-sha-256\n" + original)
    conn.execute("SELECT pg_reload_conf()")
    nopw = with_params(dsn, user=role, password=None)

    def refused() -> bool:
        try:
            psycopg.connect(nopw, connect_timeout=5, sslmode="disable").close()
        except psycopg.OperationalError:
            return True
        return False

    try:
        wait_until(refused, timeout=30, message="pg_hba.conf reload did not take effect")
        yield role, secret
    finally:
        hba.write_text(original)
        conn.execute("SELECT pg_reload_conf()")


def state_text(conn: psycopg.Connection) -> str:
    """Every row of every table in the state schema, as text."""
    out = []
    for (table,) in conn.execute("SELECT c.relname FROM pg_class c WHERE c.relkind = 'r' "
                                 "AND c.relnamespace = to_regnamespace('orchestrate')").fetchall():
        out += [str(r[0]) for r in conn.execute(f"SELECT t::text FROM orchestrate.{table} t")]
    return "\n".join(out)


def test_no_password_anywhere(conn, dsn, replica_dsn, password_role, tmp_path):
    role, secret = password_role
    base = with_params(dsn, user=role, password=None)  # no password in it
    with_pw = with_params(dsn, user=role, password=secret)
    replica_pw = with_params(replica_dsn, user=role, password=secret)
    outputs: list[str] = []

    def cli(*args: str, env: dict | None = None, expect: int = 0) -> str:
        code, out, err = run_cli(*args, env={"ORCHESTRATE_LOG_LEVEL": "DEBUG", **(env or {})})
        outputs.append(out + err)
        assert code == expect, (args, code, out, err)
        return out + err

    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({**PLAN, "throttle": {"replicas": [replica_pw], "max_replica_lag_s": 30}}))
    env_plan = tmp_path / "env-plan.yaml"
    env_plan.write_text(yaml.safe_dump({**PLAN, "dsn_env": "ORDERS_DSN",
                                        "throttle": {"replicas_env": ["ORDERS_REPLICA_DSN"], "max_replica_lag_s": 30}}))

    # libpq reads PGPASSWORD and PGPASSFILE: the DSN holds no password and the login works;
    # without either it is refused (so the variables, not trust, let it in).
    cli("plan", str(plan), "--dsn", base, expect=4)
    cli("plan", str(plan), "--dsn", base, env={"PGPASSWORD": secret})
    passfile = tmp_path / "pgpass"
    p = conninfo_to_dict(dsn)
    passfile.write_text(f"{p['host']}:{p['port']}:*:{role}:{secret}\n")
    os.chmod(passfile, 0o600)
    cli("status", str(plan), "--dsn", base, env={"PGPASSFILE": str(passfile)})
    wrong = f"Wrong-{uuid.uuid4().hex}"
    msg = cli("status", str(plan), "--dsn", base, env={"PGPASSWORD": wrong}, expect=4)
    assert "password authentication failed" in msg and wrong not in msg

    # Malformed DSNs that hold the password: one line, exit 4, password nowhere.
    for bad in (f"host=127.0.0.1 user={role} {secret}",  # libpq: missing "=" after "<the password>"
                f"host=127.0.0.1 user={role} password={secret} dbname",
                f"host=127.0.0.1 password='{secret}",
                f"postgresql://{role}:{secret}@127.0.0.1:{p['port']}/x?nosuchparam=1"):
        out = cli("status", str(plan), "--dsn", bad, expect=4)
        assert len([ln for ln in out.splitlines() if ln.startswith("error:")]) == 1, out

    # A whole migration with the password in --dsn, the plan's replica DSN and --replica-dsn;
    # logs at DEBUG, as text and as JSON.
    cli("apply", str(plan), "--dsn", with_pw, "--replica-dsn", replica_pw, "--until", "backfill")
    cli("--log-format", "json", "apply", str(plan), "--dsn", with_pw, "--replica-dsn", replica_pw,
        "--until", "verify")
    cli("status", str(plan), "--dsn", with_pw, "-o", "json")
    cli("set", str(plan), "batch_size=1000", "--dsn", with_pw)
    cli("apply", str(plan), "--dsn", with_pw, "-o", "json")
    cli("rollback", str(plan), "--dsn", with_pw)
    # Again, with the DSNs taken from the variables the plan names (no --dsn at all).
    env = {"ORDERS_DSN": with_pw, "ORDERS_REPLICA_DSN": replica_pw, "ORCHESTRATE_DSN": ""}
    cli("plan", str(env_plan), "-o", "json", env=env)
    cli("apply", str(env_plan), env=env)
    cli("status", str(env_plan), "-o", "json", env=env)
    cli("finalize", str(env_plan), "--yes", env=env)
    # An unreachable replica with a password: the backfill is throttled with a reason that
    # names the replica (logged, recorded as an event), never its password.
    create_orders(conn, table="public.orders2", rows=500, days=40)
    conn.execute(f"ALTER TABLE public.orders2 OWNER TO {role}; ALTER VIEW public.orders2_daily OWNER TO {role}")
    dead = with_params(replica_dsn, user=role, password=secret, port="1", connect_timeout="2")
    dead_plan = tmp_path / "dead-replica.yaml"
    dead_plan.write_text(yaml.safe_dump({**PLAN, "table": "public.orders2", "throttle": {"replicas": [dead]}}))
    with socket.socket() as sock:  # a free port for the Prometheus endpoint, searched too
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = start_apply(tmp_path, str(dead_plan), with_pw, "--replica-dsn", dead, "--metrics-port", str(port))
    try:
        wait_until(lambda: "unreachable" in apply_log(proc) or proc.poll() is not None, timeout=180)
        assert "unreachable" in apply_log(proc), apply_log(proc)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            scraped = r.read().decode()
        assert "orchestrate_throttled" in scraped, scraped
        outputs.append(scraped)
    finally:
        stop(proc)
    outputs.append(apply_log(proc))

    everything = "\n".join(outputs) + "\n" + state_text(conn)
    assert state_text(conn), "the state schema is empty: nothing was searched"
    assert re.search(re.escape(role), everything), "the outputs do not even name the role: nothing was searched"
    assert secret not in everything
