"""ConnectionPool: get_stats() and pop_stats().

Spec: API.md §4 (keys, gauges and counters), traps 2, 31, 32.
"""

from __future__ import annotations

import threading

import pytest

from psycopg_pool import ConnectionPool, PoolClosed, PoolTimeout

from .helpers import (
    GAUGES,
    ConnectGate,
    PoolClient,
    backend_pid,
    pool_after_giving_up,
    refused_conninfo,
    release_all,
    terminate_backends,
    wait_until,
)

COUNTERS = {f"requests_{k}" for k in ("num", "queued", "wait_ms", "errors")}
COUNTERS |= {"usage_ms", "returns_bad"}
COUNTERS |= {f"connections_{k}" for k in ("num", "ms", "errors", "lost")}


def test_gauges_before_open() -> None:
    pool: ConnectionPool = ConnectionPool(min_size=2, max_size=5, open=False)
    assert pool.get_stats() == {
        "pool_min": 2,
        "pool_max": 5,
        "pool_size": 2,
        "pool_available": 0,
        "requests_waiting": 0,
        "pool_connecting": 0,
    }
    assert pool.pop_stats() == pool.get_stats()


def test_pool_connecting_tells_attempts_from_connections(dsn: str) -> None:
    gate = ConnectGate()
    with ConnectionPool(
        dsn, min_size=2, max_size=4, connection_class=gate.connection_class, name="attempts"
    ) as pool:
        wait_until(lambda: gate.in_flight == 2, "two attempts under way")
        stats = pool.get_stats()
        # pool_size counts the attempts, as upstream's does; pool_connecting says so.
        assert (stats["pool_size"], stats["pool_connecting"]) == (2, 2)
        gate.release()
        pool.wait(5.0)
        stats = pool.get_stats()
        assert (stats["pool_size"], stats["pool_connecting"]) == (2, 0)


def test_keys_and_types(dsn: str) -> None:
    with ConnectionPool(dsn, min_size=2, open=False) as pool:
        pool.wait(5)
        with pool.connection() as conn:
            conn.execute("SELECT 1")
        stats = pool.get_stats()
    assert GAUGES <= set(stats) <= GAUGES | COUNTERS
    assert all(type(v) is int for v in stats.values())
    assert stats["connections_num"] == 2
    assert stats["connections_ms"] >= 0
    assert stats["requests_num"] == 1
    assert "usage_ms" in stats  # touched, even if by 0 ms
    assert "requests_errors" not in stats  # untouched counters are absent
    assert "returns_bad" not in stats


def test_stats_are_fresh_dicts(dsn: str) -> None:
    with ConnectionPool(dsn, min_size=1, open=False) as pool:
        pool.wait(5)
        stats = pool.get_stats()
        stats["pool_size"] = 100
        stats["requests_num"] = 100
        assert pool.get_stats()["pool_size"] == 1
        assert pool.get_stats() is not pool.get_stats()


def test_pop_stats_resets_counters_only(dsn: str) -> None:
    with ConnectionPool(dsn, min_size=2, open=False) as pool:
        pool.wait(5)
        for _ in range(3):
            with pool.connection():
                pass
        popped = pool.pop_stats()
        assert popped["requests_num"] == 3
        assert popped["connections_num"] == 2
        after = pool.get_stats()
        assert set(after) == GAUGES
        assert after["pool_available"] == 2
        with pool.connection():
            pass
        assert pool.get_stats()["requests_num"] == 1


def test_usage_ms_only_measured_by_connection(dsn: str) -> None:
    with ConnectionPool(dsn, min_size=1, open=False) as pool:
        conn = pool.getconn(5)
        conn.execute("SELECT pg_sleep(0.05)")
        conn.commit()
        pool.putconn(conn)
        assert "usage_ms" not in pool.get_stats()
        with pool.connection() as conn:
            conn.execute("SELECT pg_sleep(0.05)")
        assert pool.get_stats()["usage_ms"] >= 50


def test_request_counters(dsn: str) -> None:
    """Trap 31, made deterministic: 7 requests on 3 connections, one times out."""
    with ConnectionPool(dsn, min_size=3, open=False) as pool:
        pool.wait(5)
        hold = threading.Event()
        holders = [PoolClient(pool, timeout=5, hold=hold).start() for _ in range(3)]
        wait_until(lambda: all(c.got.is_set() for c in holders), "three holders")
        impatient = PoolClient(pool, timeout=0.05).start()
        waiters = [PoolClient(pool, timeout=5).start() for _ in range(3)]
        impatient.join()
        assert isinstance(impatient.error, PoolTimeout)
        wait_until(lambda: pool.get_stats()["requests_waiting"] == 3, "three waiters")
        release_all(hold, holders + waiters)
        stats = pool.get_stats()
    assert stats["requests_num"] == 7
    assert stats["requests_queued"] == 4
    assert stats["requests_errors"] == 1
    assert stats["requests_wait_ms"] >= 50  # at least the time the impatient one waited
    assert stats["requests_waiting"] == 0
    assert stats["connections_num"] == 3


def test_errors_not_counted_before_queueing(dsn: str) -> None:
    """Neither PoolClosed at entry nor a non-blocking PoolTimeout is a request error."""
    pool: ConnectionPool = ConnectionPool(dsn, min_size=1, open=False)
    with pytest.raises(PoolClosed):
        pool.getconn()
    with pool:
        conn = pool.getconn(5)
        with pytest.raises(PoolTimeout):
            pool.getconn(timeout=0)
        pool.putconn(conn)
        stats = pool.get_stats()
    assert stats["requests_num"] == 3
    assert stats.get("requests_errors", 0) == 0


def test_connection_counters(dsn: str) -> None:
    with ConnectionPool(dsn, min_size=2, open=False) as pool:
        pool.wait(5)
        conn = pool.getconn()
        conn.close()
        pool.putconn(conn)  # returns_bad
        wait_until(lambda: pool.get_stats()["pool_available"] == 2, "the replacement")
        pids = []
        for _ in range(2):
            with pool.connection() as conn:
                pids.append(backend_pid(conn))
        terminate_backends(dsn, pids[0])
        pool.check()  # connections_lost
        wait_until(lambda: pool.get_stats()["pool_available"] == 2, "the replacement")
        stats = pool.get_stats()
    assert stats["returns_bad"] == 1
    assert stats["connections_lost"] == 1
    assert stats["connections_num"] == 4
    assert stats.get("connections_errors", 0) == 0


def test_connections_errors_count_connect_failures_only() -> None:
    with pool_after_giving_up(refused_conninfo()) as pool:
        stats = pool.get_stats()
        assert stats["connections_errors"] >= 1
        assert stats["connections_num"] == stats["connections_errors"]
        assert "connections_ms" not in stats

    conninfo_calls: list[int] = []

    def bad_conninfo() -> str:
        conninfo_calls.append(1)
        raise RuntimeError("not a connect() failure")

    with pool_after_giving_up(bad_conninfo) as pool:
        stats = pool.get_stats()
        assert stats["connections_num"] == len(conninfo_calls) >= 1
        assert stats.get("connections_errors", 0) == 0
