"""OpenTelemetry metrics for psycopg_pool pools (extra ``otel``).

    from opentelemetry import metrics
    from psycopg_pool.metrics.otel import PoolMetrics

    pool_metrics = PoolMetrics(pool)     # on the global MeterProvider

The instruments follow OpenTelemetry's semantic conventions for database client
connection pools as of schema 1.44.0 (the names of opentelemetry-semantic-conventions
0.66b2's ``db_metrics``), each observation carrying the attribute
``db.client.connection.pool.name`` (the pool's name):

=========================================  ===================  =================================
instrument                                 kind, unit           value
=========================================  ===================  =================================
``db.client.connection.count``             up-down, connection  ``db.client.connection.state``
                                                                ``idle``: idle connections;
                                                                ``used``: the rest of the pool
                                                                (lent, being checked or opened)
``db.client.connection.idle.max``          up-down, connection  ``max_size`` (every connection
                                                                may be idle)
``db.client.connection.idle.min``          up-down, connection  ``min_size`` (the pool keeps
                                                                that many connections)
``db.client.connection.max``               up-down, connection  ``max_size``
``db.client.connection.pending_requests``  up-down, request     clients waiting in the queue
``db.client.connection.timeouts``          counter, timeout     `PoolTimeout` errors raised
``db.client.connection.create_time``       histogram, s         successful connection attempts
``db.client.connection.wait_time``         histogram, s         time clients waited in the queue
                                                                (a client served at once
                                                                records nothing)
``db.client.connection.use_time``          histogram, s         time a connection was out, for
                                                                ``pool.connection()`` blocks
=========================================  ===================  =================================

The up-down counters are observable: they read `pool.get_stats()` at each collection.
The timeouts and the histograms come from the events the pool records while watched
(off, and free, otherwise); each collection drains them. Stop with `remove_pool()` or
`close()`.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence

from opentelemetry.metrics import (
    CallbackOptions,
    Meter,
    MeterProvider,
    Observation,
    get_meter_provider,
)

from .. import __version__
from ._source import DEFAULT_BUCKETS, AnyPool, SampleFeed, check_pool

__all__ = ["DEFAULT_BUCKETS", "SCHEMA_URL", "PoolMetrics"]

_Callback = Callable[[CallbackOptions], Iterable[Observation]]

SCHEMA_URL = "https://opentelemetry.io/schemas/1.44.0"

CONNECTION_COUNT = "db.client.connection.count"
CONNECTION_IDLE_MAX = "db.client.connection.idle.max"
CONNECTION_IDLE_MIN = "db.client.connection.idle.min"
CONNECTION_MAX = "db.client.connection.max"
CONNECTION_PENDING_REQUESTS = "db.client.connection.pending_requests"
CONNECTION_TIMEOUTS = "db.client.connection.timeouts"
CONNECTION_CREATE_TIME = "db.client.connection.create_time"
CONNECTION_WAIT_TIME = "db.client.connection.wait_time"
CONNECTION_USE_TIME = "db.client.connection.use_time"

# The observable up-down counters read from get_stats(): name, stats key, unit, help.
OBSERVED = (
    (
        CONNECTION_IDLE_MAX,
        "pool_max",
        "{connection}",
        "How many idle connections the pool may keep (max_size).",
    ),
    (
        CONNECTION_IDLE_MIN,
        "pool_min",
        "{connection}",
        "How many connections the pool keeps open (min_size).",
    ),
    (
        CONNECTION_MAX,
        "pool_max",
        "{connection}",
        "How many connections the pool may open (max_size).",
    ),
    (
        CONNECTION_PENDING_REQUESTS,
        "requests_waiting",
        "{request}",
        "Clients waiting in the queue for a connection.",
    ),
)

# The histograms: sample kind, name, help.
HISTOGRAMS = (
    ("create", CONNECTION_CREATE_TIME, "Duration of the successful connection attempts."),
    ("wait", CONNECTION_WAIT_TIME, "Time clients spent queued waiting for a connection."),
    ("use", CONNECTION_USE_TIME, "Time a connection was out of the pool, in pool.connection()."),
)

POOL_NAME = "db.client.connection.pool.name"
STATE = "db.client.connection.state"


class PoolMetrics:
    """Observe one or more pools with the connection-pool instruments of a meter.

    `meter`: the meter to create the instruments on; else one named
    ``psycopg_pool`` from `meter_provider` (default: the global provider).
    `buckets`: the histograms' advised bucket boundaries, in seconds.

    The instruments are made once per meter (OpenTelemetry cannot make two of the same
    name): several `PoolMetrics` on the same meter share them, each observing its own
    pools; a pool name may be observed once per meter.
    """

    def __init__(
        self,
        *pools: AnyPool,
        meter_provider: MeterProvider | None = None,
        meter: Meter | None = None,
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ) -> None:
        if meter is None:
            provider = meter_provider if meter_provider is not None else get_meter_provider()
            meter = provider.get_meter("psycopg_pool", __version__, schema_url=SCHEMA_URL)
        self.meter = meter
        self._instruments = _Instruments.of(meter, tuple(buckets))
        self._pools: dict[str, AnyPool] = {}
        for pool in pools:
            self.add_pool(pool)

    def add_pool(self, pool: AnyPool) -> None:
        """Observe one more pool; its name must differ from the observed ones'."""
        check_pool(pool)
        self._instruments.add(pool)
        self._pools[pool.name] = pool

    def remove_pool(self, pool: AnyPool) -> None:
        """Stop observing a pool (its events not collected yet are recorded first)."""
        if self._pools.get(pool.name) is not pool:
            raise ValueError(f"pool {pool.name!r} is not observed by these metrics")
        del self._pools[pool.name]
        self._instruments.remove(pool)

    def close(self) -> None:
        """Stop observing every pool of this object. (The instruments stay on the
        meter, without data for these pools: OpenTelemetry cannot remove them.)"""
        for pool in list(self._pools.values()):
            self.remove_pool(pool)

    def record(self) -> None:
        """Record the pending events into the histograms and the timeouts counter now
        (each collection does it anyway, before reading them)."""
        self._instruments.record()


class _Instruments:
    """The instruments of one meter and the pools they observe (shared)."""

    @classmethod
    def of(cls, meter: Meter, buckets: tuple[float, ...]) -> _Instruments:
        """The meter's instruments, made at the first call."""
        with _meters_lock:
            inst = _by_meter.get(meter)
            if inst is None:
                inst = _by_meter[meter] = cls(meter, buckets)
            elif inst.buckets != buckets:
                raise ValueError(f"this meter's histograms already have the buckets {inst.buckets}")
            return inst

    def __init__(self, meter: Meter, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self._lock = threading.Lock()
        self._feeds: dict[str, SampleFeed] = {}  # by pool name

        meter.create_observable_up_down_counter(
            CONNECTION_COUNT,
            callbacks=[self._observe_count],
            unit="{connection}",
            description="Connections of the pool, by state: idle, or used (lent, being"
            " checked or opened).",
        )
        for name, key, unit, doc in OBSERVED:
            meter.create_observable_up_down_counter(
                name, callbacks=[self._observer(key)], unit=unit, description=doc
            )
        self._timeouts = meter.create_counter(
            CONNECTION_TIMEOUTS,
            unit="{timeout}",
            description="Requests for a connection that failed with PoolTimeout.",
        )
        bounds = list(buckets)
        self._histograms = {
            kind: meter.create_histogram(
                name, unit="s", description=doc, explicit_bucket_boundaries_advisory=bounds
            )
            for kind, name, doc in HISTOGRAMS
        }

    def add(self, pool: AnyPool) -> None:
        with self._lock:
            if pool.name in self._feeds:
                raise ValueError(f"a pool named {pool.name!r} is already observed")
            self._feeds[pool.name] = SampleFeed(pool)

    def remove(self, pool: AnyPool) -> None:
        with self._lock:
            feed = self._feeds.pop(pool.name)
            self._record(feed)
            feed.close()

    def record(self) -> None:
        with self._lock:
            for feed in self._feeds.values():
                self._record(feed)

    def _record(self, feed: SampleFeed) -> None:
        attrs = {POOL_NAME: feed.pool.name}
        timeouts = 0
        for kind, seconds in feed.drain():
            if kind == "timeout":
                timeouts += 1
            else:
                hist = self._histograms.get(kind)
                if hist is not None:
                    hist.record(seconds, attrs)
        if timeouts:
            self._timeouts.add(timeouts, attrs)

    def _stats(self) -> list[tuple[str, dict[str, int]]]:
        """Each pool's name and stats, after recording its pending events.

        Every observable callback calls this: the SDK runs the callbacks before it
        reads the synchronous instruments, so the events drained here are part of the
        same collection.
        """
        with self._lock:
            res = []
            for name, feed in self._feeds.items():
                self._record(feed)
                res.append((name, feed.pool.get_stats()))
            return res

    def _observe_count(self, options: CallbackOptions) -> Iterable[Observation]:
        res = []
        for name, stats in self._stats():
            idle = stats["pool_available"]
            used = max(stats["pool_size"] - idle, 0)
            res.append(Observation(idle, {POOL_NAME: name, STATE: "idle"}))
            res.append(Observation(used, {POOL_NAME: name, STATE: "used"}))
        return res

    def _observer(self, key: str) -> _Callback:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(stats[key], {POOL_NAME: name}) for name, stats in self._stats()]

        return observe


_meters_lock = threading.Lock()
_by_meter: weakref.WeakKeyDictionary[Meter, _Instruments] = weakref.WeakKeyDictionary()


def _new_locks_in_child() -> None:
    # The SDK's reader thread runs the callbacks, under these locks, and may have held
    # one at the fork: inherited locked, it would block the child's first collection.
    global _meters_lock
    _meters_lock = threading.Lock()
    for inst in list(_by_meter.values()):
        inst._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_locks_in_child)
