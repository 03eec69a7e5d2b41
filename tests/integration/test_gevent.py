"""The sync pool under gevent (gunicorn's and Celery's gevent workers).

Each case runs in a process of its own: monkey-patching is for the whole process.
psycopg cooperates with gevent once the socket module is patched; the pool must too,
with greenlets for its threads and gevent's primitives for its locks and queues.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from typing import Any

import pytest

pytest.importorskip("gevent")

SHARED = """
    import json
    import gevent
    from psycopg_pool import ConnectionPool

    holding = 0
    most = 0

    def work(pool, seconds):
        global holding, most
        with pool.connection() as conn:
            holding += 1
            most = max(most, holding)
            try:
                conn.execute("SELECT pg_sleep(%s)", [seconds])
            finally:
                holding -= 1

    def served(pool):
        with pool.connection() as conn:
            return conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                [pool.name],
            ).fetchone()[0]
"""


def run_script(dsn: str, first: str, body: str) -> dict[str, Any]:
    """Run `first`, then SHARED and `body` with DSN defined; return the JSON they print."""
    script = "\n".join([first, f"DSN = {dsn!r}", textwrap.dedent(SHARED), textwrap.dedent(body)])
    res = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    result: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    return result


def test_greenlets_share_the_pool_concurrently(dsn: str) -> None:
    # Patched before anything is imported, as gevent asks: 40 greenlets on 4
    # connections hold all 4 at once. Had the pool (or a thread of its own) blocked
    # the process, one greenlet at a time would hold a connection.
    out = run_script(
        dsn,
        "from gevent import monkey\nmonkey.patch_all()",
        """
        pool = ConnectionPool(
            DSN, min_size=0, max_size=4, open=False, name="gevent-a",
            kwargs={"application_name": "gevent-a"},
        )
        pool.open()
        jobs = [gevent.spawn(work, pool, 0.02) for _ in range(40)]
        gevent.joinall(jobs, raise_error=True)
        stats = pool.get_stats()
        backends = served(pool)
        pool.close()
        print(json.dumps({
            "most": most, "requests": stats["requests_num"], "opened": stats["connections_num"],
            "backends": backends,
        }))
        """,
    )
    assert out == {"most": 4, "requests": 40, "opened": 4, "backends": 4}


def test_imported_before_monkey_patching(dsn: str) -> None:
    # gunicorn's gevent worker with `preload_app`: the application, and the pool with
    # it, is imported before the worker patches. The pool's threads then become
    # greenlets; a primitive bound at import (a real queue, a real lock) would block
    # the only OS thread forever as the first worker waited on it.
    out = run_script(
        dsn,
        "import psycopg_pool\nfrom gevent import monkey\nmonkey.patch_all()",
        """
        pool = ConnectionPool(DSN, min_size=2, max_size=4, open=False, name="gevent-b")
        pool.open(wait=True, timeout=30)
        jobs = [gevent.spawn(work, pool, 0.001) for _ in range(20)]
        gevent.joinall(jobs, raise_error=True)
        stats = pool.get_stats()
        pool.close()
        print(json.dumps({"requests": stats["requests_num"], "closed": pool.closed}))
        """,
    )
    assert out == {"requests": 20, "closed": True}


def test_gevent_timeouts_lose_no_connection(dsn: str) -> None:
    # gevent.Timeout is raised in the greenlet wherever it next switches: while
    # queued for a connection, or holding one mid-query. Whichever, every connection
    # must end back in the pool or replaced, and nobody be left queued.
    out = run_script(
        dsn,
        "from gevent import monkey\nmonkey.patch_all()",
        """
        import random
        rnd = random.Random(5)
        pool = ConnectionPool(
            DSN, min_size=4, max_size=4, open=False, name="gevent-c",
            kwargs={"application_name": "gevent-c"},
        )
        pool.open(wait=True, timeout=30)
        counts = {"ok": 0, "timed_out": 0}

        def impatient():
            try:
                with gevent.Timeout(rnd.uniform(0.001, 0.05)):
                    work(pool, rnd.uniform(0, 0.02))
                counts["ok"] += 1
            except gevent.Timeout:
                counts["timed_out"] += 1

        jobs = [gevent.spawn(impatient) for _ in range(300)]
        gevent.joinall(jobs, raise_error=True)
        pool.wait(timeout=30)  # the replacements of the connections closed mid-query
        stats = pool.get_stats()
        # A connection closed mid-query leaves its server process behind for as long
        # as its query runs: wait for those to end.
        for _ in range(200):
            backends = served(pool)
            if backends == 4:
                break
            gevent.sleep(0.05)
        pool.close()
        print(json.dumps({
            "done": counts["ok"] + counts["timed_out"], "some_timed_out": counts["timed_out"] > 0,
            "size": stats["pool_size"], "available": stats["pool_available"],
            "waiting": stats["requests_waiting"], "backends": backends,
        }))
        """,
    )
    assert out == {
        "done": 300,
        "some_timed_out": True,
        "size": 4,
        "available": 4,
        "waiting": 0,
        "backends": 4,
    }
