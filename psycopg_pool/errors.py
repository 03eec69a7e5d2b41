"""The exceptions the pool raises: all of them are psycopg `OperationalError`s."""

from __future__ import annotations

from collections.abc import Callable

import psycopg


class PoolTimeout(psycopg.OperationalError):
    """No connection could be had within the allowed time."""

    __module__ = "psycopg_pool"

    # Part of the explanation (who holds the connections) searches every thread's and
    # task's frames: done only if the message is read, not for every timeout raised.
    _complete: Callable[[], str] | None = None

    def _completed(self) -> None:
        complete = self._complete
        if complete is not None:
            self._complete = None
            self.args = (complete(), *self.args[1:])

    def __str__(self) -> str:
        self._completed()
        return super().__str__()

    def __repr__(self) -> str:
        self._completed()
        return super().__repr__()


class PoolClosed(psycopg.OperationalError):
    """The pool is not open (not yet, or not any more)."""

    __module__ = "psycopg_pool"


class TooManyRequests(psycopg.OperationalError):
    """Too many clients are already waiting for a connection (`max_waiting`)."""

    __module__ = "psycopg_pool"
