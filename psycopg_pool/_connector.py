# WARNING: this file is generated from _connector_async.py by tools/unasync.py: do not edit it,
# edit _connector_async.py and run `python tools/unasync.py`.
"""Everything the async pool says to psycopg: connect, configure, clean, check, close.

This is the only module (with its generated twin `_connector.py`) that performs
I/O on a connection. It runs outside the pool's lock and reports back to the pool,
which turns the outcome into a fact for the core.
"""

from __future__ import annotations

import logging
import os
import select
from time import monotonic
from typing import TYPE_CHECKING, Any

from psycopg import Connection, OperationalError, ProgrammingError, pq
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import TransactionStatus

from ._acompat import resolve

if TYPE_CHECKING:
    from .pool import ConnectionPool

logger = logging.getLogger("psycopg.pool")

IDLE = TransactionStatus.IDLE
ACTIVE = TransactionStatus.ACTIVE
INTRANS = TransactionStatus.INTRANS
INERROR = TransactionStatus.INERROR
UNKNOWN = TransactionStatus.UNKNOWN


class ConnectAttempt:
    """One attempt to open and configure a connection.

    After a failure, `connect_failed` tells whether `connect()` itself failed
    (upstream counts only those in `connections_errors`) or a later step did.
    """

    __slots__ = ("connect_failed", "ms")

    def __init__(self) -> None:
        self.connect_failed = False
        self.ms = 0

    def run(
        self, pool: ConnectionPool[Any], extra: dict[str, Any] | None = None
    ) -> Any:
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
        conn = pool.connection_class.connect(conninfo or "", **kwargs)
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


# Connection failures that retrying cannot fix: credentials, missing database or
# role, a bad conninfo. libpq gives no SQLSTATE for them, so they are recognised by
# the server's (English) message; anything unrecognised counts as transient.
_FATAL_MESSAGES = (
    "password authentication failed",
    "no password supplied",
    "authentication failed",
    "no pg_hba.conf entry",
    "does not exist",
    "invalid connection option",
    "invalid sslmode value",
    "missing \"=\" after",
    "invalid integer value",
    "permission denied for database",
    "is not permitted to log in",
)
_TRANSIENT_MESSAGES = (
    "starting up",
    "shutting down",
    "too many clients",
    "remaining connection slots",
    "connection refused",
    "timeout expired",
    "could not connect",
    "recovery",
)


def is_fatal(ex: BaseException) -> bool:
    """True if `ex`, raised by a connection attempt, will not go away by retrying."""
    if isinstance(ex, ProgrammingError):
        return True  # psycopg's verdict on the conninfo or a configure callback
    if not isinstance(ex, OperationalError):
        return False
    msg = str(ex).lower()
    if any(m in msg for m in _TRANSIENT_MESSAGES):
        return False
    return any(m in msg for m in _FATAL_MESSAGES)


def clean(pool: ConnectionPool[Any], conn: Any, status: int) -> bool:
    """Make a returned connection reusable; False if it must be thrown away.

    Rolls back an open transaction, closes one still running a query, then runs
    the `reset` callback (upstream runs it even on a connection just closed here,
    so that a user's reset sees every return; we do the same).
    """
    if status == UNKNOWN:
        return False
    if status == ACTIVE:
        logger.warning("closing returned connection: %s", conn)
        close(conn)
    elif status != IDLE:
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


# Pooled connections live long and sit idle: without TCP keepalives a connection
# whose peer vanished (failover, a NAT or firewall dropping state) looks alive for
# hours. Applied unless the conninfo, the kwargs or the environment say otherwise;
# libpq ignores the TCP ones on Unix sockets.
NETWORK_DEFAULTS = {
    # psycopg waits over two minutes by default: an attempt stuck on a silent network
    # would hold one of the num_workers attempt slots all that time, and the pool
    # could not reconnect when the network comes back.
    "connect_timeout": "5",
    "keepalives": "1",
    "keepalives_idle": "60",
    "keepalives_interval": "10",
    "keepalives_count": "6",
    "tcp_user_timeout": "60000",
}


def add_network_defaults(conninfo: Any, kwargs: dict[str, Any]) -> None:
    missing = [k for k in NETWORK_DEFAULTS if k not in kwargs]
    if os.environ.get("PGCONNECT_TIMEOUT") and "connect_timeout" in missing:
        missing.remove("connect_timeout")
    if not missing:
        return
    if isinstance(conninfo, str) and conninfo:
        try:
            given = conninfo_to_dict(conninfo)
        except Exception:
            return  # let connect() report the bad conninfo
        missing = [k for k in missing if k not in given]
    for key in missing:
        if key == "tcp_user_timeout" and pq.version() < 120000:
            continue  # unknown to libpq before 12
        kwargs[key] = NETWORK_DEFAULTS[key]


def has_input(conn: Any) -> bool:
    """Is there anything to read on an idle connection? No round trip, no wait.

    An idle connection receives nothing unless the server closes it (a FATAL
    message then end of file) or it LISTENs: either way it deserves a real check.
    """
    if conn.closed:
        return True
    try:
        fd = conn.pgconn.socket
    except Exception:
        return True
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLERR | select.POLLHUP)
    return bool(poller.poll(0))


def read_only_error(conn: Any) -> bool:
    """Did the connection's last error say the server only accepts reads?"""
    try:
        msg = conn.pgconn.error_message
    except Exception:
        return False
    return b"read-only transaction" in msg or b"recovery is in progress" in msg


def wants_read_write(pool: ConnectionPool[Any]) -> bool:
    """Does the pool's conninfo ask for a primary (target_session_attrs)?"""
    conninfo = pool.conninfo if isinstance(pool.conninfo, str) else ""
    kwargs = pool.kwargs if isinstance(pool.kwargs, dict) else {}
    want = str(kwargs.get("target_session_attrs", ""))
    if not want and "target_session_attrs" in conninfo:
        try:
            want = str(conninfo_to_dict(conninfo).get("target_session_attrs", ""))
        except Exception:
            return False
    return str(want) in ("read-write", "primary")


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
    """Close for real; `_pool` is cleared first so `close_returns` cannot loop back."""
    conn._pool = None
    try:
        conn.close()
    except Exception as ex:
        logger.debug("error closing connection %s: %s", conn, ex)
