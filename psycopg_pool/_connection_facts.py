"""Facts about connections that need no I/O of their own, for both pools.

Which connection errors retrying cannot fix, the network settings pooled
connections get by default, and what a non-blocking look at an idle
connection's socket shows. The connectors and shells, sync and async, share them.
"""

from __future__ import annotations

import os
import select
from typing import Any

from psycopg import OperationalError, ProgrammingError, pq
from psycopg.conninfo import conninfo_to_dict

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
    'missing "=" after',
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
    try:
        return socket_ready(fd, reading=True, timeout=0.0)
    except (OSError, ValueError):
        return True


def socket_ready(fd: int, reading: bool, timeout: float) -> bool:
    """Wait up to `timeout` seconds for `fd` to be readable (or writable); True if it is
    (an error or hang-up on it counts as ready: the next operation reports it)."""
    poll = getattr(select, "poll", None)
    if poll is None:
        # Windows has no poll(); its select() takes a socket handle of any value
        # (elsewhere select() fails on descriptors past FD_SETSIZE, hence poll(): a
        # busy service has more than 1024 files open).
        ready = select.select([fd] if reading else [], [] if reading else [fd], [fd], timeout)
        return any(ready)
    poller = poll()
    poller.register(fd, (select.POLLIN if reading else select.POLLOUT) | select.POLLERR)
    return bool(poller.poll(timeout * 1000.0))


def still_running(conn: Any) -> bool:
    """Is the server still running the query of a connection left ACTIVE? No wait.

    Its client was interrupted while it waited for the result; the result may have
    arrived since. Reads what has (results of a query already over are dropped:
    the connection is about to be closed). True if in doubt.
    """
    pgconn = conn.pgconn
    try:
        pgconn.consume_input()
        # A query string may hold several statements: one result each.
        for _ in range(8):
            if pgconn.is_busy():
                return True
            if pgconn.get_result() is None:
                return False
    except Exception:
        pass
    return True


def read_only_error(conn: Any) -> bool:
    """Did the connection's last error say the server only accepts reads?"""
    try:
        msg = conn.pgconn.error_message
    except Exception:
        return False
    return b"read-only transaction" in msg or b"recovery is in progress" in msg


def wants_read_write(pool: Any) -> bool:
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
