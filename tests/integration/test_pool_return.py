"""ConnectionPool: the return path.

Spec: API.md §2.2 (putconn and its ValueError), §3.1 (close_returns), §3.4 (return
statuses, the reset callback and their WARNING logs), traps 13-15, 18, 23, 24.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import TransactionStatus

from psycopg_pool import ConnectionPool
from psycopg_pool import _orphan_queries as orphan_queries
from psycopg_pool._connection_facts import has_input, still_running

from .faults import FaultProxy
from .helpers import (
    async_pool,
    await_until,
    backend_pid,
    cancel_twice_mid_query,
    query_running,
    run_async,
    terminate_backends,
    wait_until,
    warnings_logged,
)

IDLE = TransactionStatus.IDLE


@pytest.fixture
def pool(dsn: str) -> Iterator[ConnectionPool]:
    """A ready 1-connection pool called 'ret'."""
    with ConnectionPool(dsn, min_size=1, open=False, name="ret", timeout=2) as pool:
        pool.wait(5)
        yield pool


@pytest.fixture
def warnings_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.WARNING, logger="psycopg.pool")
    return caplog


def wait_idle(pool: ConnectionPool, n: int = 1) -> None:
    wait_until(lambda: pool.get_stats()["pool_available"] == n, f"{n} idle connections")


def make_inerror(conn: psycopg.Connection[Any]) -> None:
    try:
        conn.execute("SELECT 1/0")
    except psycopg.errors.DivisionByZero:
        pass
    assert conn.info.transaction_status == TransactionStatus.INERROR


# ---------------------------------------------------------------------------
# Ownership (§2.2)


def test_putconn_foreign_pool(dsn: str, pool: ConnectionPool) -> None:
    with ConnectionPool(dsn, min_size=1, open=False, name="other") as other:
        conn = other.getconn(5)
        with pytest.raises(ValueError) as excinfo:
            pool.putconn(conn)
        assert str(excinfo.value) == (
            f"can't return connection to pool 'ret', it comes from pool 'other': {conn}"
        )
        assert conn._pool is other  # untouched
        other.putconn(conn)


def test_putconn_not_from_a_pool(dsn: str, pool: ConnectionPool) -> None:
    with psycopg.connect(dsn) as conn:
        with pytest.raises(ValueError) as excinfo:
            pool.putconn(conn)
        assert str(excinfo.value) == (
            f"can't return connection to pool 'ret', it doesn't come from any pool: {conn}"
        )
        assert getattr(conn, "_pool", None) is None
        assert not conn.closed


def test_putconn_twice(pool: ConnectionPool) -> None:
    conn = pool.getconn()
    pool.putconn(conn)
    with pytest.raises(ValueError, match="it doesn't come from any pool"):
        pool.putconn(conn)
    stats = pool.get_stats()
    assert stats["pool_available"] == 1
    assert stats["pool_size"] == 1


# ---------------------------------------------------------------------------
# Transaction status on return (§3.4 step 3, traps 13 and 14)


@pytest.mark.parametrize("status", ["INTRANS", "INERROR"])
def test_return_in_transaction_rolls_back(
    pool: ConnectionPool, warnings_log: pytest.LogCaptureFixture, status: str
) -> None:
    conn = pool.getconn()
    pid = backend_pid(conn)
    if status == "INTRANS":
        conn.execute("CREATE TEMP TABLE rolled_back (x int)")
    else:
        make_inerror(conn)
    pool.putconn(conn)
    warns = warnings_logged(warnings_log)
    assert len(warns) == 1
    assert warns[0].startswith("rolling back returned connection")
    assert f"[{status}]" in warns[0]
    with pool.connection() as conn2:
        assert backend_pid(conn2) == pid  # the same backend, reused
        assert conn2.info.transaction_status == IDLE
        if status == "INTRANS":
            cur = conn2.execute("SELECT to_regclass('pg_temp.rolled_back') IS NULL")
            assert cur.fetchone() == (True,)
    assert pool.get_stats().get("returns_bad", 0) == 0


def test_return_active(pool: ConnectionPool, warnings_log: pytest.LogCaptureFixture) -> None:
    conn = pool.getconn()
    pid = backend_pid(conn)
    conn.pgconn.send_query(b"SELECT 1")
    assert conn.info.transaction_status == TransactionStatus.ACTIVE
    pool.putconn(conn)
    assert conn.closed  # by putconn() itself
    wait_idle(pool)
    warns = warnings_logged(warnings_log)
    assert warns[0].startswith("closing returned connection")
    assert "[ACTIVE]" in warns[0]
    assert pool.get_stats()["returns_bad"] == 1
    with pool.connection() as conn2:
        assert backend_pid(conn2) != pid


def test_return_active_logs_bad(
    pool: ConnectionPool, warnings_log: pytest.LogCaptureFixture
) -> None:
    """Trap 14: WARNINGs `ACTIVE` then `BAD`."""
    conn = pool.getconn()
    conn.pgconn.send_query(b"SELECT 1")
    pool.putconn(conn)
    wait_idle(pool)
    warns = warnings_logged(warnings_log)
    assert len(warns) == 2
    assert "[ACTIVE]" in warns[0]
    assert warns[1].startswith("discarding closed connection")
    assert "[BAD]" in warns[1]


def running(dsn: str, pid: int) -> bool:
    """Is backend `pid` still running a statement?"""
    with psycopg.connect(dsn, autocommit=True) as admin:
        row = admin.execute("SELECT state FROM pg_stat_activity WHERE pid = %s", [pid]).fetchone()
    return row is not None and row[0] == "active"


def test_a_query_still_running_when_returned_is_cancelled(dsn: str, pool: ConnectionPool) -> None:
    # Its caller was interrupted (a Celery soft time limit, an exception raised by a
    # signal handler): closing the connection alone would leave the query running on
    # the server, holding its locks, until it ends.
    conn = pool.getconn()
    pid = backend_pid(conn)
    conn.pgconn.send_query(b"SELECT pg_sleep(60)")
    wait_until(lambda: running(dsn, pid), "the query to start")
    pool.putconn(conn)
    wait_until(lambda: not running(dsn, pid), "the server to stop the query")
    assert pool.get_stats()["returns_bad"] == 1


def test_without_a_nonblocking_cancel_a_running_query_is_left_alone(
    dsn: str, pool: ConnectionPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before libpq 17, psycopg's cancel blocks holding the GIL until the server
    # answers: the pool closes the connection without asking (see _connector.close()).
    from psycopg_pool import _connector

    calls: list[object] = []
    monkeypatch.setattr(_connector, "NONBLOCKING_CANCEL", False)
    monkeypatch.setattr(psycopg.Connection, "cancel_safe", lambda *a, **k: calls.append(a))
    conn = pool.getconn()
    pid = backend_pid(conn)
    try:
        conn.pgconn.send_query(b"SELECT pg_sleep(60)")
        wait_until(lambda: running(dsn, pid), "the query to start")
        pool.putconn(conn)
        assert conn.closed and not calls
        assert pool.get_stats()["returns_bad"] == 1
    finally:
        terminate_backends(dsn, pid)


@pytest.mark.parametrize(
    "query, runs",
    [("SELECT 1", False), ("SELECT pg_sleep(60)", True), ("SELECT 1; SELECT pg_sleep(60)", True)],
)
def test_still_running_tells_a_query_over_from_one_that_runs(
    dsn: str, query: str, runs: bool
) -> None:
    # What decides whether closing a connection left ACTIVE needs a cancel request.
    conn = psycopg.connect(dsn, autocommit=True)
    try:
        pid = backend_pid(conn)
        conn.pgconn.send_query(query.encode())
        if not runs:
            wait_until(lambda: has_input(conn), "the result")
        if runs:
            wait_until(lambda: running(dsn, pid), "the sleep to start")
        assert still_running(conn) is runs
    finally:
        conn.cancel_safe()
        conn.close()  # (not `with`: its exit would commit, and fail, mid-query)
    wait_until(lambda: not running(dsn, pid), "the cancel")


def test_a_block_left_by_an_exception_in_the_middle_of_a_query(
    dsn: str, pool: ConnectionPool, caplog: pytest.LogCaptureFixture
) -> None:
    # No rollback can be sent while a query runs: psycopg's would only fail and warn
    # ("error ignored in rollback"). The pool cancels the query and closes the
    # connection instead.
    caplog.set_level(logging.WARNING)
    with pytest.raises(ZeroDivisionError), pool.connection() as conn:
        pid = backend_pid(conn)
        conn.pgconn.send_query(b"SELECT pg_sleep(60)")
        wait_until(lambda: running(dsn, pid), "the query to start")
        1 / 0  # noqa: B018
    wait_until(lambda: not running(dsn, pid), "the server to stop the query")
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert messages[0].startswith("closing returned connection"), messages
    assert not any("error ignored in rollback" in m for m in messages), messages


@run_async
async def test_async_a_query_still_running_when_returned_is_cancelled(dsn: str) -> None:
    async with async_pool(dsn) as pool:
        conn = await pool.getconn()
        pid = conn.info.backend_pid
        conn.pgconn.send_query(b"SELECT pg_sleep(60)")
        await await_until(lambda: running(dsn, pid), "the query to start")
        await pool.putconn(conn)
        await await_until(lambda: not running(dsn, pid), "the server to stop the query")


@pytest.mark.parametrize("api", ["connection", "getconn"])
@run_async
async def test_a_query_psycopg_gives_up_cancelling_is_cancelled_by_the_pool(
    dsn: str, api: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A cancelled task's query: psycopg asks the server to cancel it, but anyio's
    # cancel scope cancels the task again as psycopg waits for that, and psycopg
    # closes the connection instead. Closed, the connection cannot tell the server,
    # which runs the query on, holding its locks, for as long as it lasts.
    caplog.set_level(logging.INFO, logger="psycopg.pool")
    query = f"SELECT pg_sleep(60) /* {api} */"
    async with async_pool(dsn, max_size=1) as pool:
        await cancel_twice_mid_query(pool, query, api, dsn)
        if api == "getconn" and sys.version_info < (3, 11):
            pytest.skip("before 3.11 a task cannot tell it is being cancelled")
        await await_until(lambda: not query_running(dsn, query), "the server to stop the query")
        async with pool.connection() as conn:  # replaced
            assert await (await conn.execute("SELECT 1")).fetchone() == (1,)
    assert "asked the server to cancel the query" in caplog.text
    # psycopg warned ("query cancellation interrupted"): the pool says the rest at INFO.
    pool_records = [r for r in caplog.records if r.name == "psycopg.pool"]
    assert not [r.getMessage() for r in pool_records if r.levelno >= logging.WARNING]
    if api == "connection":  # (getconn: putconn() cleans it in the background)
        assert any(r.getMessage().startswith("discarding closed connection") for r in pool_records)


def test_a_cancel_request_nobody_answers_gives_up_in_time(dsn: str) -> None:
    # A request the other end never answers (a silent network; PgBouncer holding one
    # open) must not hold up the pool's canceller, which sends its requests one after
    # the other.
    with FaultProxy(int(conninfo_to_dict(dsn).get("port") or 5432)) as proxy:
        conn = psycopg.connect(proxy.conninfo(dsn), autocommit=True)
        try:
            token = conn.pgconn.cancel_conn()
            proxy.blackhole()
            t0 = time.monotonic()
            with pytest.raises(psycopg.OperationalError, match=r"no answer after 0\.3 sec"):
                orphan_queries.send(token, 0.3)
            assert time.monotonic() - t0 < 5.0  # bounded, not the kernel's TCP timeout
        finally:
            proxy.resume()
            conn.close()


@contextmanager
def descriptors_taken_up_to(n: int) -> Iterator[None]:
    """Hold every free file descriptor below `n`: the next one opened is past it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < n + 100:
        pytest.skip(f"the process may not open {n} files")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, n + 100), hard))
    held: list[int] = []
    try:
        while not held or held[-1] < n:
            held.append(os.open(os.devnull, os.O_RDONLY))
        yield
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.skipif(pq.version() < 170000, reason="libpq < 17 has no non-blocking cancel")
def test_a_cancel_request_on_a_descriptor_past_fd_setsize(dsn: str) -> None:
    # A busy service (a web server with its clients' sockets) has more than 1024 files
    # open, past what select() can watch: the cancel request's own socket is one of
    # those, and the request must still go out.
    query = "SELECT pg_sleep(60) /* past FD_SETSIZE */"
    conn = psycopg.connect(dsn, autocommit=True)
    try:
        conn.pgconn.send_query(query.encode())
        wait_until(lambda: query_running(dsn, query), "the query to start")
        token = conn.pgconn.cancel_conn()
        with descriptors_taken_up_to(1100):
            orphan_queries.send(token, 5.0)
        wait_until(lambda: not query_running(dsn, query), "the server to stop the query")
    finally:
        conn.close()  # its query's result unread: no `with`, whose exit would commit


STREAM = "SELECT generate_series(1, 10000000) /* unfinished stream */"


@pytest.mark.parametrize("autocommit", [True, False])
def test_a_block_left_with_an_unfinished_stream_does_not_hang(
    dsn: str, autocommit: bool, caplog: pytest.LogCaptureFixture
) -> None:
    # The stream holds the connection's lock while suspended: psycopg's commit at the
    # block's end would wait for it for ever (upstream's does).
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute("CREATE TABLE IF NOT EXISTS unfinished_stream (x int)")
        admin.execute("TRUNCATE unfinished_stream")
    outcome: list[BaseException | None] = []
    ended = threading.Event()
    with ConnectionPool(dsn, min_size=1, kwargs={"autocommit": autocommit}) as pool:

        def block() -> None:
            try:
                with pool.connection(timeout=5) as conn:
                    conn.execute("INSERT INTO unfinished_stream VALUES (1)")
                    rows = conn.cursor().stream(STREAM)
                    assert next(rows) == (1,)
                outcome.append(None)
            except BaseException as ex:
                outcome.append(ex)
            finally:
                ended.set()

        threading.Thread(target=block, daemon=True).start()
        assert ended.wait(10.0), "the block's end waited for the stream"
        wait_until(lambda: not query_running(dsn, STREAM), "the server to stop the stream")
        with pool.connection(timeout=5) as conn:  # the pool goes on
            assert conn.execute("SELECT count(*) FROM unfinished_stream").fetchone() == (
                1 if autocommit else 0,  # the transaction was not committed
            )
    if autocommit:
        assert outcome == [None]  # nothing to commit: the stream is just dropped
    else:
        assert isinstance(outcome[0], psycopg.ProgrammingError)
        assert "could not be committed" in str(outcome[0])
    assert "closing returned connection" in caplog.text


@pytest.mark.parametrize("autocommit", [True, False])
@run_async
async def test_async_a_block_left_with_an_unfinished_stream_does_not_hang(
    dsn: str, autocommit: bool
) -> None:
    async with async_pool(dsn, kwargs={"autocommit": autocommit}) as pool:

        async def block() -> None:
            async with pool.connection(timeout=5) as conn:
                rows = conn.cursor().stream(STREAM)
                assert await anext(rows) == (1,)

        if autocommit:
            await asyncio.wait_for(block(), 10.0)
        else:
            with pytest.raises(psycopg.ProgrammingError, match="could not be committed"):
                await asyncio.wait_for(block(), 10.0)
        await await_until(lambda: not query_running(dsn, STREAM), "the server to stop it")
        async with pool.connection(timeout=5) as conn:
            assert await (await conn.execute("SELECT 1")).fetchone() == (1,)


def test_return_with_failing_rollback(
    dsn: str, pool: ConnectionPool, warnings_log: pytest.LogCaptureFixture
) -> None:
    """Trap 14: a failed rollback logs INERROR, the error, BAD (exactly 3 WARNINGs)."""
    conn = pool.getconn()
    pid = backend_pid(conn)
    make_inerror(conn)
    terminate_backends(dsn, pid)
    pool.putconn(conn)
    wait_idle(pool)
    assert conn.closed
    assert conn._pool is None
    stats = pool.get_stats()
    assert stats["returns_bad"] == 1
    assert stats["pool_size"] == 1
    warns = warnings_logged(warnings_log)
    assert len(warns) == 3
    assert "[INERROR]" in warns[0]
    assert warns[1].startswith("rollback failed: ")
    assert "Discarding connection" in warns[1]
    assert warns[2].startswith("discarding closed connection")
    assert "[BAD]" in warns[2]
    with pool.connection() as conn2:
        assert backend_pid(conn2) != pid


def test_return_closed_connection(
    pool: ConnectionPool, warnings_log: pytest.LogCaptureFixture
) -> None:
    conn = pool.getconn()
    pid = backend_pid(conn)
    conn.close()  # close_returns is False: really closed
    assert conn.closed
    pool.putconn(conn)
    warns = warnings_logged(warnings_log)
    assert len(warns) == 1
    assert warns[0].startswith("discarding closed connection")
    assert "[BAD]" in warns[0]
    assert pool.get_stats()["returns_bad"] == 1
    wait_idle(pool)
    with pool.connection() as conn2:
        assert backend_pid(conn2) != pid
    assert pool.get_stats()["pool_size"] == 1


def test_return_broken_connection(
    dsn: str, pool: ConnectionPool, warnings_log: pytest.LogCaptureFixture
) -> None:
    conn = pool.getconn()
    terminate_backends(dsn, backend_pid(conn))
    with pytest.raises(psycopg.OperationalError):
        conn.execute("SELECT 1")
    pool.putconn(conn)
    assert conn.closed
    warns = warnings_logged(warnings_log)
    assert len(warns) == 1
    assert warns[0].startswith("discarding closed connection")
    assert pool.get_stats()["returns_bad"] == 1
    wait_idle(pool)


def test_connection_block_with_broken_connection(dsn: str, pool: ConnectionPool) -> None:
    with pytest.raises(psycopg.OperationalError):
        with pool.connection() as conn:
            terminate_backends(dsn, backend_pid(conn))
            conn.execute("SELECT 1")
    assert conn.closed
    assert pool.get_stats()["returns_bad"] == 1
    with pool.connection() as conn2:
        assert conn2.execute("SELECT 1").fetchone() == (1,)


def test_return_after_close_closes_without_stats(dsn: str) -> None:
    pool: ConnectionPool = ConnectionPool(dsn, min_size=1, open=False)
    pool.open(wait=True, timeout=5)
    conn = pool.getconn()
    make_inerror(conn)
    pool.close()
    before = pool.get_stats()
    pool.putconn(conn)
    assert conn.closed
    after = pool.get_stats()
    assert after.get("returns_bad", 0) == before.get("returns_bad", 0) == 0


# ---------------------------------------------------------------------------
# The reset callback (§3.4 step 4, traps 15 and 18)


def test_reset_runs_on_every_return(dsn: str) -> None:
    resets: list[tuple[int, TransactionStatus]] = []

    def reset(conn: psycopg.Connection[Any]) -> None:
        resets.append((backend_pid(conn), conn.info.transaction_status))
        assert conn._pool is None
        conn.execute("RESET ALL")
        conn.commit()

    with ConnectionPool(dsn, min_size=1, reset=reset, open=False) as pool:
        with pool.connection(timeout=5) as conn:
            pid = backend_pid(conn)
            conn.execute("SET search_path TO pg_catalog")
        wait_until(lambda: len(resets) == 1, "the reset")
        conn = pool.getconn(5)
        make_inerror(conn)
        pool.putconn(conn)
        wait_until(lambda: len(resets) == 2, "the second reset")
        with pool.connection(timeout=5) as conn:
            assert backend_pid(conn) == pid
            assert conn.execute("SHOW search_path").fetchone() != ("pg_catalog",)
        wait_until(lambda: len(resets) == 3, "the third reset")
    # reset sees the connection IDLE: after the commit, or after the rollback
    assert resets == [(pid, IDLE)] * 3


def test_putconn_returns_before_reset(dsn: str) -> None:
    """Trap 18: with `reset`, the worker puts the connection back."""
    entered = threading.Event()
    proceed = threading.Event()

    def reset(conn: psycopg.Connection[Any]) -> None:
        entered.set()
        proceed.wait(5)

    with ConnectionPool(dsn, min_size=1, reset=reset, open=False) as pool:
        pool.wait(5)
        conn = pool.getconn()
        pool.putconn(conn)  # returns although the reset is blocked
        assert entered.wait(5)
        assert pool.get_stats()["pool_available"] == 0
        proceed.set()
        wait_idle(pool)


@pytest.mark.parametrize("failure", ["raises", "intrans"])
def test_reset_failure_replaces_the_connection(
    dsn: str, caplog: pytest.LogCaptureFixture, failure: str
) -> None:
    caplog.set_level(logging.WARNING, logger="psycopg.pool")

    def reset(conn: psycopg.Connection[Any]) -> None:
        if failure == "raises":
            conn.execute("SELECT * FROM no_such_table_for_reset")
        else:
            conn.execute("SELECT 1")  # leaves a transaction open

    with ConnectionPool(dsn, min_size=1, reset=reset, open=False) as pool:
        conn = pool.getconn(5)
        pid = backend_pid(conn)
        pool.putconn(conn)
        wait_until(lambda: conn.closed, "the connection to be closed")
        wait_idle(pool)
        assert pool.get_stats()["returns_bad"] == 1
        warns = warnings_logged(caplog)
        assert warns[0].startswith("error resetting connection: ")
        if failure == "raises":
            assert "no_such_table_for_reset" in warns[0]
        else:
            assert "INTRANS" in warns[0]
        conn = pool.getconn(5)
        assert backend_pid(conn) != pid
        conn.close()  # keep the failing reset from running again
        pool.putconn(conn)


def test_reset_not_called_for_closed_connection(dsn: str) -> None:
    resets: list[int] = []

    def reset(conn: psycopg.Connection[Any]) -> None:
        resets.append(1)

    with ConnectionPool(dsn, min_size=1, reset=reset, open=False) as pool:
        conn = pool.getconn(5)
        conn.close()
        pool.putconn(conn)
        wait_idle(pool)
        assert pool.get_stats()["returns_bad"] == 1
    assert resets == []


# ---------------------------------------------------------------------------
# close_returns (§3.1, traps 23 and 24)


def test_close_returns(dsn: str) -> None:
    with ConnectionPool(dsn, min_size=1, close_returns=True, open=False) as pool:
        assert pool.close_returns is True
        pool.wait(5)
        conn = pool.getconn()
        pid = backend_pid(conn)
        conn.execute("SELECT 1")  # a transaction is open: the return rolls it back
        conn.close()
        assert not conn.closed
        assert conn._pool is None
        wait_idle(pool)
        with pool.connection() as conn2:
            assert conn2 is conn
            assert backend_pid(conn2) == pid
        pool.close()
        assert conn.closed  # the pool's own close does close it (no loop)


def test_close_returns_expired_connection_really_closes(dsn: str) -> None:
    with ConnectionPool(dsn, min_size=1, close_returns=True, max_lifetime=0.2, open=False) as pool:
        conn = pool.getconn(5)
        wait_until(lambda: conn._expire_at < time.monotonic(), "the connection to expire")
        conn.close()
        # expired: closed for real, without recursion
        assert conn.closed  # by close() itself
        wait_idle(pool)
        with pool.connection() as conn2:
            assert conn2 is not conn


def test_close_returns_drained_connection_really_closes(dsn: str) -> None:
    with ConnectionPool(dsn, min_size=1, close_returns=True, open=False) as pool:
        conn = pool.getconn(5)
        pool.drain()
        conn.close()
        assert conn.closed  # by close() itself
        wait_idle(pool)
        with pool.connection() as conn2:
            assert conn2 is not conn
        assert pool.get_stats()["pool_size"] == 1


def test_close_returns_inside_connection_block(dsn: str) -> None:
    """Trap 24: closing inside `with pool.connection()` returns it; the exit then fails."""
    with ConnectionPool(dsn, min_size=1, close_returns=True, open=False) as pool:
        pool.wait(5)
        with pytest.raises(ValueError, match="doesn't come from any pool"):
            with pool.connection() as conn:
                conn.close()
                assert not conn.closed
        stats = pool.get_stats()
        assert stats["pool_size"] == 1
        # the pool still serves a working connection afterwards
        with pool.connection() as conn2:
            assert conn2.execute("SELECT 1").fetchone() == (1,)


# ---------------------------------------------------------------------------
# Under load


def test_mixed_returns_under_load(dsn: str) -> None:
    """Many threads returning connections in every state: nothing is lost or leaked."""
    outcomes = ["idle", "intrans", "inerror", "closed", "active"]
    errors: list[BaseException] = []
    counts = dict.fromkeys(outcomes, 0)
    lock = threading.Lock()

    def client(i: int) -> None:
        try:
            for j in range(10):
                outcome = outcomes[(i + j) % len(outcomes)]
                conn = pool.getconn(5)
                if outcome == "intrans":
                    conn.execute("SELECT 1")
                elif outcome == "inerror":
                    make_inerror(conn)
                elif outcome == "closed":
                    conn.close()
                elif outcome == "active":
                    conn.pgconn.send_query(b"SELECT 1")
                pool.putconn(conn)
                with lock:
                    counts[outcome] += 1
        except BaseException as ex:
            errors.append(ex)

    with ConnectionPool(dsn, min_size=2, max_size=5, open=False) as pool:
        pool.wait(5)
        threads = [threading.Thread(target=client, args=(i,)) for i in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert errors == []
        wait_until(
            lambda: pool.get_stats()["pool_available"] == pool.get_stats()["pool_size"],
            "every connection back in the pool",
        )
        stats = pool.get_stats()
        assert 2 <= stats["pool_size"] <= 5
        assert stats["requests_num"] == 100
        assert stats["returns_bad"] == counts["closed"] + counts["active"] == 40
        with pool.connection() as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
