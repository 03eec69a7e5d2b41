"""NullConnectionPool and AsyncNullConnectionPool against a real server (spec §6).

Each behavioural test runs on both classes. Its body is a coroutine driving the
pool through `Driver`, which awaits the async pool's methods and runs the sync
pool's in a thread, so that a sync client blocked in `getconn()` never blocks
the event loop the test runs in.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from psycopg_pool import (
    AsyncNullConnectionPool,
    NullConnectionPool,
    PoolClosed,
    PoolTimeout,
    TooManyRequests,
)

from .helpers import (
    GAUGES,
    GatedAsyncConnection,
    await_stat,
    await_until,
    log_messages,
    messages_as_logged,
    pool_stat,
    refused_conninfo,
    run_async,
    server_pids,
    silent_server,
)

CLASSES = [NullConnectionPool, AsyncNullConnectionPool]


@pytest.fixture(params=["sync", "async"])
def kind(request: pytest.FixtureRequest) -> str:
    value: str = request.param
    return value


class Driver:
    """The API of a null pool, sync or async, as coroutines."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.is_async = isinstance(pool, AsyncNullConnectionPool)

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Await `fn(*args)` (async flavour) or run it in a thread (sync flavour)."""
        if self.is_async:
            return await fn(*args)
        return await asyncio.to_thread(fn, *args)

    async def call(self, method: str, *args: Any) -> Any:
        return await self.run(getattr(self.pool, method), *args)

    async def getconn(self, timeout: float | None = None) -> Any:
        return await self.call("getconn", timeout)

    async def putconn(self, conn: Any) -> None:
        await self.call("putconn", conn)

    async def putconn_to_nobody(self, *conns: Any) -> None:
        """Return connections no client waits for: they close, the pool ends empty."""
        for conn in conns:
            await self.putconn(conn)
        await await_until(lambda: all(c.closed for c in conns), "the connections to close")
        await await_stat(self.pool, "pool_size", 0)

    def start_getconn(self, timeout: float | None = None) -> asyncio.Task[Any]:
        """A client calling getconn() concurrently with the test."""
        return asyncio.ensure_future(self.getconn(timeout))

    async def fetchval(self, conn: Any, sql: str) -> Any:
        cur = await self.run(conn.execute, sql)
        row = await cur.fetchone() if self.is_async else cur.fetchone()
        return row[0]

    async def borrow(self, timeout: float | None = None) -> int:
        """One query in a `pool.connection()` block; the backend pid it ran on."""
        if self.is_async:
            async with self.pool.connection(timeout) as conn:
                return conn.info.backend_pid

        def use() -> int:
            with self.pool.connection(timeout) as conn:
                return conn.info.backend_pid

        result: int = await asyncio.to_thread(use)
        return result


def callback(kind: str, fn: Callable[[Any], None]) -> Callable[[Any], Any]:
    """A configure/check/reset callback of the pool's flavour, doing what `fn` does."""
    if kind == "sync":
        return fn

    async def acallback(conn: Any) -> None:
        fn(conn)

    return acallback


def pool_class(kind: str) -> type:
    return NullConnectionPool if kind == "sync" else AsyncNullConnectionPool


@asynccontextmanager
async def null_pool(kind: str, conninfo: str, **kwargs: Any) -> AsyncIterator[Driver]:
    """An open null pool of the given flavour (timeout 2 s unless given), closed at exit."""
    kwargs.setdefault("timeout", 2.0)
    drv = Driver(pool_class(kind)(conninfo, open=False, **kwargs))
    await drv.call("open")
    try:
        yield drv
    finally:
        await drv.call("close")


# ----------------------------------------------------------------------
# Configuration


@pytest.mark.parametrize("cls", CLASSES)
def test_sizes(cls: type) -> None:
    pool = cls(open=False)
    assert (pool.min_size, pool.max_size) == (0, 0)  # 0: unlimited
    stats = pool.get_stats()
    assert {k: stats[k] for k in GAUGES} == dict.fromkeys(GAUGES, 0)
    assert cls(max_size=3, open=False).max_size == 3
    with pytest.raises(ValueError, match=r"^null pools must have min_size = 0$"):
        cls(min_size=1, open=False)
    with pytest.raises(ValueError, match=r"^null pools must have min_size = 0$"):
        cls(min_size=2, max_size=4, open=False)
    with pytest.raises(ValueError, match=r"^max_size must be greater or equal than min_size$"):
        cls(max_size=-2, open=False)


@pytest.mark.parametrize("cls", CLASSES)
def test_close_returns_is_forced_false(cls: type) -> None:
    assert cls(close_returns=True, open=False).close_returns is False


@run_async
async def test_resize_only_validates_and_stores(dsn: str, kind: str) -> None:
    async with null_pool(kind, dsn) as drv:
        await drv.call("resize", 0, 3)
        assert (drv.pool.min_size, drv.pool.max_size) == (0, 3)
        assert pool_stat(drv.pool, "pool_max") == 3
        await drv.call("resize", 0)
        assert drv.pool.max_size == 0
        with pytest.raises(ValueError, match=r"^null pools must have min_size = 0$"):
            await drv.call("resize", 1)
        assert drv.pool.min_size == 0
        assert pool_stat(drv.pool, "pool_size") == 0
        assert pool_stat(drv.pool, "connections_num") == 0  # nothing opened


@run_async
async def test_use_before_open(dsn: str, kind: str) -> None:
    drv = Driver(pool_class(kind)(dsn, open=False, name="unopened"))
    with pytest.raises(PoolClosed, match=r"^the pool 'unopened' is not open yet$"):
        await drv.getconn()
    assert pool_stat(drv.pool, "requests_num") == 1


# ----------------------------------------------------------------------
# Lending and taking back


@run_async
async def test_no_idle_connections(dsn: str, kind: str) -> None:
    async with null_pool(kind, dsn) as drv:
        pool = drv.pool
        conn = await drv.getconn()
        assert conn._pool is pool
        first = conn.info.backend_pid
        assert (pool_stat(pool, "pool_size"), pool_stat(pool, "pool_available")) == (1, 0)
        await drv.putconn(conn)  # nobody waits: closed
        assert conn.closed  # by putconn() itself
        assert conn._pool is None
        assert (pool_stat(pool, "pool_size"), pool_stat(pool, "pool_available")) == (0, 0)

        second = await drv.borrow()
        assert second != first
        assert pool_stat(pool, "pool_available") == 0
        stats = pool.get_stats()
        assert stats["connections_num"] == 2
        assert stats["requests_num"] == 2
        assert stats.get("requests_queued", 0) == 0
        assert "usage_ms" in stats
        await await_stat(pool, "pool_size", 0)


@run_async
async def test_unlimited_max_size(dsn: str, kind: str) -> None:
    async with null_pool(kind, dsn) as drv:
        conns = [await drv.getconn() for _ in range(5)]
        assert len({c.info.backend_pid for c in conns}) == 5
        assert pool_stat(drv.pool, "pool_size") == 5
        assert pool_stat(drv.pool, "requests_queued") == 0
        await drv.putconn_to_nobody(*conns)


@run_async
async def test_returned_connection_goes_to_a_waiting_client(dsn: str, kind: str) -> None:
    resets = 0

    def reset(conn: Any) -> None:
        nonlocal resets
        resets += 1

    async with null_pool(kind, dsn, max_size=1, reset=callback(kind, reset)) as drv:
        conn = await drv.getconn()
        backend = conn.info.backend_pid
        assert await drv.fetchval(conn, "SELECT 1") == 1  # INTRANS: rolled back on return
        waiter = drv.start_getconn()
        await await_stat(drv.pool, "requests_waiting", 1)
        await drv.putconn(conn)
        handed = await waiter
        assert handed is conn
        assert handed.info.backend_pid == backend
        assert handed.info.transaction_status.name == "IDLE"
        assert not handed.closed
        assert resets == 1
        assert pool_stat(drv.pool, "pool_size") == 1
        assert pool_stat(drv.pool, "connections_num") == 1

        await drv.putconn_to_nobody(handed)


@run_async
async def test_connection_returned_to_nobody_is_closed_without_reset(
    dsn: str, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    resets = 0

    def reset(conn: Any) -> None:
        nonlocal resets
        resets += 1

    async with null_pool(kind, dsn, reset=callback(kind, reset)) as drv:
        conn = await drv.getconn()
        assert await drv.fetchval(conn, "SELECT 1") == 1  # INTRANS
        await drv.putconn_to_nobody(conn)
        assert resets == 0
        assert pool_stat(drv.pool, "returns_bad") == 0
    assert messages_as_logged(caplog) == []  # no rollback either


@run_async
async def test_broken_connection_returned_to_a_waiting_client(dsn: str, kind: str) -> None:
    async with null_pool(kind, dsn, max_size=1) as drv:
        conn = await drv.getconn()
        waiter = drv.start_getconn()
        await await_stat(drv.pool, "requests_waiting", 1)
        await drv.run(conn.close)
        await drv.putconn(conn)  # the waiter gets a new connection instead
        handed = await waiter
        assert handed is not conn
        assert await drv.fetchval(handed, "SELECT 1") == 1
        assert pool_stat(drv.pool, "returns_bad") == 1
        assert pool_stat(drv.pool, "pool_size") == 1
        await drv.putconn_to_nobody(handed)


@run_async
async def test_closed_connection_returned(dsn: str, kind: str) -> None:
    async with null_pool(kind, dsn, close_returns=True) as drv:
        conn = await drv.getconn()
        await drv.run(conn.close)  # close_returns is ignored: really closed
        assert conn.closed
        await drv.putconn(conn)
        assert pool_stat(drv.pool, "returns_bad") == 1
        await await_stat(drv.pool, "pool_size", 0)


# ----------------------------------------------------------------------
# Waiting for a connection


@run_async
async def test_getconn_timeout(dsn: str, kind: str) -> None:
    async with null_pool(kind, dsn, max_size=1) as drv:
        conn = await drv.getconn()
        with pytest.raises(PoolTimeout, match=r"^couldn't get a connection after 0\.20 sec: "):
            await drv.getconn(0.2)
        # No idle connection ever: a non-blocking attempt always fails.
        with pytest.raises(PoolTimeout, match=r"^couldn't get a connection after 0\.00 sec: "):
            await drv.getconn(0)
        stats = drv.pool.get_stats()
        assert stats["requests_queued"] == 1
        assert stats["requests_errors"] == 1
        assert stats["requests_waiting"] == 0
        await drv.putconn(conn)
        await await_stat(drv.pool, "pool_size", 0)


@run_async
async def test_max_waiting(dsn: str, kind: str) -> None:
    async with null_pool(kind, dsn, max_size=1, max_waiting=1, name="nullbusy") as drv:
        conn = await drv.getconn()
        waiter = drv.start_getconn()
        await await_stat(drv.pool, "requests_waiting", 1)
        msg = r"^the pool 'nullbusy' has already 1 requests waiting$"
        with pytest.raises(TooManyRequests, match=msg):
            await drv.getconn()
        assert pool_stat(drv.pool, "requests_errors") == 1
        await drv.putconn(conn)
        handed = await waiter
        assert handed is conn
        await drv.putconn_to_nobody(handed)


@run_async
async def test_close_while_clients_wait(dsn: str, kind: str) -> None:
    async with null_pool(kind, dsn, max_size=1, name="nullclosing") as drv:
        conn = await drv.getconn()
        waiter = drv.start_getconn(5.0)
        await await_stat(drv.pool, "requests_waiting", 1)
        await drv.call("close")
        with pytest.raises(PoolClosed, match=r"^the pool 'nullclosing' is closed$"):
            await waiter
        assert pool_stat(drv.pool, "requests_errors") == 1
        assert not conn.closed
        await drv.putconn(conn)
        assert conn.closed  # by putconn() itself
        with pytest.raises(PoolClosed, match=r"^the pool 'nullclosing' is already closed$"):
            await drv.getconn()


# ----------------------------------------------------------------------
# Connecting


@run_async
async def test_wait_makes_exactly_one_connection(dsn: str, kind: str) -> None:
    app = f"null-wait-{kind}"
    async with null_pool(kind, dsn, kwargs={"application_name": app}) as drv:
        await drv.call("wait", 5.0)
        stats = drv.pool.get_stats()
        assert stats["connections_num"] == 1
        assert stats["pool_size"] == 0
        assert stats["pool_available"] == 0
        await await_until(lambda: not server_pids(dsn, app), "the probe connection to close")


@run_async
async def test_wait_timeout_closes_the_pool(kind: str) -> None:
    async with null_pool(kind, refused_conninfo()) as drv:
        with pytest.raises(PoolTimeout, match=r"^pool initialization incomplete after 0\.3 sec: "):
            await drv.call("wait", 0.3)
        assert drv.pool.closed


@pytest.mark.parametrize("failure", ["refused", "no such database"])
@run_async
async def test_connection_errors_reach_the_caller(dsn: str, kind: str, failure: str) -> None:
    if failure == "refused":
        conninfo = refused_conninfo()
    else:
        conninfo = make_conninfo(dsn, dbname="no_such_database")
    async with null_pool(kind, conninfo) as drv:
        with pytest.raises(psycopg.OperationalError) as excinfo:
            await drv.getconn()
        assert not isinstance(excinfo.value, PoolTimeout)
        if failure != "refused":
            assert "no_such_database" in str(excinfo.value)
        stats = drv.pool.get_stats()
        assert stats["connections_errors"] == 1
        assert stats["pool_size"] == 0
        assert stats.get("requests_queued", 0) == 0


@run_async
async def test_unresponsive_server(kind: str) -> None:
    # libpq waits at least 2 s for a server: the one slow test of this module.
    with silent_server() as conninfo:
        async with null_pool(kind, conninfo) as drv:
            with pytest.raises(PoolTimeout) as excinfo:
                await drv.borrow(timeout=1)
            assert "timeout" in str(excinfo.value)
            assert pool_stat(drv.pool, "pool_size") == 0


@run_async
async def test_cancelled_while_connecting() -> None:
    with silent_server() as conninfo:
        async with null_pool("async", conninfo, timeout=10.0) as drv:
            client = drv.start_getconn()
            await await_stat(drv.pool, "pool_size", 1)  # connecting
            client.cancel()
            with pytest.raises(asyncio.CancelledError):
                await client
            assert pool_stat(drv.pool, "pool_size") == 0


@run_async
async def test_configure_runs_for_each_connection(dsn: str, kind: str) -> None:
    configured: list[int] = []

    def configure(conn: Any) -> None:
        configured.append(conn.info.backend_pid)

    async with null_pool(kind, dsn, configure=callback(kind, configure)) as drv:
        first = await drv.borrow()
        second = await drv.borrow()
        assert configured == [first, second]


@run_async
async def test_failing_check_gets_another_connection(
    dsn: str, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="psycopg.pool")
    checked: list[int] = []

    def check(conn: Any) -> None:
        checked.append(conn.info.backend_pid)
        if len(checked) == 1:
            raise psycopg.OperationalError("not this one")

    async with null_pool(kind, dsn, check=callback(kind, check)) as drv:
        given = await drv.borrow()
        assert len(checked) == 2
        assert given == checked[1] != checked[0]
        assert pool_stat(drv.pool, "connections_num") == 2
        await await_stat(drv.pool, "pool_size", 0)
    assert any("failed check" in m for m in log_messages(caplog, logging.INFO))
    assert messages_as_logged(caplog) == []


@run_async
async def test_check_is_a_no_op(dsn: str, kind: str) -> None:
    async with null_pool(kind, dsn) as drv:
        conn = await drv.getconn()
        before = drv.pool.get_stats()
        await drv.call("check")
        assert drv.pool.get_stats() == before
        assert not conn.closed
        assert conn._pool is drv.pool
        await drv.putconn(conn)


@run_async
async def test_stats(dsn: str, kind: str) -> None:
    async with null_pool(kind, dsn, max_size=2) as drv:
        for _ in range(3):
            await drv.borrow()
        stats = drv.pool.pop_stats()
        assert stats["pool_min"] == 0
        assert stats["pool_max"] == 2
        assert stats["pool_available"] == 0
        assert stats["requests_num"] == 3
        assert stats["connections_num"] == 3
        assert "connections_ms" in stats
        assert "usage_ms" in stats
        after = drv.pool.get_stats()
        assert set(after) == GAUGES  # counters reset, gauges still there


@run_async
async def test_drain_affects_connections_passed_between_clients(dsn: str, kind: str) -> None:
    async with null_pool(kind, dsn, max_size=1) as drv:
        conn = await drv.getconn()
        waiter = drv.start_getconn()
        await await_stat(drv.pool, "requests_waiting", 1)
        await drv.call("drain")
        await drv.putconn(conn)  # made before the drain: not handed on
        handed = await waiter
        assert handed is not conn
        assert conn.closed  # by putconn() itself
        await drv.putconn_to_nobody(handed)


@run_async
async def test_wait_on_a_busy_pool(dsn: str, kind: str) -> None:
    # wait() checks that a connection can be made; clients using all of max_size
    # are no reason to fail it (and a failed wait() closes the pool).
    async with null_pool(kind, dsn, max_size=1) as drv:
        conn = await drv.getconn()
        await drv.call("wait", 0.5)
        assert not drv.pool.closed
        assert pool_stat(drv.pool, "connections_num") == 2
        await drv.putconn(conn)


@run_async
async def test_close_while_a_client_connects(dsn: str) -> None:
    class Gated(GatedAsyncConnection):
        gate = asyncio.Event()

    async with null_pool("async", dsn, connection_class=Gated, name="nullgone") as drv:
        client = drv.start_getconn()
        await await_until(lambda: Gated.in_flight == 1, "the client to be connecting")
        await drv.call("close")
        Gated.gate.set()
        with pytest.raises(PoolClosed, match=r"^the pool 'nullgone' is already closed$"):
            await client
        assert pool_stat(drv.pool, "pool_size") == 0
