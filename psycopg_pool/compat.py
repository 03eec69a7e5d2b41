"""A `psycopg2.pool` work-alike on Psycopg 3 connections.

Code written against ``psycopg2.pool`` moves to Psycopg 3 by changing one import::

    from psycopg_pool.compat import ThreadedConnectionPool   # was: psycopg2.pool

The four names (`PoolError`, `AbstractConnectionPool`, `SimpleConnectionPool`,
`ThreadedConnectionPool`) behave like psycopg2 2.9's, including its quirks, so that
moved code keeps doing what it did:

* the constructor opens `minconn` connections at once (errors propagate); `minconn`
  and `maxconn` are not validated;
* `getconn()` without a key draws a fresh integer key from a counter starting at 1 (a
  user's own integer keys can collide with those); a key already checked out gives
  back the *same* connection; idle connections are reused last-in, first-out; with
  `maxconn` connections checked out `getconn()` raises `PoolError` at once (there is
  no waiting, no timeout);
* `putconn()` keeps the connection while fewer than `minconn` are idle (rolling back a
  transaction left open, dropping a broken one) and closes it otherwise; nothing
  replaces a dropped connection; an explicit key that is not checked out raises
  `KeyError` after the connection was kept or closed;
* `closeall()` closes every connection, idle or checked out; a second call raises
  `PoolError`; so do `getconn()`/`putconn()` on a closed pool.

What differs, because the connections are Psycopg 3's:

* `PoolError` derives from `psycopg.Error` (psycopg2's from `psycopg2.Error`).
* ``conn.closed`` is a bool (psycopg2: an int, 0 open, 1 closed, 2 broken); a
  connection that lost its server reads as closed.
* The transaction status is ``conn.info.transaction_status``, a
  `psycopg.pq.TransactionStatus` (IDLE 0, ACTIVE 1, INTRANS 2, INERROR 3, UNKNOWN 4:
  the same numbers as psycopg2's ``TRANSACTION_STATUS_*``); there is no
  ``conn.get_transaction_status()``.
* ``with conn:`` *closes* a Psycopg 3 connection at the end of the block (psycopg2
  only ends the transaction): with a pooled connection use ``with conn.transaction():``
  instead, or the pool loses the connection (a closed one is dropped on `putconn()`).
* The connection arguments: one positional `dsn` (or ``dsn=...``) and keyword
  arguments, passed to `psycopg.connect()` as ``psycopg.connect(dsn or "", **kwargs)``.
  ``database=`` is renamed ``dbname=`` as psycopg2 does; ``connection_factory=`` must
  be a `psycopg.Connection` subclass (its ``connect()`` is used); other keywords
  (``autocommit``, ``row_factory``, ``prepare_threshold``, ...) go to Psycopg 3.

For a pool that waits for a connection instead of failing, checks and replaces broken
connections, and reports stats, move on to `psycopg_pool.ConnectionPool`.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable
from typing import Any

import psycopg
from psycopg.pq import TransactionStatus

from . import _connector as connector

__all__ = [
    "AbstractConnectionPool",
    "PoolError",
    "SimpleConnectionPool",
    "ThreadedConnectionPool",
]

Conn = psycopg.Connection[Any]


class PoolError(psycopg.Error):
    """A misuse of the pool: closed, exhausted, or a connection it does not know."""

    __module__ = "psycopg_pool.compat"


def _connect(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Conn:
    """Open a connection from psycopg2-style connection arguments."""
    if len(args) > 1:
        raise TypeError(
            "only the dsn can be given as a positional connection argument,"
            f" got {len(args)} positional arguments"
        )
    kw = dict(kwargs)
    dsn = args[0] if args else kw.pop("dsn", None)
    if "database" in kw:
        if "dbname" in kw:
            raise TypeError("you can't specify both 'database' and 'dbname' arguments")
        kw["dbname"] = kw.pop("database")
    factory = kw.pop("connection_factory", None)
    if factory is None:
        return psycopg.connect(dsn or "", **kw)
    if not (isinstance(factory, type) and issubclass(factory, psycopg.Connection)):
        raise TypeError(
            f"connection_factory must be a psycopg.Connection subclass, got {factory!r}"
        )
    conn: Conn = factory.connect(dsn or "", **kw)
    return conn


class AbstractConnectionPool:
    """The pool's state and its unlocked operations (underscore methods)."""

    def __init__(self, minconn: int, maxconn: int, *args: Any, **kwargs: Any) -> None:
        self.minconn = int(minconn)
        self.maxconn = int(maxconn)
        self.closed = False

        self._args = args
        self._kwargs = kwargs

        self._pool: list[Conn] = []  # idle connections; the last one goes out first
        self._used: dict[Hashable, Conn] = {}  # checked-out connections by key
        self._rused: dict[int, Hashable] = {}  # id(connection) -> key
        self._keys = 0

        for _ in range(self.minconn):
            self._connect()

    def _connect(self, key: Hashable | None = None) -> Conn:
        """Open a connection: checked out under `key`, or idle if no key."""
        conn = _connect(self._args, self._kwargs)
        if key is not None:
            self._used[key] = conn
            self._rused[id(conn)] = key
        else:
            self._pool.append(conn)
        return conn

    def _getkey(self) -> int:
        """The next automatic key: 1, 2, 3..."""
        self._keys += 1
        return self._keys

    def _getconn(self, key: Hashable | None = None) -> Conn:
        """Check out a connection (the same one again for a key already out)."""
        if self.closed:
            raise PoolError("connection pool is closed")
        if key is None:
            key = self._getkey()

        if key in self._used:
            return self._used[key]

        if self._pool:
            conn = self._pool.pop()
            self._used[key] = conn
            self._rused[id(conn)] = key
            return conn

        if len(self._used) == self.maxconn:
            raise PoolError("connection pool exhausted")
        return self._connect(key)

    def _putconn(self, conn: Conn | None, key: Hashable | None = None, close: bool = False) -> None:
        """Give a connection back: kept while fewer than `minconn` are idle, else closed."""
        if self.closed:
            raise PoolError("connection pool is closed")
        if conn is None and key is not None:
            conn = self._used[key]  # an extension: the connection checked out as `key`
        if key is None:
            key = self._rused.get(id(conn))
            if key is None:
                raise PoolError("trying to put unkeyed connection")
        assert conn is not None  # a None conn has no key: refused above

        status = conn.info.transaction_status
        if len(self._pool) < self.minconn and not close and not conn.closed:
            if status == TransactionStatus.INTRANS or status == TransactionStatus.INERROR:
                conn.rollback()
                self._pool.append(conn)
            elif status == TransactionStatus.IDLE:
                self._pool.append(conn)
            else:
                # Broken (lost its server), or still running a query (a generator from
                # `cursor.stream()` left unfinished: a rollback would wait for it for
                # ever, holding the pool's lock): closed, the query cancelled first.
                connector.close(conn)
        else:
            connector.close(conn)

        # Forget the key; an explicit key that is not checked out raises KeyError here,
        # after the connection was kept or closed (as psycopg2 does).
        del self._used[key]
        del self._rused[id(conn)]

    def _closeall(self) -> None:
        """Close every connection, idle or checked out; the pool is closed for good."""
        if self.closed:
            raise PoolError("connection pool is closed")
        for conn in self._pool + list(self._used.values()):
            try:
                connector.close(conn)  # a query still running is cancelled first
            except Exception:
                pass
        self.closed = True


class SimpleConnectionPool(AbstractConnectionPool):
    """A pool for a single thread (no locking)."""

    def getconn(self, key: Hashable | None = None) -> Conn:
        """Check out a connection; `key` gets the same connection back while it is out."""
        return self._getconn(key)

    def putconn(self, conn: Conn, key: Hashable | None = None, close: bool = False) -> None:
        """Give back a connection; `close=True` closes it instead of keeping it."""
        self._putconn(conn, key, close)

    def closeall(self) -> None:
        """Close all the connections, the checked-out ones too."""
        self._closeall()


class ThreadedConnectionPool(AbstractConnectionPool):
    """A pool shared by threads: each operation runs under one lock."""

    def __init__(self, minconn: int, maxconn: int, *args: Any, **kwargs: Any) -> None:
        super().__init__(minconn, maxconn, *args, **kwargs)
        # Not reentrant; connecting in getconn() happens while holding it.
        self._lock = threading.Lock()

    def getconn(self, key: Hashable | None = None) -> Conn:
        """Check out a connection; `key` gets the same connection back while it is out."""
        with self._lock:
            return self._getconn(key)

    def putconn(
        self, conn: Conn | None = None, key: Hashable | None = None, close: bool = False
    ) -> None:
        """Give back a connection; `close=True` closes it instead of keeping it."""
        with self._lock:
            self._putconn(conn, key, close)

    def closeall(self) -> None:
        """Close all the connections, the checked-out ones too."""
        with self._lock:
            self._closeall()
