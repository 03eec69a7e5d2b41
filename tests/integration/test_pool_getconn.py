"""ConnectionPool: lending connections.

Spec: API.md §2.2 (connection, getconn), §3.1 (the contract with connection
objects), §3.2 (creation, configure), §3.3 (getconn, timeouts, max_waiting, the
check callback), traps 1-6, 12, 16, 17, and the deliberate differences 1, 2 and 6.
"""

from __future__ import annotations

import logging
import select
import threading
import time
from typing import Any

import psycopg
import pytest
from psycopg.pq import TransactionStatus

from psycopg_pool import ConnectionPool, PoolTimeout, TooManyRequests

from .helpers import (
    ConnectGate,
    PoolClient,
    backend_pid,
    log_messages,
    release_all,
    terminate_backends,
    wait_until,
)

# ---------------------------------------------------------------------------
# connection() and getconn()


def test_connection_commits_and_keeps_the_connection(dsn: str) -> None:
    with ConnectionPool(dsn, min_size=1, open=False) as pool:
        with pool.connection(timeout=5) as conn:
            conn.execute("CREATE TEMP TABLE t_commit (x int)")
            conn.execute("INSERT INTO t_commit VALUES (1)")
            pid = backend_pid(conn)
        assert not conn.closed
        assert conn.info.transaction_status == TransactionStatus.IDLE
        with pool.connection(timeout=5) as conn:
            assert backend_pid(conn) == pid
            assert conn.execute("SELECT x FROM t_commit").fetchall() == [(1,)]


def test_connection_rolls_back_on_error(dsn: str) -> None:
    with ConnectionPool(dsn, min_size=1, open=False) as pool:
        with pool.connection(timeout=5) as conn:
            conn.execute("CREATE TEMP TABLE t_rollback (x int)")
        with pytest.raises(ZeroDivisionError):
            with pool.connection(timeout=5) as conn:
                conn.execute("INSERT INTO t_rollback VALUES (1)")
                1 / 0  # noqa: B018
        assert not conn.closed
        with pool.connection(timeout=5) as conn:
            assert conn.execute("SELECT count(*) FROM t_rollback").fetchone() == (0,)
        assert pool.get_stats().get("returns_bad", 0) == 0


def test_connection_block_interrupted(dsn: str) -> None:
    with ConnectionPool(dsn, min_size=1, open=False) as pool:
        with pytest.raises(KeyboardInterrupt):
            with pool.connection(timeout=5) as conn:
                conn.execute("CREATE TEMP TABLE t_interrupted (x int)")
                raise KeyboardInterrupt
        assert not conn.closed
        with pool.connection(timeout=5) as conn2:
            assert conn2 is conn
            cur = conn2.execute("SELECT to_regclass('pg_temp.t_interrupted') IS NULL")
            assert cur.fetchone() == (True,)  # rolled back


def test_autocommit_connections(dsn: str) -> None:
    def configure(conn: psycopg.Connection[Any]) -> None:
        conn.autocommit = True

    for kwargs in ({"kwargs": {"autocommit": True}}, {"configure": configure}):
        with ConnectionPool(dsn, min_size=1, open=False, **kwargs) as pool:  # type: ignore[arg-type]
            with pool.connection(timeout=5) as conn:
                assert conn.autocommit
                conn.execute("CREATE TEMP TABLE t_auto (x int)")
                conn.execute("INSERT INTO t_auto VALUES (1)")
                assert conn.info.transaction_status == TransactionStatus.IDLE
            pool.check()
            with pool.connection(timeout=5) as conn:
                assert conn.autocommit
                assert conn.execute("SELECT x FROM t_auto").fetchall() == [(1,)]
            assert pool.get_stats().get("returns_bad", 0) == 0


def test_getconn_putconn_and_pool_attribute(dsn: str) -> None:
    with ConnectionPool(dsn, min_size=1, open=False) as pool:
        conn = pool.getconn(5)
        assert conn._pool is pool
        assert conn.execute("SELECT 1").fetchone() == (1,)
        conn.commit()
        pool.putconn(conn)
        assert conn._pool is None
        assert not conn.closed
        # psycopg's `with conn:` does not close a pooled connection
        conn = pool.getconn(5)
        with conn:
            conn.execute("SELECT 1")
        assert not conn.closed
        pool.putconn(conn)


def test_created_and_expire_stamps(dsn: str) -> None:
    before = time.monotonic()
    with ConnectionPool(dsn, min_size=4, max_lifetime=100.0, open=False) as pool:
        pool.wait(5)
        after = time.monotonic()
        conns = [pool.getconn(5) for _ in range(4)]
        for conn in conns:
            assert before <= conn._created_at <= after
            lifetime = conn._expire_at - conn._created_at
            assert 95.0 <= lifetime <= 100.0  # jittered downwards by up to 5 %
        assert len({c._expire_at for c in conns}) > 1
        for conn in conns:
            pool.putconn(conn)


def test_fifo_idle_queue(dsn: str) -> None:
    """Trap 6: 8 sequential uses of a 4-connection pool hit each connection twice."""
    with ConnectionPool(dsn, min_size=4, open=False) as pool:
        pool.wait(5)
        pids = []
        for _ in range(8):
            with pool.connection() as conn:
                pids.append(backend_pid(conn))
        assert len(set(pids)) == 4
        assert pids[:4] == pids[4:]


def test_default_timeout_is_read_at_call(dsn: str) -> None:
    with ConnectionPool(dsn, min_size=1, open=False, timeout=30) as pool:
        held = pool.getconn()
        pool.timeout = 0.1
        with pytest.raises(PoolTimeout) as excinfo:
            pool.getconn()
        assert str(excinfo.value).startswith("couldn't get a connection after 0.10 sec: ")
        pool.putconn(held)


def test_getconn_timeout(dsn: str) -> None:
    with ConnectionPool(dsn, min_size=1, open=False) as pool:
        pool.wait(5)
        held = pool.getconn(5)
        with pytest.raises(PoolTimeout) as excinfo:
            pool.getconn(timeout=0.15)
        assert str(excinfo.value).startswith("couldn't get a connection after 0.15 sec: ")
        with pytest.raises(PoolTimeout, match=r"after 0\.10 sec"):
            with pool.connection(timeout=0.1):
                pass
        stats = pool.get_stats()
        assert stats["requests_errors"] == 2
        assert stats["requests_queued"] == 2
        pool.putconn(held)


def test_getconn_timeout_zero_takes_an_idle_connection(dsn: str) -> None:
    """Deliberate difference 6 (replaces trap 1)."""
    with ConnectionPool(dsn, min_size=1, open=False) as pool:
        pool.wait(5)
        conn = pool.getconn(timeout=0)
        assert conn.execute("SELECT 1").fetchone() == (1,)
        with pytest.raises(PoolTimeout, match=r"couldn.t get a connection after 0\.00 sec"):
            pool.getconn(timeout=0)
        stats = pool.get_stats()
        assert stats.get("requests_queued", 0) == 0  # a non-blocking attempt never queues
        assert stats["requests_waiting"] == 0
        pool.putconn(conn)
        with pool.connection(timeout=0) as conn:
            conn.execute("SELECT 1")


def test_waiters_are_served_in_order(dsn: str) -> None:
    with ConnectionPool(dsn, min_size=1, open=False) as pool:
        held = pool.getconn(5)
        served: list[int] = []
        lock = threading.Lock()

        def client(i: int) -> None:
            with pool.connection(timeout=5):
                with lock:
                    served.append(i)

        threads = []
        for i in range(5):
            t = threading.Thread(target=client, args=(i,))
            t.start()
            threads.append(t)
            wait_until(
                lambda i=i: pool.get_stats()["requests_waiting"] == i + 1,  # type: ignore[misc]
                "the client to queue",
            )
        pool.putconn(held)
        for t in threads:
            t.join(10)
        assert served == [0, 1, 2, 3, 4]


def test_timed_out_waiter_leaves_the_queue_at_once(dsn: str) -> None:
    """Deliberate difference 2 (replaces trap 3)."""
    with ConnectionPool(dsn, min_size=1, open=False, max_waiting=1) as pool:
        held = pool.getconn(5)
        with pytest.raises(PoolTimeout):
            pool.getconn(timeout=0.05)
        assert pool.get_stats()["requests_waiting"] == 0
        # it does not count against max_waiting either
        client = PoolClient(pool, timeout=5).start()
        wait_until(lambda: pool.get_stats()["requests_waiting"] == 1, "the client to queue")
        pool.putconn(held)
        client.join()
        assert client.error is None
        stats = pool.get_stats()
        assert stats["requests_errors"] == 1
        assert stats["pool_available"] == 1


def test_timed_out_waiter_does_not_lose_a_connection(dsn: str) -> None:
    """Trap 5: the offer passes on to the next waiter."""
    with ConnectionPool(dsn, min_size=2, open=False) as pool:
        held = [pool.getconn(5), pool.getconn(5)]
        short = PoolClient(pool, timeout=0.1).start()
        wait_until(lambda: pool.get_stats()["requests_waiting"] == 1, "the first client")
        patient = PoolClient(pool, timeout=5).start()
        short.join()
        assert isinstance(short.error, PoolTimeout)
        pool.putconn(held.pop())
        patient.join()
        assert patient.error is None
        pool.putconn(held.pop())
        wait_until(lambda: pool.get_stats()["pool_available"] == 2, "both connections idle")
        assert pool.get_stats()["pool_size"] == 2


def test_many_clients_few_connections(dsn: str) -> None:
    with ConnectionPool(dsn, min_size=2, max_size=3, open=False) as pool:
        errors: list[BaseException] = []

        def client() -> None:
            try:
                for _ in range(5):
                    with pool.connection(timeout=5) as conn:
                        conn.execute("SELECT 1")
            except BaseException as ex:
                errors.append(ex)

        threads = [threading.Thread(target=client) for _ in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert errors == []
        stats = pool.get_stats()
        assert stats["requests_num"] == 50
        assert stats["pool_size"] <= 3
        assert stats["connections_num"] <= 3
        assert stats["requests_waiting"] == 0


# ---------------------------------------------------------------------------
# max_waiting (trap 4)


def test_max_waiting(dsn: str) -> None:
    with ConnectionPool(dsn, min_size=1, open=False, max_waiting=2, name="busy") as pool:
        hold = threading.Event()
        holder = PoolClient(pool, timeout=5, hold=hold).start()
        holder.got.wait(5)
        waiters = [PoolClient(pool, timeout=5).start() for _ in range(2)]
        wait_until(lambda: pool.get_stats()["requests_waiting"] == 2, "two queued clients")
        with pytest.raises(TooManyRequests) as excinfo:
            pool.getconn(5)
        assert str(excinfo.value) == "the pool 'busy' has already 2 requests waiting"
        assert pool.get_stats()["requests_errors"] == 1
        pool.max_waiting = 0  # writable: unlimited
        third = PoolClient(pool, timeout=5).start()
        wait_until(lambda: pool.get_stats()["requests_waiting"] == 3, "a third queued client")
        release_all(hold, [holder, *waiters, third])


# ---------------------------------------------------------------------------
# Growth on demand (deliberate difference 1, replaces trap 22)


def test_grows_when_clients_wait(dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="psycopg.pool")
    with ConnectionPool(dsn, min_size=1, max_size=3, open=False, name="grower") as pool:
        pool.wait(5)
        conns = [pool.getconn(5) for _ in range(3)]
        assert len({backend_pid(c) for c in conns}) == 3
        assert pool.get_stats()["pool_size"] == 3
        with pytest.raises(PoolTimeout):
            pool.getconn(0.1)  # never beyond max_size
        assert pool.get_stats()["pool_size"] == 3
        for c in conns:
            pool.putconn(c)
    assert any("growing pool 'grower'" in m for m in log_messages(caplog, logging.INFO))


def test_growth_is_parallel_and_bounded(dsn: str) -> None:
    gate = ConnectGate()
    pool: ConnectionPool = ConnectionPool(
        dsn,
        connection_class=gate.connection_class,
        min_size=0,
        max_size=5,
        num_workers=3,
        open=False,
    )
    with pool:
        hold = threading.Event()
        clients = [PoolClient(pool, timeout=5, hold=hold).start() for _ in range(8)]
        # several connections are being opened at once, bounded by num_workers
        wait_until(lambda: gate.in_flight == 3, "three attempts in flight")
        wait_until(lambda: pool.get_stats()["requests_waiting"] == 8, "all clients queued")
        assert gate.in_flight == 3
        gate.release()
        wait_until(lambda: sum(c.got.is_set() for c in clients) == 5, "five clients served")
        assert gate.peak == 3
        assert gate.attempts == 5
        stats = pool.get_stats()
        assert stats["pool_size"] == 5
        assert stats["requests_waiting"] == 3
        release_all(hold, clients)
        assert gate.attempts == 5


def test_num_workers_is_writable(dsn: str) -> None:
    gate = ConnectGate()
    pool: ConnectionPool = ConnectionPool(
        dsn, connection_class=gate.connection_class, min_size=0, max_size=4, open=False
    )
    pool.num_workers = 1
    with pool:
        clients = [PoolClient(pool, timeout=5).start() for _ in range(3)]
        wait_until(lambda: pool.get_stats()["requests_waiting"] == 3, "all clients queued")
        wait_until(lambda: gate.in_flight == 1, "an attempt in flight")
        gate.release()
        for c in clients:
            c.join()
            assert c.error is None
        assert gate.peak == 1


def test_gauges_mid_burst(dsn: str) -> None:
    """Trap 32: 3 clients on a 2..4 pool → size 3; 7 clients → size 4, 3 waiting."""
    with ConnectionPool(dsn, min_size=2, max_size=4, open=False) as pool:
        pool.wait(5)
        hold = threading.Event()
        clients = [PoolClient(pool, timeout=5, hold=hold).start() for _ in range(3)]
        wait_until(lambda: all(c.got.is_set() for c in clients), "three clients served")
        assert pool.get_stats()["pool_size"] == 3
        clients += [PoolClient(pool, timeout=5, hold=hold).start() for _ in range(4)]
        wait_until(lambda: pool.get_stats()["requests_waiting"] == 3, "three clients waiting")
        wait_until(lambda: sum(c.got.is_set() for c in clients) == 4, "four clients served")
        stats = pool.get_stats()
        assert stats["pool_size"] == 4
        assert stats["requests_waiting"] == 3
        assert stats["pool_available"] == 0
        release_all(hold, clients)


# ---------------------------------------------------------------------------
# configure (§3.2, traps 16 and 17)


def test_configure_runs_once_per_connection(dsn: str) -> None:
    configured: list[int] = []

    def configure(conn: psycopg.Connection[Any]) -> None:
        assert conn._pool is not None
        configured.append(backend_pid(conn))
        conn.execute("SET application_name = 'configured'")
        conn.commit()

    with ConnectionPool(dsn, min_size=1, configure=configure, open=False) as pool:
        for _ in range(3):
            with pool.connection(timeout=5) as conn:
                assert conn.execute("SHOW application_name").fetchone() == ("configured",)
        assert len(configured) == 1
        # closing a connection in use forces a new one, configured again
        with pool.connection(timeout=5) as conn:
            conn.close()
        wait_until(lambda: len(configured) == 2, "a configured replacement")
        with pool.connection(timeout=5) as conn:
            assert backend_pid(conn) == configured[1]
            assert conn.execute("SHOW application_name").fetchone() == ("configured",)


@pytest.mark.parametrize(
    "failure",
    [
        "raises",
        pytest.param("intrans"),
    ],
)
def test_configure_failure(dsn: str, caplog: pytest.LogCaptureFixture, failure: str) -> None:
    caplog.set_level(logging.WARNING, logger="psycopg.pool")
    attempts: list[psycopg.Connection[Any]] = []

    def configure(conn: psycopg.Connection[Any]) -> None:
        attempts.append(conn)
        if failure == "raises":
            conn.execute("SELECT * FROM no_such_table_for_configure")
        else:
            conn.execute("SELECT 1")  # leaves a transaction open

    pool: ConnectionPool = ConnectionPool(
        dsn, min_size=1, configure=configure, open=False, name="misconfigured"
    )
    pool.open()
    with pytest.raises(PoolTimeout):
        pool.wait(0.3)
    assert pool.closed
    warns = [m for m in log_messages(caplog, logging.WARNING) if "error connecting in" in m]
    assert warns
    assert all("'misconfigured'" in m for m in warns)
    if failure == "raises":
        assert "no_such_table_for_configure" in warns[0]
    else:
        assert "connection left in status INTRANS by configure function" in warns[0]
        assert "discarded" in warns[0]
    # backoff, not a busy loop: the first retry waits about a second
    assert len(attempts) == 1
    wait_until(lambda: all(c.closed for c in attempts), "discarded connections to be closed")
    stats = pool.get_stats()
    assert stats["connections_num"] == 1
    assert stats.get("connections_errors", 0) == 0  # only connect() failures count


# ---------------------------------------------------------------------------
# The check callback (§3.3 d, trap 12)


def test_check_callback_runs_before_handing_out(dsn: str) -> None:
    checked: list[psycopg.Connection[Any]] = []

    def check(conn: psycopg.Connection[Any]) -> None:
        assert conn._pool is not None
        checked.append(conn)
        ConnectionPool.check_connection(conn)

    with ConnectionPool(dsn, min_size=1, check=check, open=False) as pool:
        with pool.connection(timeout=5) as conn:
            assert checked == [conn]
        with pool.connection(timeout=5) as conn:
            assert checked == [conn, conn]


def kill_idle_connections(dsn: str, pool: ConnectionPool[Any], n: int) -> list[int]:
    """Fill the pool with `n` connections, then end their server processes."""
    pool.wait(5)
    conns = [pool.getconn(5) for _ in range(n)]
    pids = [backend_pid(c) for c in conns]
    for c in conns:
        pool.putconn(c)
    terminate_backends(dsn, *pids)
    return pids


def test_check_callback_replaces_dead_connections(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Deliberate difference 7: a dead connection is replaced, the next one tried at once.

    (Upstream backs off ~1 s after the second failed check: with all three idle
    connections dead, a 0.8 s request would time out.)
    """
    caplog.set_level(logging.INFO, logger="psycopg.pool")
    with ConnectionPool(dsn, min_size=3, check=ConnectionPool.check_connection, open=False) as pool:
        pids = kill_idle_connections(dsn, pool, 3)
        with pool.connection(timeout=0.8) as conn:
            assert backend_pid(conn) not in pids
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert pool.get_stats()["connections_lost"] == 3
        wait_until(lambda: pool.get_stats()["pool_available"] == 3, "three replacements")
    # INFO logs only (whether the check callback or the pool found them dead)
    assert log_messages(caplog, logging.WARNING) == []


@pytest.mark.parametrize("looked_at_by", ["poll", "select"])
def test_idle_connections_closed_by_the_server_are_not_lent(
    dsn: str, monkeypatch: pytest.MonkeyPatch, looked_at_by: str
) -> None:
    """Deliberate difference 9, by poll() and by select(): Windows has no poll()."""
    if looked_at_by == "select":
        monkeypatch.delattr(select, "poll")
    with ConnectionPool(dsn, min_size=2, alive_check_after=0, open=False) as pool:
        pids = kill_idle_connections(dsn, pool, 2)
        with pool.connection(timeout=5) as conn:
            assert backend_pid(conn) not in pids
            assert conn.execute("SELECT 1").fetchone() == (1,)
        # The one about to be lent was found dead, and the other swept with it.
        assert pool.get_stats()["connections_lost"] == 2


def test_failing_check_callback_times_out(dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="psycopg.pool")
    calls: list[int] = []

    def check(conn: psycopg.Connection[Any]) -> None:
        calls.append(backend_pid(conn))
        raise ValueError("not today")

    with ConnectionPool(dsn, min_size=1, check=check, open=False) as pool:
        pool.wait(5)
        with pytest.raises(PoolTimeout, match=r"couldn't get a connection after 0\.50 sec"):
            pool.getconn(timeout=0.5)
        # the second try is immediate, then it backs off (about 1 s, beyond the timeout)
        assert len(calls) == 2
        assert len(set(calls)) == 1  # the healthy connection went back, and was reused
        stats = pool.get_stats()
        assert stats["pool_available"] == 1
        assert stats.get("connections_lost", 0) == 0
        assert stats["connections_num"] == 1
    infos = log_messages(caplog, logging.INFO)
    assert sum("failed check" in m for m in infos) == 2
    assert log_messages(caplog, logging.WARNING) == []


def test_check_callback_breaking_the_connection(dsn: str) -> None:
    broken: list[psycopg.Connection[Any]] = []

    def check(conn: psycopg.Connection[Any]) -> None:
        if not broken:
            broken.append(conn)
            conn.close()
            raise psycopg.OperationalError("closed by the check")

    with ConnectionPool(dsn, min_size=1, check=check, open=False) as pool:
        pool.wait(5)
        with pool.connection(timeout=2) as conn:
            assert conn is not broken[0]
            assert conn.execute("SELECT 1").fetchone() == (1,)
        stats = pool.get_stats()
        assert stats["connections_lost"] == 1
        assert stats.get("returns_bad", 0) == 0
        assert stats["pool_size"] == 1


@pytest.mark.parametrize("left", ["INTRANS", "INERROR"])
def test_failing_check_leaving_a_transaction(dsn: str, left: str) -> None:
    fail = [True]

    def check(conn: psycopg.Connection[Any]) -> None:
        if fail:
            fail.clear()
            if left == "INTRANS":
                conn.execute("SELECT 1")
            else:
                try:
                    conn.execute("SELECT 1/0")
                except psycopg.errors.DivisionByZero:
                    pass
            assert conn.info.transaction_status == TransactionStatus[left]
            raise ValueError("bad")

    with ConnectionPool(dsn, min_size=1, check=check, open=False) as pool:
        pool.wait(5)
        with pool.connection(timeout=2) as conn:
            assert conn.info.transaction_status == TransactionStatus.IDLE
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert pool.get_stats().get("connections_lost", 0) == 0


def test_interrupted_check_returns_the_connection(dsn: str) -> None:
    def check(conn: psycopg.Connection[Any]) -> None:
        raise KeyboardInterrupt

    with ConnectionPool(dsn, min_size=1, check=check, open=False) as pool:
        pool.wait(5)
        with pytest.raises(KeyboardInterrupt):
            pool.getconn(5)
        stats = pool.get_stats()
        assert stats["pool_available"] == 1
        assert stats["pool_size"] == 1


def _one_taken_then_one_queued(pool: ConnectionPool[Any]) -> None:
    """Two getconn() calls: one served at once, one queued until the first returns."""
    pool.wait(5)
    held = pool.getconn()
    client = PoolClient(pool, timeout=5).start()
    wait_until(lambda: pool.get_stats()["requests_waiting"] == 1, "the client to queue")
    pool.putconn(held)
    client.join()


def test_requested_and_given_logs(dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="psycopg.pool")
    with ConnectionPool(dsn, min_size=1, open=False, name="chatty") as pool:
        _one_taken_then_one_queued(pool)
    infos = log_messages(caplog, logging.INFO)
    assert any("connection requested" in m and "chatty" in m for m in infos)
    assert sum("connection given" in m for m in infos) == 2
    assert any("returning connection" in m for m in infos)
    assert any("adding new connection" in m for m in infos)


def test_log_level_changes_reach_the_hot_path(dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    # The hot path reads logging's own cache of level answers: a level set after
    # the pool has answered before must be seen at the next call, both ways.
    pool_logger = logging.getLogger("psycopg.pool")
    caplog.set_level(logging.INFO, logger="psycopg.pool")  # restored afterwards
    pool_logger.setLevel(logging.WARNING)
    with ConnectionPool(dsn, min_size=1, open=False, name="levels") as pool:
        pool.wait(5)
        pool.putconn(pool.getconn())  # caches "INFO is off"
        assert not any("connection given" in m for m in log_messages(caplog, logging.INFO))
        pool_logger.setLevel(logging.INFO)
        pool.putconn(pool.getconn())
        infos = log_messages(caplog, logging.INFO)
        assert sum("connection given" in m for m in infos) == 1
        assert sum("returning connection" in m for m in infos) == 1
        pool_logger.setLevel(logging.WARNING)
        pool.putconn(pool.getconn())
        infos = log_messages(caplog, logging.INFO)
        assert sum("connection given" in m for m in infos) == 1


def test_each_getconn_logs_requested_and_given_once(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A queued request whose connection is then checked goes through two code paths:
    # still one "requested" and one "given" per call.
    caplog.set_level(logging.INFO, logger="psycopg.pool")
    check = ConnectionPool.check_connection
    with ConnectionPool(dsn, min_size=1, max_size=1, check=check, open=False) as pool:
        _one_taken_then_one_queued(pool)
    infos = log_messages(caplog, logging.INFO)
    assert sum("connection requested" in m for m in infos) == 2
    assert sum("connection given" in m for m in infos) == 2
