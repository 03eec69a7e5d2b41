"""``python -m psycopg_pool``: the ``psycopg-pool`` command (see `psycopg_pool.cli`)."""

from __future__ import annotations

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
