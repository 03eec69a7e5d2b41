"""ConnectionPool: background maintenance and the maintenance methods.

Spec: API.md §2.2 (resize, check, check_connection, drain), §3.5 (growth, shrink,
lifetime, reconnection), traps 7-10, 19-21, and the deliberate differences 3, 4, 5, 7.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
from psycopg.pq import TransactionStatus

from psycopg_pool import ConnectionPool, PoolClosed, PoolTimeout

from .helpers import (
    PoolClient,
    backend_pid,
    log_messages,
    pool_after_giving_up,
    pool_threads,
    refused_conninfo,
    release_all,
    server_pids,
    set_backoff,
    terminate_backends,
    wait_until,
    warnings_logged,
)


def shrink_sizes(caplog: pytest.LogCaptureFixture) -> list[int]:
    """The sizes announced by the INFO `shrinking pool ... to N` records, in order."""
    sizes = []
    for msg in log_messages(caplog, logging.INFO):
        m = re.match(r"shrinking pool '[^']*' to (\d+)", msg)
        if m:
            sizes.append(int(m.group(1)))
    return sizes


def observe(pool: ConnectionPool, seconds: float) -> list[dict[str, int]]:
    """Sample the stats for a while: for what must *not* happen in that window."""
    samples = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        samples.append(pool.get_stats())
        time.sleep(0.01)
    return samples


# ---------------------------------------------------------------------------
# Shrinking (trap 21)


def test_shrink_after_burst(dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="psycopg.pool")
    with ConnectionPool(dsn, min_size=2, max_size=4, max_idle=0.1, open=False) as pool:
        pool.wait(5)
        conns = [pool.getconn(5) for _ in range(4)]
        for c in conns:
            pool.putconn(c)
        assert pool.get_stats()["pool_size"] == 4
        wait_until(lambda: pool.get_stats()["pool_size"] == 2, "the pool to shrink to 2")
        assert shrink_sizes(caplog) == [3, 2]  # one connection per max_idle period
        samples = observe(pool, 0.35)  # a few more periods: never below min_size
        assert {s["pool_size"] for s in samples} == {2}
        assert {s["pool_available"] for s in samples} == {2}
        assert shrink_sizes(caplog) == [3, 2]


def test_min_size_zero_shrinks_to_nothing(dsn: str) -> None:
    with ConnectionPool(dsn, min_size=0, max_size=2, max_idle=0.05, open=False) as pool:
        pool.wait(5)  # nothing to wait for
        assert pool.get_stats()["pool_size"] == 0
        with pool.connection(timeout=5) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert pool.get_stats()["pool_available"] == 1
        wait_until(lambda: pool.get_stats()["pool_size"] == 0, "the pool to shrink to 0")
        with pool.connection(timeout=5) as conn:  # and it grows again on demand
            assert conn.execute("SELECT 1").fetchone() == (1,)


def test_no_shrink_while_connections_are_used(dsn: str) -> None:
    with ConnectionPool(dsn, min_size=1, max_size=2, max_idle=0.1, open=False) as pool:
        pool.wait(5)
        hold = threading.Event()
        clients = [PoolClient(pool, timeout=5, hold=hold).start() for _ in range(2)]
        wait_until(lambda: all(c.got.is_set() for c in clients), "both clients served")
        samples = observe(pool, 0.35)
        assert {s["pool_size"] for s in samples} == {2}
        release_all(hold, clients)


def test_max_idle_is_writable(dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="psycopg.pool")
    with ConnectionPool(dsn, min_size=1, max_size=3, max_idle=0.05, open=False) as pool:
        pool.wait(5)
        pool.max_idle = 600.0  # read at the next reschedule
        conns = [pool.getconn(5) for _ in range(3)]
        for c in conns:
            pool.putconn(c)
        samples = observe(pool, 0.3)
        assert {s["pool_size"] for s in samples} == {3}
        assert shrink_sizes(caplog) == []


# ---------------------------------------------------------------------------
# resize (trap 20)


def test_resize_grows_at_once_and_shrinks_lazily(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="psycopg.pool")
    with ConnectionPool(dsn, min_size=2, max_idle=0.1, open=False, name="resized") as pool:
        pool.wait(5)
        pool.resize(4)
        stats = pool.get_stats()
        assert (stats["pool_min"], stats["pool_max"]) == (4, 4)
        assert stats["pool_size"] == 4  # nconns grows at once
        assert (pool.min_size, pool.max_size) == (4, 4)
        wait_until(lambda: pool.get_stats()["pool_available"] == 4, "4 idle connections")
        pool.resize(1, 4)
        assert pool.get_stats()["pool_size"] == 4  # decreases are lazy
        wait_until(lambda: pool.get_stats()["pool_size"] == 1, "the pool to shrink to 1")
        # The housekeeper logs a shrink just after the core makes it, outside the lock.
        wait_until(lambda: len(shrink_sizes(caplog)) >= 3, "the last shrink's log line")
        assert shrink_sizes(caplog) == [3, 2, 1]
    assert any("resizing 'resized'" in m for m in log_messages(caplog, logging.INFO))


def test_resize_down_while_connections_are_out(dsn: str) -> None:
    with ConnectionPool(dsn, min_size=1, max_size=4, max_idle=0.05, open=False) as pool:
        pool.wait(5)
        conns = [pool.getconn(5) for _ in range(4)]
        pool.resize(1, 2)
        with pytest.raises(PoolTimeout):
            pool.getconn(0.2)  # over the new max_size: no new connection
        stats = pool.get_stats()
        assert stats["pool_size"] == 4
        assert stats["connections_num"] == 4
        for c in conns:
            pool.putconn(c)
        wait_until(lambda: pool.get_stats()["pool_size"] == 1, "the pool to shrink to 1")
        with pool.connection() as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((-1,), "min_size cannot be negative"),
        ((3, 2), "max_size must be greater or equal than min_size"),
        ((0,), "if min_size is 0 max_size must be greater than 0"),
    ],
)
def test_resize_validation(args: tuple[int, ...], message: str) -> None:
    pool: ConnectionPool = ConnectionPool(min_size=2, max_size=3, open=False)
    with pytest.raises(ValueError) as excinfo:
        pool.resize(*args)
    assert str(excinfo.value) == message
    assert (pool.min_size, pool.max_size) == (2, 3)


def test_resize_before_open(dsn: str) -> None:
    pool: ConnectionPool = ConnectionPool(dsn, min_size=1, open=False)
    pool.resize(3, 5)
    assert pool.get_stats()["pool_size"] == 3
    with pool:
        pool.wait(5)
        assert pool.get_stats()["pool_available"] == 3


# ---------------------------------------------------------------------------
# Lifetime (trap 7 and deliberate difference 3)


def test_lifetime_jitter(dsn: str) -> None:
    with ConnectionPool(dsn, min_size=8, max_lifetime=10.0, open=False) as pool:
        pool.wait(5)
        conns = [pool.getconn() for _ in range(8)]
        spans = [c._expire_at - c._created_at for c in conns]
        assert all(9.5 <= s <= 10.0 for s in spans)
        assert len(set(spans)) > 1
        for c in conns:
            pool.putconn(c)


def test_expired_idle_connections_replaced_in_background(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="psycopg.pool")
    app = "expiring-idle"
    with ConnectionPool(
        dsn, min_size=2, max_lifetime=0.2, kwargs={"application_name": app}, open=False
    ) as pool:
        pool.wait(5)
        first = server_pids(dsn, app)
        assert len(first) == 2
        # no client activity: the housekeeping replaces them
        wait_until(
            lambda: len(server_pids(dsn, app) - first) >= 2, "both connections to be replaced"
        )
        wait_until(lambda: pool.get_stats()["pool_available"] == 2, "two idle connections")
        assert pool.get_stats()["pool_size"] == 2
    assert any("discarding expired" in m for m in log_messages(caplog, logging.INFO))


def test_expired_connection_never_handed_out(dsn: str) -> None:
    with ConnectionPool(dsn, min_size=2, max_size=2, max_lifetime=0.1, open=False) as pool:
        pool.wait(5)
        seen: set[int] = set()

        def several_generations() -> bool:
            t0 = time.monotonic()
            with pool.connection(timeout=5) as conn:
                assert conn._expire_at > t0, "an expired connection was handed out"
                seen.add(backend_pid(conn))
            return len(seen) >= 6

        wait_until(several_generations, "connections of several generations")


def test_expired_connection_closed_on_return(dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="psycopg.pool")
    with ConnectionPool(dsn, min_size=1, max_lifetime=0.2, open=False) as pool:
        conn = pool.getconn(5)
        pid = backend_pid(conn)
        wait_until(lambda: conn._expire_at < time.monotonic(), "the connection to expire")
        pool.putconn(conn)
        assert conn.closed  # by putconn() itself
        with pool.connection(timeout=5) as conn2:
            assert backend_pid(conn2) != pid
        assert pool.get_stats()["pool_size"] == 1
        assert pool.get_stats().get("returns_bad", 0) == 0
    assert any("discarding expired" in m for m in log_messages(caplog, logging.INFO))


def test_max_lifetime_read_at_creation(dsn: str) -> None:
    with ConnectionPool(dsn, min_size=1, max_lifetime=3600.0, open=False) as pool:
        pool.wait(5)
        pool.max_lifetime = 50.0
        pool.drain()  # new connections, created with the new lifetime
        wait_until(lambda: pool.get_stats()["pool_available"] == 1, "a new connection")
        with pool.connection() as conn:
            assert 47.5 <= conn._expire_at - conn._created_at <= 50.0


# ---------------------------------------------------------------------------
# Reconnection (traps 9, 10, 19 and deliberate difference 4)


def test_reconnect_failed(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="psycopg.pool")
    called: list[Any] = []
    with pool_after_giving_up(
        refused_conninfo(), on_failed=called.append, reconnect_timeout=0.2, name="unreachable"
    ) as pool:
        assert called == [pool]
        warns = warnings_logged(caplog)
        assert warns[0].startswith("error connecting in 'unreachable': ")
        assert any(
            "reconnection attempt in pool 'unreachable' failed after 0.2 sec" in m for m in warns
        )
        stats = pool.get_stats()
        assert stats["connections_errors"] >= 2
        assert stats["connections_num"] == stats["connections_errors"]
        assert stats.get("pool_available", 0) == 0


def test_failing_reconnect_failed_callback(dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    """A raising callback is logged; the pool goes on working."""
    caplog.set_level(logging.WARNING, logger="psycopg.pool")

    def reconnect_failed(pool: ConnectionPool) -> None:
        raise ZeroDivisionError("callback blew up")

    with pool_after_giving_up(refused_conninfo(), on_failed=reconnect_failed) as pool:
        wait_until(
            lambda: any("ZeroDivisionError" in m for m in warnings_logged(caplog)),
            "the callback failure to be logged",
        )
        pool.conninfo = dsn
        with pool.connection(timeout=5) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    msg = next(m for m in warnings_logged(caplog) if "ZeroDivisionError" in m)
    assert "callback blew up" in msg
    assert "failed" in msg


def test_close_from_reconnect_failed(caplog: pytest.LogCaptureFixture) -> None:
    """The seed's advice for persistent errors: close the pool (here, from the callback)."""
    caplog.set_level(logging.WARNING, logger="psycopg.pool")
    with pool_after_giving_up(
        refused_conninfo(), on_failed=lambda pool: pool.close(), name="self-closing"
    ) as pool:
        wait_until(lambda: pool.closed, "the pool to close")
        wait_until(lambda: not pool_threads("self-closing"), "its threads to stop")
        with pytest.raises(PoolClosed, match="already closed"):
            pool.getconn()
    assert not [m for m in warnings_logged(caplog) if "couldn't stop" in m]


def test_failed_attempts_back_off(caplog: pytest.LogCaptureFixture) -> None:
    """Trap 19: a raising conninfo callable runs once per attempt, and attempts back off."""
    caplog.set_level(logging.WARNING, logger="psycopg.pool")
    calls: list[float] = []
    fired = threading.Event()

    def conninfo() -> str:
        calls.append(time.monotonic())
        raise RuntimeError("no conninfo today")

    with ConnectionPool(
        conninfo,
        min_size=3,
        reconnect_timeout=0.3,
        reconnect_failed=lambda pool: fired.set(),
        open=False,
    ):
        assert fired.wait(5)
        # The initial fill tries 3 connections; then one attempt at a time, at the
        # backoff's pace (the first delay, ~1 s, is clipped to the give-up time).
        assert len(calls) <= 5
    assert "no conninfo today" in warnings_logged(caplog)[0]


@contextmanager
def pool_that_gave_up(
    dsn: str, min_size: int, next_retry: float, max_size: int | None = None
) -> Iterator[ConnectionPool]:
    """An open pool whose server was unreachable until it called reconnect_failed.

    When it is yielded, the server is reachable again (its conninfo is fixed) and
    the pool's next scheduled attempt is about `next_retry` seconds away.
    """
    with pool_after_giving_up(
        refused_conninfo(),
        backoff=(next_retry / 2, next_retry),
        min_size=min_size,
        max_size=max_size,
    ) as pool:
        pool.conninfo = dsn  # the server is back
        yield pool


def test_reconnection_after_giving_up(dsn: str) -> None:
    """Deliberate difference 4: after reconnect_failed the pool keeps trying."""
    with pool_that_gave_up(dsn, min_size=2, next_retry=0.1) as pool:
        # no client, no check(): the pool refills by itself
        wait_until(lambda: pool.get_stats()["pool_available"] == 2, "the pool to refill")
        assert pool.get_stats()["pool_size"] == 2


def test_demand_reconnects_at_once_after_giving_up(dsn: str) -> None:
    """Trap 9 (with difference 4): a new request does not wait for the long backoff step."""
    with pool_that_gave_up(dsn, min_size=1, next_retry=60.0) as pool:
        with pool.connection(timeout=5) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)


def test_check_reconnects_at_once_after_giving_up(dsn: str) -> None:
    """check() refills to min_size (trap 8, difference 5) even while backing off."""
    with pool_that_gave_up(dsn, min_size=2, max_size=4, next_retry=60.0) as pool:
        pool.check()
        wait_until(
            lambda: pool.get_stats()["pool_available"] == 2, "the pool to refill", timeout=2.0
        )
        assert pool.get_stats()["pool_size"] == 2


def test_server_restart(dsn: str, pg_control: Any) -> None:
    """The server goes away and comes back: the pool recovers its connections."""
    with ConnectionPool(dsn, min_size=2, check=ConnectionPool.check_connection, open=False) as pool:
        set_backoff(pool, initial=0.05, max_delay=0.2)
        pool.wait(5)
        pg_control.restart()
        with pool.connection(timeout=5) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        wait_until(lambda: pool.get_stats()["pool_available"] == 2, "the pool to refill")


# ---------------------------------------------------------------------------
# check() (trap 8, deliberate differences 5 and 7)


def test_check_replaces_broken_connections(dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="psycopg.pool")
    app = "checked"
    with ConnectionPool(
        dsn, min_size=3, kwargs={"application_name": app}, open=False, name="checked"
    ) as pool:
        pool.wait(5)
        pids = server_pids(dsn, app)
        broken = sorted(pids)[:2]
        terminate_backends(dsn, *broken)
        pool.check()
        warns = warnings_logged(caplog)
        assert len(warns) == 2
        assert all(m.startswith("discarding broken connection: ") for m in warns)
        stats = pool.get_stats()
        assert stats["connections_lost"] == 2
        assert stats["pool_size"] == 3
        wait_until(lambda: pool.get_stats()["pool_available"] == 3, "the replacements")
        now = server_pids(dsn, app)
        assert len(now) == 3
        assert not now & set(broken)


def test_check_healthy_pool_adds_nothing(dsn: str) -> None:
    """Deliberate difference 5: no extra connection when below max_size."""
    with ConnectionPool(dsn, min_size=2, max_size=4, open=False) as pool:
        pool.wait(5)
        pool.check()
        stats = pool.get_stats()
        assert stats["pool_size"] == 2
        assert stats["pool_available"] == 2
        assert stats["connections_num"] == 2
        assert stats.get("connections_lost", 0) == 0


def test_check_uses_check_connection_not_the_callback(dsn: str) -> None:
    calls: list[int] = []

    def check(conn: psycopg.Connection[Any]) -> None:
        calls.append(1)

    with ConnectionPool(dsn, min_size=2, check=check, open=False) as pool:
        pool.wait(5)
        pool.check()
        assert calls == []
        assert pool.get_stats()["pool_available"] == 2


def test_check_leaves_connections_in_use_alone(dsn: str) -> None:
    with ConnectionPool(dsn, min_size=2, open=False) as pool:
        pool.wait(5)
        conn = pool.getconn()
        pool.check()
        assert conn._pool is pool
        assert conn.execute("SELECT 1").fetchone() == (1,)
        stats = pool.get_stats()
        assert (stats["pool_available"], stats["pool_size"]) == (1, 2)
        pool.putconn(conn)


def test_check_closes_expired_connections(dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="psycopg.pool")
    with ConnectionPool(dsn, min_size=1, max_lifetime=0.3, open=False) as pool:
        pool.wait(5)
        with pool.connection() as conn:
            old = backend_pid(conn)
        wait_until(lambda: conn._expire_at < time.monotonic(), "the connection to expire")
        pool.check()
        wait_until(lambda: pool.get_stats()["pool_available"] == 1, "a replacement")
        with pool.connection() as conn:
            assert backend_pid(conn) != old


# ---------------------------------------------------------------------------
# check_connection()


@pytest.mark.parametrize("autocommit", [False, True])
def test_check_connection_healthy(dsn: str, autocommit: bool) -> None:
    with psycopg.connect(dsn, autocommit=autocommit) as conn:
        ConnectionPool.check_connection(conn)
        assert conn.autocommit is autocommit
        assert conn.info.transaction_status == TransactionStatus.IDLE
        assert not conn.closed


def test_check_connection_dead(dsn: str) -> None:
    conn = psycopg.connect(dsn)
    try:
        terminate_backends(dsn, backend_pid(conn))
        with pytest.raises(psycopg.OperationalError):
            ConnectionPool.check_connection(conn)
        assert conn.closed
    finally:
        conn.close()


# ---------------------------------------------------------------------------
# drain()


def test_drain_replaces_every_connection(dsn: str) -> None:
    app = "drained"
    with ConnectionPool(dsn, min_size=3, kwargs={"application_name": app}, open=False) as pool:
        pool.wait(5)
        in_use = pool.getconn()
        old = server_pids(dsn, app)
        assert len(old) == 3
        pool.drain()
        assert pool.get_stats()["pool_size"] == 3  # nconns unchanged
        wait_until(lambda: pool.get_stats()["pool_available"] == 2, "idle replacements")
        assert not in_use.closed  # in use: replaced when it comes back
        pool.putconn(in_use)
        wait_until(lambda: in_use.closed, "the drained connection to close on return")
        wait_until(lambda: pool.get_stats()["pool_available"] == 3, "all replacements")
        new = server_pids(dsn, app)
        assert len(new) == 3
        assert not new & old
        stats = pool.get_stats()
        assert stats["connections_num"] == 6
        assert stats.get("returns_bad", 0) == 0


def test_drain_passes_no_old_connection_to_waiters(dsn: str) -> None:
    with ConnectionPool(dsn, min_size=1, open=False) as pool:
        conn = pool.getconn(5)
        old = backend_pid(conn)
        client = PoolClient(pool, timeout=5, hold=threading.Event()).start()
        wait_until(lambda: pool.get_stats()["requests_waiting"] == 1, "the client to queue")
        pool.drain()
        pool.putconn(conn)
        assert client.got.wait(5)
        assert backend_pid(client.conn) != old
        assert client.hold is not None
        client.hold.set()
        client.join()


def test_timeout_while_pool_is_broken() -> None:
    with ConnectionPool(refused_conninfo(), min_size=1, open=False) as pool:
        with pytest.raises(PoolTimeout):
            pool.getconn(0.2)
        assert pool.get_stats()["requests_waiting"] == 0
