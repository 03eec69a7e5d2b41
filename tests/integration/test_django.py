"""Django (5.1+) builds and uses our pool (issue 6, item 4).

With ``DATABASES[...]["OPTIONS"]["pool"]`` set, Django's PostgreSQL backend builds a
``psycopg_pool.ConnectionPool`` itself (``kwargs=`` its connection parameters,
``open=False``, ``configure=`` its time-zone/role set-up, ``check=`` when
``CONN_HEALTH_CHECKS``), calls ``pool.open()`` before every ``getconn()``, returns
connections with ``conn._pool.putconn(conn)`` and closes with ``pool.close()``.

Django's settings are process-global, so the project (tests/integration/django_app:
settings in code, one model, a migration) runs in a subprocess, with warnings as
errors, in a database of its own; it reports what it saw as JSON and the assertions
are made here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from .django_app.run import POOL, ROUNDS, THREADS

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def database(dsn: str) -> Iterator[str]:
    """A fresh database for the Django project, dropped afterwards."""
    name = f"django_test_{os.getpid()}"
    ident = sql.Identifier(name)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(ident))
    yield name
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))


def run_project(dsn: str, database: str) -> dict[str, Any]:
    config = {
        "conninfo": make_conninfo(dsn, dbname=database),
        "dbname": database,
        "application_name": "django-project",
    }
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    proc = subprocess.run(
        [
            sys.executable,
            "-W",
            "error",
            "-m",
            "tests.integration.django_app.run",
            json.dumps(config),
        ],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, f"the Django project failed:\n{proc.stderr}"
    report: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return report


def test_django_project(dsn: str, database: str) -> None:
    report = run_project(dsn, database)

    # Django built OUR pool: the class upstream has at the same place, from this tree.
    assert report["pool_class"] == "psycopg_pool.pool.ConnectionPool"
    assert Path(report["pool_file"]).resolve() == ROOT / "psycopg_pool" / "pool.py"

    # Migrations ran through the pool, and Django's configure callback did its set-up.
    applied = set(report["applied"])
    assert {"contenttypes.0001_initial", "auth.0001_initial", "django_app.0001_initial"} <= applied
    assert report["timezone"] == "UTC"

    # ORM work from several threads, all through the one pool.
    assert report["errors"] == []
    assert report["threads_alive"] == 0
    assert report["same_pool"] is True
    assert report["notes"] == THREADS * ROUNDS
    assert report["notes_n_sum"] == THREADS * (sum(range(ROUNDS)) + ROUNDS * 1000)

    # Every connection came back: as many idle as open, all of them alive on the
    # server, none opened beyond max_size and none thrown away.
    stats = report["stats"]
    assert stats["pool_available"] == stats["pool_size"] == report["backends"]
    assert POOL["min_size"] <= stats["pool_size"] <= POOL["max_size"]
    assert stats["connections_num"] == stats["pool_size"]
    assert stats["requests_num"] >= THREADS * ROUNDS  # a getconn per "request" at least
    assert stats.get("returns_bad", 0) == 0
    assert stats.get("connections_lost", 0) == 0

    # Closed cleanly: no thread and no server backend left behind.
    assert report["pool_threads_open"] != []
    assert report["pool_closed"] is True
    assert report["pool_threads"] == []
    assert report["backends_after_close"] == 0
