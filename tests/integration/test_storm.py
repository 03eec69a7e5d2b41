"""A storm of interrupted clients on a real server: nothing lost, nothing leaked.

Hundreds of asyncio tasks (or dozens of threads) share a pool of `max_size=4` for a
few seconds. They borrow connections with short pool timeouts, run queries
(some long enough to be interrupted in the middle), leave transactions open,
raise in their `with` block; the async ones are also cancelled by each other at
random and run under `asyncio.timeout` or `asyncio.wait_for`. Afterwards:

- every client ended (no hang) with a connection or an expected exception, and
  no connection was ever in the hands of two clients at once;
- the pool settles: all its connections idle, `get_stats()` consistent, and it
  serves a new request at once (without queueing);
- the server has exactly `pool_size` backends with the pool's application_name:
  no connection was lost (left open by the pool) or leaked.

Issue 3, item 2. Bounded: STORM_SECONDS per storm.
"""

from __future__ import annotations

import asyncio
import random
import sys
import threading
import time
from collections import Counter
from typing import Any

import psycopg
import pytest

from psycopg_pool import AsyncConnectionPool, ConnectionPool, PoolTimeout

from .helpers import run_async, server_pids, wait_until

STORM_SECONDS = 3.0
MAX_SIZE = 4
N_TASKS = 500
N_THREADS = 48
HAS_TIMEOUT = sys.version_info >= (3, 11)


class Books:
    """What the clients saw, and which connections are in whose hands."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.outcomes: Counter[str] = Counter()
        self.unexpected: list[BaseException] = []
        self.in_hands: set[int] = set()
        self.double: list[str] = []

    def took(self, conn: Any) -> None:
        with self.lock:
            if id(conn) in self.in_hands:
                self.double.append(repr(conn))
            self.in_hands.add(id(conn))

    def gave(self, conn: Any) -> None:
        with self.lock:
            self.in_hands.discard(id(conn))

    def ended(self, what: str) -> None:
        with self.lock:
            self.outcomes[what] += 1

    def check(self, *kinds: str) -> None:
        assert not self.double, f"connections handed to two clients: {self.double}"
        assert not self.unexpected, f"unexpected errors: {self.unexpected[:5]}"
        assert not self.in_hands
        print(f"storm outcomes: {dict(self.outcomes)}")
        missing = [k for k in kinds if not self.outcomes[k]]
        assert not missing, f"the storm never produced {missing}: {self.outcomes}"


class Boom(Exception):
    """Raised by a client inside its `with` block."""


EXPECTED = (PoolTimeout, Boom, psycopg.errors.QueryCanceled)


def settled(pool: Any, dsn: str, app: str) -> None:
    """All connections back and idle, the stats consistent, the server agreeing."""

    def idle() -> bool:
        s = pool.get_stats()
        return s["pool_available"] == s["pool_size"] and not s["requests_waiting"]

    wait_until(idle, "every connection to be back in the pool")
    stats = pool.get_stats()
    assert pool.min_size <= stats["pool_size"] <= MAX_SIZE, stats
    assert stats["requests_waiting"] == 0
    wait_until(
        lambda: len(server_pids(dsn, app)) == pool.get_stats()["pool_size"],
        "the server's backends to match pool_size",
    )


def pool_kwargs(app: str) -> dict[str, Any]:
    return {
        "min_size": 2,
        "max_size": MAX_SIZE,
        "kwargs": {"application_name": app},
        "timeout": 1.0,
        "open": False,
    }


SQL = ["SELECT 1", "SELECT pg_sleep(0.001)", "SELECT pg_sleep(0.02)"]


# ----------------------------------------------------------------------
# asyncio


@run_async
async def test_async_storm(dsn: str) -> None:
    app = "storm-async"
    books = Books()
    rng = random.Random(3)
    loop = asyncio.get_running_loop()
    end = loop.time() + STORM_SECONDS
    tasks: set[asyncio.Task[None]] = set()
    used = [0]
    async with AsyncConnectionPool(dsn, **pool_kwargs(app)) as pool:
        await pool.wait()

        async def one_use() -> None:
            timeout = rng.choice([0.005, 0.05, 0.3, None])
            async with pool.connection(timeout) as conn:
                books.took(conn)
                try:
                    await conn.execute(rng.choice(SQL))
                    used[0] += 1
                    if used[0] % 8 == 1:  # not at random: every run must have some
                        raise Boom()
                finally:
                    books.gave(conn)

        async def client() -> None:
            while loop.time() < end:
                r = rng.random()
                try:
                    if r < 0.1 and HAS_TIMEOUT:
                        async with asyncio.timeout(rng.uniform(0.0, 0.02)):
                            await one_use()
                    elif r < 0.2:
                        await asyncio.wait_for(one_use(), rng.uniform(0.0, 0.02))
                    else:
                        await one_use()
                except EXPECTED as ex:
                    books.ended(type(ex).__name__)
                except (TimeoutError, asyncio.TimeoutError):
                    books.ended("deadline")
                except Exception as ex:
                    books.unexpected.append(ex)
                else:
                    books.ended("ok")
                if rng.random() < 0.05 and tasks:  # and cancel someone else
                    rng.choice(list(tasks)).cancel()

        def spawn() -> None:
            task = loop.create_task(client())
            tasks.add(task)
            task.add_done_callback(ended)

        def ended(task: asyncio.Task[None]) -> None:
            tasks.discard(task)
            if task.cancelled():
                books.ended("cancelled")
                if loop.time() < end:
                    spawn()  # keep the crowd at N_TASKS
            elif task.exception() is not None:
                books.unexpected.append(task.exception())  # type: ignore[arg-type]

        for _ in range(N_TASKS):
            spawn()
        while tasks:  # ends by itself at `end`; a hang fails the test (run_async)
            await asyncio.wait(list(tasks))

        books.check("ok", "PoolTimeout", "Boom", "deadline", "cancelled")
        await loop.run_in_executor(None, settled, pool, dsn, app)
        queued = pool.get_stats().get("requests_queued", 0)
        async with pool.connection(1.0) as conn:
            await conn.execute("SELECT 1")
        assert pool.get_stats().get("requests_queued", 0) == queued, "had to wait"
    await loop.run_in_executor(
        None, wait_until, lambda: not server_pids(dsn, app), "the backends to go"
    )


# ----------------------------------------------------------------------
# threads


def test_thread_storm(dsn: str) -> None:
    app = "storm-threads"
    books = Books()
    end = time.monotonic() + STORM_SECONDS
    with ConnectionPool(dsn, **pool_kwargs(app)) as pool:
        pool.wait()

        def client(seed: int) -> None:
            rng = random.Random(seed)
            while time.monotonic() < end:
                try:
                    with pool.connection(rng.choice([0.005, 0.05, 0.3, None])) as conn:
                        books.took(conn)
                        try:
                            if rng.random() < 0.1:
                                # Cut short by the server: an error in the middle of a query.
                                conn.execute("SET LOCAL statement_timeout = 1")
                                conn.execute("SELECT pg_sleep(0.05)")
                            conn.execute(rng.choice(SQL))
                            if rng.random() < 0.1:
                                raise Boom()
                        finally:
                            books.gave(conn)
                except EXPECTED as ex:
                    books.ended(type(ex).__name__)
                except Exception as ex:
                    books.unexpected.append(ex)
                else:
                    books.ended("ok")

        threads = [threading.Thread(target=client, args=(i,)) for i in range(N_THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(STORM_SECONDS + 10.0)
        assert not any(t.is_alive() for t in threads), "HANG: a client thread never ended"

        books.check("ok", "PoolTimeout", "Boom", "QueryCanceled")
        settled(pool, dsn, app)
        queued = pool.get_stats().get("requests_queued", 0)
        with pool.connection(1.0) as conn:
            conn.execute("SELECT 1")
        assert pool.get_stats().get("requests_queued", 0) == queued, "had to wait"
    wait_until(lambda: not server_pids(dsn, app), "the backends to go")


@pytest.fixture(autouse=True)
def _no_leftover_backends(dsn: str) -> None:
    """A storm starts with no backend of its application_name (a previous run's)."""
    for app in ("storm-async", "storm-threads"):
        wait_until(lambda app=app: not server_pids(dsn, app), f"old {app} backends to go")
