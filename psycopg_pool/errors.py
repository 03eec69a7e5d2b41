"""The exceptions the pool raises: all of them are psycopg `OperationalError`s."""

from __future__ import annotations

import psycopg


class PoolTimeout(psycopg.OperationalError):
    """No connection could be had within the allowed time."""

    __module__ = "psycopg_pool"


class PoolClosed(psycopg.OperationalError):
    """The pool is not open (not yet, or not any more)."""

    __module__ = "psycopg_pool"


class TooManyRequests(psycopg.OperationalError):
    """Too many clients are already waiting for a connection (`max_waiting`)."""

    __module__ = "psycopg_pool"
