"""The layout is the architecture: engine, command line and lab apart (README "Layout").

The import direction itself is checked by lint-imports (pyproject's [tool.importlinter],
run by scripts/test.sh); this test keeps that contract complete: every module of the
engine must be one of its source modules, so a new module cannot slip past it.
"""

from __future__ import annotations

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "orchestrator"
APART = {"cli", "lab"}  # the command line and the lab; everything else is the engine


def _contracts() -> list[dict]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return config["tool"]["importlinter"]["contracts"]


def _engine_modules() -> set[str]:
    names = set()
    for p in PACKAGE.iterdir():
        if p.name.startswith("_") or p.name in APART:
            continue
        if p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists()):
            names.add(f"orchestrator.{p.stem}")
    return names


def test_every_engine_module_is_under_the_import_contract():
    engine = next(c for c in _contracts() if "orchestrator.cli" in c.get("forbidden_modules", [])
                  and "orchestrator.lab" in c["forbidden_modules"])
    assert {"click", "orchestrator.cli", "orchestrator.lab"} <= set(engine["forbidden_modules"])
    missing = _engine_modules() - set(engine["source_modules"])
    assert not missing, f"engine modules outside the import contract in pyproject.toml: {sorted(missing)}"
    stale = set(engine["source_modules"]) - _engine_modules()
    assert not stale, f"the import contract names modules that do not exist: {sorted(stale)}"


def test_the_lab_may_not_import_the_command_line():
    assert any(c["source_modules"] == ["orchestrator.lab"] and c["forbidden_modules"] == ["orchestrator.cli"]
               for c in _contracts())


def test_the_harness_lives_in_the_lab_and_the_verbs_in_the_cli():
    lab = {p.stem for p in (PACKAGE / "lab").glob("*.py")} - {"__init__"}
    assert {"cluster", "citus_cluster", "pooler", "workload", "sample", "bench", "demo"} <= lab
    cli = {p.stem for p in (PACKAGE / "cli").glob("*.py")} - {"__init__"}
    assert {"common", "migrate", "steer", "maintain", "lab", "report"} <= cli
    # nothing of the harness or the verbs left beside the engine
    assert not (lab | {"report"}) & {p.stem for p in PACKAGE.glob("*.py")}
