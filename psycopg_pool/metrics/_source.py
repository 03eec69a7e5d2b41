"""What the exporters read from a pool: `get_stats()` and the core's event samples.

The core records `(kind, seconds)` events ("wait", "use", "create", "timeout") only
while `pool._core.samples` is a list; it is None, and costs nothing, by default.
`SampleFeed` switches it on for one exporter and drains it. Several exporters may
watch the same pool (a Prometheus collector and OpenTelemetry metrics, say): the
pool's buffer is then shared, and each drain hands the events it takes to the other
feeds too, so that every exporter sees every event exactly once.

Lock order: this module's lock, then the pool's `_lock` (the pool never takes ours).
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import Any, TypeAlias

from .._core.state import MAX_SAMPLES
from ..pool import ConnectionPool
from ..pool_async import AsyncConnectionPool

# The pools an exporter can watch (the null pools are subclasses).
AnyPool: TypeAlias = ConnectionPool[Any] | AsyncConnectionPool[Any]

Sample = tuple[str, float]

# Histogram bounds, in seconds: from a fraction of a millisecond (a local idle
# connection) to a minute. Compact on purpose: each bound is one series per pool.
DEFAULT_BUCKETS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)

_lock = threading.Lock()
_feeds: weakref.WeakKeyDictionary[AnyPool, list[SampleFeed]] = weakref.WeakKeyDictionary()


class SampleFeed:
    """One exporter's subscription to one pool's event samples."""

    def __init__(self, pool: AnyPool) -> None:
        self.pool = pool
        self._pending: list[Sample] = []  # events another feed drained for us
        self._closed = False
        with _lock:
            feeds = _feeds.get(pool)
            if feeds is None:
                feeds = _feeds[pool] = []
                with pool._lock:
                    pool._core.samples = []
            feeds.append(self)

    def drain(self) -> list[Sample]:
        """The events recorded since the last drain of this feed."""
        with _lock:
            if self._closed:
                return []
            pool = self.pool
            with pool._lock:
                core = pool._core
                new = core.samples or []
                core.samples = []
            if new:
                for feed in _feeds.get(pool, ()):
                    if feed is not self:
                        room = MAX_SAMPLES - len(feed._pending)
                        feed._pending.extend(new[:room])
            if not self._pending:
                return new
            res, self._pending = self._pending, []
            res.extend(new)
            return res

    def close(self) -> None:
        """Stop; the pool stops recording once no feed is left."""
        with _lock:
            if self._closed:
                return
            self._closed = True
            self._pending = []
            feeds = _feeds.get(self.pool)
            if feeds is None:
                return
            feeds.remove(self)
            if not feeds:
                del _feeds[self.pool]
                with self.pool._lock:
                    self.pool._core.samples = None


def _new_lock_in_child() -> None:
    # Another thread of the parent (a metrics scrape) may have held it at the fork:
    # inherited locked, it would block the child's first scrape for good.
    global _lock
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_lock_in_child)


def check_pool(pool: object) -> AnyPool:
    """Refuse what is not one of this package's pools, with a clear message."""
    if not isinstance(pool, (ConnectionPool, AsyncConnectionPool)):
        raise TypeError(f"expected a psycopg_pool pool, got {type(pool).__name__}")
    return pool
