"""A pool used before fork() keeps working in the child, and the parent is untouched."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import select
import signal
import sys
import threading
from typing import Any

import psycopg
import pytest

from psycopg_pool import AsyncConnectionPool, ConnectionPool

pytestmark = [
    pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()"),
    # Python >= 3.12 warns about forking a process with threads: forking with a pool's
    # threads running is exactly the situation under test.
    pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning"),
]


def backend_pid(pool: ConnectionPool[Any]) -> int:
    with pool.connection(timeout=5) as conn:
        row = conn.execute("SELECT pg_backend_pid()").fetchone()
        assert row is not None
        return int(row[0])


def run_in_child(fn: Any) -> int:
    """Run fn() in a forked child; return its exit status (fn's int, 99 on error)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 99
        try:
            code = fn()
        except BaseException as ex:
            print(f"child failed: {type(ex).__name__}: {ex}", file=sys.stderr)
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_child_gets_fresh_connections_and_parent_keeps_its_own(dsn: str) -> None:
    with ConnectionPool(dsn, min_size=2, open=True) as pool:
        pool.wait(5)
        parent_pids = {backend_pid(pool), backend_pid(pool)}

        def child() -> int:
            pids = {backend_pid(pool) for _ in range(4)}
            # New backends, never the parent's: their sockets are not used here.
            return 0 if pids and not (pids & parent_pids) else 1

        assert run_in_child(child) == 0
        # The parent's connections still work and are the same backends.
        assert {backend_pid(pool) for _ in range(4)} <= parent_pids
        assert pool.get_stats()["pool_size"] == 2


def test_connection_held_across_fork_fails_in_child_not_in_parent(dsn: str) -> None:
    with ConnectionPool(dsn, min_size=1, open=True) as pool:
        pool.wait(5)
        with pool.connection() as held:
            held_pid = held.execute("SELECT pg_backend_pid()").fetchone()

            def child() -> int:
                # Using the parent's connection in the child must fail, not answer.
                try:
                    held.execute("SELECT 1").fetchone()
                except psycopg.Error:
                    pass
                else:
                    return 2
                pool.putconn(held)  # given back quietly: it is not the child's
                return 0 if backend_pid(pool) != held_pid else 3

            assert run_in_child(child) == 0
            # In the parent the same connection goes on answering correctly.
            assert held.execute("SELECT pg_backend_pid()").fetchone() == held_pid
        assert pool.get_stats()["pool_size"] == 1


def test_connection_held_across_fork_given_back_through_its_pool_attribute(dsn: str) -> None:
    # Django closes a pooled connection with `conn._pool.putconn(conn)`: in a forked
    # child (Celery prefork, multiprocessing, Django's parallel test runner) that
    # must drop the parent's connection quietly, not raise AttributeError.
    with ConnectionPool(dsn, min_size=1, open=True) as pool:
        pool.wait(5)
        with pool.connection() as held:
            held_pid = held.execute("SELECT pg_backend_pid()").fetchone()

            def child() -> int:
                held._pool.putconn(held)
                if held._pool is not None:
                    return 2
                return 0 if backend_pid(pool) != held_pid else 3

            assert run_in_child(child) == 0
            assert held.execute("SELECT pg_backend_pid()").fetchone() == held_pid
        assert pool.get_stats()["pool_size"] == 1


def test_async_connection_held_across_fork_given_back_through_its_pool_attribute(
    dsn: str,
) -> None:
    async def parent() -> None:
        async with AsyncConnectionPool(dsn, min_size=1, open=False) as pool:
            await pool.wait(5)
            async with pool.connection() as held:

                def child() -> int:
                    # A fresh loop in the child, as a forked worker would run.
                    asyncio.run(held._pool.putconn(held))
                    return 0 if held._pool is None else 2

                assert run_in_child(child) == 0
                await held.execute("SELECT 1")
            assert pool.get_stats()["pool_size"] == 1

    asyncio.run(parent())


def _mp_worker(n: int) -> int:
    pool = _GLOBAL_POOL
    assert pool is not None
    with pool.connection(timeout=5) as conn:
        row = conn.execute("SELECT %s::int * 2", [n]).fetchone()
        assert row is not None
        return int(row[0])


_GLOBAL_POOL: ConnectionPool[Any] | None = None


def test_multiprocessing_fork_workers_use_the_inherited_pool(dsn: str) -> None:
    global _GLOBAL_POOL
    with ConnectionPool(dsn, min_size=2, open=True) as pool:
        pool.wait(5)
        _GLOBAL_POOL = pool
        try:
            before = {backend_pid(pool) for _ in range(4)}
            opened = pool.get_stats()["connections_num"]
            ctx = multiprocessing.get_context("fork")
            with ctx.Pool(3) as workers:
                results = workers.map(_mp_worker, range(30))
            assert results == [n * 2 for n in range(30)]
            # The parent's pool was not disturbed by the children: same backends, none
            # lost or reopened.
            assert {backend_pid(pool) for _ in range(4)} == before
            assert pool.get_stats()["connections_num"] == opened
            with pool.connection() as conn:
                assert conn.execute("SELECT 42").fetchone() == (42,)
        finally:
            _GLOBAL_POOL = None


def ends_in_time(child: Any, held: list[Any], seconds: float = 10.0) -> int:
    """Fork while another thread of the parent holds the `held` locks; the exit status
    of `child()` run in the child, or -1 if it did not end within `seconds`."""
    holding, done = threading.Event(), threading.Event()

    def hold() -> None:
        with contextlib.ExitStack() as stack:
            for lock in held:
                stack.enter_context(lock)
            holding.set()
            done.wait(30.0)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert holding.wait(10.0)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            code = 99
            try:
                code = child()
            finally:
                os._exit(code)
    finally:
        done.set()
        holder.join()
    # The child's end, as an event: a pidfd turns readable when it exits.
    pidfd = os.pidfd_open(pid)
    try:
        ended = bool(select.select([pidfd], [], [], seconds)[0])
    finally:
        os.close(pidfd)
    if not ended:
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) if ended else -1


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="needs pidfd_open() (Linux)")
def test_a_metrics_lock_held_at_the_fork_does_not_block_the_child(dsn: str) -> None:
    # Another thread of the parent (a Prometheus scrape) holds the exporters' lock at the
    # moment of the fork: the child must not inherit it locked.
    from psycopg_pool.metrics import _source

    with ConnectionPool(dsn, min_size=1, open=True) as pool:
        pool.wait(5)

        def child() -> int:
            feed = _source.SampleFeed(pool)
            with pool.connection(timeout=5):
                pass
            events = feed.drain()
            feed.close()
            return 0 if any(kind == "wait" for kind, _ in events) else 1

        assert ends_in_time(child, [_source._lock]) == 0


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="needs pidfd_open() (Linux)")
def test_an_otel_lock_held_at_the_fork_does_not_block_the_child(dsn: str) -> None:
    # OpenTelemetry's reader thread runs the pool's callbacks under their lock.
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from psycopg_pool.metrics import otel

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    try:
        with ConnectionPool(dsn, min_size=1, open=True, name="forked-otel") as pool:
            pool.wait(5)
            metrics = otel.PoolMetrics(pool, meter_provider=provider)

            def child() -> int:
                data = reader.get_metrics_data()  # runs the pool's callbacks
                return 0 if data is not None and data.resource_metrics else 1

            held = [otel._meters_lock, metrics._instruments._lock]
            assert ends_in_time(child, held) == 0
            metrics.remove_pool(pool)
    finally:
        provider.shutdown()


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="needs pidfd_open() (Linux)")
def test_the_check_watchdog_held_at_the_fork_does_not_block_the_child(dsn: str) -> None:
    # The watchdog's thread, which bounds every check by its client's deadline, holds
    # its condition between two waits: a fork at that moment must not leave it locked.
    from psycopg_pool._acompat import Watchdog

    check = ConnectionPool.check_connection
    with ConnectionPool(dsn, min_size=1, open=True, check=check) as pool:
        with pool.connection(timeout=5):  # a checked checkout: the watchdog runs
            pass

        def child() -> int:
            with pool.connection(timeout=5) as conn:  # checked too
                return 0 if conn.execute("SELECT 1").fetchone() == (1,) else 1

        assert ends_in_time(child, [Watchdog._made["cond"]]) == 0
