"""A Prometheus collector for psycopg_pool pools (extra ``prometheus``).

    from prometheus_client import start_http_server
    from psycopg_pool.metrics.prometheus import PoolCollector

    collector = PoolCollector(pool)      # registers itself in prometheus_client.REGISTRY
    start_http_server(9100)

Each scrape reads every watched pool's `get_stats()` and drains the events the pool
recorded since the previous scrape. All the metrics carry a ``pool`` label (the pool's
name, unique per collector). With the default prefix:

Gauges (from `get_stats()`, at scrape time):

- ``psycopg_pool_connections``: connections in the pool: idle, lent, being checked
  or being opened (``pool_size``);
- ``psycopg_pool_connections_idle``: idle connections (``pool_available``);
- ``psycopg_pool_connections_in_use``: the others (``pool_size - pool_available``);
- ``psycopg_pool_requests_waiting``: clients queued for a connection;
- ``psycopg_pool_max_size``, ``psycopg_pool_min_size``;
- ``psycopg_pool_connections_connecting``: connection attempts under way, counted in
  ``psycopg_pool_connections`` (``pool_connecting``).

Counters (``_total``), from the pool's counters, which start at the pool's creation;
they never go backwards, even if something calls `pool.pop_stats()` (a counter seen
lower than at the previous scrape was reset: its new value is added):

- ``psycopg_pool_requests_total``: connections asked for (``requests_num``);
- ``psycopg_pool_requests_queued_total``: requests that had to wait;
- ``psycopg_pool_requests_errors_total``: requests that failed (timeout, too many
  waiting, pool closed...);
- ``psycopg_pool_returns_bad_total``: connections returned broken or in a bad state;
- ``psycopg_pool_connection_attempts_total``: connection attempts (``connections_num``);
- ``psycopg_pool_connection_errors_total``: failed attempts (``connections_errors``);
- ``psycopg_pool_connections_lost_total``: connections found broken or lost;
- ``psycopg_pool_timeouts_total``: `PoolTimeout` errors raised, counted from the moment
  the collector watches the pool.

Histograms, in seconds, of the events since the collector watches the pool:

- ``psycopg_pool_wait_seconds``: how long a client waited in the queue (only clients
  that had to queue: one served at once records nothing);
- ``psycopg_pool_use_seconds``: how long a connection was out, for
  ``pool.connection()`` blocks (not for `getconn()`/`putconn()`);
- ``psycopg_pool_connect_seconds``: how long a successful connection attempt took.

Watching a pool switches on its event recording (off, and free, otherwise); stop
watching with `remove_pool()` or `close()`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from ._source import DEFAULT_BUCKETS, AnyPool, SampleFeed, check_pool

__all__ = ["DEFAULT_BUCKETS", "PoolCollector"]

# Counter suffix -> the get_stats() key it follows, and its help text.
COUNTERS: dict[str, tuple[str, str]] = {
    "requests": ("requests_num", "Connections asked for from the pool."),
    "requests_queued": ("requests_queued", "Requests that had to wait in the queue."),
    "requests_errors": (
        "requests_errors",
        "Requests that failed (timeout, too many waiting, pool closed...).",
    ),
    "returns_bad": ("returns_bad", "Connections returned broken or in a bad state."),
    "connection_attempts": ("connections_num", "Connection attempts made by the pool."),
    "connection_errors": ("connections_errors", "Connection attempts that failed."),
    "connections_lost": ("connections_lost", "Connections found broken or lost."),
}

# Histogram suffix -> the sample kind it records, and its help text.
HISTOGRAMS: dict[str, tuple[str, str]] = {
    "wait_seconds": ("wait", "Time a client waited in the queue for a connection."),
    "use_seconds": ("use", "Time a connection was out of the pool, in pool.connection()."),
    "connect_seconds": ("create", "Time a successful connection attempt took."),
}


class _Watched:
    """What the collector keeps for one pool."""

    __slots__ = ("feed", "last", "name", "pool")

    def __init__(self, pool: AnyPool) -> None:
        self.pool = pool
        self.name = pool.name
        self.feed = SampleFeed(pool)
        self.last: dict[str, int] = {}  # counter values seen at the previous scrape


class PoolCollector(Collector):
    """Collects the metrics of one or more pools at each scrape.

    `registry`: where to register (default: prometheus_client's global ``REGISTRY``;
    None: don't, e.g. to register it yourself). `prefix` starts every metric name;
    `buckets` are the histograms' upper bounds, in seconds.
    """

    def __init__(
        self,
        *pools: AnyPool,
        registry: CollectorRegistry | None = REGISTRY,
        prefix: str = "psycopg_pool",
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ) -> None:
        self.prefix = prefix
        self._lock = threading.Lock()
        self._pools: dict[str, _Watched] = {}
        # prometheus_client's own metric objects, not registered anywhere: this
        # collector yields them from collect(), fed from the pools' events and stats.
        self._counters = {
            key: Counter(f"{prefix}_{key}", doc, ["pool"], registry=None)
            for key, (_, doc) in COUNTERS.items()
        }
        self._timeouts = Counter(
            f"{prefix}_timeouts", "PoolTimeout errors raised.", ["pool"], registry=None
        )
        self._histograms = {
            kind: Histogram(f"{prefix}_{key}", doc, ["pool"], registry=None, buckets=buckets)
            for key, (kind, doc) in HISTOGRAMS.items()
        }
        for pool in pools:
            self.add_pool(pool)
        self._registry = registry
        if registry is not None:
            registry.register(self)

    def add_pool(self, pool: AnyPool) -> None:
        """Watch one more pool; its name must differ from the watched ones'."""
        check_pool(pool)
        with self._lock:
            if pool.name in self._pools:
                raise ValueError(f"a pool named {pool.name!r} is already watched")
            self._pools[pool.name] = _Watched(pool)

    def remove_pool(self, pool: AnyPool) -> None:
        """Stop watching a pool: its series disappear, its event recording stops."""
        with self._lock:
            w = self._pools.get(pool.name)
            if w is None or w.pool is not pool:
                raise ValueError(f"pool {pool.name!r} is not watched by this collector")
            del self._pools[pool.name]
            w.feed.close()
            for metric in (*self._counters.values(), self._timeouts):
                _forget(metric, w.name)
            for hist in self._histograms.values():
                _forget(hist, w.name)

    def close(self) -> None:
        """Stop watching every pool and leave the registry."""
        with self._lock:
            pools = [w.pool for w in self._pools.values()]
        for pool in pools:
            self.remove_pool(pool)
        if self._registry is not None:
            self._registry.unregister(self)
            self._registry = None

    # ------------------------------------------------------------------
    # The Collector protocol

    def describe(self) -> Iterable[Metric]:
        """The metric names, without reading the pools (for the registry's checks)."""
        return [*self._gauges(), *self._families()]

    def collect(self) -> Iterable[Metric]:
        gauges = self._gauges()
        with self._lock:
            for w in self._pools.values():
                self._update(w, gauges)
            families = self._families()
        return [*gauges, *families]

    # ------------------------------------------------------------------

    def _gauges(self) -> list[GaugeMetricFamily]:
        p = self.prefix
        return [
            GaugeMetricFamily(
                f"{p}_connections",
                "Connections in the pool: idle, in use, being checked or opened.",
                labels=["pool"],
            ),
            GaugeMetricFamily(f"{p}_connections_idle", "Idle connections.", labels=["pool"]),
            GaugeMetricFamily(
                f"{p}_connections_in_use",
                "Connections lent, being checked or being opened.",
                labels=["pool"],
            ),
            GaugeMetricFamily(
                f"{p}_requests_waiting", "Clients waiting for a connection.", labels=["pool"]
            ),
            GaugeMetricFamily(f"{p}_max_size", "The pool's max_size.", labels=["pool"]),
            GaugeMetricFamily(f"{p}_min_size", "The pool's min_size.", labels=["pool"]),
            GaugeMetricFamily(
                f"{p}_connections_connecting",
                "Connection attempts under way (counted in connections).",
                labels=["pool"],
            ),
        ]

    def _families(self) -> list[Metric]:
        metrics: list[Counter | Histogram] = [
            *self._counters.values(),
            self._timeouts,
            *self._histograms.values(),
        ]
        return [family for m in metrics for family in m.collect()]

    def _update(self, w: _Watched, gauges: list[GaugeMetricFamily]) -> None:
        stats = w.pool.get_stats()
        size, idle = stats["pool_size"], stats["pool_available"]
        waiting, pmax, pmin = stats["requests_waiting"], stats["pool_max"], stats["pool_min"]
        connecting = stats["pool_connecting"]
        values = (size, idle, max(size - idle, 0), waiting, pmax, pmin, connecting)
        for family, value in zip(gauges, values, strict=True):
            family.add_metric([w.name], value)

        for key, (stat, _) in COUNTERS.items():
            value = stats.get(stat, 0)
            last = w.last.get(stat, 0)
            # Lower than last time: pop_stats() reset it; all of it is new.
            delta = value - last if value >= last else value
            w.last[stat] = value
            counter = self._counters[key].labels(w.name)
            if delta:
                counter.inc(delta)

        timeouts = self._timeouts.labels(w.name)
        hists = {kind: h.labels(w.name) for kind, h in self._histograms.items()}
        for kind, seconds in w.feed.drain():
            if kind == "timeout":
                timeouts.inc()
            else:
                h = hists.get(kind)
                if h is not None:
                    h.observe(seconds)


def _forget(metric: Counter | Histogram, name: str) -> None:
    try:
        metric.remove(name)
    except KeyError:
        pass
