# WARNING: this file is generated from _connector_async.py by tools/unasync.py: do not edit it,
# edit _connector_async.py and run `python tools/unasync.py`.
"""Everything the async pool says to psycopg: connect, configure, clean, check, close.

This is the only module (with its generated twin `_connector.py`) that performs
I/O on a connection. It runs outside the pool's lock and reports back to the pool,
which turns the outcome into a fact for the core.
"""

from __future__ import annotations

import logging
from time import monotonic
from typing import TYPE_CHECKING, Any

from psycopg import Connection, ProgrammingError, capabilities
from psycopg.pq import TransactionStatus

from ._acompat import resolve
from ._connection_facts import add_network_defaults, still_running
from ._explain import without_password

if TYPE_CHECKING:
    from .pool import ConnectionPool

logger = logging.getLogger("psycopg.pool")
# Before libpq 17, cancel_safe() falls back to psycopg's blocking cancel(), which
# holds the GIL until the server answers: one that never does (a silent network)
# would freeze every thread of the process. Then a running query is not cancelled.
NONBLOCKING_CANCEL = capabilities.has_cancel_safe()

IDLE = TransactionStatus.IDLE
ACTIVE = TransactionStatus.ACTIVE
INTRANS = TransactionStatus.INTRANS
INERROR = TransactionStatus.INERROR
UNKNOWN = TransactionStatus.UNKNOWN

# How long a connection being closed may take to ask the server to stop its query.
CANCEL_TIMEOUT = 5.0


class ConnectAttempt:
    """One attempt to open and configure a connection.

    After a failure, `connect_failed` tells whether `connect()` itself failed
    (upstream counts only those in `connections_errors`) or a later step did.
    """

    __slots__ = ("connect_failed", "ms")

    def __init__(self) -> None:
        self.connect_failed = False
        self.ms = 0

    def run(self, pool: ConnectionPool[Any], extra: dict[str, Any] | None = None) -> Any:
        conninfo: Any = pool.conninfo
        if callable(conninfo):
            conninfo = resolve(conninfo())
        kwargs: Any = pool.kwargs
        if callable(kwargs):
            kwargs = resolve(kwargs())
        kwargs = dict(kwargs) if kwargs else {}
        if extra:
            kwargs.update(extra)
        add_network_defaults(conninfo, kwargs)

        t0 = monotonic()
        self.connect_failed = True
        try:
            conn = pool.connection_class.connect(conninfo or "", **kwargs)
        except Exception as ex:
            # Every message and log line about the failure quotes this exception.
            clean = without_password(ex, conninfo)
            if clean is ex:
                raise
            raise clean from None
        self.connect_failed = False
        self.ms = int(1000.0 * (monotonic() - t0))

        conn._pool = pool
        try:
            configure = pool._configure
            if configure is not None:
                configure(conn)
                status = conn.pgconn.transaction_status
                if status != IDLE:
                    raise ProgrammingError(
                        f"connection left in status {TransactionStatus(status).name} by"
                        " configure function"
                        f" {configure}: discarded"
                    )
        except BaseException:
            conn._pool = None
            close(conn)
            raise
        return conn


def clean(pool: ConnectionPool[Any], conn: Any, status: int, quiet: bool = False) -> bool:
    """Make a returned connection reusable; False if it must be thrown away.

    Rolls back an open transaction (warning, unless `quiet`: the rollback a block
    left by an exception owes), closes one still running a query, then runs the
    `reset` callback (upstream runs it even on a connection just closed here, so that
    a user's reset sees every return; we do the same).
    """
    if status == UNKNOWN:
        return False
    if status == ACTIVE:
        logger.warning("closing returned connection: %s", conn)
        close(conn)
    elif status != IDLE:
        if not quiet:
            logger.warning("rolling back returned connection: %s", conn)
        try:
            conn.rollback()
        except Exception as ex:
            logger.warning(
                "rollback failed: %s: %s. Discarding connection %s", type(ex).__name__, ex, conn
            )
            close(conn)
    reset = pool._reset
    if reset is not None:
        try:
            reset(conn)
            status = conn.pgconn.transaction_status
            if status != IDLE:
                raise ProgrammingError(
                    f"connection left in status {TransactionStatus(status).name} by reset"
                    f" function {reset}: discarded"
                )
        except Exception as ex:
            logger.warning("error resetting connection: %s", ex)
            close(conn)
    return bool(conn.pgconn.transaction_status == IDLE)


def check_connection(conn: Connection[Any]) -> None:
    """Raise if the connection cannot run a query; leave it as it was found."""
    if conn.autocommit:
        conn.execute("")
        return
    conn.set_autocommit(True)
    try:
        conn.execute("")
    finally:
        try:
            conn.set_autocommit(False)
        except Exception:
            pass  # the connection is broken: the caller already knows from execute()


def close(conn: Any) -> None:
    """Close for real; `_pool` is cleared first so `close_returns` cannot loop back.

    A query still running is cancelled first. Its caller was interrupted without
    psycopg cancelling it (Celery's soft time limit and other exceptions raised by a
    signal handler are not KeyboardInterrupt): closed, the connection would leave it
    running on the server, with its locks, until it ends.
    """
    conn._pool = None
    try:
        try:
            if (
                NONBLOCKING_CANCEL
                and conn.pgconn.transaction_status == ACTIVE
                and still_running(conn)
            ):
                conn.cancel_safe(timeout=CANCEL_TIMEOUT)
        except Exception as ex:
            logger.debug("error cancelling the query of connection %s: %s", conn, ex)
        finally:
            conn.close()  # even if the cancel was interrupted
    except Exception as ex:
        logger.debug("error closing connection %s: %s", conn, ex)
