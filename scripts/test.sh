#!/usr/bin/env bash
# Everything CI checks: bootstrap, ruff (lint and format), mypy, the unasync freshness
# check (once tools/unasync.py exists) and pytest; arguments go to pytest, relative to the repo
# root. Every step runs even after a failure; the exit status is non-zero if any
# failed (pytest finding no tests, exit code 5, is a failure too).
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

section() { printf '\n===== %s =====\n' "$*"; }

failed=()
step() {
    local name=$1 rc
    shift
    section "$name"
    "$@"
    rc=$?
    if [ "$rc" -ne 0 ]; then
        printf -- '----- %s: FAILED (exit code %d)\n' "$name" "$rc"
        failed+=("$name")
    fi
}

section bootstrap
bash scripts/bootstrap.sh || {
    echo "----- bootstrap: FAILED" >&2
    exit 1
}

py=.venv/bin/python
if [ -n "${CI:-}" ]; then export HYPOTHESIS_PROFILE=ci; fi  # core state machine: >= 1,000 examples
step "ruff check" "$py" -m ruff check .
step "ruff format --check" "$py" -m ruff format --check .
step "mypy" "$py" -m mypy
if [ -f tools/unasync.py ]; then
    step "unasync --check" "$py" tools/unasync.py --check
fi
core_coverage() {
    # The pure core keeps 100% branch coverage from its own tests (no database).
    HYPOTHESIS_PROFILE=coverage "$py" -m coverage run --data-file=.coverage-core --branch \
        --source=psycopg_pool/_core -m pytest -q -p no:cacheprovider tests/core &&
        "$py" -m coverage report --data-file=.coverage-core --fail-under=100 -m
}
if [ $# -eq 0 ]; then
    step "core branch coverage" core_coverage
fi
step "pytest" "$py" -m pytest -p no:cacheprovider "$@"

section summary
if [ ${#failed[@]} -gt 0 ]; then
    printf 'FAILED: %s\n' "${failed[@]}"
    exit 1
fi
echo "all checks passed"
