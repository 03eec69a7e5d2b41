"""The async pools on uvloop, the event loop uvicorn picks when it is installed.

uvloop keeps asyncio's futures and tasks but has timers and callbacks of its own:
the pool's deadline timers, its thread-safe wake-ups and the close it runs inline on
a connection's return go through them.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Coroutine
from typing import Any

import pytest

from psycopg_pool import AsyncConnectionPool, AsyncNullConnectionPool, PoolTimeout

from .helpers import ASYNC_TEST_TIMEOUT, await_until, server_pids

uvloop = pytest.importorskip("uvloop")


def run(coro: Coroutine[Any, Any, None]) -> None:
    uvloop.run(asyncio.wait_for(coro, ASYNC_TEST_TIMEOUT))


def test_impatient_tasks_lose_no_connection(dsn: str) -> None:
    async def main() -> None:
        rnd = random.Random(3)
        pool = AsyncConnectionPool(
            dsn, min_size=2, max_size=6, open=False, name="uv-a",
            kwargs={"application_name": "uv-a"},
        )  # fmt: skip
        await pool.open(wait=True, timeout=10)
        outcomes = {"served": 0, "timed_out": 0}

        async def work() -> None:
            async with pool.connection() as conn:
                await conn.execute("SELECT pg_sleep(%s)", [rnd.uniform(0, 0.01)])

        async def impatient() -> None:
            # Cancelled while queued, or holding a connection mid-query.
            try:
                await asyncio.wait_for(work(), rnd.uniform(0.001, 0.05))
                outcomes["served"] += 1
            except asyncio.TimeoutError:
                outcomes["timed_out"] += 1

        await asyncio.gather(*[impatient() for _ in range(400)])
        await asyncio.gather(*[work() for _ in range(200)])  # all served afterwards
        held = [await pool.getconn(timeout=5) for _ in range(6)]
        with pytest.raises(PoolTimeout):  # the deadline timer fires
            await pool.getconn(timeout=0.05)
        for conn in held:
            await pool.putconn(conn)
        await pool.wait(timeout=10)
        stats = pool.get_stats()
        assert outcomes["served"] + outcomes["timed_out"] == 400
        assert outcomes["timed_out"] > 0
        assert stats["pool_available"] == stats["pool_size"]
        assert stats["requests_waiting"] == 0
        size = stats["pool_size"]
        # Nothing left open on the server beyond what the pool holds.
        await await_until(lambda: len(server_pids(dsn, "uv-a")) == size, "stray backends to end")
        await pool.close()

    run(main())


def test_connections_closed_on_return_are_closed_at_once(dsn: str) -> None:
    async def main() -> None:
        pool = AsyncConnectionPool(dsn, min_size=1, open=False)
        await pool.open(wait=True, timeout=10)
        async with pool.connection() as conn:
            await pool.drain()  # while out: to be replaced as it comes back
        assert conn.closed
        conn = await pool.getconn()
        await pool.close()
        await pool.putconn(conn)  # returned to a closed pool
        assert conn.closed

        null = AsyncNullConnectionPool(dsn, max_size=2, open=False)
        await null.open()
        async with null.connection() as conn:
            await conn.execute("SELECT 1")
        assert conn.closed
        await null.close()

    run(main())
