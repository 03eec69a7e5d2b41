"""ConnectionPool under concurrent load: races between timeouts, returns, close, drain.

Each test runs many threads for a fraction of a second and then checks that no
connection was lost or leaked, nobody hung, and the only errors are the expected ones.
Spec: API.md §3.3 (waiters timing out must not lose a connection, trap 5), §3.4,
§3.5, §3.6, and the deliberate differences 2 and 3.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest

from psycopg_pool import ConnectionPool, PoolClosed, PoolTimeout

from .helpers import server_pids, wait_until


def hammer(
    pool: ConnectionPool,
    nthreads: int,
    iterations: int,
    timeout: Callable[[random.Random], float],
    expected: tuple[type[BaseException], ...] = (PoolTimeout,),
    use: Callable[[psycopg.Connection[Any]], None] | None = None,
) -> dict[str, int]:
    """Run `nthreads` clients doing getconn/use/putconn; return outcome counts.

    Unexpected exceptions fail the test (after every thread is joined).
    """
    counts = {"ok": 0, "expected": 0}
    unexpected: list[BaseException] = []
    lock = threading.Lock()

    def client(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(iterations):
            try:
                conn = pool.getconn(timeout(rng))
            except expected:
                with lock:
                    counts["expected"] += 1
                continue
            except BaseException as ex:
                unexpected.append(ex)
                return
            try:
                assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
                if use is not None:
                    use(conn)
                else:
                    conn.execute("SELECT 1")
            except BaseException as ex:
                unexpected.append(ex)
            finally:
                try:
                    pool.putconn(conn)
                except BaseException as ex:
                    unexpected.append(ex)
            with lock:
                counts["ok"] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(nthreads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "a client thread hung"
    assert unexpected == []
    return counts


def settle(pool: ConnectionPool, size: int) -> None:
    """Wait until every connection is back and idle, and none is missing."""

    def settled() -> bool:
        s = pool.get_stats()
        return s["pool_available"] == s["pool_size"] == size and s["requests_waiting"] == 0

    wait_until(settled, f"{size} idle connections and nobody waiting")


def test_timeouts_racing_with_returns(dsn: str) -> None:
    """Trap 5 under load: waiters timing out while connections are handed over."""
    with ConnectionPool(dsn, min_size=2, open=False) as pool:
        pool.wait(5)
        counts = hammer(pool, 16, 40, timeout=lambda rng: rng.choice([0.0, 0.001, 0.005, 0.02]))
        assert counts["ok"] > 0
        assert counts["expected"] > 0  # the race did happen
        settle(pool, 2)
        stats = pool.get_stats()
        assert stats["connections_num"] == 2  # nothing was lost and replaced
        assert stats["requests_num"] == 16 * 40


def test_growth_and_shrink_under_load(dsn: str) -> None:
    with ConnectionPool(dsn, min_size=1, max_size=4, max_idle=0.05, open=False) as pool:
        pool.wait(5)
        for _ in range(3):
            counts = hammer(pool, 8, 20, timeout=lambda rng: 5.0)
            assert counts["expected"] == 0
            assert pool.get_stats()["pool_size"] <= 4
        wait_until(lambda: pool.get_stats()["pool_size"] == 1, "the pool to shrink back")
        settle(pool, 1)


def test_short_lifetime_under_load(dsn: str) -> None:
    """Difference 3: connections expire all the time, none is handed out expired."""

    def use(conn: psycopg.Connection[Any]) -> None:
        assert conn._expire_at > time.monotonic() - 0.05  # just taken: was not expired
        conn.execute("SELECT 1")

    with ConnectionPool(dsn, min_size=2, max_size=4, max_lifetime=0.02, open=False) as pool:
        pool.wait(5)

        def several_generations() -> bool:
            counts = hammer(pool, 8, 10, timeout=lambda rng: 5.0, use=use)
            assert counts["expected"] == 0
            return pool.get_stats()["connections_num"] >= 12

        wait_until(several_generations, "connections to be replaced")
        wait_until(lambda: pool.get_stats()["pool_available"] >= 2, "idle connections")


@contextmanager
def looping(action: Callable[[], object]) -> Iterator[None]:
    """Run `action` over and over in a thread for the duration of the block."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            action()

    t = threading.Thread(target=loop)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join(10)


def test_drain_under_load(dsn: str) -> None:
    """drain() in a loop while clients come and go: every connection has one holder."""
    with ConnectionPool(dsn, min_size=3, open=False) as pool:
        pool.wait(5)
        with looping(pool.drain):
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                counts = hammer(pool, 8, 10, timeout=lambda rng: 5.0)
                assert counts["expected"] == 0
        settle(pool, 3)


def test_check_under_load(dsn: str) -> None:
    with ConnectionPool(dsn, min_size=3, open=False) as pool:
        pool.wait(5)
        with looping(pool.check):
            counts = hammer(pool, 8, 15, timeout=lambda rng: 5.0)
        assert counts["expected"] == 0
        settle(pool, 3)


@pytest.mark.parametrize("reset", [False, True])
def test_close_under_load(dsn: str, reset: bool) -> None:
    app = f"close-under-load-{reset}"

    def reset_cb(conn: psycopg.Connection[Any]) -> None:
        conn.execute("SELECT 1")
        conn.commit()

    pool: ConnectionPool = ConnectionPool(
        dsn,
        min_size=2,
        max_size=4,
        kwargs={"application_name": app},
        reset=reset_cb if reset else None,
        open=False,
    )
    pool.open(wait=True, timeout=5)
    closer = threading.Timer(0.1, pool.close)
    closer.start()
    counts = hammer(pool, 10, 1000, timeout=lambda rng: 1.0, expected=(PoolClosed,))
    closer.join(10)
    assert pool.closed
    assert counts["expected"] > 0
    stats = pool.get_stats()
    assert stats["pool_available"] == 0
    assert stats["requests_waiting"] == 0

    wait_until(lambda: not server_pids(dsn, app), "every server connection to close")
