"""A connection that the pool closes as it comes back is closed when the return ends.

psycopg_pool 3.3 closes it in the caller, so code that looks at `conn.closed` right
after `putconn()` or the `with` block finds it closed. The cases: the pool was
closed meanwhile, a null pool with nobody waiting, an expired connection, a drained
one. Other connections (idle ones expiring, say) are still closed in the background.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import psycopg
import pytest

from psycopg_pool import (
    AsyncConnectionPool,
    AsyncNullConnectionPool,
    ConnectionPool,
    NullConnectionPool,
)

from .helpers import await_until, run_async, wait_until

SYNC_CLASSES = [ConnectionPool, NullConnectionPool]
ASYNC_CLASSES = [AsyncConnectionPool, AsyncNullConnectionPool]


def _size(cls: type) -> dict[str, int]:
    return {"min_size": 0 if "Null" in cls.__name__ else 1}


# ---------------------------------------------------------------------------
# The pool closed while the connection was out


@pytest.mark.parametrize("cls", SYNC_CLASSES)
def test_block_ending_after_close(dsn: str, cls: Any) -> None:
    pool = cls(dsn, open=False, **_size(cls))
    pool.open(wait=True, timeout=5)
    with pool.connection() as conn:
        pool.close()
        assert not conn.closed
    assert conn.closed


@pytest.mark.parametrize("cls", ASYNC_CLASSES)
@run_async
async def test_async_block_ending_after_close(dsn: str, cls: Any) -> None:
    pool = cls(dsn, open=False, **_size(cls))
    await pool.open(wait=True, timeout=5)
    async with pool.connection() as conn:
        await pool.close()
        assert not conn.closed
    assert conn.closed


# ---------------------------------------------------------------------------
# A null pool with nobody waiting


def test_null_pool_return(dsn: str) -> None:
    with NullConnectionPool(dsn) as pool:
        conn = pool.getconn()
        pool.putconn(conn)
        assert conn.closed
        with pool.connection() as conn2:
            assert conn2 is not conn
        assert conn2.closed
        assert pool.get_stats()["pool_size"] == 0


@run_async
async def test_async_null_pool_return(dsn: str) -> None:
    async with AsyncNullConnectionPool(dsn) as pool:
        conn = await pool.getconn()
        await pool.putconn(conn)
        assert conn.closed
        async with pool.connection() as conn2:
            assert conn2 is not conn
        assert conn2.closed
        assert pool.get_stats()["pool_size"] == 0


# ---------------------------------------------------------------------------
# Expired and drained connections, in a pool still open


def test_expired_return(dsn: str) -> None:
    with ConnectionPool(dsn, min_size=1, max_lifetime=0.2, open=False) as pool:
        conn = pool.getconn(5)
        wait_until(lambda: conn._expire_at < time.monotonic(), "the connection to expire")
        pool.putconn(conn)
        assert conn.closed
        with pool.connection(timeout=5) as conn2:
            assert conn2.execute("SELECT 1").fetchone() == (1,)


@run_async
async def test_async_expired_return(dsn: str) -> None:
    async with AsyncConnectionPool(dsn, min_size=1, max_lifetime=0.2, open=False) as pool:
        conn = await pool.getconn(5)
        await await_until(lambda: conn._expire_at < time.monotonic(), "the connection to expire")
        await pool.putconn(conn)
        assert conn.closed
        async with pool.connection(timeout=5) as conn2:
            await conn2.execute("SELECT 1")


def test_drained_return(dsn: str) -> None:
    with ConnectionPool(dsn, min_size=1, open=False) as pool:
        with pool.connection(timeout=5) as conn:
            pool.drain()
        assert conn.closed
        pool.wait(5)
        assert pool.get_stats()["pool_size"] == 1


@run_async
async def test_async_drained_return(dsn: str) -> None:
    async with AsyncConnectionPool(dsn, min_size=1, open=False) as pool:
        async with pool.connection(timeout=5) as conn:
            await pool.drain()
        assert conn.closed
        await pool.wait(5)
        assert pool.get_stats()["pool_size"] == 1


# ---------------------------------------------------------------------------
# A close() override that awaits something: the rest of it runs in a task


class SlowClose(psycopg.AsyncConnection[Any]):
    """Its close() suspends before closing; each instance records how far it got."""

    async def close(self) -> None:
        self.steps: list[str] = ["started"]
        try:
            await self.go_on.wait()
        except asyncio.CancelledError:
            self.steps.append("cancelled")
            raise
        await super().close()
        self.steps.append("closed")

    go_on: asyncio.Event


@run_async
async def test_async_close_override_finished_by_a_task(dsn: str) -> None:
    SlowClose.go_on = asyncio.Event()
    pool = AsyncNullConnectionPool(dsn, connection_class=SlowClose, open=False)
    await pool.open()
    conn = await pool.getconn()
    await pool.putconn(conn)
    # Started in the caller, suspended, not lost.
    assert conn.steps == ["started"]
    assert not conn.closed
    SlowClose.go_on.set()
    # The pool waits for its close jobs as it closes.
    await pool.close()
    assert conn.steps == ["started", "closed"]
    assert conn.closed


@run_async
async def test_async_close_override_cancelled_by_pool_close(dsn: str) -> None:
    SlowClose.go_on = asyncio.Event()  # never set
    pool = AsyncNullConnectionPool(dsn, connection_class=SlowClose, open=False)
    await pool.open()
    conn = await pool.getconn()
    await pool.putconn(conn)
    assert conn.steps == ["started"]
    # The close job outlives the timeout: cancelled, and the cancellation reaches the
    # override where it waits.
    await pool.close(timeout=0.05)
    await await_until(lambda: conn.steps[-1] == "cancelled", "the override to be cancelled")
    assert conn.steps == ["started", "cancelled"]
    assert not conn.closed
    await psycopg.AsyncConnection.close(conn)  # what the override did not get to
