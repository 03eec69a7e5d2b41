"""psycopg_pool.compat: psycopg2.pool's behaviour on Psycopg 3 connections.

Spec: API.md §8 (every bullet) and trap 33. Each test uses its own application_name,
so the server's view (pg_stat_activity) tells how many connections really exist.
"""

from __future__ import annotations

import functools
import itertools
import threading
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import TransactionStatus

from psycopg_pool import compat
from psycopg_pool.compat import (
    AbstractConnectionPool,
    PoolError,
    SimpleConnectionPool,
    ThreadedConnectionPool,
)

from .helpers import (
    backend_pid,
    refused_conninfo,
    running_threads,
    server_pids,
    terminate_backends,
    wait_until,
)

_names = itertools.count(1)


@pytest.fixture
def app() -> str:
    """A fresh application_name: the connections of one test, as the server sees them."""
    return f"compat-{next(_names)}"


@pytest.fixture(params=[SimpleConnectionPool, ThreadedConnectionPool])
def pool_class(request: pytest.FixtureRequest) -> type[Any]:
    cls: type[Any] = request.param
    return cls


@pytest.fixture
def new_pool(dsn: str, app: str) -> Iterator[Callable[..., Any]]:
    """`new_pool(cls, minconn, maxconn, **kwargs)`: a pool on the test server, its
    connections named after the test; closed at the end unless the test closed it."""
    pools: list[Any] = []

    def new(cls: type[Any], minconn: Any, maxconn: Any, **kwargs: Any) -> Any:
        pool = cls(minconn, maxconn, dsn, application_name=app, **kwargs)
        pools.append(pool)
        return pool

    yield new
    for p in pools:
        if not p.closed:
            p.closeall()


def idle(pool: Any) -> list[Any]:
    # psycopg2 users do read the idle list `_pool`; it is part of what we mimic.
    conns: list[Any] = pool._pool
    return conns


def backends(dsn: str, app: str, n: int) -> None:
    """Wait until the server has exactly `n` connections of this test (a closed
    connection's backend leaves pg_stat_activity a moment after the client is done)."""
    wait_until(lambda: len(server_pids(dsn, app)) == n, f"{n} server connections of {app}")


def fetch1(conn: psycopg.Connection[Any], sql: str) -> Any:
    row = conn.execute(sql).fetchone()
    assert row is not None
    return row[0]


# ----------------------------------------------------------------------
# Names and construction


def test_exports_and_pool_error() -> None:
    assert set(compat.__all__) == {
        "PoolError",
        "AbstractConnectionPool",
        "SimpleConnectionPool",
        "ThreadedConnectionPool",
    }
    assert issubclass(PoolError, psycopg.Error)
    assert issubclass(SimpleConnectionPool, AbstractConnectionPool)
    assert issubclass(ThreadedConnectionPool, AbstractConnectionPool)
    err = PoolError("boom")
    assert str(err) == "boom"


def test_import_psycopg_pool_does_not_import_compat() -> None:
    import subprocess
    import sys

    code = "import sys, psycopg_pool; print('psycopg_pool.compat' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_constructor_opens_minconn(
    dsn: str, app: str, pool_class: type[Any], new_pool: Callable[..., Any]
) -> None:
    pool = new_pool(pool_class, "2", 5.0)  # int() on both, as psycopg2 does
    assert (pool.minconn, pool.maxconn) == (2, 5)
    assert pool.closed is False
    backends(dsn, app, 2)
    assert len(idle(pool)) == 2
    conn = pool.getconn()
    assert isinstance(conn, psycopg.Connection)
    assert conn.closed is False  # a bool in psycopg 3 (an int in psycopg2)
    backends(dsn, app, 2)  # an idle one was reused


def test_no_validation_min_above_max(dsn: str, app: str, new_pool: Callable[..., Any]) -> None:
    pool = new_pool(SimpleConnectionPool, 3, 1)
    assert len(idle(pool)) == 3
    conns = [pool.getconn() for _ in range(3)]  # idle ones are lent whatever maxconn says
    assert len(set(map(id, conns))) == 3
    # psycopg2 tests `checked out == maxconn`: once past it, nothing is "exhausted".
    conns.append(pool.getconn())
    backends(dsn, app, 4)


def test_constructor_connection_error_propagates(pool_class: type[Any]) -> None:
    with pytest.raises(psycopg.OperationalError):
        pool_class(1, 2, refused_conninfo())


def test_connection_arguments(dsn: str, app: str) -> None:
    params = {k: v for k, v in conninfo_to_dict(dsn).items() if v is not None}
    dbname = params.pop("dbname")

    class MyConnection(psycopg.Connection[Any]):
        pass

    variants: list[tuple[tuple[Any, ...], dict[str, Any]]] = [
        ((dsn,), {}),  # positional dsn
        ((), {"dsn": dsn}),  # dsn keyword
        ((), {**params, "dbname": dbname}),  # keywords only
        ((), {**params, "database": dbname}),  # psycopg2's alias
        ((dsn,), {"connection_factory": MyConnection}),
        ((dsn,), {"autocommit": True}),  # psycopg 3 keywords pass through
    ]
    for args, kwargs in variants:
        pool = SimpleConnectionPool(1, 1, *args, application_name=app, **kwargs)
        conn = pool.getconn()
        assert fetch1(conn, "SELECT current_database()") == dbname
        assert fetch1(conn, "SHOW application_name") == app
        if "connection_factory" in kwargs:
            assert type(conn) is MyConnection
        assert conn.autocommit is bool(kwargs.get("autocommit"))
        pool.putconn(conn)
        pool.closeall()
    assert pool._args == (dsn,)  # kept verbatim
    assert pool._kwargs == {"application_name": app, "autocommit": True}

    with pytest.raises(TypeError, match="both 'database' and 'dbname'"):  # as psycopg2
        SimpleConnectionPool(1, 1, dbname=dbname, database=dbname)
    with pytest.raises(TypeError, match="positional"):
        SimpleConnectionPool(1, 1, dsn, "something else")
    with pytest.raises(TypeError, match="connection_factory"):
        SimpleConnectionPool(1, 1, dsn, connection_factory=object)


# ----------------------------------------------------------------------
# getconn


def test_lifo_reuse(
    dsn: str, app: str, pool_class: type[Any], new_pool: Callable[..., Any]
) -> None:
    pool = new_pool(pool_class, 3, 3)
    a, b, c = (pool.getconn() for _ in range(3))
    for conn in (a, b, c):
        pool.putconn(conn)
    # The last one given back is the first one lent again.
    assert pool.getconn() is c
    assert pool.getconn() is b
    pool.putconn(b)
    assert pool.getconn() is b
    assert pool.getconn() is a


def test_initial_connections_lent_last_first(
    dsn: str, app: str, new_pool: Callable[..., Any]
) -> None:
    pool = new_pool(SimpleConnectionPool, 2, 2)
    first, second = idle(pool)
    assert pool.getconn() is second
    assert pool.getconn() is first


def test_same_key_same_connection(
    dsn: str, app: str, pool_class: type[Any], new_pool: Callable[..., Any]
) -> None:
    pool = new_pool(pool_class, 1, 2)
    conn = pool.getconn("job")
    assert pool.getconn("job") is conn
    assert pool.getconn(("any", "hashable")) is not conn
    # Asking again for a key already out works even when the pool is exhausted.
    with pytest.raises(PoolError, match="exhausted"):
        pool.getconn()
    assert pool.getconn("job") is conn
    pool.putconn(conn, "job")
    # Once given back, the key is free: a new checkout (of the idle one, LIFO).
    assert pool.getconn("job") is conn
    backends(dsn, app, 2)


def test_auto_keys_count_from_one_and_collide_with_int_keys(
    dsn: str, app: str, pool_class: type[Any], new_pool: Callable[..., Any]
) -> None:
    pool = new_pool(pool_class, 1, 5)
    mine = pool.getconn(2)  # a user's own integer key
    auto1 = pool.getconn()  # automatic key 1
    assert auto1 is not mine
    auto2 = pool.getconn()  # automatic key 2: the user's key, so the user's connection
    assert auto2 is mine
    assert pool._used == {2: mine, 1: auto1}
    pool.putconn(auto1)  # found by identity: key 1; kept (below minconn)
    assert 1 not in pool._used
    # Counters are never reused: key 3 comes next, even after a put.
    assert pool.getconn() is auto1
    assert pool._used[3] is auto1


def test_exhausted_raises_at_once(
    dsn: str, app: str, pool_class: type[Any], new_pool: Callable[..., Any]
) -> None:
    pool = new_pool(pool_class, 1, 2)
    a = pool.getconn()
    b = pool.getconn()
    for _ in range(3):
        with pytest.raises(PoolError, match=r"^connection pool exhausted$"):
            pool.getconn()
    backends(dsn, app, 2)  # no connection attempted
    pool.putconn(a)
    assert pool.getconn() is a
    pool.putconn(b)


def test_getconn_on_closed_pool(
    dsn: str, app: str, pool_class: type[Any], new_pool: Callable[..., Any]
) -> None:
    pool = new_pool(pool_class, 1, 2)
    pool.closeall()
    with pytest.raises(PoolError, match=r"^connection pool is closed$"):
        pool.getconn()
    with pytest.raises(PoolError, match=r"^connection pool is closed$"):
        pool.getconn("key")


# ----------------------------------------------------------------------
# putconn


def test_putconn_keeps_up_to_minconn_then_closes(
    dsn: str, app: str, pool_class: type[Any], new_pool: Callable[..., Any]
) -> None:
    pool = new_pool(pool_class, 1, 3)
    conns = [pool.getconn() for _ in range(3)]
    backends(dsn, app, 3)
    for conn in conns:
        pool.putconn(conn)
    assert idle(pool) == [conns[0]]
    assert [c.closed for c in conns] == [False, True, True]
    backends(dsn, app, 1)
    assert pool._used == {} and pool._rused == {}


def test_putconn_close_true(
    dsn: str, app: str, pool_class: type[Any], new_pool: Callable[..., Any]
) -> None:
    pool = new_pool(pool_class, 2, 2)
    conn = pool.getconn()
    pool.putconn(conn, close=True)  # closed although fewer than minconn are idle
    assert conn.closed is True
    assert conn not in idle(pool)
    assert len(idle(pool)) == 1  # no automatic replacement
    backends(dsn, app, 1)
    conn2 = pool.getconn()
    conn3 = pool.getconn()  # connects anew on demand
    assert conn3 is not conn and not conn3.closed
    pool.putconn(conn2)
    pool.putconn(conn3)


def test_putconn_unkeyed_connection(
    dsn: str, app: str, pool_class: type[Any], new_pool: Callable[..., Any]
) -> None:
    pool = new_pool(pool_class, 1, 2)
    with psycopg.connect(dsn) as stranger:
        with pytest.raises(PoolError, match=r"^trying to put unkeyed connection$"):
            pool.putconn(stranger)
        assert stranger.closed is False  # not touched
        assert stranger not in idle(pool)


def test_putconn_rolls_back_intrans_and_inerror(
    dsn: str, app: str, pool_class: type[Any], new_pool: Callable[..., Any]
) -> None:
    pool = new_pool(pool_class, 1, 1)
    conn = pool.getconn()
    pid = backend_pid(conn)
    conn.execute("CREATE TEMP TABLE t (x int) ON COMMIT DROP")
    conn.execute("INSERT INTO t VALUES (1)")
    assert conn.info.transaction_status == TransactionStatus.INTRANS
    pool.putconn(conn)
    assert conn.info.transaction_status == TransactionStatus.IDLE
    again = pool.getconn()
    assert again is conn and backend_pid(again) == pid
    # The transaction was rolled back: the table never existed.
    assert fetch1(again, "SELECT to_regclass('pg_temp.t') IS NULL") is True
    again.rollback()

    with pytest.raises(psycopg.errors.DivisionByZero):
        again.execute("SELECT 1 / 0")
    assert again.info.transaction_status == TransactionStatus.INERROR
    pool.putconn(again)
    assert again.info.transaction_status == TransactionStatus.IDLE
    assert pool.getconn() is conn
    assert fetch1(conn, "SELECT 42") == 42


def test_putconn_drops_broken_connection(
    dsn: str, app: str, pool_class: type[Any], new_pool: Callable[..., Any]
) -> None:
    pool = new_pool(pool_class, 1, 1)
    conn = pool.getconn()
    pid = backend_pid(conn)
    terminate_backends(dsn, pid)
    with pytest.raises(psycopg.OperationalError):
        conn.execute("SELECT 1")
    # In psycopg 3 a connection that lost its server reads closed, status UNKNOWN.
    assert conn.info.transaction_status == TransactionStatus.UNKNOWN
    assert conn.closed is True
    pool.putconn(conn)  # dropped silently
    assert idle(pool) == []
    fresh = pool.getconn()  # a new connection, made on demand
    assert fresh is not conn
    assert backend_pid(fresh) != pid
    assert fetch1(fresh, "SELECT 1") == 1
    pool.putconn(fresh)


def test_putconn_closes_a_connection_still_running_a_query(
    dsn: str, app: str, pool_class: type[Any], new_pool: Callable[..., Any]
) -> None:
    # A `cursor.stream()` left unfinished: the connection is still in its query, and
    # the stream holds the connection's lock, which a rollback would wait for for ever
    # (under the threaded pool's lock, blocking every other thread too).
    pool = new_pool(pool_class, 1, 2)
    conn = pool.getconn()
    rows = conn.cursor().stream("SELECT generate_series(1, 10000000)")
    assert next(rows) == (1,)
    assert conn.info.transaction_status == TransactionStatus.ACTIVE
    returned = threading.Event()

    def give_back() -> None:
        pool.putconn(conn)
        returned.set()

    threading.Thread(target=give_back, daemon=True).start()
    assert returned.wait(10.0), "putconn() blocked on the unfinished query"
    assert conn.closed and idle(pool) == []
    backends(dsn, app, 0)  # the server's side is gone too
    other = pool.getconn()  # and the pool goes on
    assert fetch1(other, "SELECT 1") == 1
    pool.putconn(other)


def test_putconn_drops_connection_closed_by_user(
    dsn: str, app: str, pool_class: type[Any], new_pool: Callable[..., Any]
) -> None:
    pool = new_pool(pool_class, 2, 2)
    conn = pool.getconn()
    # `with conn:` closes a psycopg 3 connection (psycopg2's only ended the transaction).
    with conn:
        conn.execute("SELECT 1")
    assert conn.closed is True
    pool.putconn(conn)
    assert conn not in idle(pool)
    assert len(idle(pool)) == 1
    backends(dsn, app, 1)


def test_putconn_explicit_key_not_out_raises_keyerror_after_keep_or_close(
    dsn: str, app: str, pool_class: type[Any], new_pool: Callable[..., Any]
) -> None:
    pool = new_pool(pool_class, 1, 3)
    conn = pool.getconn("a")
    with pytest.raises(KeyError):
        pool.putconn(conn, key="b")
    # The connection was kept (fewer than minconn were idle) before the KeyError...
    assert idle(pool) == [conn]
    assert conn.closed is False
    # ...while still booked under its real key, as in psycopg2: it can be lent twice.
    assert pool._used == {"a": conn}
    assert pool.getconn("c") is conn

    # Closed (minconn 0: nothing is kept) before the KeyError.
    pool0 = new_pool(pool_class, 0, 3)
    other = pool0.getconn("a")
    with pytest.raises(KeyError):
        pool0.putconn(other, key="b")
    assert other.closed is True
    assert idle(pool0) == []

    # close=True: closed before the KeyError too.
    third = pool0.getconn("d")
    with pytest.raises(KeyError):
        pool0.putconn(third, key="b", close=True)
    assert third.closed is True


def test_putconn_on_closed_pool(
    dsn: str, app: str, pool_class: type[Any], new_pool: Callable[..., Any]
) -> None:
    pool = new_pool(pool_class, 1, 2)
    conn = pool.getconn()
    pool.closeall()
    with pytest.raises(PoolError, match=r"^connection pool is closed$"):
        pool.putconn(conn)


def test_threaded_putconn_defaults(dsn: str, app: str, new_pool: Callable[..., Any]) -> None:
    pool = new_pool(ThreadedConnectionPool, 1, 2)
    with pytest.raises(PoolError, match="unkeyed"):
        pool.putconn()  # conn=None is the default (and unknown)
    conn = pool.getconn("k")
    pool.putconn(key="k")  # extension: the connection checked out under the key
    assert idle(pool) == [conn]
    with pytest.raises(KeyError):
        pool.putconn(key="k")


# ----------------------------------------------------------------------
# closeall


def test_closeall_closes_idle_and_checked_out(
    dsn: str, app: str, pool_class: type[Any], new_pool: Callable[..., Any]
) -> None:
    pool = new_pool(pool_class, 2, 4)
    out = [pool.getconn(), pool.getconn("x"), pool.getconn()]
    spare = idle(pool)
    backends(dsn, app, 3)
    pool.closeall()
    assert pool.closed is True
    assert all(c.closed for c in out + spare)
    backends(dsn, app, 0)
    # The second call raises (trap 33).
    with pytest.raises(PoolError, match=r"^connection pool is closed$"):
        pool.closeall()


def test_closeall_ignores_errors(dsn: str, app: str) -> None:
    class FailingClose(psycopg.Connection[Any]):
        def close(self) -> None:
            super().close()
            raise RuntimeError("close failed")

    pool = SimpleConnectionPool(2, 2, dsn, application_name=app, connection_factory=FailingClose)
    conn = pool.getconn()
    pool.closeall()
    assert pool.closed is True
    assert conn.closed and all(c.closed for c in idle(pool))


# ----------------------------------------------------------------------
# ThreadedConnectionPool


def test_threaded_lock_is_plain_lock(dsn: str, app: str, new_pool: Callable[..., Any]) -> None:
    pool = new_pool(ThreadedConnectionPool, 1, 2)
    assert isinstance(pool._lock, type(threading.Lock()))
    assert not hasattr(SimpleConnectionPool(0, 1, dsn), "_lock")


def test_threaded_pool_under_threads(dsn: str, app: str, new_pool: Callable[..., Any]) -> None:
    nthreads, rounds, maxconn = 8, 30, 4
    pool = new_pool(ThreadedConnectionPool, 2, maxconn)

    guard = threading.Lock()
    holders: dict[int, int] = {}  # id(conn) -> thread index, while checked out
    peak = 0
    served = exhausted = 0
    errors: list[BaseException] = []
    start = threading.Barrier(nthreads)

    def client(i: int) -> None:
        nonlocal peak, served, exhausted
        try:
            start.wait(10)
            for r in range(rounds):
                try:
                    conn = pool.getconn()
                except PoolError as ex:
                    assert str(ex) == "connection pool exhausted"
                    with guard:
                        exhausted += 1
                    continue
                with guard:
                    assert id(conn) not in holders, "a connection lent to two threads"
                    holders[id(conn)] = i
                    peak = max(peak, len(holders))
                assert fetch1(conn, f"SELECT {i * 1000 + r}") == i * 1000 + r
                with guard:
                    del holders[id(conn)]
                pool.putconn(conn)
                with guard:
                    served += 1
        except BaseException as ex:
            errors.append(ex)

    with running_threads(*(functools.partial(client, i) for i in range(nthreads))):
        pass
    assert errors == []
    assert served + exhausted == nthreads * rounds
    assert served > 0
    assert peak <= maxconn
    assert pool._used == {} and pool._rused == {}
    assert len(idle(pool)) == 2  # kept up to minconn, the rest closed
    backends(dsn, app, 2)
    assert pool._keys == nthreads * rounds  # every getconn drew a key
