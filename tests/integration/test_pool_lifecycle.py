"""ConnectionPool: opening, waiting, closing, reopening, threads, implicit-open warnings.

Spec: API.md §2.2 (open, wait, close, context manager, __del__), §3.6, §5, and the
deliberate difference 8 (a closed pool can be opened again).
"""

from __future__ import annotations

import gc
import logging
import threading
import warnings
from typing import Any

import pytest

from psycopg_pool import ConnectionPool, PoolClosed, PoolTimeout

from .helpers import (
    ConnectGate,
    PoolClient,
    backend_pid,
    log_messages,
    pool_threads,
    refused_conninfo,
    server_pids,
    wait_until,
)

# ---------------------------------------------------------------------------
# open() and wait()


def test_open_false_opens_nothing(dsn: str) -> None:
    pool: ConnectionPool = ConnectionPool(dsn, min_size=2, open=False, name="lazy")
    assert pool.closed
    assert pool_threads("lazy") == []
    stats = pool.get_stats()
    assert stats["pool_size"] == 2  # nconns equals min_size even before open
    assert stats["pool_available"] == 0
    assert "connections_num" not in stats


def test_open_true_fills_in_background(dsn: str) -> None:
    pool = ConnectionPool(dsn, min_size=3, open=True, kwargs={"application_name": "filled"})
    try:
        assert not pool.closed
        pool.wait(5)
        assert pool.get_stats()["pool_available"] == 3
        assert len(server_pids(dsn, "filled")) == 3
    finally:
        pool.close()
    wait_until(lambda: not server_pids(dsn, "filled"), "the server connections to close")


def test_open_wait(dsn: str) -> None:
    pool: ConnectionPool = ConnectionPool(dsn, min_size=2, open=False)
    try:
        pool.open(wait=True, timeout=5)
        assert pool.get_stats()["pool_available"] == 2
    finally:
        pool.close()


def test_wait_returns_at_once_when_ready(dsn: str) -> None:
    with ConnectionPool(dsn, min_size=1, open=False) as pool:
        pool.wait(5)
        pool.wait(0.001)  # already ready: does not time out
        assert not pool.closed


def test_wait_timeout_closes_the_pool(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="psycopg.pool")
    pool: ConnectionPool = ConnectionPool(
        refused_conninfo(), min_size=1, open=False, name="never-ready"
    )
    pool.open()
    with pytest.raises(PoolTimeout) as excinfo:
        pool.wait(0.2)
    assert str(excinfo.value).startswith("pool initialization incomplete after 0.2 sec: ")
    assert pool.closed
    with pytest.raises(PoolClosed, match="already closed"):
        pool.getconn()
    assert any("error connecting in 'never-ready'" in m for m in log_messages(caplog, 30))
    wait_until(lambda: not pool_threads("never-ready"), "the pool threads to stop")


def test_wait_before_open_and_after_close(dsn: str) -> None:
    pool: ConnectionPool = ConnectionPool(dsn, min_size=1, open=False, name="unopened")
    with pytest.raises(PoolClosed, match="the pool 'unopened' is not open yet"):
        pool.wait(0.1)
    pool.open(wait=True, timeout=5)
    pool.close()
    with pytest.raises(PoolClosed, match="the pool 'unopened' is already closed"):
        pool.wait(0.1)


def test_wait_logs(dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="psycopg.pool")
    with ConnectionPool(dsn, min_size=1, open=False) as pool:
        pool.wait(5)
    infos = log_messages(caplog, logging.INFO)
    assert any("waiting for" in m for m in infos)
    assert any("ready" in m for m in infos)


def test_open_is_idempotent_and_cheap(dsn: str) -> None:
    with ConnectionPool(dsn, min_size=2, open=False, name="reopened-often") as pool:
        pool.wait(5)
        threads = {t.ident for t in pool_threads("reopened-often")}
        before = pool.get_stats()
        for _ in range(50):
            pool.open()
        assert {t.ident for t in pool_threads("reopened-often")} == threads
        after = pool.get_stats()
        assert after["connections_num"] == before["connections_num"] == 2
        assert after["pool_available"] == 2


def test_concurrent_open(dsn: str) -> None:
    pool: ConnectionPool = ConnectionPool(dsn, min_size=2, open=False, name="racing-open")
    barrier = threading.Barrier(8)

    def opener() -> None:
        barrier.wait(5)
        pool.open()

    threads = [threading.Thread(target=opener) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    try:
        pool.wait(5)
        assert pool.get_stats()["connections_num"] == 2
    finally:
        pool.close()


# ---------------------------------------------------------------------------
# Threads


def test_background_threads_are_daemons_and_stop_on_close(dsn: str) -> None:
    pool: ConnectionPool = ConnectionPool(
        dsn, min_size=1, num_workers=2, open=False, name="threaded"
    )
    pool.open(wait=True, timeout=5)
    threads = pool_threads("threaded")
    assert threads
    assert all(t.daemon for t in threads)
    pool.close()
    assert not any(t.is_alive() for t in threads)
    assert pool_threads("threaded") == []


def test_dropped_open_pool_stops_its_threads(dsn: str) -> None:
    pool: ConnectionPool = ConnectionPool(dsn, min_size=2, open=False, name="dropped")
    pool.open(wait=True, timeout=5)
    with pool.connection() as conn:
        conn.execute("SELECT 1")
    assert pool_threads("dropped")
    del pool, conn
    gc.collect()
    wait_until(lambda: not pool_threads("dropped"), "the threads of a dropped pool to stop")


# ---------------------------------------------------------------------------
# close()


def test_close_closes_idle_connections(dsn: str) -> None:
    pool: ConnectionPool = ConnectionPool(
        dsn, min_size=2, open=False, kwargs={"application_name": "closing"}
    )
    pool.open(wait=True, timeout=5)
    assert len(server_pids(dsn, "closing")) == 2
    pool.close()
    assert pool.closed
    assert pool.get_stats()["pool_available"] == 0
    wait_until(lambda: not server_pids(dsn, "closing"), "idle connections to close")


def test_close_is_idempotent_and_noop_before_open(dsn: str) -> None:
    pool: ConnectionPool = ConnectionPool(dsn, min_size=1, open=False)
    pool.close()  # never opened: no-op
    pool.close()
    pool.open(wait=True, timeout=5)  # and it can still be opened
    with pool.connection() as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    pool.close()
    pool.close()
    assert pool.closed


def test_checked_out_connection_closed_on_return_after_close(dsn: str) -> None:
    pool: ConnectionPool = ConnectionPool(dsn, min_size=1, open=False)
    pool.open(wait=True, timeout=5)
    conn = pool.getconn()
    pool.close()
    assert not conn.closed  # in use: closed only when returned
    assert conn.execute("SELECT 1").fetchone() == (1,)
    before = pool.get_stats()
    pool.putconn(conn)
    assert conn.closed
    after = pool.get_stats()
    assert after.get("returns_bad", 0) == before.get("returns_bad", 0)
    assert conn._pool is None


def test_close_fails_waiting_clients(dsn: str) -> None:
    pool: ConnectionPool = ConnectionPool(dsn, min_size=1, open=False, name="closing-on-you")
    pool.open(wait=True, timeout=5)
    held = pool.getconn()
    clients = [PoolClient(pool, timeout=10).start() for _ in range(3)]
    wait_until(lambda: pool.get_stats()["requests_waiting"] == 3, "three queued clients")
    pool.close()
    for c in clients:
        c.join()
        assert isinstance(c.error, PoolClosed)
        assert str(c.error) == "the pool 'closing-on-you' is closed"
    stats = pool.get_stats()
    assert stats["requests_waiting"] == 0
    assert stats["requests_errors"] == 3
    pool.putconn(held)
    assert held.closed


def test_close_fails_a_pending_wait() -> None:
    pool: ConnectionPool = ConnectionPool(
        refused_conninfo(), min_size=1, open=False, name="never-filled"
    )
    pool.open()
    errors: list[BaseException] = []

    def waiter() -> None:
        try:
            pool.wait(10)
        except BaseException as ex:
            errors.append(ex)

    t = threading.Thread(target=waiter)
    t.start()
    wait_until(
        lambda: pool.get_stats().get("connections_errors", 0) >= 1, "a failed connection attempt"
    )
    pool.close()
    t.join(10)
    assert not t.is_alive()
    assert len(errors) == 1
    assert isinstance(errors[0], PoolClosed)
    assert "never-filled" in str(errors[0])


def test_maintenance_methods_on_a_pool_not_open(dsn: str) -> None:
    pool: ConnectionPool = ConnectionPool(dsn, min_size=1, open=False, name="idle-methods")
    pool.drain()
    pool.check()
    pool.resize(2)
    assert pool_threads("idle-methods") == []
    assert pool.get_stats().get("connections_num", 0) == 0
    pool.open(wait=True, timeout=5)
    pool.close()
    pool.drain()
    pool.check()
    assert pool_threads("idle-methods") == []
    assert pool.get_stats()["connections_num"] == 2


def test_getconn_before_open_and_after_close(dsn: str) -> None:
    pool: ConnectionPool = ConnectionPool(dsn, min_size=1, open=False, name="states")
    with pytest.raises(PoolClosed) as excinfo:
        pool.getconn()
    assert str(excinfo.value) == "the pool 'states' is not open yet"
    with pytest.raises(PoolClosed, match="not open yet"):
        with pool.connection():
            pass
    pool.open(wait=True, timeout=5)
    pool.close()
    with pytest.raises(PoolClosed) as excinfo:
        pool.getconn()
    assert str(excinfo.value) == "the pool 'states' is already closed"
    # requests_num counts even the calls failing with PoolClosed (trap 2)
    stats = pool.get_stats()
    assert stats["requests_num"] == 3
    assert stats.get("requests_errors", 0) == 0


def test_creation_completing_after_close_is_closed(dsn: str) -> None:
    gate = ConnectGate()
    pool: ConnectionPool = ConnectionPool(
        dsn, connection_class=gate.connection_class, min_size=1, open=False
    )
    pool.open()
    wait_until(lambda: gate.in_flight == 1, "the connection attempt to start")
    pool.close(timeout=0.1)  # the attempt is stuck in the gate
    gate.release()
    wait_until(lambda: gate.connections, "the late attempt to connect")
    wait_until(lambda: gate.connections[0].closed, "the late connection to be closed")
    assert pool.get_stats()["pool_available"] == 0


def test_close_warns_about_threads_not_stopping(dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="psycopg.pool")
    gate = ConnectGate()
    pool: ConnectionPool = ConnectionPool(
        dsn, connection_class=gate.connection_class, min_size=1, open=False, name="stuck"
    )
    pool.open()
    wait_until(lambda: gate.in_flight == 1, "the connection attempt to start")
    try:
        pool.close(timeout=0.05)
        warns = log_messages(caplog, logging.WARNING)
        assert warns
        assert all("stuck" in m for m in warns)
    finally:
        gate.release()
    wait_until(lambda: not pool_threads("stuck"), "the stuck thread to finish")


# ---------------------------------------------------------------------------
# Reopening (deliberate difference 8) and the context manager


def test_reopen_after_close(dsn: str) -> None:
    pool: ConnectionPool = ConnectionPool(dsn, min_size=2, open=False, name="phoenix")
    pool.open(wait=True, timeout=5)
    with pool.connection() as conn:
        first_pid = backend_pid(conn)
    pool.close()
    with pytest.raises(PoolClosed, match="already closed"):
        pool.getconn()  # only an explicit open() reopens
    pool.open(wait=True, timeout=5)
    try:
        assert not pool.closed
        assert pool_threads("phoenix")
        with pool.connection() as conn:
            assert backend_pid(conn) != first_pid  # new connections
            assert conn.execute("SELECT 1").fetchone() == (1,)
        stats = pool.get_stats()
        assert stats["connections_num"] == 4  # counters kept across the reopen
        assert stats["requests_num"] == 3
        assert stats["pool_available"] == 2
    finally:
        pool.close()


def test_reopen_with_a_connection_still_out(dsn: str) -> None:
    """A connection lent before close() belongs to the old life of the pool.

    The reopened pool starts with min_size new connections, and closes the old
    one when it comes back (a user would not expect the pool to be short of it).
    """
    with ConnectionPool(dsn, min_size=2, open=False) as pool:
        pool.wait(5)
        old = pool.getconn()
        pool.close()
        pool.open(wait=True, timeout=2)
        assert pool.get_stats()["pool_available"] == 2
        pool.putconn(old)
        wait_until(lambda: old.closed, "the old connection to close")
        wait_until(lambda: pool.get_stats()["pool_available"] == 2, "two idle connections")
        assert pool.get_stats()["pool_size"] == 2


def test_close_while_reset_runs(dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="psycopg.pool")
    entered = threading.Event()
    proceed = threading.Event()

    def reset(conn: Any) -> None:
        entered.set()
        proceed.wait(5)

    pool: ConnectionPool = ConnectionPool(dsn, min_size=1, reset=reset, open=False)
    pool.open(wait=True, timeout=5)
    conn = pool.getconn()
    pool.putconn(conn)
    assert entered.wait(5)
    pool.close(timeout=0.05)  # the reset is still running in a worker
    proceed.set()
    wait_until(lambda: conn.closed, "the reset connection to be closed, not pooled")
    assert pool.get_stats()["pool_available"] == 0
    assert not [m for m in log_messages(caplog, logging.WARNING) if "couldn't stop" not in m]


def test_context_manager_reopens_a_closed_pool(dsn: str) -> None:
    pool: ConnectionPool = ConnectionPool(dsn, min_size=1, open=False)
    with pool as entered:
        assert entered is pool
        assert not pool.closed
    assert pool.closed
    with pool:
        with pool.connection(timeout=5) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    assert pool.closed


def test_context_manager_closes_on_error(dsn: str) -> None:
    pool: ConnectionPool = ConnectionPool(dsn, min_size=1, open=False)
    with pytest.raises(ZeroDivisionError):
        with pool:
            pool.wait(5)
            1 / 0  # noqa: B018
    assert pool.closed


# ---------------------------------------------------------------------------
# Implicit open warnings (§5, trap 28)


def _implicit_pool(dsn: str) -> ConnectionPool:
    pool: ConnectionPool = ConnectionPool(dsn, min_size=1)  # open omitted
    return pool


def test_implicit_open_warns_at_first_getconn(dsn: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pool = _implicit_pool(dsn)  # no warning in the constructor
    try:
        assert not pool.closed
        with pytest.deprecated_call() as record:
            conn = pool.getconn(5)
        pool.putconn(conn)
        assert len(record) == 1
        msg = str(record[0].message)
        assert "ConnectionPool" in msg
        assert "False" in msg
        assert "open" in msg
        assert "with" in msg
        assert record[0].filename == __file__  # points at the caller
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pool.connection(5):  # once per pool
                pass
            pool.wait(5)
    finally:
        pool.close()


@pytest.mark.parametrize(
    "first_use",
    [
        "connection",
        "wait",
    ],
)
def test_implicit_open_warns_at_other_first_uses(dsn: str, first_use: str) -> None:
    pool = _implicit_pool(dsn)
    try:
        with pytest.deprecated_call() as record:
            if first_use == "connection":
                with pool.connection(5):
                    pass
            else:
                pool.wait(5)
        assert len(record) == 1
        assert record[0].filename == __file__  # points at the caller, as for getconn()
    finally:
        pool.close()


def test_implicit_open_warns_even_after_explicit_open(dsn: str) -> None:
    pool = _implicit_pool(dsn)
    try:
        pool.open()
        with pytest.deprecated_call():
            pool.wait(5)
    finally:
        pool.close()


@pytest.mark.parametrize("open_arg", [True, False, "with"])
def test_no_warning_when_explicit(dsn: str, open_arg: Any) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        if open_arg == "with":
            with ConnectionPool(dsn, min_size=1) as pool:
                pool.wait(5)
                with pool.connection(5) as conn:
                    conn.execute("SELECT 1")
            return
        pool = ConnectionPool(dsn, min_size=1, open=open_arg)
        try:
            pool.open()
            pool.wait(5)
            with pool.connection(5) as conn:
                conn.execute("SELECT 1")
        finally:
            pool.close()


def test_no_warning_when_closed_by_user_before_use(dsn: str) -> None:
    """The warning is about using a pool: closing an unused one is silent."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pool = _implicit_pool(dsn)
        pool.close()
    assert pool.closed
