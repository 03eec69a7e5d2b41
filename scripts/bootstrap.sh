#!/usr/bin/env bash
# Prepare a fresh clone for the tests and the demo. Idempotent; works from any folder,
# with no terminal. Installs what is missing:
#   - PostgreSQL server binaries (apt-get install postgresql; needs root), looked up
#     like psycopg_pool._embedded_pg.find_pg_bindir: $PG_BINDIR, `pg_config --bindir`,
#     then the newest /usr/lib/postgresql/*/bin holding initdb and pg_ctl;
#   - PgBouncer (apt-get install pgbouncer) when no `pgbouncer` binary is found;
#   - as root, a `postgres` system account (PostgreSQL refuses to run as root);
#   - .venv (python3 -m venv, Python >= 3.10; $PYTHON picks another interpreter, $VENV
#     another folder) with this project installed in it: pip install -e ".[$EXTRAS]"
#     (default test,dev,binary), skipped while .venv/.stamp is newer than pyproject.toml.
# Quiet when all is well: progress lines and errors go to stderr.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { printf 'bootstrap: %s\n' "$*" >&2; }
die() {
    printf 'bootstrap: error: %s\n' "$*" >&2
    exit 1
}

is_root() { [ "$(id -u)" -eq 0 ]; }

has_server_binaries() { [ -n "$1" ] && [ -x "$1/initdb" ] && [ -x "$1/pg_ctl" ]; }

find_pg_bindir() {
    local dir
    if [ -n "${PG_BINDIR:-}" ] && has_server_binaries "$PG_BINDIR"; then
        echo "$PG_BINDIR"
        return 0
    fi
    if command -v pg_config >/dev/null 2>&1; then
        dir=$(pg_config --bindir 2>/dev/null || true)
        if has_server_binaries "$dir"; then
            echo "$dir"
            return 0
        fi
    fi
    while IFS= read -r dir; do
        if has_server_binaries "$dir"; then
            echo "$dir"
            return 0
        fi
    done < <(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V -r)
    return 1
}

python_ok() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; }

require_python() {
    python_ok "$python" || die "Python >= 3.10 is required, $python is $("$python" -V 2>&1); set PYTHON=python3.X"
}

# Run "$@" quietly: its output is shown only if it fails.
quietly() {
    local out
    if ! out=$("$@" 2>&1); then
        printf '%s\n' "$out" >&2
        return 1
    fi
}

apt_install() {
    is_root || die "missing system packages: $*; install them (as root: apt-get install $*) and rerun"
    command -v apt-get >/dev/null 2>&1 || die "missing system packages: $* (and no apt-get to install them)"
    log "installing $* with apt-get ..."
    export DEBIAN_FRONTEND=noninteractive
    quietly apt-get update || die "apt-get update failed"
    quietly apt-get install -y --no-install-recommends "$@" || die "apt-get install $* failed"
}

# --- system packages -----------------------------------------------------------
python=${PYTHON:-python3}
packages=()
find_pg_bindir >/dev/null || packages+=(postgresql)
# PgBouncer, for tests/integration/test_pgbouncer.py (Debian installs it in /usr/sbin).
command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ] || packages+=(pgbouncer)
venv=${VENV:-.venv}
if [ ! -x "$venv/bin/python" ]; then
    if ! command -v "$python" >/dev/null 2>&1; then
        [ -z "${PYTHON:-}" ] || die "PYTHON=$PYTHON: no such interpreter"
        packages+=(python3 python3-venv)
    else
        require_python
        # Debian ships venv's pip bootstrap (ensurepip) in a package of its own.
        "$python" -c 'import ensurepip, venv' >/dev/null 2>&1 || packages+=(python3-venv)
    fi
fi
if [ ${#packages[@]} -gt 0 ]; then
    apt_install "${packages[@]}"
fi
find_pg_bindir >/dev/null || die "PostgreSQL server binaries (initdb, pg_ctl) still not found; set PG_BINDIR"

if is_root && ! id -u postgres >/dev/null 2>&1; then
    log "creating the postgres system account ..."
    useradd --system --user-group --no-create-home postgres || die "useradd postgres failed"
fi

# --- virtual environment ---------------------------------------------------------
if [ -x "$venv/bin/python" ]; then
    python_ok "$venv/bin/python" || die "$venv has Python < 3.10: remove $venv and rerun (PYTHON=python3.X to choose)"
else
    require_python
    log "creating $venv with $python ..."
    rm -rf "$venv"
    quietly "$python" -m venv "$venv" || die "$python -m venv failed"
fi

# (A pip constraints file, $PIP_CONSTRAINT, counts as part of the requirements.)
if [ "$venv/.stamp" -nt pyproject.toml ] &&
    { [ -z "${PIP_CONSTRAINT:-}" ] || [ "$venv/.stamp" -nt "$PIP_CONSTRAINT" ]; }; then
    exit 0
fi
log "installing the project and its test dependencies into $venv ..."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PIP_ROOT_USER_ACTION=ignore
quietly "$venv/bin/python" -m pip install -e ".[${EXTRAS:-test,dev,binary}]" ||
    die "pip install into $venv failed"
touch "$venv/.stamp"
