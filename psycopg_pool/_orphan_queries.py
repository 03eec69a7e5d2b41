"""Queries left running on the server by connections psycopg closed mid-query.

When a task is cancelled during a query, psycopg asks the server to cancel it. If the
task is cancelled again while psycopg waits for that (anyio's cancel scopes cancel
a task again each time it waits, until the scope is left), psycopg gives up and
closes the connection instead. The server does not notice a closed client until it
next reads from or writes to it, so the query runs to its end, holding its locks,
and a `pg_sleep()` or a query queued behind a lock may run for minutes.

The pool cannot send a cancel request through a closed connection, so it keeps what
libpq needs to send one for each connection it opens (`remember()`), and when a
cancellation brings back a connection that psycopg closed, it sends it (`cancel()`).
The request connects to the server, so it is sent from a thread of its own, for both
pools: never on a client's path, and one at a time (a burst of timeouts sends a burst
of requests, which need not be parallel).

Each request is bounded by CANCEL_TIMEOUT: one that gets no answer (a silent
network, PgBouncer holding it open) must not hold up the ones after it. That takes
libpq's non-blocking cancel (`PGcancelConn`, libpq 17 or later, which the psycopg
binary packages bundle; about 11 KB kept per connection). Older libpq only has a
blocking call, which psycopg makes without releasing the GIL: one request nobody
answers would freeze every thread of the process. With it the pool sends nothing.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from time import monotonic
from typing import Any

from psycopg import OperationalError, pq

from ._connection_facts import socket_ready
from ._explain import error_text

logger = logging.getLogger("psycopg.pool")

CANCEL_TIMEOUT = 5.0

_jobs: queue.SimpleQueue[tuple[Any, str]] | None = None
_start_lock = threading.Lock()


def remember(conn: Any) -> None:
    """Keep what it takes to cancel a query of a connection just opened, for `cancel()`."""
    try:
        conn._pool_cancel = conn.pgconn.cancel_conn()
    except Exception:  # libpq < 17 (see above), or a connection class that cannot
        conn._pool_cancel = None


def cancel(conn: Any, pool_name: str) -> None:
    """Ask the server, in the background, to cancel what `conn` may have left running."""
    token = getattr(conn, "_pool_cancel", None)
    if token is None:
        return
    conn._pool_cancel = None  # once is enough
    global _jobs
    jobs = _jobs
    if jobs is None:
        with _start_lock:
            jobs = _jobs
            if jobs is None:
                jobs = _jobs = queue.SimpleQueue()
                threading.Thread(
                    target=_run, args=(jobs,), name="psycopg-pool-cancel", daemon=True
                ).start()
    jobs.put((token, pool_name))


def send(token: Any, timeout: float) -> None:
    """Send a cancel request; raise OperationalError if it fails or takes too long."""
    deadline = monotonic() + timeout
    try:
        token.start()
        while True:
            status = token.poll()
            if status == pq.PollingStatus.OK:
                return
            if status == pq.PollingStatus.FAILED:
                raise OperationalError(token.get_error_message())
            remaining = deadline - monotonic()
            if remaining <= 0.0:
                raise OperationalError(f"no answer after {timeout:g} sec")
            socket_ready(token.socket, status == pq.PollingStatus.READING, remaining)
    finally:
        token.finish()


def _run(jobs: queue.SimpleQueue[tuple[Any, str]]) -> None:
    while True:
        token, name = jobs.get()
        try:
            send(token, CANCEL_TIMEOUT)
        except Exception as ex:
            logger.info(
                "pool %r: could not ask the server to cancel the query of a connection"
                " closed mid-query: %s",
                name,
                error_text(ex),
            )
        else:
            logger.info(
                "pool %r: asked the server to cancel the query of a connection psycopg"
                " closed mid-query (its task was cancelled again while psycopg cancelled it)",
                name,
            )
        del token  # freed now, not kept while the thread waits for the next one


def _forget_in_child() -> None:
    # The thread does not exist in a forked child: the next cancel() starts one there.
    # (A new lock too: another thread of the parent may have held it at the fork.)
    global _jobs, _start_lock
    _jobs = None
    _start_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)
