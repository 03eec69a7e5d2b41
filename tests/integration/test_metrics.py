"""Metrics exporters: psycopg_pool.metrics.prometheus and psycopg_pool.metrics.otel.

Real pools (sync and async) on the test server run a known workload; the metrics are
read back through a real prometheus_client registry and a real OpenTelemetry SDK
MeterProvider with an InMemoryMetricReader, and compared with the pool's stats and the
events of the workload.
"""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    Histogram as OtelHistogram,
)
from opentelemetry.sdk.metrics.export import (
    InMemoryMetricReader,
    Sum,
)
from prometheus_client import CollectorRegistry, generate_latest

from psycopg_pool import (
    AsyncConnectionPool,
    ConnectionPool,
    NullConnectionPool,
    PoolTimeout,
)
from psycopg_pool.metrics import otel, prometheus
from psycopg_pool.metrics.otel import PoolMetrics
from psycopg_pool.metrics.prometheus import PoolCollector

from .helpers import (
    ASYNC_TEST_TIMEOUT,
    PoolClient,
    await_until,
    pool_stat,
    wait_until,
)

_names = itertools.count(1)

# The workload (see `run_workload`): what the pool records while an exporter watches.
USES = 5  # `with pool.connection()` blocks
WAITS = 3  # clients that queued: for the 3rd connection, behind a full pool, timed out
TIMEOUTS = 1
CREATES = 3  # connections opened: min_size 2, then grown to max_size 3


def new_name() -> str:
    return f"metrics-{next(_names)}"


Hook = Callable[[Any], None]


def run_workload(
    flavor: str, dsn: str, name: str, attach: Hook, read: Callable[[], Any]
) -> tuple[Any, Any, dict[str, int]]:
    """Run the workload on a new pool (2..3 connections) of the given flavor.

    `attach(pool)` runs before the pool opens. Returns what `read()` returned while 3
    connections were out and 1 client waited, then after all connections came back,
    and the pool's stats at that moment (checked against the workload).
    """
    seen: list[Any] = []

    def burst(pool: Any) -> None:
        seen.append(read())

    def end(pool: Any) -> None:
        stats = pool.get_stats()
        check_workload_stats(stats)
        seen.append(read())
        seen.append(stats)

    if flavor == "sync":
        run_sync(dsn, name, attach, burst, end)
    else:
        asyncio.run(asyncio.wait_for(run_async(dsn, name, attach, burst, end), ASYNC_TEST_TIMEOUT))
    burst_read, end_read, stats = seen
    return burst_read, end_read, stats


def run_sync(dsn: str, name: str, attach: Hook, burst: Hook, end: Hook) -> None:
    pool: ConnectionPool[Any] = ConnectionPool(dsn, min_size=2, max_size=3, name=name, open=False)
    attach(pool)
    try:
        pool.open(wait=True, timeout=10)
        for _ in range(USES):
            with pool.connection() as conn:
                conn.execute("SELECT 1")
        held = [pool.getconn() for _ in range(3)]
        waiter = PoolClient(pool, timeout=10).start()
        wait_until(lambda: pool_stat(pool, "requests_waiting") == 1, "a queued client")
        burst(pool)
        pool.putconn(held.pop())
        waiter.join()
        assert waiter.error is None
        held.append(pool.getconn())
        with pytest.raises(PoolTimeout):
            pool.getconn(timeout=0.05)
        for conn in held:
            pool.putconn(conn)
        wait_until(lambda: pool_stat(pool, "pool_available") == 3, "all connections back")
        end(pool)
    finally:
        pool.close()


async def run_async(dsn: str, name: str, attach: Hook, burst: Hook, end: Hook) -> None:
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        dsn, min_size=2, max_size=3, name=name, open=False
    )
    attach(pool)
    try:
        await pool.open(wait=True, timeout=10)
        for _ in range(USES):
            async with pool.connection() as conn:
                await conn.execute("SELECT 1")
        held = [await pool.getconn() for _ in range(3)]

        async def waiter() -> None:
            conn = await pool.getconn(timeout=10)
            await pool.putconn(conn)

        task = asyncio.create_task(waiter())
        await await_until(lambda: pool_stat(pool, "requests_waiting") == 1, "a queued client")
        burst(pool)
        await pool.putconn(held.pop())
        await task
        held.append(await pool.getconn())
        with pytest.raises(PoolTimeout):
            await pool.getconn(timeout=0.05)
        for conn in held:
            await pool.putconn(conn)
        await await_until(lambda: pool_stat(pool, "pool_available") == 3, "all back")
        end(pool)
    finally:
        await pool.close()


def check_workload_stats(stats: dict[str, int]) -> None:
    """The stats the workload leaves (the exporters are compared with these)."""
    assert stats["pool_size"] == 3
    assert stats["pool_available"] == 3
    assert stats["requests_num"] == USES + 3 + 1 + 1 + 1
    assert stats["requests_queued"] == WAITS
    assert stats["requests_errors"] == TIMEOUTS
    assert stats["connections_num"] == CREATES


# ----------------------------------------------------------------------
# Prometheus


class Prom:
    """Reads one pool's samples from a registry."""

    def __init__(self, registry: CollectorRegistry, name: str) -> None:
        self.registry = registry
        self.name = name

    def __call__(self, metric: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(metric, {"pool": self.name, **labels})

    def gauges(self) -> dict[str, float | None]:
        keys = ("connections", "connections_idle", "connections_in_use", "requests_waiting")
        keys += ("max_size", "min_size", "connections_connecting")
        return {k: self(f"psycopg_pool_{k}") for k in keys}


@pytest.mark.parametrize("flavor", ["sync", "async"])
def test_prometheus_reads_back_stats_and_events(dsn: str, flavor: str) -> None:
    registry = CollectorRegistry()
    collector = PoolCollector(registry=registry)
    name = new_name()
    prom = Prom(registry, name)
    burst_gauges, end_gauges, stats = run_workload(
        flavor, dsn, name, collector.add_pool, prom.gauges
    )

    assert burst_gauges == {
        "connections": 3,
        "connections_idle": 0,
        "connections_in_use": 3,
        "requests_waiting": 1,
        "max_size": 3,
        "min_size": 2,
        "connections_connecting": 0,
    }
    assert end_gauges == {
        "connections": stats["pool_size"],
        "connections_idle": stats["pool_available"],
        "connections_in_use": stats["pool_size"] - stats["pool_available"],
        "requests_waiting": stats["requests_waiting"],
        "max_size": stats["pool_max"],
        "min_size": stats["pool_min"],
        "connections_connecting": stats["pool_connecting"],
    }

    # Counters follow the pool's counters (absent ones are 0).
    for metric, key in [
        ("requests", "requests_num"),
        ("requests_queued", "requests_queued"),
        ("requests_errors", "requests_errors"),
        ("returns_bad", "returns_bad"),
        ("connection_attempts", "connections_num"),
        ("connection_errors", "connections_errors"),
        ("connections_lost", "connections_lost"),
    ]:
        assert prom(f"psycopg_pool_{metric}_total") == stats.get(key, 0), metric
    assert prom("psycopg_pool_timeouts_total") == TIMEOUTS

    # Histograms: one observation per event, sums matching the pool's own totals.
    def hist(metric: str) -> tuple[float | None, float | None, float | None]:
        base = f"psycopg_pool_{metric}_seconds"
        inf = prom(f"{base}_bucket", le="+Inf")
        return prom(f"{base}_count"), prom(f"{base}_sum"), inf

    count, total, inf = hist("wait")
    assert count == inf == WAITS
    assert total == pytest.approx(stats["requests_wait_ms"] / 1000)
    count, total, inf = hist("use")
    assert count == inf == USES
    assert total is not None
    # usage_ms adds up each use truncated to the millisecond.
    assert stats["usage_ms"] / 1000 <= total < stats["usage_ms"] / 1000 + USES * 0.001
    count, total, inf = hist("connect")
    assert count == inf == CREATES
    assert total == pytest.approx(stats["connections_ms"] / 1000)
    # Buckets are cumulative, bounded by the count.
    buckets = [prom("psycopg_pool_connect_seconds_bucket", le=str(b)) for b in (0.001, 60.0)]
    assert buckets[0] is not None and buckets[1] is not None
    assert buckets[0] <= buckets[1] <= CREATES

    collector.close()
    assert prom("psycopg_pool_connections") is None


def test_prometheus_text_exposition(dsn: str) -> None:
    registry = CollectorRegistry()
    name = new_name()
    with ConnectionPool(dsn, min_size=1, name=name) as pool:
        collector = PoolCollector(pool, registry=registry)
        with pool.connection() as conn:
            conn.execute("SELECT 1")
        text = generate_latest(registry).decode()
        collector.close()
    assert "# TYPE psycopg_pool_connections gauge" in text
    assert "# TYPE psycopg_pool_requests_total counter" in text
    assert "# TYPE psycopg_pool_use_seconds histogram" in text
    assert f'psycopg_pool_requests_total{{pool="{name}"}} 1.0' in text
    assert f'psycopg_pool_use_seconds_count{{pool="{name}"}} 1.0' in text
    assert f'psycopg_pool_connections_idle{{pool="{name}"}} 1.0' in text


def test_prometheus_counters_survive_pop_stats(dsn: str) -> None:
    registry = CollectorRegistry()
    name = new_name()
    prom = Prom(registry, name)
    with ConnectionPool(dsn, min_size=1, name=name) as pool:
        collector = PoolCollector(pool, registry=registry)
        for _ in range(3):
            with pool.connection():
                pass
        assert prom("psycopg_pool_requests_total") == 3
        assert pool.pop_stats()["requests_num"] == 3  # someone else resets the counters
        with pool.connection():
            pass
        # Never backwards: the reset counter's new value is added.
        assert prom("psycopg_pool_requests_total") == 4
        with pool.connection():
            pass
        assert prom("psycopg_pool_requests_total") == 5
        collector.close()


def test_prometheus_several_pools_one_collector(dsn: str) -> None:
    registry = CollectorRegistry()
    a, b = new_name(), new_name()
    with (
        ConnectionPool(dsn, min_size=1, name=a) as pa,
        NullConnectionPool(dsn, max_size=2, name=b) as pb,
    ):
        collector = PoolCollector(pa, pb, registry=registry)
        for _ in range(2):
            with pb.connection() as conn:
                conn.execute("SELECT 1")
        assert Prom(registry, a)("psycopg_pool_requests_total") == 0
        assert Prom(registry, b)("psycopg_pool_requests_total") == 2
        # The null pool opens a connection per request: two connect events.
        assert Prom(registry, b)("psycopg_pool_connect_seconds_count") == 2
        assert Prom(registry, b)("psycopg_pool_max_size") == 2

        with pytest.raises(ValueError, match="already watched"):
            collector.add_pool(pa)
        collector.remove_pool(pb)
        assert Prom(registry, b)("psycopg_pool_requests_total") is None
        assert Prom(registry, a)("psycopg_pool_min_size") == 1
        with pytest.raises(ValueError, match="not watched"):
            collector.remove_pool(pb)
        with pytest.raises(TypeError, match="psycopg_pool pool"):
            collector.add_pool(object())  # type: ignore[arg-type]
        collector.close()
    # Out of the registry: nothing left, and the names can be registered again.
    assert generate_latest(registry) == b""
    PoolCollector(registry=registry).close()


def test_prometheus_describe_does_not_drain(dsn: str) -> None:
    registry = CollectorRegistry(auto_describe=True)
    name = new_name()
    with ConnectionPool(dsn, min_size=1, name=name) as pool:
        collector = PoolCollector(pool, registry=None)
        with pool.connection():
            pass
        registry.register(collector)  # calls describe(): the event must stay pending
        assert Prom(registry, name)("psycopg_pool_use_seconds_count") == 1
        with pytest.raises(ValueError, match="Duplicated timeseries"):
            registry.register(PoolCollector(registry=None))
        collector.close()


# ----------------------------------------------------------------------
# OpenTelemetry


@pytest.fixture
def otel_reader() -> Iterator[tuple[MeterProvider, InMemoryMetricReader]]:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    yield provider, reader
    provider.shutdown()


class Otel:
    """One collection of an InMemoryMetricReader, for one pool."""

    def __init__(self, reader: InMemoryMetricReader, name: str) -> None:
        data = reader.get_metrics_data()
        assert data is not None
        self.metrics: dict[str, Any] = {}
        self.scopes = []
        for rm in data.resource_metrics:
            for sm in rm.scope_metrics:
                self.scopes.append(sm)
                for m in sm.metrics:
                    self.metrics[m.name] = m
        self.name = name

    def points(self, metric: str) -> list[Any]:
        m = self.metrics.get(metric)
        if m is None:
            return []  # no data point at all this collection
        return [
            p
            for p in m.data.data_points
            if p.attributes.get("db.client.connection.pool.name") == self.name
        ]

    def value(self, metric: str, **attrs: str) -> Any:
        for p in self.points(metric):
            if all(p.attributes.get(f"db.client.connection.{k}") == v for k, v in attrs.items()):
                return p.value if hasattr(p, "value") else p
        return None

    def gauges(self) -> dict[str, Any]:
        return {
            "idle": self.value("db.client.connection.count", state="idle"),
            "used": self.value("db.client.connection.count", state="used"),
            "idle.max": self.value("db.client.connection.idle.max"),
            "idle.min": self.value("db.client.connection.idle.min"),
            "max": self.value("db.client.connection.max"),
            "pending": self.value("db.client.connection.pending_requests"),
        }


@pytest.mark.parametrize("flavor", ["sync", "async"])
def test_otel_reads_back_stats_and_events(
    dsn: str, flavor: str, otel_reader: tuple[MeterProvider, InMemoryMetricReader]
) -> None:
    provider, reader = otel_reader
    pool_metrics = PoolMetrics(meter_provider=provider)
    name = new_name()
    burst, got, stats = run_workload(
        flavor, dsn, name, pool_metrics.add_pool, lambda: Otel(reader, name)
    )
    burst_gauges = burst.gauges()

    assert burst_gauges == {
        "idle": 0,
        "used": 3,
        "idle.max": 3,
        "idle.min": 2,
        "max": 3,
        "pending": 1,
    }
    assert got.gauges() == {
        "idle": stats["pool_available"],
        "used": stats["pool_size"] - stats["pool_available"],
        "idle.max": stats["pool_max"],
        "idle.min": stats["pool_min"],
        "max": stats["pool_max"],
        "pending": stats["requests_waiting"],
    }
    assert got.value("db.client.connection.timeouts") == TIMEOUTS

    wait = got.value("db.client.connection.wait_time")
    assert wait.count == WAITS
    assert wait.sum == pytest.approx(stats["requests_wait_ms"] / 1000)
    use = got.value("db.client.connection.use_time")
    assert use.count == USES
    assert stats["usage_ms"] / 1000 <= use.sum < stats["usage_ms"] / 1000 + USES * 0.001
    create = got.value("db.client.connection.create_time")
    assert create.count == CREATES
    assert create.sum == pytest.approx(stats["connections_ms"] / 1000)
    assert sum(create.bucket_counts) == CREATES
    assert tuple(create.explicit_bounds) == otel.DEFAULT_BUCKETS

    # Instrument kinds and units, as the semantic conventions give them.
    m = got.metrics
    for key in ("count", "idle.max", "idle.min", "max"):
        metric = m[f"db.client.connection.{key}"]
        assert isinstance(metric.data, Sum) and not metric.data.is_monotonic
        assert metric.unit == "{connection}"
    assert m["db.client.connection.pending_requests"].unit == "{request}"
    timeouts = m["db.client.connection.timeouts"]
    assert isinstance(timeouts.data, Sum) and timeouts.data.is_monotonic
    assert timeouts.unit == "{timeout}"
    for key in ("create_time", "wait_time", "use_time"):
        metric = m[f"db.client.connection.{key}"]
        assert isinstance(metric.data, OtelHistogram)
        assert metric.unit == "s"
    (scope,) = got.scopes
    assert scope.scope.name == "psycopg_pool"
    assert scope.schema_url == otel.SCHEMA_URL

    pool_metrics.close()


def test_otel_names_match_the_semconv_package() -> None:
    db_metrics = pytest.importorskip("opentelemetry.semconv._incubating.metrics.db_metrics")
    db_attrs = pytest.importorskip("opentelemetry.semconv._incubating.attributes.db_attributes")
    for const in (
        "COUNT",
        "IDLE_MAX",
        "IDLE_MIN",
        "MAX",
        "PENDING_REQUESTS",
        "TIMEOUTS",
        "CREATE_TIME",
        "WAIT_TIME",
        "USE_TIME",
    ):
        assert getattr(otel, f"CONNECTION_{const}") == getattr(
            db_metrics, f"DB_CLIENT_CONNECTION_{const}"
        )
    assert otel.POOL_NAME == db_attrs.DB_CLIENT_CONNECTION_POOL_NAME
    assert otel.STATE == db_attrs.DB_CLIENT_CONNECTION_STATE
    states = {v.value for v in db_attrs.DbClientConnectionStateValues}
    assert states == {"idle", "used"}


def test_otel_remove_pool_records_pending_events(
    dsn: str, otel_reader: tuple[MeterProvider, InMemoryMetricReader]
) -> None:
    provider, reader = otel_reader
    name = new_name()
    with ConnectionPool(dsn, min_size=1, name=name) as pool:
        pool_metrics = PoolMetrics(pool, meter_provider=provider)
        assert pool._core.samples == []
        with pool.connection():
            pass
        pool_metrics.remove_pool(pool)
        assert pool._core.samples is None  # recording off again
        got = Otel(reader, name)
        assert got.value("db.client.connection.use_time").count == 1
        assert got.value("db.client.connection.count", state="idle") is None  # not observed
        with pytest.raises(ValueError, match="not observed"):
            pool_metrics.remove_pool(pool)
        pool_metrics.close()


def test_otel_several_pool_metrics_share_a_meter(
    dsn: str, otel_reader: tuple[MeterProvider, InMemoryMetricReader]
) -> None:
    provider, reader = otel_reader
    a, b, c = new_name(), new_name(), new_name()
    with (
        ConnectionPool(dsn, min_size=1, max_size=4, name=a) as pa,
        ConnectionPool(dsn, min_size=1, max_size=5, name=b) as pb,
    ):
        first = PoolMetrics(pa, meter_provider=provider)
        second = PoolMetrics(pb, meter_provider=provider)  # same meter: shared instruments
        assert Otel(reader, a).value("db.client.connection.max") == 4
        assert Otel(reader, b).value("db.client.connection.max") == 5
        with pytest.raises(ValueError, match="already observed"):
            second.add_pool(pa)
        with pytest.raises(ValueError, match="not observed"):
            second.remove_pool(pa)  # first's pool
        with pytest.raises(ValueError, match="buckets"):
            PoolMetrics(meter_provider=provider, buckets=(1.0, 2.0))
        first.close()
        assert Otel(reader, a).value("db.client.connection.max") is None
        assert Otel(reader, b).value("db.client.connection.max") == 5
        # The pool can be observed again, by a new object on the same meter.
        with pa.connection():
            pass
        third = PoolMetrics(pa, meter_provider=provider)
        with pa.connection():
            pass
        assert Otel(reader, a).value("db.client.connection.use_time").count == 1
        with pytest.raises(TypeError, match="psycopg_pool pool"):
            third.add_pool(c)  # type: ignore[arg-type]
        second.close()
        third.close()


# ----------------------------------------------------------------------
# Both, and the cost when off


def test_both_exporters_see_every_event(
    dsn: str, otel_reader: tuple[MeterProvider, InMemoryMetricReader]
) -> None:
    provider, reader = otel_reader
    registry = CollectorRegistry()
    name = new_name()
    prom = Prom(registry, name)
    with ConnectionPool(dsn, min_size=1, name=name) as pool:
        assert pool._core.samples is None  # off by default
        collector = PoolCollector(pool, registry=registry)
        pool_metrics = PoolMetrics(pool, meter_provider=provider)
        with pool.connection():
            pass
        assert prom("psycopg_pool_use_seconds_count") == 1  # Prometheus drains first
        with pool.connection():
            pass
        assert Otel(reader, name).value("db.client.connection.use_time").count == 2
        assert prom("psycopg_pool_use_seconds_count") == 2

        collector.close()
        assert pool._core.samples == []  # still on: OpenTelemetry watches
        with pool.connection():
            pass
        assert Otel(reader, name).value("db.client.connection.use_time").count == 3
        pool_metrics.close()
        assert pool._core.samples is None


def test_importing_psycopg_pool_imports_no_exporter() -> None:
    code = (
        "import sys, psycopg_pool\n"
        "bad = [m for m in sys.modules if m.startswith(('psycopg_pool.metrics',"
        " 'prometheus_client', 'opentelemetry'))]\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert prometheus.__name__ == "psycopg_pool.metrics.prometheus"
