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
    local name=$1 rc start=$SECONDS
    shift
    section "$name"
    "$@"
    rc=$?
    # CI's limit is on the whole run: each step's share shows where the time goes.
    printf -- '----- %s: %d s\n' "$name" $((SECONDS - start))
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
printf -- '----- bootstrap: %d s\n' "$SECONDS"

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
step "pytest" "$py" -m pytest -p no:cacheprovider --durations=15 "$@"

# `python3.X` if it runs, else pyenv's build of 3.X, if any.
find_python() {
    local v=$1 bin
    if "python$v" -c '' >/dev/null 2>&1; then
        command -v "python$v"
        return 0
    fi
    for bin in "${PYENV_ROOT:-$HOME/.pyenv}/versions/$v".*/bin/"python$v"; do
        if [ -x "$bin" ]; then
            echo "$bin"
            return 0
        fi
    done
    return 1
}
other_pythons() {
    # The tests that need no server, on the oldest and the newest other CPython this
    # machine has: how tracing and asyncio's scheduling behave changes between
    # versions, and the suite relies on both. Each gets a venv of its own (.venv-3.X);
    # the oldest also gets the oldest psycopg supported (scripts/oldest-deps.txt).
    local main v bin found=() paths=() rc=0
    main=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    for v in 3.10 3.11 3.12 3.13 3.14; do
        if [ "$v" != "$main" ] && bin=$(find_python "$v"); then
            found+=("$v")
            paths+=("$bin")
        fi
    done
    if [ ${#found[@]} -eq 0 ]; then
        echo "no other CPython >= 3.10 found: skipped"
        return 0
    fi
    local pick=(0)
    [ ${#found[@]} -gt 1 ] && pick+=($((${#found[@]} - 1)))
    local i constraint=scripts/oldest-deps.txt
    for i in "${pick[@]}"; do
        v=${found[$i]}
        echo "--- Python $v: tests/core tests/shell"
        PIP_CONSTRAINT=$constraint PYTHON=${paths[$i]} VENV=".venv-$v" EXTRAS=test,binary \
            bash scripts/bootstrap.sh &&
            ".venv-$v/bin/python" -c 'import psycopg; print("psycopg", psycopg.__version__)' &&
            HYPOTHESIS_PROFILE=dev ".venv-$v/bin/python" -m pytest -q -p no:cacheprovider \
                tests/core tests/shell || rc=1
        constraint=
    done
    return $rc
}
if [ $# -eq 0 ]; then
    step "other Pythons" other_pythons
fi

section summary
if [ ${#failed[@]} -gt 0 ]; then
    printf 'FAILED: %s\n' "${failed[@]}"
    echo "after $SECONDS s"
    exit 1
fi
echo "all checks passed in $SECONDS s"
