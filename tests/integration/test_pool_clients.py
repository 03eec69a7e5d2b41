"""ConnectionPool driven by the real clients of the spec's last appendix.

SQLAlchemy's NullPool with `creator=pool.getconn` and `close_returns=True`, and
Django's built-in pool support (settings OPTIONS["pool"]). Skipped when the
framework is not installed. Django runs in a subprocess: its settings are global.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from psycopg_pool import ConnectionPool


def test_sqlalchemy_nullpool_creator(dsn: str) -> None:
    sa = pytest.importorskip("sqlalchemy")
    from sqlalchemy.pool import NullPool

    with ConnectionPool(dsn, min_size=1, close_returns=True, open=False) as pool:
        engine = sa.create_engine("postgresql+psycopg://", creator=pool.getconn, poolclass=NullPool)
        pids = set()
        for _ in range(3):
            with engine.connect() as conn:
                pids.add(conn.execute(sa.text("SELECT pg_backend_pid()")).scalar())
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TEMP TABLE sa_t (x int)"))
            conn.execute(sa.text("INSERT INTO sa_t VALUES (1)"))
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT x FROM sa_t")).scalar() == 1
        engine.dispose()
        stats = pool.get_stats()
        assert len(pids) == 1  # SQLAlchemy's close() gave the connection back each time
        assert stats["connections_num"] == 1
        assert stats["requests_num"] == 5
        assert stats["pool_available"] == 1
        assert stats.get("returns_bad", 0) == 0


DJANGO_SCRIPT = """
import sys
import threading
import warnings

warnings.simplefilter("error")

import django
from django.conf import settings
from psycopg.conninfo import conninfo_to_dict

params = conninfo_to_dict(sys.argv[1])
settings.configure(
    DATABASES={
        "default": {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": params.get("dbname", "postgres"),
            "USER": params.get("user", ""),
            "HOST": params.get("host", ""),
            "PORT": params.get("port", ""),
            "CONN_HEALTH_CHECKS": True,
            "OPTIONS": {"pool": {"min_size": 1, "max_size": 2, "timeout": 5, "name": "dj"}},
        }
    }
)
django.setup()

from django.db import connection

from psycopg_pool import ConnectionPool

errors = []


def work():
    try:
        for _ in range(5):
            with connection.cursor() as cur:
                cur.execute("SELECT 1")
                assert cur.fetchone() == (1,)
            connection.close()  # gives the connection back to the pool
    except BaseException as ex:
        errors.append(ex)


threads = [threading.Thread(target=work) for _ in range(3)]
for t in threads:
    t.start()
for t in threads:
    t.join()
work()
assert errors == [], errors
pool = connection.pool
assert isinstance(pool, ConnectionPool), type(pool)
stats = pool.get_stats()
assert stats["requests_num"] == 20, stats
assert stats["connections_num"] <= 2, stats
assert stats["requests_waiting"] == 0, stats
connection.close_pool()
assert pool.closed
print("ok", pool.name)
"""


def test_django_pool_option(dsn: str) -> None:
    pytest.importorskip("django")
    res = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(DJANGO_SCRIPT), dsn],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["ok", "dj"]
