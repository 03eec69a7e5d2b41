#!/usr/bin/env bash
# The demo: `psycopg-pool bench` for a few seconds, after bootstrapping. Without
# DATABASE_URL it starts a throw-away PostgreSQL and removes it afterwards.
# Arguments go to `psycopg-pool bench` (default: --duration 3).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/bootstrap.sh"
if [ $# -eq 0 ]; then
    set -- --duration 3
fi
exec "$root/.venv/bin/psycopg-pool" bench "$@"
