"""Connections that only garbage holds.

A connection can be held by an object nobody can reach any more, which only Python's
cycle collector frees: a generator abandoned in the middle of its `connection()`
block (a streaming response whose client went away), a connection dropped inside a
reference cycle. That collector may not run for minutes: when a client has waited
a second with every connection out, the pool runs it. These tests turn automatic
collection off, so that only the pool's request for it (or the test's) frees them.

An abandoned generator is a special case: the collector first clears the weak
references to it and what it holds (which tells the pool its connection was
dropped), then its finalizer closes it (an async generator's close is scheduled on
its loop), which gives the connection back after all. The pool waits a moment
before it replaces a connection reported dropped, so the connection comes back in
use: counted once, its weak reference renewed, and replaced by nothing.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import re
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest

from psycopg_pool import ConnectionPool, PoolTimeout
from psycopg_pool import pool as sync_pool
from psycopg_pool._core import state as core_state

from .helpers import (
    async_pool,
    await_until,
    pool_stat,
    run_async,
    server_pids,
    warnings_logged,
)


@pytest.fixture
def no_automatic_gc() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


class Cycle:
    """An object that refers to itself: freed by the cycle collector only."""

    def __init__(self, held: Any) -> None:
        self.me = self
        self.held = held


@pytest.mark.usefixtures("no_automatic_gc")
def test_a_connection_dropped_in_a_reference_cycle_comes_back(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="psycopg.pool")
    with ConnectionPool(dsn, min_size=1, max_size=1, timeout=10.0, open=True) as pool:
        pool.wait()
        Cycle(pool.getconn())  # dropped at once, alive until the cycle is collected
        with pool.connection() as conn:  # waits, then the pool collects
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert pool_stat(pool, "pool_size") == 1
    assert any("garbage-collected without being returned" in m for m in warnings_logged(caplog))
    assert any("collecting garbage" in r.getMessage() for r in caplog.records)


def collection_reports(caplog: pytest.LogCaptureFixture) -> list[tuple[int, float]]:
    """(connections found, seconds to the next collection) of each collection logged."""
    found = re.compile(r"found (\d+) connection.* no sooner than ([\d.e-]+) sec")
    return [
        (int(m[1]), float(m[2]))
        for r in caplog.records
        if (m := found.search(r.getMessage())) is not None
    ]


@pytest.mark.usefixtures("no_automatic_gc")
@pytest.mark.parametrize("kind", ["sync", "async"])
def test_collections_that_find_nothing_back_off(
    dsn: str, kind: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # An overload, not garbage, keeps the clients waiting. A full collection of a large
    # heap stalls every thread (or the event loop) of the process, so each one that
    # finds no connection doubles the time to the next; one that finds some resets it.
    monkeypatch.setattr(core_state, "COLLECT_AFTER", 0.05)
    monkeypatch.setattr(core_state, "COLLECT_EVERY", 0.4)
    monkeypatch.setattr(core_state, "COLLECT_COST_FACTOR", 0.0)  # however big the heap
    caplog.set_level(logging.INFO, logger="psycopg.pool")

    async def scenario(pool: Any, call: Callable[[Any], Awaitable[Any]]) -> None:
        held = await call(pool.getconn())
        with pytest.raises(PoolTimeout):
            await call(pool.getconn(timeout=0.5))  # a collection or more, finding nothing
        fruitless = collection_reports(caplog)
        assert fruitless and all(found == 0 for found, _ in fruitless)
        assert [every for _, every in fruitless] == [0.8 * 2**n for n in range(len(fruitless))]
        await call(pool.putconn(held))
        del held  # the pool's only connection: lent again next
        Cycle(await call(pool.getconn()))  # dropped: only garbage holds it now
        conn = await call(pool.getconn())  # served once the pool collects it
        await call(pool.putconn(conn))
        assert collection_reports(caplog)[len(fruitless)] == (1, 0.4)
        assert pool_stat(pool, "pool_size") == 1

    if kind == "sync":

        async def now(value: Any) -> Any:
            return value

        with ConnectionPool(dsn, min_size=1, max_size=1, timeout=10.0, open=True) as pool:
            pool.wait()
            asyncio.run(scenario(pool, now))
    else:

        async def main() -> None:
            async with async_pool(dsn, max_size=1, timeout=10.0) as pool:
                await scenario(pool, lambda aw: aw)

        asyncio.run(main())


def abandon_a_generator(pool: Any) -> Callable[[], Awaitable[None]]:
    """A function that starts a generator in a `connection()` block, in a transaction,
    and drops it in a reference cycle (as a streaming response abandons its body)."""

    async def rows() -> AsyncIterator[int]:
        async with pool.connection() as conn:
            await conn.execute("SELECT 1")
            for n in range(1, 1000):
                yield n

    async def start() -> None:
        gen = rows()
        assert await gen.__anext__() == 1
        Cycle(gen)

    return start


@pytest.mark.usefixtures("no_automatic_gc")
@pytest.mark.parametrize("collected_by", ["the pool", "the interpreter"])
@run_async
async def test_an_abandoned_generator_costs_no_capacity(
    dsn: str, collected_by: str, caplog: pytest.LogCaptureFixture
) -> None:
    name = f"abandoned-{collected_by.split()[-1]}"
    async with async_pool(dsn, max_size=1, timeout=10.0, kwargs={"application_name": name}) as pool:
        start = abandon_a_generator(pool)
        await start()
        if collected_by == "the interpreter":
            gc.collect()
            await asyncio.sleep(0)  # the generator's close, scheduled by its finalizer
        async with pool.connection() as conn:  # served (after the pool collects)
            assert conn.info.transaction_status.name == "IDLE"  # rolled back, or new
        # The generator's connection came back (rolled back), or after a replacement
        # (closed): either way the pool counts one connection and lends one at most.
        await await_until(lambda: len(server_pids(dsn, name)) == 1, "one connection left")
        assert pool_stat(pool, "pool_size") == 1
        await await_until(lambda: pool_stat(pool, "pool_available") == 1, "the return")
        held = await pool.getconn()
        with pytest.raises(PoolTimeout):
            await pool.getconn(timeout=0.2)
        await pool.putconn(held)
        assert len(server_pids(dsn, name)) == 1
        assert pool_stat(pool, "connections_num") == 1  # given back, not replaced
    (warning,) = warnings_logged(caplog)
    assert "given back only when the garbage collector finalized" in warning


@pytest.mark.usefixtures("no_automatic_gc")
def test_a_connection_given_back_by_a_finalizer_is_watched_again(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A generator's finalizer gives its connection back to a waiting client, which
    # takes it before the pool looks at the collector's report, then drops it. That
    # drop must be noticed like any other: the connection needs a new weak reference,
    # as the collector cleared the one it had.
    taken = threading.Event()
    reap = sync_pool.ConnectionPool._reap

    def late_reap(self: Any, *args: Any) -> Any:
        taken.wait(10)
        return reap(self, *args)

    monkeypatch.setattr(sync_pool.ConnectionPool, "_reap", late_reap)
    with ConnectionPool(dsn, min_size=1, max_size=1, timeout=10.0, open=True) as pool:
        pool.wait()

        def rows() -> Iterator[int]:
            with pool.connection() as conn:
                conn.execute("SELECT 1")
                yield from range(1000)

        gen = rows()
        assert next(gen) == 0
        Cycle(gen)
        del gen

        def client() -> None:
            conn = pool.getconn()  # waits: served as the pool collects the generator
            taken.set()
            del conn  # dropped without being returned

        thread = threading.Thread(target=client)
        thread.start()
        assert taken.wait(10)
        thread.join()
        with pool.connection(timeout=5) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert pool_stat(pool, "connections_lost") == 1


@pytest.mark.usefixtures("no_automatic_gc")
@run_async
async def test_a_timeout_names_the_generator_that_holds_the_connection(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(core_state, "COLLECT_AFTER", 3600.0)  # the pool does not collect
    async with async_pool(dsn, max_size=1) as pool:
        await abandon_a_generator(pool)()
        with pytest.raises(PoolTimeout, match=r"held longest by a suspended generator rows\(\) at"):
            await pool.getconn(timeout=0.2)
