"""The pool through a real PgBouncer in transaction pooling mode (issue 6, item 1).

Each test starts its own PgBouncer (tests/integration/pgbouncer.py, ~50 ms) in front of
the session's server, with fewer server connections than the pool has client
connections, so that PgBouncer really multiplexes: consecutive transactions of one
pooled connection run on different server connections.

What the tests prove (docs/integrations.md has the recipe):
- with ``prepare_threshold=None`` in `kwargs`, sync and async pools under concurrent
  load get correct results and no "prepared statement does not exist"; the
  control test shows the failure that setting prevents, so PgBouncer is really in
  transaction mode;
- PgBouncer keeps the session parameters it tracks (TimeZone, application_name, ...)
  per *client* connection, so a pooled connection carries them from one user to the
  next; a ``reset`` callback running ``RESET ALL`` stops that. The load tests check
  at the start of every lease that the previous user's TimeZone is gone, and the
  control test shows it is not without `reset`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import psycopg
import pytest

from psycopg_pool import AsyncConnectionPool, ConnectionPool
from psycopg_pool import _orphan_queries as orphan_queries

from .helpers import await_until, cancel_twice_mid_query, query_running, run_async, running_threads
from .pgbouncer import PgBouncer, supports_prepared_statements

if TYPE_CHECKING:
    from psycopg_pool._embedded_pg import EmbeddedPostgres

SERVER_POOL = 3  # PgBouncer's default_pool_size: server connections
POOL_SIZE = 6  # client connections of our pool to PgBouncer
CLIENTS = 12  # threads or tasks sharing the pool
ROUNDS = 20  # transactions per client
# Time zones the clients set, none of them the server's default (Etc/UTC or the like).
ZONES = ("Asia/Tokyo", "America/Lima", "Europe/Rome", "Australia/Perth")
TABLE = "pgb_load"


@pytest.fixture
def bouncer(pg_server: EmbeddedPostgres | None) -> Iterator[PgBouncer]:
    if pg_server is None:
        pytest.skip("PSYCOPG_POOL_TEST_DSN is set: PgBouncer runs only in front of our server")
    with PgBouncer(pg_server.host, pg_server.port, pool_size=SERVER_POOL) as bouncer:
        yield bouncer


@pytest.fixture
def table(dsn: str) -> Iterator[str]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {TABLE}")
        conn.execute(f"CREATE TABLE {TABLE} (client int, n int, v int, PRIMARY KEY (client, n))")
    yield TABLE
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {TABLE}")


def default_timezone(bouncer: PgBouncer) -> str:
    """The TimeZone a fresh client of PgBouncer sees."""
    with psycopg.connect(bouncer.dsn, autocommit=True) as conn:
        row = conn.execute("SHOW TimeZone").fetchone()
        assert row is not None and row[0] not in ZONES
        return str(row[0])


def reset_session(conn: psycopg.Connection[Any]) -> None:
    """The pool's `reset`: drop the session settings the last user made."""
    conn.execute("RESET ALL")
    conn.commit()


async def areset_session(conn: psycopg.AsyncConnection[Any]) -> None:
    await conn.execute("RESET ALL")
    await conn.commit()


# One lease: (SQL, what to check). The same statements run hundreds of times on each
# pooled connection, far past psycopg's default prepare_threshold (5).
SHOW_TZ = "SHOW TimeZone"
SET_TZ = "SELECT set_config('TimeZone', %s, false)"
INSERT = f"INSERT INTO {TABLE} (client, n, v) VALUES (%s, %s, %s)"
SELECT = f"SELECT v, current_setting('TimeZone') FROM {TABLE} WHERE client = %s AND n = %s"


def value(client: int, n: int) -> int:
    return client * 1000 + n


def zone(client: int, n: int) -> str:
    return ZONES[(client + n) % len(ZONES)]


def lease(conn: psycopg.Connection[Any], client: int, n: int) -> str:
    """One transaction of a client; returns the TimeZone the lease started with."""
    row = conn.execute(SHOW_TZ).fetchone()
    assert row is not None
    conn.execute(SET_TZ, [zone(client, n)])
    conn.execute(INSERT, [client, n, value(client, n)])
    assert conn.execute(SELECT, [client, n]).fetchone() == (value(client, n), zone(client, n))
    return str(row[0])


async def alease(conn: psycopg.AsyncConnection[Any], client: int, n: int) -> str:
    cur = await conn.execute(SHOW_TZ)
    row = await cur.fetchone()
    assert row is not None
    await conn.execute(SET_TZ, [zone(client, n)])
    await conn.execute(INSERT, [client, n, value(client, n)])
    cur = await conn.execute(SELECT, [client, n])
    assert await cur.fetchone() == (value(client, n), zone(client, n))
    return str(row[0])


def check_load(dsn: str, bouncer: PgBouncer, errors: list[BaseException]) -> None:
    """After a load run: no client error, every row written, PgBouncer multiplexed."""
    assert errors == []
    with psycopg.connect(dsn) as conn:
        row = conn.execute(f"SELECT count(*), sum(v) FROM {TABLE}").fetchone()
    expected = sum(value(c, n) for c in range(CLIENTS) for n in range(ROUNDS))
    assert row == (CLIENTS * ROUNDS, expected)
    # POOL_SIZE client connections were served by at most SERVER_POOL server ones.
    assert 1 <= bouncer.server_connections() <= SERVER_POOL < POOL_SIZE


def run_sync_load(pool: ConnectionPool, default_tz: str) -> tuple[list[BaseException], int]:
    """CLIENTS threads doing ROUNDS leases each; (errors, leases that saw a leak)."""
    errors: list[BaseException] = []
    leaks = 0
    lock = threading.Lock()

    def client(c: int) -> None:
        nonlocal leaks
        for n in range(ROUNDS):
            try:
                with pool.connection(timeout=10) as conn:
                    seen = lease(conn, c, n)
            except Exception as ex:
                with lock:
                    errors.append(ex)
                return
            if seen != default_tz:
                with lock:
                    leaks += 1

    with running_threads(*(lambda c=c: client(c) for c in range(CLIENTS))):
        pass
    return errors, leaks


def test_sync_pool_under_load(dsn: str, bouncer: PgBouncer, table: str) -> None:
    default_tz = default_timezone(bouncer)
    with ConnectionPool(
        bouncer.dsn,
        min_size=POOL_SIZE,
        kwargs={"prepare_threshold": None},
        reset=reset_session,
        open=False,
        name="pgb-sync",
    ) as pool:
        pool.wait(10)
        errors, leaks = run_sync_load(pool, default_tz)
        stats = pool.get_stats()
    check_load(dsn, bouncer, errors)
    assert leaks == 0
    assert stats["pool_size"] == POOL_SIZE
    assert stats.get("returns_bad", 0) == 0
    assert stats.get("connections_lost", 0) == 0


@run_async
async def test_async_pool_under_load(dsn: str, bouncer: PgBouncer, table: str) -> None:
    default_tz = await asyncio.to_thread(default_timezone, bouncer)
    errors: list[BaseException] = []
    leaks = 0

    async def client(pool: AsyncConnectionPool, c: int) -> None:
        nonlocal leaks
        for n in range(ROUNDS):
            try:
                async with pool.connection(timeout=10) as conn:
                    seen = await alease(conn, c, n)
            except Exception as ex:
                errors.append(ex)
                return
            leaks += seen != default_tz

    async with AsyncConnectionPool(
        bouncer.dsn,
        min_size=POOL_SIZE,
        kwargs={"prepare_threshold": None},
        reset=areset_session,
        open=False,
        name="pgb-async",
    ) as pool:
        await pool.wait(10)
        await asyncio.gather(*(client(pool, c) for c in range(CLIENTS)))
        stats = pool.get_stats()
    await asyncio.to_thread(check_load, dsn, bouncer, errors)
    assert leaks == 0
    assert stats["pool_size"] == POOL_SIZE
    assert stats.get("returns_bad", 0) == 0


@pytest.mark.parametrize("reset", [reset_session, None], ids=["reset", "no-reset"])
def test_session_state_and_reset(bouncer: PgBouncer, reset: Any) -> None:
    """A one-connection pool: what the second user sees of the first one's SET.

    The control case (no reset) proves the load tests' leak check can fail: PgBouncer
    re-applies a client's TimeZone on whichever server connection serves it next.
    """
    default_tz = default_timezone(bouncer)
    with ConnectionPool(
        bouncer.dsn,
        min_size=1,
        kwargs={"prepare_threshold": None},
        reset=reset,
        open=False,
        name="pgb-reset",
    ) as pool:
        pool.wait(10)
        with pool.connection() as conn:
            conn.execute(SET_TZ, ["Asia/Tokyo"])
        with pool.connection() as conn:
            row = conn.execute(SHOW_TZ).fetchone()
    assert row is not None
    assert row[0] == (default_tz if reset else "Asia/Tokyo")


def test_transaction_pooling_breaks_default_prepared_statements(bouncer: PgBouncer) -> None:
    """Why the recipe sets prepare_threshold=None: psycopg's default prepares a query
    on the server connection that runs it; under transaction pooling the next run
    can land on another server connection, where that statement does not exist.
    """
    with ConnectionPool(
        bouncer.dsn, min_size=1, kwargs={"autocommit": True}, open=False, name="pgb-prep"
    ) as pool:
        pool.wait(10)
        with pool.connection() as conn:
            for i in range(8):  # prepared on the only server connection, from the 5th
                assert conn.execute("SELECT %s::int", [i]).fetchone() == (i,)
            # Another client holds that server connection in a transaction, so the
            # next statement goes to a new server connection.
            with psycopg.connect(bouncer.dsn) as other:
                other.execute("SELECT 1")
                with pytest.raises(psycopg.errors.InvalidSqlStatementName):
                    conn.execute("SELECT %s::int", [42])
    assert bouncer.server_connections() == 2


@pytest.mark.skipif(
    not supports_prepared_statements(), reason="PgBouncer < 1.21 has no max_prepared_statements"
)
def test_prepared_statements_with_max_prepared_statements(
    dsn: str, pg_server: EmbeddedPostgres | None, table: str
) -> None:
    """PgBouncer >= 1.21 tracks prepared statements itself: psycopg's default works."""
    if pg_server is None:
        pytest.skip("PSYCOPG_POOL_TEST_DSN is set: PgBouncer runs only in front of our server")
    with PgBouncer(
        pg_server.host,
        pg_server.port,
        pool_size=SERVER_POOL,
        settings={"max_prepared_statements": "100"},
    ) as bouncer:
        default_tz = default_timezone(bouncer)
        with ConnectionPool(
            bouncer.dsn, min_size=POOL_SIZE, reset=reset_session, open=False, name="pgb-mps"
        ) as pool:
            pool.wait(10)
            errors, leaks = run_sync_load(pool, default_tz)
        check_load(dsn, bouncer, errors)
        assert leaks == 0


@run_async
async def test_a_cancel_request_through_pgbouncer_holds_up_no_other(
    dsn: str, bouncer: PgBouncer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The pool's own cancel request for a query psycopg gave up cancelling (see
    # test_pool_return.py) does not reach the query through PgBouncer, which drops a
    # client's cancel key when the client disconnects: the query runs on (a limitation
    # docs/differences.md states). PgBouncer may also hold such a request open without
    # an answer (seen with libpq's blocking call), so each request gives up after
    # CANCEL_TIMEOUT, and the next one, queued behind it, still goes.
    monkeypatch.setattr(orphan_queries, "CANCEL_TIMEOUT", 0.5)
    caplog.set_level(logging.INFO, logger="psycopg.pool")
    through_pgbouncer = "SELECT pg_sleep(60) /* through pgbouncer */"
    direct = "SELECT pg_sleep(60) /* direct, after pgbouncer */"
    try:
        async with AsyncConnectionPool(
            bouncer.dsn, min_size=1, kwargs={"prepare_threshold": None}, open=False, name="pgb"
        ) as pool:
            await cancel_twice_mid_query(pool, through_pgbouncer, "connection", dsn)
        async with AsyncConnectionPool(dsn, min_size=1, open=False) as pool:
            await cancel_twice_mid_query(pool, direct, "connection", dsn)
            await await_until(lambda: not query_running(dsn, direct), "the direct cancel")
        assert "pool 'pgb': asked the server to cancel" in caplog.text or (
            "pool 'pgb': could not ask the server to cancel" in caplog.text
        )
    finally:
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query = %s",
                [through_pgbouncer],
            )
