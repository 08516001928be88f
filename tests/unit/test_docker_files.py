"""Checks of docker/ that need no Docker engine.

The image and the compose stack cannot be built or started on a machine without an
engine, so these tests check what can be checked statically: compose.yaml's structure,
the Dockerfile's user, entrypoint and COPY sources against the build context and its
ignore file, and the shell scripts' syntax. When the docker CLI with the compose plugin
is present, `docker compose config -q` (which needs no engine) validates compose.yaml too.
"""

from __future__ import annotations

import fnmatch
import json
import shlex
import shutil
import subprocess
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
COMPOSE_FILE = DOCKER / "compose.yaml"
DOCKERFILE = DOCKER / "Dockerfile"
DOCKERIGNORE = DOCKER / "Dockerfile.dockerignore"

SERVICES = {"primary", "replica", "orchestrate"}


# ---------------------------------------------------------------- helpers


def load_compose() -> dict:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict), "compose.yaml must be a mapping"
    return data


def as_list(command) -> list[str]:
    """A compose command/entrypoint in list form (compose accepts a string too)."""
    if command is None:
        return []
    if isinstance(command, str):
        return shlex.split(command)
    return [str(part) for part in command]


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # comment lines inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        pending += line
        keyword, _, args = pending.strip().partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        pending = ""
    assert not pending, "Dockerfile ends inside a continued line"
    return instructions


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for keyword, args in dockerfile_instructions():
        if keyword == "FROM":
            result.append([])
        if result:
            result[-1].append((keyword, args))
    return result


def copy_sources() -> list[str]:
    """Sources of every COPY/ADD taken from the build context (not --from another stage)."""
    sources: list[str] = []
    for keyword, args in dockerfile_instructions():
        if keyword not in ("COPY", "ADD"):
            continue
        if args.startswith("["):
            parts = json.loads(args)
        else:
            parts = shlex.split(args)
        flags = [p for p in parts if p.startswith("--")]
        paths = [p for p in parts if not p.startswith("--")]
        if any(f.startswith("--from=") for f in flags):
            continue
        assert len(paths) >= 2, f"{keyword} {args}: needs a source and a destination"
        sources.extend(paths[:-1])
    return sources


def ignore_patterns() -> list[str]:
    return [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]


def context_path_excluded(path: str) -> bool:
    """Whether the ignore file keeps `path` out of the build context (last match wins)."""
    path = path.strip("/").removeprefix("./")
    excluded = False
    for pattern in ignore_patterns():
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        candidates = [pattern]
        if pattern.startswith("**/"):
            candidates.append(pattern[3:])
        # A pattern matches the path or one of its parent directories.
        prefixes = ["/".join(path.split("/")[: i + 1]) for i in range(len(path.split("/")))]
        if any(fnmatch.fnmatchcase(p, c) for p in prefixes for c in candidates):
            excluded = not negate
    return excluded


def compose_plugin_available() -> bool:
    docker = shutil.which("docker")
    if docker is None:
        return False
    try:
        probe = subprocess.run(
            [docker, "compose", "version"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


def assert_compose_structure(data: dict) -> None:
    """The checks every compose test relies on, with or without the compose plugin."""
    services = data.get("services")
    assert isinstance(services, dict), "compose.yaml has no services mapping"
    assert SERVICES <= set(services), f"missing services: {SERVICES - set(services)}"
    for name in ("primary", "replica"):
        health = services[name].get("healthcheck")
        assert health and "pg_isready" in " ".join(as_list(health["test"])), name
    depends = services["orchestrate"]["depends_on"]
    assert depends["primary"]["condition"] == "service_healthy"
    assert depends["replica"]["condition"] == "service_healthy"
    assert {"primary-data", "replica-data"} <= set(data.get("volumes") or {})


# ---------------------------------------------------------------- compose.yaml


def test_compose_parses_with_the_three_services():
    assert_compose_structure(load_compose())


def test_compose_config_validates():
    """`docker compose config -q` where the plugin exists; the YAML checks always."""
    assert_compose_structure(load_compose())
    if compose_plugin_available():
        result = subprocess.run(
            ["docker", "compose", "-f", str(COMPOSE_FILE), "config", "-q"],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO,
        )
        assert result.returncode == 0, result.stderr


def test_postgres_services_use_postgres_15_with_healthchecks():
    services = load_compose()["services"]
    for name in ("primary", "replica"):
        service = services[name]
        assert service["image"] == "postgres:15", name
        health = service["healthcheck"]
        test = as_list(health["test"])
        assert test[0] in ("CMD", "CMD-SHELL"), name
        assert "pg_isready" in " ".join(test), name
        for key in ("interval", "timeout", "retries"):
            assert key in health, f"{name}: healthcheck without {key}"


def test_primary_is_configured_for_streaming_replication():
    primary = load_compose()["services"]["primary"]
    command = as_list(primary["command"])
    assert "wal_level=replica" in command
    assert any(arg.startswith("max_wal_senders=") for arg in command)
    mounts = [str(v) for v in primary["volumes"]]
    initdb = [m for m in mounts if m.split(":")[1] == "/docker-entrypoint-initdb.d"]
    assert initdb, "primary does not mount docker/initdb"
    source = (DOCKER / initdb[0].split(":")[0]).resolve()
    assert source == DOCKER / "initdb" and source.is_dir()
    scripts = list(source.glob("*.sh")) + list(source.glob("*.sql"))
    assert scripts, "docker/initdb holds no init script"
    assert any("REPLICATION" in s.read_text() for s in scripts), "no replication role is created"


def test_replica_clones_the_primary_and_waits_for_it():
    replica = load_compose()["services"]["replica"]
    assert replica["depends_on"]["primary"]["condition"] == "service_healthy"
    entrypoint = as_list(replica["entrypoint"])
    script_in_container = entrypoint[-1]
    mounts = [str(v).split(":") for v in replica["volumes"]]
    sources = [m[0] for m in mounts if m[1] == script_in_container]
    assert sources, "the replica's entrypoint script is not mounted"
    script = (DOCKER / sources[0]).resolve()
    assert script.is_file()
    text = script.read_text()
    assert "pg_basebackup" in text and ("--write-recovery-conf" in text or " -R" in text)
    assert "PG_VERSION" in text, "the clone must run only on an empty data directory"


def test_orchestrate_service_builds_the_dockerfile_and_targets_primary_and_replica():
    orchestrate = load_compose()["services"]["orchestrate"]
    build = orchestrate["build"]
    context = (DOCKER / build["context"]).resolve()
    assert context == REPO, "the build context must be the repository root"
    assert (context / build["dockerfile"]).resolve() == DOCKERFILE
    assert DOCKERFILE.is_file()

    dsn = orchestrate["environment"]["ORCHESTRATE_DSN"]
    assert "@primary:5432/" in dsn
    # apply reads ORCHESTRATE_REPLICA_DSN (the env form of its --replica-dsn option)
    assert "@replica:5432/" in orchestrate["environment"]["ORCHESTRATE_REPLICA_DSN"]
    assert as_list(orchestrate["command"])[:2] == ["plan", "/plans/examples/orders.yaml"]

    plans = [str(v) for v in orchestrate["volumes"] if str(v).split(":")[1] == "/plans"]
    assert plans, "plans/ is not mounted at /plans"
    source, _, mode = plans[0].split(":")
    assert mode == "ro"
    assert (DOCKER / source).resolve() == REPO / "plans"


def test_named_volumes_are_declared_and_bind_sources_exist():
    data = load_compose()
    declared = set(data.get("volumes") or {})
    for name, service in data["services"].items():
        for volume in service.get("volumes", []):
            source = str(volume).split(":")[0]
            if source.startswith((".", "/", "~")):
                assert (DOCKER / source).exists(), f"{name}: bind source {source} missing"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"
    services = data["services"]
    for name in ("primary", "replica"):
        data_mount = [str(v) for v in services[name]["volumes"] if ":/var/lib/postgresql/data" in str(v)]
        assert data_mount and data_mount[0].split(":")[0] in declared, name


def test_passwords_come_from_the_environment():
    data = load_compose()
    for name, service in data["services"].items():
        env = service.get("environment") or {}
        assert isinstance(env, dict), f"{name}: use the mapping form of environment"
        for key, value in env.items():
            if "PASSWORD" in key:
                assert str(value).startswith("${") and ":-" in str(value), f"{name}: {key}"


# ---------------------------------------------------------------- Dockerfile


def test_dockerfile_is_multi_stage_on_python_311_slim():
    all_stages = stages()
    assert len(all_stages) >= 2, "the Dockerfile must be multi-stage"
    bases = [s[0][1].split()[0] for s in all_stages]
    assert all(base == "python:3.11-slim" for base in bases), bases
    assert " AS builder" in all_stages[0][0][1].replace(" as ", " AS ")
    runtime = all_stages[-1]
    assert any(k == "RUN" and "builder" in a and "/wheels" in a for k, a in runtime), (
        "the runtime stage must install the wheels built in the builder stage"
    )
    assert any(k == "RUN" and "pip wheel" in a for k, a in all_stages[0])


def test_dockerfile_runs_as_non_root_with_orchestrate_entrypoint():
    runtime = stages()[-1]
    users = [a for k, a in runtime if k == "USER"]
    assert users, "the runtime stage has no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), user
    entrypoints = [a for k, a in runtime if k == "ENTRYPOINT"]
    assert entrypoints and json.loads(entrypoints[-1]) == ["orchestrate"]
    cmds = [a for k, a in runtime if k == "CMD"]
    assert cmds and json.loads(cmds[-1]) == ["--help"]


def test_dockerfile_installs_psql_and_has_oci_labels():
    runtime = stages()[-1]
    assert any(k == "RUN" and "postgresql-client" in a for k, a in runtime)
    labels = " ".join(a for k, a in runtime if k == "LABEL")
    for key in ("title", "description", "version", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels, key


def test_every_copy_source_exists_and_reaches_the_build_context():
    sources = copy_sources()
    assert sources, "the Dockerfile copies nothing from the context"
    for source in sources:
        assert (REPO / source).exists(), f"COPY source {source} is not in the repository"
        assert not context_path_excluded(source), f"{source} is excluded by {DOCKERIGNORE.name}"


def test_dockerignore_keeps_local_state_out():
    assert DOCKERIGNORE.is_file()
    for path in (".git", ".venv", ".pytest_cache", "orchestrator/__pycache__", "tests"):
        assert context_path_excluded(path), f"{path} would be sent to the builder"


# ---------------------------------------------------------------- shell scripts


def test_shell_scripts_parse():
    scripts = sorted(DOCKER.rglob("*.sh"))
    assert any(s.parent == DOCKER / "initdb" for s in scripts), "no script under docker/initdb"
    bash = shutil.which("bash")
    assert bash, "bash is needed to check the scripts"
    for script in scripts:
        result = subprocess.run([bash, "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, f"{script.relative_to(REPO)}: {result.stderr}"
        assert script.read_text().startswith("#!"), f"{script.relative_to(REPO)} has no shebang"
