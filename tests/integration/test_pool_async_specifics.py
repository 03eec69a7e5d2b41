"""AsyncConnectionPool against a real server: what is specific to asyncio (spec §7).

Opening inside or outside a running loop and its warnings, callbacks that are
coroutine functions, callables for the connection parameters, and cancellation.
"""

from __future__ import annotations

import asyncio
import logging
import random
import sys
import warnings
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import psycopg
import pytest
from psycopg import AsyncConnection

from psycopg_pool import AsyncConnectionPool, AsyncNullConnectionPool, PoolClosed, PoolTimeout

from .helpers import (
    ASYNC_TEST_TIMEOUT,
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

NO_LOOP = r"^{} open with no running loop$"
DEPRECATED = "opening an async pool in its constructor is deprecated"


# ----------------------------------------------------------------------
# Opening, loops and warnings


@pytest.mark.parametrize("cls", [AsyncConnectionPool, AsyncNullConnectionPool])
def test_implicit_open_outside_a_loop_raises_without_warning(dsn: str, cls: type) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(RuntimeError, match=NO_LOOP.format(cls.__name__)):
            cls(dsn)
    assert [str(w.message) for w in caught] == []


@pytest.mark.parametrize("cls", [AsyncConnectionPool, AsyncNullConnectionPool])
def test_open_true_outside_a_loop_warns_then_raises(dsn: str, cls: type) -> None:
    with pytest.warns(RuntimeWarning, match=DEPRECATED) as caught:
        with pytest.raises(RuntimeError, match=NO_LOOP.format(cls.__name__)):
            cls(dsn, open=True)
    assert len(caught) == 1
    # The warning comes first: made an error, it is what the constructor raises.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeWarning, match=DEPRECATED):
            cls(dsn, open=True)


def test_pool_built_outside_a_loop_opens_in_one(dsn: str) -> None:
    pool = AsyncConnectionPool(dsn, min_size=2, open=False, timeout=2.0)  # no loop here
    assert pool.closed

    async def use() -> None:
        await pool.open(wait=True, timeout=5.0)  # open=False never warns
        try:
            async with pool.connection() as conn:
                assert await afetchval(conn, "SELECT 1") == 1
            await pool.wait()
            assert pool_stat(pool, "pool_available") == 2
        finally:
            await pool.close()

    asyncio.run(use())


def test_pool_reopened_in_another_loop(dsn: str) -> None:
    # The asyncio primitives are made at open, in the running loop: a pool closed
    # in one loop works in the next one (deliberate difference 8 allows reopening).
    pool = AsyncConnectionPool(dsn, min_size=1, open=False, timeout=2.0)

    async def use() -> int:
        await pool.open(wait=True, timeout=5.0)
        try:
            conn = await pool.getconn()
            waiter = asyncio.create_task(pool.getconn())  # exercises a hand-off
            await await_stat(pool, "requests_waiting", 1)
            await pool.putconn(conn)
            handed = await waiter
            assert handed is conn
            await pool.putconn(handed)
            return backend_pid(conn)
        finally:
            await pool.close()

    first = asyncio.run(use())
    second = asyncio.run(use())
    assert first != second


@run_async
async def test_open_true_in_a_loop_warns_in_the_constructor(dsn: str) -> None:
    with pytest.warns(RuntimeWarning, match=DEPRECATED) as caught:
        pool = AsyncConnectionPool(dsn, min_size=1, open=True, timeout=2.0)
    assert len(caught) == 1
    try:
        async with pool.connection() as conn:  # no second warning at first use
            assert await afetchval(conn, "SELECT 1") == 1
    finally:
        await pool.close()


@pytest.mark.parametrize("first_use", ["getconn", "connection", "wait"])
@run_async
async def test_implicit_open_warns_at_first_use(dsn: str, first_use: str) -> None:
    pool = AsyncConnectionPool(dsn, min_size=1, timeout=2.0)  # warnings are errors here
    try:
        with pytest.warns(RuntimeWarning, match=DEPRECATED) as caught:
            if first_use == "getconn":
                await pool.putconn(await pool.getconn())
            elif first_use == "connection":
                async with pool.connection():
                    pass
            else:
                await pool.wait(5.0)
        assert len(caught) == 1
        # Once per pool.
        async with pool.connection():
            pass
        await pool.wait(5.0)
    finally:
        await pool.close()


@run_async
async def test_implicit_open_entered_with_async_with_never_warns(dsn: str) -> None:
    async with AsyncConnectionPool(dsn, min_size=1, timeout=2.0) as pool:
        await pool.wait(5.0)
        async with pool.connection() as conn:
            assert await afetchval(conn, "SELECT 1") == 1
        await pool.putconn(await pool.getconn())
    assert pool.closed


def run_in_new_loop(coro: Any) -> Any:
    """One `asyncio.run()` of its own: its loop is closed when it returns."""
    return asyncio.run(asyncio.wait_for(coro, ASYNC_TEST_TIMEOUT))


def test_a_pool_carries_on_in_the_next_event_loop(dsn: str) -> None:
    """A global pool, and code that runs each unit of work in a loop of its own
    (asyncio.run() per call, each test in a new loop): the loop it was opened in
    ends, cancelling the pool's tasks. Upstream then never grows nor replaces
    connections again, and close() fails with 'Event loop is closed'."""
    pool = AsyncConnectionPool(dsn, min_size=1, max_size=3, max_lifetime=0.5, timeout=5, open=False)

    async def first() -> list[AsyncConnection[Any]]:
        await pool.open(wait=True, timeout=5)
        held = [await pool.getconn() for _ in range(3)]
        # Queued as the loop ends: the shared deadline timer is armed there.
        asyncio.get_running_loop().create_task(pool.getconn(timeout=60))
        await await_stat(pool, "requests_waiting", 1)
        return held

    held = run_in_new_loop(first())
    assert pool_stat(pool, "requests_waiting") == 0  # the queued task was cancelled

    async def second() -> None:
        # This client's deadline comes before the one armed in the dead loop.
        with pytest.raises(PoolTimeout):
            await pool.getconn(timeout=0.2)
        for conn in held:
            await pool.putconn(conn)
        # The housekeeper runs here now: it closes the connections as they pass
        # max_lifetime, and opens new ones.
        opened = pool_stat(pool, "connections_num")
        await await_until(
            lambda: pool_stat(pool, "connections_num") > opened, "expired ones replaced"
        )

    run_in_new_loop(second())

    async def many() -> None:
        async def query() -> None:
            async with pool.connection() as conn:
                await conn.execute("SELECT pg_sleep(0.005)")

        await asyncio.gather(*[query() for _ in range(6)])

    for _ in range(10):
        run_in_new_loop(many())
    stats = pool.get_stats()
    assert stats["pool_available"] == stats["pool_size"] > 0
    assert stats["requests_waiting"] == 0
    run_in_new_loop(pool.close())
    assert pool.closed


def test_a_pool_used_in_other_loops_closes_at_once_in_its_own(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """pytest-asyncio's layout: the pool opened in a session loop that stays open
    but idle, each test running in a loop of its own, the pool closed back in the
    session loop. The housekeeper moved to each test's loop in turn; the one left
    idle in the session loop must not hold close() up until its timeout."""
    caplog.set_level(logging.INFO, logger="psycopg.pool")
    session = asyncio.new_event_loop()
    try:
        pool = AsyncConnectionPool(dsn, min_size=1, max_size=2, open=False)
        session.run_until_complete(pool.open(wait=True, timeout=5))

        async def a_test() -> None:
            async def query() -> None:
                async with pool.connection() as conn:
                    await conn.execute("SELECT 1")

            # Three at once on one connection: the pool starts a second, which may
            # still be connecting when the loop ends and cancels it.
            await asyncio.gather(query(), query(), query())

        run_in_new_loop(a_test())
        run_in_new_loop(a_test())
        session.run_until_complete(asyncio.wait_for(pool.close(timeout=10), 5))
    finally:
        session.close()
    assert pool.closed
    # Neither a housekeeper that would not stop, nor an attempt cancelled with its
    # loop reported as a server error.
    assert log_messages(caplog, logging.WARNING) == []


# ----------------------------------------------------------------------
# Callbacks are coroutine functions


@run_async
async def test_configure_check_reset_are_awaited(dsn: str) -> None:
    calls: list[str] = []
    reset_done = asyncio.Event()

    async def configure(conn: AsyncConnection[Any]) -> None:
        calls.append("configure")
        await conn.execute("SET application_name = 'configured'")
        await conn.commit()

    async def check(conn: AsyncConnection[Any]) -> None:
        calls.append("check")
        await asyncio.sleep(0)

    async def reset(conn: AsyncConnection[Any]) -> None:
        calls.append("reset")
        await conn.execute("SET application_name = 'reset'")
        await conn.commit()
        reset_done.set()

    async with async_pool(dsn, configure=configure, check=check, reset=reset) as pool:
        async with pool.connection() as conn:
            assert await afetchval(conn, "SHOW application_name") == "configured"
            backend = backend_pid(conn)
        await asyncio.wait_for(reset_done.wait(), 5.0)
        await await_stat(pool, "pool_available", 1)
        async with pool.connection() as conn:
            assert backend_pid(conn) == backend
            assert await afetchval(conn, "SHOW application_name") == "reset"
        # configure once per physical connection; check at each lending.
        assert calls[:4] == ["configure", "check", "reset", "check"]


@run_async
async def test_plain_function_as_check_fails_every_attempt(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="psycopg.pool")
    calls = 0

    def check(conn: AsyncConnection[Any]) -> None:
        nonlocal calls
        calls += 1

    async with async_pool(dsn, check=check, timeout=0.5) as pool:
        with pytest.raises(PoolTimeout, match=r"^couldn't get a connection after 0\.50 sec: "):
            await pool.getconn()
        assert calls >= 2  # the second try is immediate
        await await_stat(pool, "pool_available", 1)
        assert pool_stat(pool, "pool_size") == 1
    assert any("failed check" in m for m in log_messages(caplog, logging.INFO))
    assert messages_as_logged(caplog) == []  # a failing check is not a warning


@run_async
async def test_plain_function_as_configure_fails_connections(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    calls = 0

    def configure(conn: AsyncConnection[Any]) -> None:
        nonlocal calls
        calls += 1

    pool = AsyncConnectionPool(dsn, min_size=1, open=False, configure=configure)
    with pytest.raises(PoolTimeout, match=r"^pool initialization incomplete after 0\.3 sec: "):
        await pool.open(wait=True, timeout=0.3)
    assert pool.closed
    assert calls >= 1
    stats = pool.get_stats()
    assert stats["connections_num"] >= 1
    assert stats.get("connections_errors", 0) == 0  # connect() itself worked
    assert any(m.startswith("error connecting in ") for m in messages_as_logged(caplog))


@run_async
async def test_plain_function_as_reset_discards_connections(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    def reset(conn: AsyncConnection[Any]) -> None:
        pass

    async with async_pool(dsn, reset=reset) as pool:
        conn = await pool.getconn()
        backend = backend_pid(conn)
        await pool.putconn(conn)
        await await_stat(pool, "returns_bad", 1)
        await await_stat(pool, "pool_available", 1)
        assert conn.closed
        pool._reset = None  # to look at the replacement without resetting it
        async with pool.connection() as again:
            assert backend_pid(again) != backend
    assert messages_as_logged(caplog)[0].startswith("error resetting connection: ")


@pytest.mark.parametrize("kind", ["sync", "async"])
@run_async
async def test_reconnect_failed_callback(kind: str, caplog: pytest.LogCaptureFixture) -> None:
    called = asyncio.Event()
    got: list[Any] = []

    def sync_cb(pool: Any) -> None:
        got.append(pool)
        called.set()

    async def async_cb(pool: Any) -> None:
        await asyncio.sleep(0)
        sync_cb(pool)

    pool = AsyncConnectionPool(
        refused_conninfo(),
        min_size=1,
        open=False,
        reconnect_timeout=0.2,
        reconnect_failed=sync_cb if kind == "sync" else async_cb,
        name="unreachable",
    )
    await pool.open()
    try:
        await asyncio.wait_for(called.wait(), 5.0)
        assert got == [pool]
    finally:
        await pool.close()
    messages = messages_as_logged(caplog)
    assert "reconnection attempt in pool 'unreachable' failed after 0.2 sec" in messages


@pytest.mark.parametrize("form", ["value", "sync callable", "async callable"])
@run_async
async def test_conninfo_and_kwargs_forms(dsn: str, form: str) -> None:
    calls = {"conninfo": 0, "kwargs": 0}
    kwargs_value = {"application_name": "from-kwargs"}

    def sync_conninfo() -> str:
        calls["conninfo"] += 1
        return dsn

    def sync_kwargs() -> dict[str, Any]:
        calls["kwargs"] += 1
        return kwargs_value

    async def async_conninfo() -> str:
        await asyncio.sleep(0)
        return sync_conninfo()

    async def async_kwargs() -> dict[str, Any]:
        await asyncio.sleep(0)
        return sync_kwargs()

    conninfo: Any
    kwargs: Any
    if form == "value":
        conninfo, kwargs = dsn, kwargs_value
    elif form == "sync callable":
        conninfo, kwargs = sync_conninfo, sync_kwargs
    else:
        conninfo, kwargs = async_conninfo, async_kwargs

    async with async_pool(conninfo, kwargs=kwargs, min_size=2) as pool:
        async with pool.connection() as conn:
            assert await afetchval(conn, "SHOW application_name") == "from-kwargs"
        if form != "value":
            assert calls == {"conninfo": 2, "kwargs": 2}  # once per connection
            await pool.drain()
            await await_until(lambda: calls["kwargs"] == 4, "reconnections after drain")
            assert calls["conninfo"] == 4
    assert kwargs_value == {"application_name": "from-kwargs"}  # never mutated


# ----------------------------------------------------------------------
# Cancellation


@pytest.mark.parametrize("when", ["queued", "given a connection"])
@run_async
async def test_cancelled_waiter_loses_no_connection(dsn: str, when: str) -> None:
    async with async_pool(dsn) as pool:
        conn = await pool.getconn()
        waiter = asyncio.create_task(pool.getconn(timeout=5.0))
        await await_stat(pool, "requests_waiting", 1)
        if when == "given a connection":
            await pool.putconn(conn)  # goes to the waiter, which has not run yet
            assert pool_stat(pool, "requests_waiting") == 0
            assert pool_stat(pool, "pool_available") == 0
            assert not waiter.done()
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        # Deliberate difference 2: it left the queue at once.
        assert pool_stat(pool, "requests_waiting") == 0
        assert pool_stat(pool, "requests_errors") == 1
        if when == "queued":
            await pool.putconn(conn)
        assert pool_stat(pool, "pool_available") == 1  # (reclaimed if it was given)
        again = await pool.getconn(timeout=0)
        assert again is conn
        await pool.putconn(again)


@run_async
async def test_a_client_granted_a_connection_before_close_keeps_it(dsn: str) -> None:
    """The grant is the hand-over (as upstream, which fills the waiter's future):
    close() fails the clients still waiting, not one already given its connection."""
    async with async_pool(dsn) as pool:
        conn = await pool.getconn()
        served = asyncio.create_task(pool.getconn(timeout=5.0))
        await await_stat(pool, "requests_waiting", 1)
        failed = asyncio.create_task(pool.getconn(timeout=5.0))
        await await_stat(pool, "requests_waiting", 2)
        await pool.putconn(conn)  # to the first waiter, which has not run yet
        assert not served.done()
        await pool.close()
        got = await served
        assert got is conn
        assert await afetchval(got, "SELECT 1") == 1  # usable after close()
        with pytest.raises(PoolClosed):
            await failed
        assert pool_stat(pool, "requests_errors") == 1  # the one that waited on
        await pool.putconn(got)
        await await_until(lambda: got.closed, "closed as it comes back to a closed pool")


@run_async
async def test_each_waiter_times_out_at_its_own_deadline(dsn: str) -> None:
    """Queued clients share one timer while their deadlines come in order; a client
    with a shorter timeout than one queued before it keeps a timer of its own. Either
    way each one times out at its own deadline and not before, and the timer steps
    over a client that was served meanwhile."""
    timeouts = [0.8, 0.2, 1.2, 0.5, 0.8, 0.6]  # in order of arrival
    async with async_pool(dsn, min_size=1, max_size=1) as pool:
        held = await pool.getconn()
        loop = asyncio.get_running_loop()
        ended: list[tuple[float, int]] = []
        kept: list[Any] = []

        async def client(i: int) -> None:
            t0 = loop.time()
            try:
                kept.append(await pool.getconn(timeout=timeouts[i]))
                ended.append((-1.0, i))  # served, and keeps the connection
            except PoolTimeout:
                ended.append((loop.time() - t0, i))

        waiters = []
        for i in range(len(timeouts)):
            waiters.append(asyncio.create_task(client(i)))
            await await_stat(pool, "requests_waiting", i + 1)
        last = asyncio.create_task(pool.getconn(timeout=10.0))
        await await_stat(pool, "requests_waiting", len(timeouts) + 1)
        await pool.putconn(held)  # to the first client, at the front of the shared timer
        await asyncio.gather(*waiters)
        assert [i for _, i in ended] == [0, 1, 3, 5, 4, 2], ended  # the rest by deadline
        for waited, i in ended[1:]:
            assert waited >= timeouts[i], (i, waited)
        await pool.putconn(kept[0])
        await pool.putconn(await last)  # still queued after the others timed out
        assert pool_stat(pool, "requests_errors") == len(timeouts) - 1


@run_async
async def test_cancelling_all_waiters(dsn: str) -> None:
    async with async_pool(dsn, min_size=2) as pool:
        held = [await pool.getconn() for _ in range(2)]
        waiters = [asyncio.create_task(pool.getconn(timeout=5.0)) for _ in range(5)]
        await await_stat(pool, "requests_waiting", 5)
        for waiter in waiters:
            waiter.cancel()
        results = await asyncio.gather(*waiters, return_exceptions=True)
        assert all(isinstance(r, asyncio.CancelledError) for r in results)
        for conn in held:
            await pool.putconn(conn)
        stats = pool.get_stats()
        assert stats["pool_available"] == 2
        assert stats["requests_waiting"] == 0
        assert stats["requests_errors"] == 5


@pytest.mark.parametrize("left_in", ["IDLE", "INTRANS"])
@run_async
async def test_cancelled_inside_check(dsn: str, left_in: str) -> None:
    entered = asyncio.Event()
    block = True

    async def check(conn: AsyncConnection[Any]) -> None:
        if block:
            if left_in == "INTRANS":
                await conn.execute("SELECT 1")
            entered.set()
            await asyncio.sleep(30)

    async with async_pool(dsn, check=check) as pool:
        client = asyncio.create_task(pool.getconn())
        await asyncio.wait_for(entered.wait(), 5.0)
        assert pool_stat(pool, "pool_available") == 0
        client.cancel()
        with pytest.raises(asyncio.CancelledError):
            await client
        await await_stat(pool, "pool_available", 1)
        assert pool_stat(pool, "pool_size") == 1
        block = False
        async with pool.connection() as conn:
            assert conn.info.transaction_status.name == "IDLE"
            assert await afetchval(conn, "SELECT 1") == 1


@pytest.mark.parametrize(
    "how",
    [
        pytest.param(
            "asyncio.timeout",
            marks=pytest.mark.skipif(sys.version_info < (3, 11), reason="Python 3.11+"),
        ),
        "asyncio.wait_for",
    ],
)
@run_async
async def test_timeout_around_getconn(dsn: str, how: str) -> None:
    async with async_pool(dsn) as pool:
        conn = await pool.getconn()
        with pytest.raises(asyncio.TimeoutError):  # not yet TimeoutError on Python 3.10
            if how == "asyncio.wait_for":
                await asyncio.wait_for(pool.getconn(), 0.05)
            else:
                async with asyncio.timeout(0.05):  # type: ignore[attr-defined]
                    await pool.getconn()
        assert pool_stat(pool, "requests_waiting") == 0
        assert pool_stat(pool, "requests_errors") == 1
        await pool.putconn(conn)
        assert pool_stat(pool, "pool_available") == 1


@run_async
async def test_timeouts_racing_returns_lose_no_connection(dsn: str) -> None:
    rng = random.Random(42)
    async with async_pool(dsn, min_size=2) as pool:

        async def client() -> int:
            served = 0
            for _ in range(25):
                try:
                    conn = await asyncio.wait_for(pool.getconn(), rng.choice([0, 0.001, 0.003]))
                except asyncio.TimeoutError:
                    continue
                served += 1
                await asyncio.sleep(rng.choice([0, 0, 0.001]))
                await pool.putconn(conn)
            return served

        served = await asyncio.gather(*(client() for _ in range(8)))
        assert sum(served) > 0
        stats = pool.get_stats()
        assert stats["requests_waiting"] == 0
        assert stats["pool_size"] == 2
        await await_stat(pool, "pool_available", 2)


@pytest.mark.skipif(sys.version_info < (3, 12), reason="eager tasks: Python 3.12+")
@run_async
async def test_eager_tasks_lose_nothing(dsn: str) -> None:
    """Under asyncio's eager task factory a task the pool spawns (a connection attempt,
    a background return) runs inside the call that spawns it, up to its first wait.
    Clients timing out at random while the pool grows: still no connection lost or
    lent to two clients at once."""
    loop = asyncio.get_running_loop()
    loop.set_task_factory(asyncio.eager_task_factory)  # type: ignore[attr-defined]
    rng = random.Random(7)
    in_use: set[int] = set()
    try:
        async with async_pool(dsn, min_size=1, max_size=4) as pool:

            async def client() -> int:
                served = 0
                for _ in range(30):
                    try:
                        async with asyncio.timeout(rng.choice([0.001, 0.01, 1.0])):  # type: ignore[attr-defined]
                            async with pool.connection() as conn:
                                assert id(conn) not in in_use, "lent to two clients"
                                in_use.add(id(conn))
                                try:
                                    await conn.execute("SELECT 1")
                                finally:
                                    in_use.discard(id(conn))
                                served += 1
                    except TimeoutError:
                        continue
                return served

            served = await asyncio.gather(*(client() for _ in range(20)))
            assert sum(served) > 0
            assert pool_stat(pool, "requests_waiting") == 0
            assert pool_stat(pool, "pool_size") == 4
            await await_stat(pool, "pool_available", 4)
    finally:
        loop.set_task_factory(None)


@run_async
async def test_cancelled_inside_reset_replaces_the_connection(dsn: str) -> None:
    cancel = True

    async def reset(conn: AsyncConnection[Any]) -> None:
        if cancel:
            raise asyncio.CancelledError

    async with async_pool(dsn, reset=reset) as pool:
        conn = await pool.getconn()
        backend = backend_pid(conn)
        await pool.putconn(conn)
        await await_until(lambda: conn.closed, "the connection to close")
        await await_stat(pool, "pool_available", 1)
        cancel = False
        async with pool.connection() as again:
            assert backend_pid(again) != backend
        # The background of the pool survived the cancellation.
        async with pool.connection() as again2:
            assert again2 is again


@run_async
async def test_close_stops_unfinished_background_work(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def reset(conn: AsyncConnection[Any]) -> None:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    pool = AsyncConnectionPool(dsn, min_size=1, open=False, reset=reset)
    await pool.open(wait=True, timeout=5.0)
    conn = await pool.getconn()
    await pool.putconn(conn)
    await asyncio.wait_for(started.wait(), 5.0)
    await pool.close(timeout=0.05)
    assert len(messages_as_logged(caplog)) >= 1  # a WARNING per unfinished task
    await asyncio.wait_for(cancelled.wait(), 5.0)
    await await_until(lambda: conn.closed, "the connection to close")


@run_async
async def test_check_connection_as_check_callback(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="psycopg.pool")
    async with async_pool(dsn, min_size=2, check=AsyncConnectionPool.check_connection) as pool:
        first, second = [await pool.getconn() for _ in range(2)]
        await pool.putconn(first)
        await pool.putconn(second)
        terminate_backends(dsn, backend_pid(first))
        conn = await pool.getconn()  # the dead one fails its check, the next one is given
        assert conn is second
        assert pool_stat(pool, "connections_lost") == 1
        await pool.putconn(conn)
        await await_stat(pool, "pool_available", 2)
    assert any("failed check" in m for m in log_messages(caplog, logging.INFO))
    assert messages_as_logged(caplog) == []


@pytest.mark.parametrize("left_in", ["IDLE", "INTRANS"])
@run_async
async def test_client_cancelled_inside_connection_block(dsn: str, left_in: str) -> None:
    inside = asyncio.Event()

    async def client() -> None:
        async with pool.connection() as conn:
            if left_in == "INTRANS":
                await conn.execute("SELECT 1")
            inside.set()
            await asyncio.sleep(30)

    async with async_pool(dsn) as pool:
        task = asyncio.create_task(client())
        await asyncio.wait_for(inside.wait(), 5.0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await await_stat(pool, "pool_available", 1)
        async with pool.connection() as conn:
            assert conn.info.transaction_status.name == "IDLE"
        assert pool_stat(pool, "pool_size") == 1
        assert "usage_ms" in pool.get_stats()


# A cancellation that keeps firing: anyio's cancel scopes (FastAPI, Starlette, httpx)
# cancel again at every await until the scope is left, and asyncio code may cancel a
# task twice (a timeout, then its TaskGroup). The rollback a cancelled block owes must
# not be one of those awaits, or psycopg closes the connection it interrupts.


async def cancelled_again_and_again(
    body: Callable[[asyncio.Event], Awaitable[None]], how: str
) -> None:
    """Run `body(blocked)` until it sets `blocked`, then cancel it at every await until
    it ends."""
    blocked = asyncio.Event()
    if how == "anyio":
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(body, blocked)
                await blocked.wait()
                scope.cancel()
        assert scope.cancelled_caught
    else:
        task = asyncio.create_task(body(blocked))
        await blocked.wait()
        while not task.done():
            task.cancel()
            await asyncio.sleep(0)
        assert task.cancelled()


async def fails_as_it_is_cancelled(blocked: asyncio.Event) -> None:
    try:
        blocked.set()
        await asyncio.sleep(30)
    finally:
        raise ValueError("clean-up failed")


@pytest.mark.parametrize("how", ["anyio", "asyncio"])
@pytest.mark.parametrize("left_in", ["INTRANS", "INERROR", "group"])
@run_async
async def test_a_repeated_cancellation_keeps_the_connection_of_a_block(
    dsn: str, how: str, left_in: str, caplog: pytest.LogCaptureFixture
) -> None:
    if left_in == "group" and not hasattr(asyncio.Task, "cancelling"):
        pytest.skip("Python < 3.11 cannot tell that the task is being cancelled")
    async with async_pool(dsn, max_size=1) as pool:
        async with pool.connection() as conn:
            backend = backend_pid(conn)

        async def body(blocked: asyncio.Event) -> None:
            try:
                async with pool.connection() as conn:
                    await conn.execute("SELECT 1")
                    if left_in == "INERROR":
                        with pytest.raises(psycopg.errors.DivisionByZero):
                            await conn.execute("SELECT 1 / 0")
                    if left_in == "group":
                        # The block is left by an exception group, not the cancellation.
                        async with anyio.create_task_group() as tg:
                            tg.start_soon(fails_as_it_is_cancelled, blocked)
                            await asyncio.sleep(30)
                    blocked.set()
                    await asyncio.sleep(30)
            except Exception as ex:
                if left_in != "group":
                    raise
                assert "clean-up failed" in repr(ex)
                raise asyncio.CancelledError from None  # what the group stood for

        await cancelled_again_and_again(body, how)
        async with pool.connection(timeout=5.0) as conn:
            assert backend_pid(conn) == backend  # rolled back, not replaced
            assert conn.info.transaction_status.name == "IDLE"
        assert pool_stat(pool, "connections_num") == 1
        assert pool_stat(pool, "returns_bad") == 0
    assert messages_as_logged(caplog) == []  # the rollback a block's exit owes is no news


@pytest.mark.parametrize("how", ["anyio", "asyncio"])
@run_async
async def test_a_repeated_cancellation_keeps_a_connection_given_back_by_putconn(
    dsn: str, how: str
) -> None:
    if not hasattr(asyncio.Task, "cancelling"):
        pytest.skip("Python < 3.11 cannot tell that the task is being cancelled")
    async with async_pool(dsn, max_size=1) as pool:
        async with pool.connection() as conn:
            backend = backend_pid(conn)

        async def body(blocked: asyncio.Event) -> None:
            conn = await pool.getconn()
            try:
                await conn.execute("SELECT 1")
                blocked.set()
                await asyncio.sleep(30)
            finally:
                await pool.putconn(conn)

        await cancelled_again_and_again(body, how)
        async with pool.connection(timeout=5.0) as conn:
            assert backend_pid(conn) == backend
            assert conn.info.transaction_status.name == "IDLE"
        assert pool_stat(pool, "connections_num") == 1


@run_async
async def test_close_under_a_repeated_cancellation_closes_every_connection(dsn: str) -> None:
    # An application shut down by a cancel scope (a server's shutdown timeout): the
    # pool's exit runs cancelled at each of its waits, and must not leave connections
    # open on the server.
    name = "closed-cancelled"
    with anyio.CancelScope() as scope:
        async with async_pool(
            dsn, min_size=4, max_size=8, kwargs={"application_name": name}
        ) as pool:
            conns = [await pool.getconn() for _ in range(6)]
            for conn in conns[:3]:
                await conn.execute("SELECT 1")  # each needs a rollback as it comes back
            for conn in conns:
                await pool.putconn(conn)
            scope.cancel()
            await asyncio.sleep(30)
    assert scope.cancelled_caught
    assert pool.closed
    assert all(conn.closed for conn in conns)
    await await_until(lambda: not server_pids(dsn, name), "the server to see them closed")


@pytest.mark.parametrize("how", ["anyio", "asyncio"])
@run_async
async def test_a_cancelled_block_of_a_null_pool_closes_its_connection_uncleaned(
    dsn: str, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    resets = 0

    async def reset(conn: AsyncConnection[Any]) -> None:
        nonlocal resets
        resets += 1

    async with AsyncNullConnectionPool(dsn, reset=reset, open=False) as pool:
        held: list[AsyncConnection[Any]] = []

        async def body(blocked: asyncio.Event) -> None:
            async with pool.connection() as conn:
                held.append(conn)
                await conn.execute("SELECT 1")
                blocked.set()
                await asyncio.sleep(30)

        await cancelled_again_and_again(body, how)
        await await_until(lambda: held[0].closed, "the connection to close")
        assert resets == 0  # nobody waits for it: no rollback, no reset
        assert pool_stat(pool, "pool_size") == 0
        assert pool_stat(pool, "returns_bad") == 0
    assert messages_as_logged(caplog) == []


@pytest.mark.parametrize(
    "how",
    [
        "anyio shield",
        pytest.param(
            "asyncio.timeout",
            marks=pytest.mark.skipif(sys.version_info < (3, 11), reason="Python 3.11+"),
        ),
    ],
)
@run_async
async def test_a_clean_up_after_a_cancellation_gets_past_a_failed_check(dsn: str, how: str) -> None:
    # In a clean-up that runs as its task is cancelled (a `finally` under a shield, or
    # under an expired asyncio.timeout), a check failing for a reason of its own is
    # retried with the next connection, as anywhere else: the cancellation is not in
    # that failure, and nothing will cancel the clean-up again.
    async with async_pool(
        dsn, min_size=2, max_size=2, check=AsyncConnectionPool.check_connection
    ) as pool:
        first, second = [await pool.getconn() for _ in range(2)]
        dead, alive = backend_pid(first), backend_pid(second)
        await pool.putconn(first)
        await pool.putconn(second)
        terminate_backends(dsn, dead)  # the next one lent, and it fails its check
        got: list[int] = []

        async def clean_up() -> None:
            async with pool.connection() as conn:
                got.append(backend_pid(conn))

        if how == "anyio shield":
            with anyio.CancelScope() as scope:
                try:
                    scope.cancel()
                    await asyncio.sleep(30)
                finally:
                    with anyio.CancelScope(shield=True):
                        await clean_up()
            assert scope.cancelled_caught
        else:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0):  # type: ignore[attr-defined]
                    try:
                        await asyncio.sleep(30)
                    finally:
                        await clean_up()
        assert got == [alive]
        assert pool_stat(pool, "connections_lost") == 1


@run_async
async def test_a_check_timing_out_on_its_own_is_a_failed_check(dsn: str) -> None:
    # Its TimeoutError comes from a CancelledError (asyncio's timeouts cancel what they
    # bound): not a cancellation of the client, which gets PoolTimeout, not cancelled.
    async def check(conn: AsyncConnection[Any]) -> None:
        await asyncio.wait_for(asyncio.Event().wait(), 0.01)

    async with async_pool(dsn, check=check) as pool:
        with pytest.raises(PoolTimeout, match="check"):
            await pool.getconn(timeout=0.3)
        assert pool_stat(pool, "pool_size") == 1
