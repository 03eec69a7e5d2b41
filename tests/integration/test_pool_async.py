"""AsyncConnectionPool against a real server: the behaviours it shares with the sync pool.

The async specifics of the spec's §7 (opening, warnings, coroutine callbacks,
cancellation) are in test_pool_async_specifics.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import Any

import psycopg
import pytest
from psycopg import AsyncConnection
from psycopg.pq import TransactionStatus

from psycopg_pool import AsyncConnectionPool, PoolClosed, PoolTimeout, TooManyRequests

from .helpers import (
    GAUGES,
    GatedAsyncConnection,
    afetchval,
    async_pool,
    await_stat,
    await_until,
    backend_pid,
    log_messages,
    messages_as_logged,
    pool_stat,
    refused_conninfo,
    run_async,
    server_pids,
    terminate_backends,
)

# ----------------------------------------------------------------------
# Lending and taking back


@run_async
async def test_getconn_putconn(dsn: str) -> None:
    async with async_pool(dsn, min_size=2, name="lender") as pool:
        stats = pool.get_stats()
        assert {k: stats[k] for k in GAUGES} == {
            "pool_min": 2,
            "pool_max": 2,
            "pool_size": 2,
            "pool_available": 2,
            "requests_waiting": 0,
            "pool_connecting": 0,
        }
        conn = await pool.getconn()
        assert isinstance(conn, AsyncConnection)
        assert conn._pool is pool
        assert pool_stat(pool, "pool_available") == 1
        assert await afetchval(conn, "SELECT 42") == 42
        await conn.rollback()

        await pool.putconn(conn)
        assert conn._pool is None
        assert not conn.closed
        assert pool_stat(pool, "pool_available") == 2
        assert pool_stat(pool, "requests_num") == 1


@run_async
async def test_putconn_foreign_connections(dsn: str) -> None:
    async with async_pool(dsn, name="mine") as pool, async_pool(dsn, name="theirs") as other:
        theirs = await other.getconn()
        with pytest.raises(
            ValueError,
            match=r"^can't return connection to pool 'mine', it comes from pool 'theirs': ",
        ):
            await pool.putconn(theirs)
        assert theirs._pool is other
        await other.putconn(theirs)

        async with await AsyncConnection.connect(dsn) as stranger:
            with pytest.raises(
                ValueError,
                match=r"^can't return connection to pool 'mine', it doesn't come from any pool: ",
            ):
                await pool.putconn(stranger)

        conn = await pool.getconn()
        await pool.putconn(conn)
        with pytest.raises(ValueError, match="it doesn't come from any pool"):
            await pool.putconn(conn)  # twice
        assert pool_stat(pool, "pool_available") == 1
        assert pool_stat(pool, "pool_size") == 1


@run_async
async def test_idle_queue_is_fifo(dsn: str) -> None:
    async with async_pool(dsn, min_size=4) as pool:
        pids = []
        for _ in range(8):
            async with pool.connection() as conn:
                pids.append(backend_pid(conn))
        assert sorted(Counter(pids).values()) == [2, 2, 2, 2]
        assert pids[:4] == pids[4:]


@run_async
async def test_connection_commits_or_rolls_back(dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    async with async_pool(dsn, min_size=1) as pool:
        async with pool.connection() as conn:
            await conn.execute("SET application_name = 'committed'")
        assert not conn.closed
        assert conn.info.transaction_status == TransactionStatus.IDLE

        with pytest.raises(ZeroDivisionError):
            async with pool.connection() as conn2:
                await conn2.execute("SET application_name = 'rolled back'")
                1 / 0  # noqa: B018
        assert conn2 is conn
        assert not conn.closed

        async with pool.connection() as conn3:
            assert conn3 is conn
            assert await afetchval(conn3, "SHOW application_name") == "committed"
        assert "usage_ms" in pool.get_stats()
        assert pool_stat(pool, "requests_num") == 3
    assert messages_as_logged(caplog) == []


# ----------------------------------------------------------------------
# Waiting, timeouts, queue limits


@run_async
async def test_getconn_timeout(dsn: str) -> None:
    async with async_pool(dsn, min_size=1, timeout=0.2, max_waiting=1) as pool:
        conn = await pool.getconn()
        with pytest.raises(PoolTimeout, match=r"^couldn't get a connection after 0\.20 sec: "):
            await pool.getconn()
        with pytest.raises(PoolTimeout, match=r"^couldn't get a connection after 0\.05 sec: "):
            await pool.getconn(timeout=0.05)
        stats = pool.get_stats()
        assert stats["requests_queued"] == 2
        assert stats["requests_errors"] == 2
        assert "requests_wait_ms" in stats
        # Deliberate difference 2: a timed-out client left the queue at once, and
        # does not count against max_waiting.
        assert stats["requests_waiting"] == 0
        waiter = asyncio.create_task(pool.getconn(timeout=2.0))
        await await_stat(pool, "requests_waiting", 1)
        await pool.putconn(conn)
        conn2 = await waiter
        assert conn2 is conn
        await pool.putconn(conn2)
        assert pool_stat(pool, "pool_available") == 1


@run_async
async def test_getconn_timeout_zero_is_a_non_blocking_attempt(dsn: str) -> None:
    # Deliberate difference 6: an idle connection is given, otherwise PoolTimeout at once.
    async with async_pool(dsn, min_size=1, max_size=2) as pool:
        conn = await pool.getconn(timeout=0)
        assert conn._pool is pool
        with pytest.raises(PoolTimeout, match=r"^couldn't get a connection after 0\.00 sec: "):
            await pool.getconn(timeout=0)
        assert pool_stat(pool, "requests_queued") == 0
        assert pool_stat(pool, "requests_waiting") == 0
        await pool.putconn(conn)
        again = await pool.getconn(timeout=0)
        assert again is conn
        await pool.putconn(again)


@run_async
async def test_max_waiting(dsn: str) -> None:
    async with async_pool(dsn, min_size=1, max_waiting=2, name="busy") as pool:
        conn = await pool.getconn()
        waiters = [asyncio.create_task(pool.getconn()) for _ in range(2)]
        await await_stat(pool, "requests_waiting", 2)
        msg = r"^the pool 'busy' has already 2 requests waiting$"
        with pytest.raises(TooManyRequests, match=msg):
            await pool.getconn()
        assert pool_stat(pool, "requests_errors") == 1
        assert pool_stat(pool, "requests_queued") == 2

        await pool.putconn(conn)
        for waiter in waiters:
            await pool.putconn(await waiter)
        assert pool_stat(pool, "pool_available") == 1
        assert pool_stat(pool, "requests_errors") == 1


@run_async
async def test_waiters_served_in_order(dsn: str) -> None:
    async with async_pool(dsn, min_size=1) as pool:
        conn = await pool.getconn()
        order: list[int] = []

        async def client(i: int) -> None:
            async with pool.connection():
                order.append(i)

        tasks = []
        for i in range(4):
            tasks.append(asyncio.create_task(client(i)))
            await await_stat(pool, "requests_waiting", i + 1)
        await pool.putconn(conn)
        await asyncio.gather(*tasks)
        assert order == [0, 1, 2, 3]


@run_async
async def test_gauges_mid_burst(dsn: str) -> None:
    async with async_pool(dsn, min_size=2, max_size=4) as pool:
        release = asyncio.Event()
        holding = 0

        async def client() -> None:
            nonlocal holding
            async with pool.connection():
                holding += 1
                await release.wait()

        tasks = [asyncio.create_task(client()) for _ in range(7)]
        await await_until(
            lambda: holding == 4 and pool_stat(pool, "requests_waiting") == 3,
            "4 clients served and 3 waiting",
        )
        assert pool_stat(pool, "pool_size") == 4
        assert pool_stat(pool, "pool_available") == 0
        release.set()
        await asyncio.gather(*tasks)
        assert holding == 7
        assert pool_stat(pool, "requests_waiting") == 0
        assert pool_stat(pool, "pool_available") == 4
        assert pool_stat(pool, "connections_num") == 4


# ----------------------------------------------------------------------
# The return path


@pytest.mark.parametrize("status", ["INTRANS", "INERROR"])
@run_async
async def test_return_in_transaction_is_rolled_back(
    dsn: str, caplog: pytest.LogCaptureFixture, status: str
) -> None:
    async with async_pool(dsn, min_size=1) as pool:
        conn = await pool.getconn()
        if status == "INTRANS":
            await conn.execute("SELECT 1")
        else:
            with pytest.raises(psycopg.errors.DivisionByZero):
                await conn.execute("SELECT 1 / 0")
        assert conn.info.transaction_status.name == status
        backend = backend_pid(conn)
        await pool.putconn(conn)
        await await_stat(pool, "pool_available", 1)

        messages = messages_as_logged(caplog)
        assert len(messages) == 1, messages
        assert messages[0].startswith("rolling back returned connection: ")
        assert f"[{status}]" in messages[0]
        async with pool.connection() as again:
            assert backend_pid(again) == backend
        assert pool_stat(pool, "returns_bad") == 0


async def make_active(dsn: str, conn: AsyncConnection[Any]) -> None:
    copy = conn.cursor().copy("COPY (SELECT generate_series(1, 10)) TO STDOUT")
    await copy.__aenter__()  # a COPY left half-way: the connection is ACTIVE


async def make_unrollbackable(dsn: str, conn: AsyncConnection[Any]) -> None:
    with pytest.raises(psycopg.errors.DivisionByZero):
        await conn.execute("SELECT 1 / 0")
    terminate_backends(dsn, backend_pid(conn))  # INERROR, and the rollback will fail


@pytest.mark.parametrize(
    ("spoil", "expected"),
    [
        (make_active, ["closing returned connection: [ACTIVE]"]),
        (
            make_unrollbackable,
            [
                "rolling back returned connection: [INERROR]",
                "rollback failed: Discarding connection",
            ],
        ),
    ],
    ids=["ACTIVE", "failed rollback"],
)
@run_async
async def test_return_path_closing_the_connection(
    dsn: str, caplog: pytest.LogCaptureFixture, spoil: Any, expected: list[str]
) -> None:
    async with async_pool(dsn, min_size=1) as pool:
        conn = await pool.getconn()
        backend = backend_pid(conn)
        await spoil(dsn, conn)
        await pool.putconn(conn)
        await await_stat(pool, "pool_available", 1)

        assert conn.closed
        assert pool_stat(pool, "returns_bad") == 1
        async with pool.connection() as again:
            assert backend_pid(again) != backend
        messages = messages_as_logged(caplog)
        expected = [*expected, "discarding closed connection: [BAD]"]
        assert len(messages) == len(expected), messages
        for message, fragments in zip(messages, expected, strict=True):
            start, _, mark = fragments.partition(": ")
            assert message.startswith(f"{start}: "), message
            assert mark in message, message


@run_async
async def test_return_closed_connection(dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    async with async_pool(dsn, min_size=1) as pool:
        conn = await pool.getconn()
        backend = backend_pid(conn)
        await conn.close()  # close_returns is False: really closed
        assert conn.closed
        await pool.putconn(conn)
        await await_stat(pool, "pool_available", 1)
        assert pool_stat(pool, "returns_bad") == 1
        messages = messages_as_logged(caplog)
        assert len(messages) == 1, messages
        assert messages[0].startswith("discarding closed connection: ")
        async with pool.connection() as again:
            assert backend_pid(again) != backend


@run_async
async def test_close_returns(dsn: str) -> None:
    async with async_pool(dsn, min_size=1, close_returns=True) as pool:
        assert pool.close_returns is True
        conn = await pool.getconn()
        await conn.close()  # gives it back
        assert not conn.closed
        assert conn._pool is None
        assert pool_stat(pool, "pool_available") == 1
        async with pool.connection() as again:
            assert again is conn


@run_async
async def test_reset_runs_after_putconn_returns(dsn: str) -> None:
    entered = asyncio.Event()
    go_on = asyncio.Event()

    async def reset(conn: AsyncConnection[Any]) -> None:
        entered.set()
        await go_on.wait()
        await conn.execute("SET application_name = 'was reset'")
        await conn.commit()

    async with async_pool(dsn, min_size=1, reset=reset) as pool:
        conn = await pool.getconn()
        backend = backend_pid(conn)
        await pool.putconn(conn)  # returns while the reset is still blocked
        await asyncio.wait_for(entered.wait(), 5.0)
        assert pool_stat(pool, "pool_available") == 0
        assert pool_stat(pool, "pool_size") == 1
        go_on.set()
        await await_stat(pool, "pool_available", 1)
        async with pool.connection() as again:
            assert backend_pid(again) == backend
            assert await afetchval(again, "SHOW application_name") == "was reset"


@pytest.mark.parametrize("failure", ["raises", "leaves INTRANS"])
@run_async
async def test_failing_reset_replaces_connection(
    dsn: str, caplog: pytest.LogCaptureFixture, failure: str
) -> None:
    async def reset(conn: AsyncConnection[Any]) -> None:
        if failure == "raises":
            await conn.execute("SELECT * FROM no_such_table")
        else:
            await conn.execute("SELECT 1")

    async with async_pool(dsn, min_size=1, reset=reset) as pool:
        conn = await pool.getconn()
        backend = backend_pid(conn)
        await pool.putconn(conn)
        await await_stat(pool, "returns_bad", 1)
        await await_stat(pool, "pool_available", 1)
        assert conn.closed
        messages = messages_as_logged(caplog)
        assert messages[0].startswith("error resetting connection: ")
        assert ("no_such_table" if failure == "raises" else "INTRANS") in messages[0]
        pool._reset = None  # to look at the replacement without resetting it
        async with pool.connection() as again:
            assert backend_pid(again) != backend


# ----------------------------------------------------------------------
# Maintenance


@run_async
async def test_drain(dsn: str) -> None:
    async with async_pool(dsn, min_size=2) as pool:
        out = await pool.getconn()
        idle = await pool.getconn()
        old = {backend_pid(out), backend_pid(idle)}
        await pool.putconn(idle)
        await pool.drain()
        assert pool_stat(pool, "pool_size") == 2
        await await_stat(pool, "pool_available", 1)  # the idle one was replaced
        await pool.putconn(out)  # made before the drain: discarded
        await await_until(lambda: out.closed and idle.closed, "the old connections to close")
        await await_stat(pool, "pool_available", 2)
        conns = [await pool.getconn() for _ in range(2)]
        assert not {backend_pid(c) for c in conns} & old
        for c in conns:
            await pool.putconn(c)
        assert pool_stat(pool, "pool_size") == 2


@run_async
async def test_resize(dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="psycopg.pool")
    async with async_pool(dsn, min_size=1, max_idle=0.1) as pool:
        await pool.resize(3)
        stats = pool.get_stats()
        assert (stats["pool_min"], stats["pool_max"], stats["pool_size"]) == (3, 3, 3)
        assert (pool.min_size, pool.max_size) == (3, 3)
        await await_stat(pool, "pool_available", 3)

        await pool.resize(1, 2)
        assert (pool.min_size, pool.max_size) == (1, 2)
        assert pool_stat(pool, "pool_size") == 3  # shrinking is lazy
        await await_stat(pool, "pool_size", 1)
        shrinks = [m for m in log_messages(caplog, logging.INFO) if m.startswith("shrinking")]
        assert len(shrinks) == 2  # one connection at a time

        with pytest.raises(ValueError, match="max_size must be greater or equal than min_size"):
            await pool.resize(3, 2)
        with pytest.raises(ValueError, match="min_size cannot be negative"):
            await pool.resize(-1)
        assert (pool.min_size, pool.max_size) == (1, 2)


@run_async
async def test_check_replaces_broken_connections(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with async_pool(dsn, min_size=2, max_size=4) as pool:
        conns = [await pool.getconn() for _ in range(2)]
        broken, healthy = (backend_pid(c) for c in conns)
        for c in conns:
            await pool.putconn(c)
        terminate_backends(dsn, broken)

        await pool.check()
        messages = messages_as_logged(caplog)
        assert len(messages) == 1, messages
        assert messages[0].startswith("discarding broken connection: ")
        assert pool_stat(pool, "connections_lost") == 1
        await await_stat(pool, "pool_available", 2)
        # Deliberate difference 5: back to min_size, no extra connection.
        assert pool_stat(pool, "pool_size") == 2
        conns = [await pool.getconn() for _ in range(2)]
        pids = {backend_pid(c) for c in conns}
        assert healthy in pids
        assert broken not in pids
        for c in conns:
            await pool.putconn(c)


@run_async
async def test_expired_connection_is_not_handed_out(dsn: str) -> None:
    # Deliberate difference 3: past its lifetime an idle connection is not served.
    async with async_pool(dsn, min_size=1, max_lifetime=0.2) as pool:
        conn = await pool.getconn()
        lifetime = conn._expire_at - conn._created_at
        assert 0.95 * 0.2 - 1e-6 <= lifetime <= 0.2 + 1e-6
        backend = backend_pid(conn)
        expire_at = conn._expire_at
        await pool.putconn(conn)
        await await_until(lambda: time.monotonic() > expire_at, "the connection to expire")
        async with pool.connection() as again:
            assert backend_pid(again) != backend
        assert pool_stat(pool, "pool_size") == 1


@run_async
async def test_wait_timeout_closes_the_pool(caplog: pytest.LogCaptureFixture) -> None:
    pool = AsyncConnectionPool(refused_conninfo(), min_size=1, open=False)
    await pool.open()
    try:
        with pytest.raises(PoolTimeout, match=r"^pool initialization incomplete after 0\.2 sec: "):
            await pool.wait(0.2)
        assert pool.closed
    finally:
        await pool.close()
    assert pool_stat(pool, "connections_errors") >= 1
    assert any(m.startswith("error connecting in ") for m in messages_as_logged(caplog))


# ----------------------------------------------------------------------
# Closing and reopening


@run_async
async def test_use_before_open(dsn: str) -> None:
    pool = AsyncConnectionPool(dsn, min_size=1, open=False, name="unopened")
    with pytest.raises(PoolClosed, match=r"^the pool 'unopened' is not open yet$"):
        await pool.getconn()
    with pytest.raises(PoolClosed, match=r"^the pool 'unopened' is not open yet$"):
        await pool.wait()
    assert pool_stat(pool, "requests_num") == 1
    assert pool_stat(pool, "pool_size") == 1  # min_size even before open
    await pool.close()  # a no-op on a never-opened pool
    await pool.open(wait=True)
    try:
        async with pool.connection() as conn:
            assert await afetchval(conn, "SELECT 1") == 1
    finally:
        await pool.close()


@run_async
async def test_close_while_clients_wait(dsn: str) -> None:
    async with async_pool(dsn, min_size=1, name="closing") as pool:
        conn = await pool.getconn()
        waiters = [asyncio.create_task(pool.getconn(timeout=5.0)) for _ in range(2)]
        await await_stat(pool, "requests_waiting", 2)
        await pool.close()
        for waiter in waiters:
            with pytest.raises(PoolClosed, match=r"^the pool 'closing' is closed$"):
                await waiter
        stats = pool.get_stats()
        assert stats["requests_errors"] == 2
        assert stats["requests_waiting"] == 0

        # A connection in use is closed only when it comes back.
        assert not conn.closed
        await pool.putconn(conn)
        assert conn.closed  # by putconn() itself
        with pytest.raises(PoolClosed, match=r"^the pool 'closing' is already closed$"):
            await pool.getconn()


@run_async
async def test_reopen_after_close(dsn: str) -> None:
    # Deliberate difference 8: open() after close() starts the pool afresh.
    async with async_pool(dsn, min_size=2) as pool:
        async with pool.connection() as conn:
            before = backend_pid(conn)
        await pool.close()
        assert pool.closed
        await await_until(lambda: conn.closed, "the idle connection to close")
        with pytest.raises(PoolClosed, match="is already closed"):
            await pool.getconn()

        await pool.open(wait=True, timeout=5.0)
        assert not pool.closed
        assert pool_stat(pool, "pool_available") == 2
        async with pool.connection() as conn:
            assert backend_pid(conn) != before
        assert pool_stat(pool, "requests_num") == 3  # counters survive the reopening
        await pool.close()

        async with pool:  # entering the context manager reopens too
            async with pool.connection() as conn:
                assert await afetchval(conn, "SELECT 1") == 1
        assert pool.closed


@pytest.mark.parametrize(
    "with_reset",
    [
        pytest.param(False),
        pytest.param(True),
    ],
)
@run_async
async def test_putconn_after_close_closes_the_connection(
    dsn: str, caplog: pytest.LogCaptureFixture, with_reset: bool
) -> None:
    resets = 0

    async def reset(conn: AsyncConnection[Any]) -> None:
        nonlocal resets
        resets += 1

    async with async_pool(dsn, reset=reset if with_reset else None) as pool:
        conn = await pool.getconn()
        await conn.execute("SELECT 1")  # INTRANS: no point rolling back, the pool is closed
        await pool.close()
        await pool.putconn(conn)
        assert conn.closed  # by putconn() itself
        assert conn._pool is None
        assert pool_stat(pool, "returns_bad") == 0
        assert resets == 0
    assert messages_as_logged(caplog) == []


@run_async
async def test_reopen_with_a_connection_still_out(dsn: str) -> None:
    # A connection lent before close() belongs to the old pool: the reopened one
    # starts with min_size new connections, and closes the old one when it returns.
    async with async_pool(dsn, min_size=2) as pool:
        old = await pool.getconn()
        await pool.close()
        await pool.open(wait=True, timeout=1.0)
        assert pool_stat(pool, "pool_available") == 2
        await pool.putconn(old)
        await await_until(lambda: old.closed, "the old connection to close")
        await await_stat(pool, "pool_available", 2)
        assert pool_stat(pool, "pool_size") == 2


@run_async
async def test_resize_grows_for_waiting_clients(dsn: str) -> None:
    async with async_pool(dsn, min_size=1) as pool:
        held = await pool.getconn()
        waiters = [asyncio.create_task(pool.getconn()) for _ in range(2)]
        await await_stat(pool, "requests_waiting", 2)
        await pool.resize(1, 3)
        served = await asyncio.gather(*waiters)
        assert len({backend_pid(c) for c in [held, *served]}) == 3
        assert pool_stat(pool, "pool_size") == 3
        for conn in [held, *served]:
            await pool.putconn(conn)
        assert pool_stat(pool, "pool_available") == 3


@run_async
async def test_growth_is_parallel_but_bounded(dsn: str) -> None:
    # Deliberate difference 1: one attempt per waiting client, up to num_workers at once.
    class Gated(GatedAsyncConnection):
        gate = asyncio.Event()

    pool = AsyncConnectionPool(
        dsn, connection_class=Gated, min_size=0, max_size=6, num_workers=3, open=False
    )
    await pool.open()
    try:
        clients = [asyncio.create_task(pool.getconn(timeout=5.0)) for _ in range(5)]
        await await_until(lambda: Gated.in_flight == 3, "3 connection attempts in flight")
        assert pool_stat(pool, "requests_waiting") == 5
        Gated.gate.set()
        conns = await asyncio.gather(*clients)
        assert Gated.peak == 3
        assert len({backend_pid(c) for c in conns}) == 5
        assert pool_stat(pool, "pool_size") == 5
        for conn in conns:
            await pool.putconn(conn)
    finally:
        await pool.close()


@run_async
async def test_failing_conninfo_callable_backs_off(caplog: pytest.LogCaptureFixture) -> None:
    calls = 0

    async def conninfo() -> str:
        nonlocal calls
        calls += 1
        raise ValueError("no conninfo today")

    pool = AsyncConnectionPool(conninfo, min_size=1, open=False)
    await pool.open()
    with pytest.raises(PoolTimeout):
        await pool.wait(0.3)
    assert 1 <= calls <= 2  # backing off, not a busy loop
    assert any("no conninfo today" in m for m in messages_as_logged(caplog))
    assert pool_stat(pool, "connections_errors") == 0  # connect() was never reached


@run_async
async def test_expired_idle_connection_replaced_in_the_background(dsn: str) -> None:
    app = "async-lifetime"
    async with async_pool(dsn, kwargs={"application_name": app}, max_lifetime=0.2) as pool:
        first = server_pids(dsn, app)
        assert len(first) == 1
        await await_until(
            lambda: (pids := server_pids(dsn, app)) and not pids & first,
            "the expired connection to be replaced",
        )
        # The new backend is up slightly before the pool has the connection idle.
        await await_until(
            lambda: pool_stat(pool, "pool_available") == 1, "the replacement to be idle"
        )
        assert pool_stat(pool, "pool_size") == 1
        assert pool_stat(pool, "requests_num") == 0


@run_async
async def test_close_while_wait_is_pending() -> None:
    pool = AsyncConnectionPool(refused_conninfo(), min_size=1, open=False, name="never ready")
    await pool.open()
    waiting = asyncio.create_task(pool.wait(5.0))
    await asyncio.sleep(0)  # let it start waiting
    await pool.close()
    with pytest.raises(PoolClosed, match=r"^the pool 'never ready' is closed$"):
        await waiting


@run_async
async def test_configure_leaving_a_transaction(dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    async def configure(conn: AsyncConnection[Any]) -> None:
        await conn.execute("SELECT 1")

    pool = AsyncConnectionPool(dsn, min_size=1, open=False, configure=configure)
    with pytest.raises(PoolTimeout):
        await pool.open(wait=True, timeout=0.3)
    messages = messages_as_logged(caplog)
    assert messages[0].startswith("error connecting in ")
    assert "connection left in status INTRANS by configure function" in messages[0]


@run_async
async def test_close_returns_inside_connection_block(dsn: str) -> None:
    async with async_pool(dsn, close_returns=True) as pool:
        with pytest.raises(ValueError, match="it doesn't come from any pool"):
            async with pool.connection() as conn:
                await conn.close()  # back to the pool already
        assert pool_stat(pool, "pool_size") == 1
        async with pool.connection() as again:
            assert await afetchval(again, "SELECT 1") == 1


@run_async
async def test_server_restart(pg_control: Any) -> None:
    async with async_pool(
        pg_control.dsn, min_size=2, check=AsyncConnectionPool.check_connection
    ) as pool:
        conns = [await pool.getconn() for _ in range(2)]
        old = {backend_pid(c) for c in conns}
        for conn in conns:
            await pool.putconn(conn)
        await asyncio.to_thread(pg_control.stop)
        client = asyncio.create_task(pool.getconn(timeout=10.0))
        await await_stat(pool, "requests_waiting", 1)  # both idle ones failed their check
        await asyncio.to_thread(pg_control.start)
        conn = await client
        assert backend_pid(conn) not in old
        assert await afetchval(conn, "SELECT 1") == 1
        await pool.putconn(conn)
        assert pool_stat(pool, "connections_lost") == 2
        await await_stat(pool, "pool_available", 2)
