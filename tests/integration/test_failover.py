"""Primary + streaming-replication standby: the pool follows a failover (issue 6, item 2).

The test starts its own primary and a hot standby made with ``pg_basebackup -R``
(`EmbeddedPostgres.create_standby`), and a pool whose conninfo lists both hosts with
``target_session_attrs=read-write``: libpq connects to the first host that accepts
writes. Writer threads insert rows without pause while the primary crashes
(``immediate`` stop) and the standby is promoted. The same pool object must serve
writes from the new primary within a bounded time. Users see at most one error per
connection the pool had open on the old primary (the statement in flight on it when
it died): a dead idle connection is caught by the `check` callback, and new
connections only reach the new primary.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator

import psycopg
import pytest

from psycopg_pool import ConnectionPool, PoolTimeout
from psycopg_pool._embedded_pg import HOST, EmbeddedPostgres

from .helpers import running_threads, server_pids, wait_until

WRITERS = 4
APP = "failover-pool"
FAILOVER_DEADLINE = 10.0  # seconds from the crash to the first write on the new primary
MAX_WRITES = 20_000  # per writer: the load loop is bounded in count as well as in time
REPLICATION_HBA = [
    "local all all trust",
    "local replication all trust",
    f"host all all {HOST}/32 trust",
    f"host replication all {HOST}/32 trust",
]


@pytest.fixture
def cluster() -> Iterator[tuple[EmbeddedPostgres, EmbeddedPostgres]]:
    """A running primary and a running standby streaming from it; a table to write."""
    primary = EmbeddedPostgres(
        settings={"wal_level": "replica", "max_wal_senders": "4", "hot_standby": "on"},
        hba_lines=REPLICATION_HBA,
    )
    try:
        primary.start()
        primary.execute("CREATE TABLE writes (id bigserial PRIMARY KEY, writer int)")
        standby = primary.create_standby()
        try:
            standby.start()
            streaming = "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'"
            wait_until(
                lambda: primary.execute(streaming) == "1",
                "the standby to stream from the primary",
                timeout=30,
            )
            wait_until(
                lambda: standby.execute("SELECT to_regclass('writes') IS NOT NULL") == "t",
                "the table to reach the standby",
                timeout=30,
            )
            yield primary, standby
        finally:
            standby.cleanup()
    finally:
        primary.cleanup()


def test_pool_follows_failover(cluster: tuple[EmbeddedPostgres, EmbeddedPostgres]) -> None:
    primary, standby = cluster
    assert standby.execute("SELECT pg_is_in_recovery()") == "t"
    conninfo = (
        f"host={HOST},{HOST} port={primary.port},{standby.port} user=postgres"
        f" dbname=postgres target_session_attrs=read-write connect_timeout=3"
        f" application_name={APP}"
    )
    writes: Counter[int] = Counter()  # successful inserts by server port
    errors: list[Exception] = []
    lock = threading.Lock()
    stop = threading.Event()

    with ConnectionPool(
        conninfo,
        min_size=WRITERS,
        check=ConnectionPool.check_connection,
        timeout=2 * FAILOVER_DEADLINE,  # a client waits out the switch
        open=False,
        name="failover",
    ) as pool:
        pool.wait(10)

        def writer(w: int) -> None:
            deadline = time.monotonic() + 60
            for _ in range(MAX_WRITES):
                if stop.is_set() or time.monotonic() > deadline:
                    return
                try:
                    with pool.connection() as conn:
                        cur = conn.execute(
                            "INSERT INTO writes (writer) VALUES (%s) RETURNING inet_server_port()",
                            [w],
                        )
                        row = cur.fetchone()
                except psycopg.Error as ex:
                    with lock:
                        errors.append(ex)
                    continue
                assert row is not None
                with lock:
                    writes[row[0]] += 1

        with running_threads(*(lambda w=w: writer(w) for w in range(WRITERS))):
            try:
                wait_until(lambda: writes[primary.port] >= 50, "writes on the primary")
                primary.stop("immediate")  # a crash: backends die mid-statement
                crashed_at = time.monotonic()
                standby.promote()
                wait_until(
                    lambda: writes[standby.port] >= 50,
                    "writes on the promoted standby",
                    timeout=FAILOVER_DEADLINE,
                )
                recovered_in = time.monotonic() - crashed_at
            finally:
                stop.set()

        # The clients' side of the switch: no timeout, and at most one error per
        # connection open on the old primary when it died (min_size = max_size).
        assert not any(isinstance(ex, PoolTimeout) for ex in errors), errors
        assert all(isinstance(ex, psycopg.OperationalError) for ex in errors), errors
        assert len(errors) <= WRITERS
        assert recovered_in < FAILOVER_DEADLINE

        # The same pool, now entirely on the new primary: as many connections as
        # backends there, and none in recovery.
        assert not pool.closed

        def settled() -> bool:
            stats = pool.get_stats()
            backends = server_pids(standby.dsn, APP)
            return stats["pool_size"] == stats["pool_available"] == len(backends) == WRITERS

        wait_until(settled, "pool_size == live backends on the new primary")
        with pool.connection() as conn:
            row = conn.execute("SELECT pg_is_in_recovery(), inet_server_port()").fetchone()
            assert row == (False, standby.port)
        stats = pool.get_stats()

    rows = int(standby.execute("SELECT count(*) FROM writes"))
    assert rows >= writes[standby.port] >= 50
    # Reported by -rA / on failure: how the switch went.
    print(
        f"failover: recovered in {recovered_in:.2f} s, {len(errors)} client errors"
        f" ({sorted({type(ex).__name__ for ex in errors})}), writes {dict(writes)},"
        f" connections_num={stats.get('connections_num', 0)}"
        f" connections_errors={stats.get('connections_errors', 0)}"
        f" connections_lost={stats.get('connections_lost', 0)}"
        f" returns_bad={stats.get('returns_bad', 0)}"
    )
