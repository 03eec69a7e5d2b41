#!/usr/bin/env bash
# Run the demo (python -m psycopg_pool.demo) after bootstrapping; arguments go to it.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/bootstrap.sh"
exec "$root/.venv/bin/python" -m psycopg_pool.demo "$@"
