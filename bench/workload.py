"""Run ONE benchmark measurement in the current interpreter and print one JSON line.

This script is started by ``bench/run.py`` once per measurement, with the Python of
the venv under test: ``import psycopg_pool`` resolves to whatever that venv has
installed (our package or upstream's), which is how two implementations sharing an
import name are compared.

Usage::

    python bench/workload.py --dsn DSN --scenario NAME --params '{"...": ...}'
    python bench/workload.py --info

Every loop here is bounded both in time (a deadline) and in count (a cap), so a
measurement always ends even if the pool under test misbehaves.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg

Params = dict[str, Any]
Metrics = dict[str, Any]

clock = time.perf_counter

# Upper bound on requests issued by one worker in one measurement (besides the deadline).
MAX_OPS_PER_WORKER = 5_000_000
# Cycles per timed batch in the overhead scenario.
OVERHEAD_BATCH = 2_000
# Timeout passed to every pool checkout: a stuck pool fails the run instead of hanging it.
CHECKOUT_TIMEOUT = 60.0


# --------------------------------------------------------------------------------------
# helpers


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (q in 0..100)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), round(q / 100.0 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


def env_info() -> dict[str, Any]:
    """Versions of what this interpreter imports."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "python_impl": platform.python_implementation(),
        "executable": sys.executable,
        "psycopg": psycopg.__version__,
        "psycopg_impl": psycopg.pq.__impl__,
        "libpq": psycopg.pq.version(),
    }
    try:
        import psycopg_pool
    except Exception as ex:  # report it: the driver says so clearly
        info["psycopg_pool_error"] = f"{type(ex).__name__}: {ex}"
    else:
        info["psycopg_pool"] = getattr(psycopg_pool, "__version__", "?")
        info["psycopg_pool_file"] = getattr(psycopg_pool, "__file__", "?")
    try:
        import sqlalchemy
    except ImportError:
        pass
    else:
        info["sqlalchemy"] = sqlalchemy.__version__
    try:
        import asyncpg
    except ImportError:
        pass
    else:
        info["asyncpg"] = asyncpg.__version__
    return info


def activity_snapshot(monitor: psycopg.Connection[Any], pids: list[int]) -> dict[int, str]:
    """Server-side view of the given backends: when each last changed state.

    Any statement a backend runs moves it idle -> active -> idle and bumps
    ``state_change``; a connection that sent nothing keeps the same timestamp.
    """
    rows = monitor.execute(
        "SELECT pid, state_change::text FROM pg_stat_activity WHERE pid = ANY(%s)", [pids]
    ).fetchall()
    return {int(pid): str(ts) for pid, ts in rows}


def latency_metrics(per_worker: list[tuple[list[float], list[float]]], window: float) -> Metrics:
    """Aggregate (latencies, waits) lists collected by each worker over `window` s."""
    lat = sorted(x for lats, _ in per_worker for x in lats)
    waits = sorted(x for _, ws in per_worker for x in ws)
    counts = [len(lats) for lats, _ in per_worker]
    n = len(lat)
    return {
        "ops": n,
        "window_s": window,
        "throughput": n / window if window > 0 else 0.0,
        "lat_p50_ms": percentile(lat, 50) * 1e3,
        "lat_p99_ms": percentile(lat, 99) * 1e3,
        "lat_max_ms": (lat[-1] if lat else float("nan")) * 1e3,
        "wait_p50_ms": percentile(waits, 50) * 1e3,
        "wait_p99_ms": percentile(waits, 99) * 1e3,
        "wait_max_ms": (waits[-1] if waits else float("nan")) * 1e3,
        "worker_ops_min": min(counts) if counts else 0,
        "worker_ops_median": statistics.median(counts) if counts else 0,
        "workers_idle": sum(1 for c in counts if c == 0),
    }


# --------------------------------------------------------------------------------------
# overhead: checkout + return with no query


def _floor_sync(duration: float) -> float:
    """µs per cycle of the floor: a lock around a deque pop, and again around an append."""
    lock = threading.Lock()
    items: deque[object] = deque(object() for _ in range(4))
    per_batch: list[float] = []
    deadline = clock() + duration
    for _ in range(10_000):
        t0 = clock()
        for _ in range(OVERHEAD_BATCH):
            with lock:
                x = items.popleft()
            with lock:
                items.append(x)
        t1 = clock()
        per_batch.append((t1 - t0) / OVERHEAD_BATCH)
        if t1 >= deadline:
            break
    return min(per_batch) * 1e6


def _timed_batches(step: Callable[[], None], warmup: float, duration: float) -> list[float]:
    """Run `step` (OVERHEAD_BATCH cycles) repeatedly; return µs/cycle of each timed batch."""
    end_warm = clock() + warmup
    for _ in range(100_000):
        step()
        if clock() >= end_warm:
            break
    out: list[float] = []
    deadline = clock() + duration
    for _ in range(100_000):
        t0 = clock()
        step()
        t1 = clock()
        out.append((t1 - t0) / OVERHEAD_BATCH * 1e6)
        if t1 >= deadline:
            break
    return out


async def _atimed_batches(
    step: Callable[[], Awaitable[None]], warmup: float, duration: float
) -> list[float]:
    end_warm = clock() + warmup
    for _ in range(100_000):
        await step()
        if clock() >= end_warm:
            break
    out: list[float] = []
    deadline = clock() + duration
    for _ in range(100_000):
        t0 = clock()
        await step()
        t1 = clock()
        out.append((t1 - t0) / OVERHEAD_BATCH * 1e6)
        if t1 >= deadline:
            break
    return out


def _overhead_result(
    batches: list[float], before: dict[int, str], after: dict[int, str], floor: float
) -> Metrics:
    changed = sum(1 for pid, ts in before.items() if after.get(pid) != ts)
    return {
        # best batch, as timeit advises: slower batches are other processes' doing
        "us_per_cycle": min(batches),
        "us_per_cycle_median": statistics.median(batches),
        "us_per_cycle_mean": statistics.fmean(batches),
        "cycles": len(batches) * OVERHEAD_BATCH,
        "backends_watched": len(before),
        # > 0 means some pool connection ran a statement during the timed loop
        "backends_with_activity": changed,
        "floor_us": floor,
    }


def scenario_overhead(dsn: str, p: Params) -> Metrics:
    from psycopg_pool import AsyncConnectionPool, ConnectionPool

    size = int(p.get("size", 4))
    mode = str(p["mode"])  # "with" | "getconn"
    warmup, duration = float(p.get("warmup", 0.2)), float(p.get("duration", 1.0))
    floor = _floor_sync(min(0.3, duration))

    with psycopg.connect(dsn, autocommit=True) as monitor:
        if p["kind"] == "sync":
            pool = ConnectionPool(dsn, min_size=size, max_size=size, open=False)
            pool.open(wait=True, timeout=CHECKOUT_TIMEOUT)
            try:
                conns = [pool.getconn() for _ in range(size)]
                pids = [c.info.backend_pid for c in conns]
                for c in conns:
                    pool.putconn(c)

                def step_with() -> None:
                    for _ in range(OVERHEAD_BATCH):
                        with pool.connection():
                            pass

                def step_getconn() -> None:
                    for _ in range(OVERHEAD_BATCH):
                        pool.putconn(pool.getconn())

                before = activity_snapshot(monitor, pids)
                step = step_with if mode == "with" else step_getconn
                batches = _timed_batches(step, warmup, duration)
                after = activity_snapshot(monitor, pids)
            finally:
                pool.close()
            return _overhead_result(batches, before, after, floor)

        async def arun() -> Metrics:
            apool = AsyncConnectionPool(dsn, min_size=size, max_size=size, open=False)
            await apool.open(wait=True, timeout=CHECKOUT_TIMEOUT)
            try:
                aconns = [await apool.getconn() for _ in range(size)]
                pids = [c.info.backend_pid for c in aconns]
                for c in aconns:
                    await apool.putconn(c)

                async def step_with() -> None:
                    for _ in range(OVERHEAD_BATCH):
                        async with apool.connection():
                            pass

                async def step_getconn() -> None:
                    for _ in range(OVERHEAD_BATCH):
                        await apool.putconn(await apool.getconn())

                before = activity_snapshot(monitor, pids)
                step = step_with if mode == "with" else step_getconn
                batches = await _atimed_batches(step, warmup, duration)
                after = activity_snapshot(monitor, pids)
            finally:
                await apool.close()
            return _overhead_result(batches, before, after, floor)

        return asyncio.run(arun())


# --------------------------------------------------------------------------------------
# request loops shared by select1, churn and the peers
#
# A "request" is a function returning (t_got_connection, t_done). The loop counts the
# requests completed inside the measurement window (throughput, latency = t_done - t0),
# and records the wait (t_got - t0) of every request served inside or after the window:
# a waiter stuck since the warm-up, or still queued when the window closes, shows up.

SyncRequest = Callable[[], tuple[float, float]]
AsyncRequest = Callable[[], Awaitable[tuple[float, float]]]


def _sample_cpu(window: list[float]) -> tuple[threading.Thread, list[float]]:
    """Read the process's CPU time at each moment of `window`, from a sleeping thread.

    Client CPU per request tells whether the client was CPU-bound, and what the pool
    adds to each request where it was (the asyncio cases).
    """
    cpu: list[float] = []

    def sample() -> None:
        for t in window:
            delay = t - clock()
            if delay > 0:
                time.sleep(delay)
            cpu.append(time.process_time())

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    return th, cpu


def _with_cpu(m: Metrics, sampler: threading.Thread, cpu: list[float]) -> Metrics:
    sampler.join(timeout=5)
    if len(cpu) == 2 and m["ops"]:
        m["cpu_us_per_op"] = (cpu[1] - cpu[0]) / m["ops"] * 1e6
    return m


def run_threads(requests: list[SyncRequest], warmup: float, duration: float) -> Metrics:
    """One thread per request function, all released at once, for warmup + duration."""
    n = len(requests)
    results: list[tuple[list[float], list[float]]] = [([], []) for _ in range(n)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(n + 1)
    window: list[float] = []  # [t_start, t_end], set before the barrier opens

    def worker(i: int) -> None:
        lats, waits = results[i]
        req = requests[i]
        try:
            barrier.wait()
            t_start, t_end = window
            for _ in range(MAX_OPS_PER_WORKER):
                t0 = clock()
                if t0 >= t_end:
                    break
                t1, t2 = req()
                if t1 >= t_start:  # got its connection in the window, or after it
                    waits.append(t1 - t0)
                if t_start <= t2 < t_end:  # completed in the window
                    lats.append(t2 - t0)
        except BaseException as ex:
            errors.append(ex)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    now = clock()
    window.extend([now + warmup, now + warmup + duration])
    sampler, cpu = _sample_cpu(window)
    barrier.wait()
    for t in threads:
        t.join(timeout=warmup + duration + CHECKOUT_TIMEOUT + 30)
    if errors:
        raise errors[0]
    if any(t.is_alive() for t in threads):
        raise RuntimeError("worker threads did not stop in time")
    return _with_cpu(latency_metrics(results, duration), sampler, cpu)


async def run_tasks(requests: list[AsyncRequest], warmup: float, duration: float) -> Metrics:
    """One task per request function, all released at once, for warmup + duration."""
    n = len(requests)
    results: list[tuple[list[float], list[float]]] = [([], []) for _ in range(n)]
    go = asyncio.Event()
    window: list[float] = []

    async def worker(i: int) -> None:
        lats, waits = results[i]
        req = requests[i]
        await go.wait()
        t_start, t_end = window
        for _ in range(MAX_OPS_PER_WORKER):
            t0 = clock()
            if t0 >= t_end:
                break
            t1, t2 = await req()
            if t1 >= t_start:  # got its connection in the window, or after it
                waits.append(t1 - t0)
            if t_start <= t2 < t_end:  # completed in the window
                lats.append(t2 - t0)

    tasks = [asyncio.create_task(worker(i)) for i in range(n)]
    await asyncio.sleep(0)  # let every task reach go.wait()
    now = clock()
    window.extend([now + warmup, now + warmup + duration])
    sampler, cpu = _sample_cpu(window)
    go.set()
    await asyncio.wait_for(
        asyncio.gather(*tasks), timeout=warmup + duration + CHECKOUT_TIMEOUT + 30
    )
    return _with_cpu(latency_metrics(results, duration), sampler, cpu)


def _pool_request(pool: Any) -> SyncRequest:
    # `with pool.connection()` commits on exit when a transaction is open, so the
    # non-autocommit case costs a COMMIT round trip, as in the baseline.
    def req() -> tuple[float, float]:
        with pool.connection(timeout=CHECKOUT_TIMEOUT) as conn:
            t1 = clock()
            conn.execute("SELECT 1").fetchone()
        return t1, clock()

    return req


def _apool_request(pool: Any) -> AsyncRequest:
    async def req() -> tuple[float, float]:
        async with pool.connection(timeout=CHECKOUT_TIMEOUT) as conn:
            t1 = clock()
            await (await conn.execute("SELECT 1")).fetchone()
        return t1, clock()

    return req


def _pool_kwargs(p: Params) -> dict[str, Any]:
    kw: dict[str, Any] = {
        "min_size": int(p["min_size"] if "min_size" in p else p["max_size"]),
        "max_size": int(p["max_size"]),
        "kwargs": {"autocommit": bool(p.get("autocommit", True))},
        "timeout": CHECKOUT_TIMEOUT,
    }
    for k in ("max_lifetime", "max_idle"):
        if k in p:
            kw[k] = float(p[k])
    return kw


def scenario_select1(dsn: str, p: Params) -> Metrics:
    """SELECT 1 from `workers` threads/tasks through a pool (or dedicated connections)."""
    workers, max_size = int(p["workers"]), int(p["max_size"])
    autocommit = bool(p.get("autocommit", True))
    warmup, duration = float(p.get("warmup", 0.3)), float(p.get("duration", 1.0))
    baseline = p.get("mode") == "baseline"
    n_base = min(workers, max_size)

    if p["kind"] == "sync":
        if baseline:
            return _baseline_sync(dsn, n_base, autocommit, warmup, duration)
        from psycopg_pool import ConnectionPool

        pool = ConnectionPool(dsn, open=False, **_pool_kwargs(p))
        pool.open(wait=True, timeout=CHECKOUT_TIMEOUT)
        try:
            m = run_threads([_pool_request(pool)] * workers, warmup, duration)
            m["connections_opened"] = pool.get_stats().get("connections_num")
            if p.get("share"):
                m.update(_share_sync(dsn, pool, workers, max_size, autocommit))
        finally:
            pool.close()
        return m

    async def arun() -> Metrics:
        if baseline:
            return await _baseline_async(dsn, n_base, autocommit, warmup, duration)
        from psycopg_pool import AsyncConnectionPool

        apool = AsyncConnectionPool(dsn, open=False, **_pool_kwargs(p))
        await apool.open(wait=True, timeout=CHECKOUT_TIMEOUT)
        try:
            m = await run_tasks([_apool_request(apool)] * workers, warmup, duration)
            m["connections_opened"] = apool.get_stats().get("connections_num")
            if p.get("share"):
                m.update(await _share_async(dsn, apool, workers, max_size, autocommit))
        finally:
            await apool.close()
        return m

    return asyncio.run(arun())


# --------------------------------------------------------------------------------------
# select1, share of the no-pool limit measured in one process
#
# Separate runs of the pool and of its baseline land in different machine states (on 2
# shared cores, thread runs of the same case differ by up to 2x from one process to
# the next), so their ratio mostly measures that. Here the pool, the dedicated
# connections and a bare FIFO of connections (the least any pool must do) take turns
# in short slices, A B C C B A ..., in the same process.

SHARE_SLICE = 0.2  # seconds per slice
SHARE_ROUNDS = 4  # each mode gets this many slices


class _SyncFifo:
    """A locked deque of connections; waiters are served in arrival order."""

    def __init__(self, conns: list[Any]) -> None:
        self._lock = threading.Lock()
        self._idle: deque[Any] = deque(conns)
        self._waiters: deque[tuple[threading.Lock, list[Any]]] = deque()

    def get(self) -> Any:
        with self._lock:
            if self._idle:
                return self._idle.popleft()
            gate = threading.Lock()
            box: list[Any] = []
            gate.acquire()
            self._waiters.append((gate, box))
        if not gate.acquire(timeout=CHECKOUT_TIMEOUT):
            raise RuntimeError("the bare FIFO did not serve a waiter in time")
        return box[0]

    def put(self, conn: Any) -> None:
        with self._lock:
            if not self._waiters:
                self._idle.append(conn)
                return
            gate, box = self._waiters.popleft()
        box.append(conn)
        gate.release()


class _AsyncFifo:
    """A deque of connections and one future per waiter, served in arrival order."""

    def __init__(self, conns: list[Any]) -> None:
        self._idle: deque[Any] = deque(conns)
        self._waiters: deque[asyncio.Future[Any]] = deque()

    async def get(self) -> Any:
        if self._idle:
            return self._idle.popleft()
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        return await fut

    def put(self, conn: Any) -> None:
        if self._waiters:
            self._waiters.popleft().set_result(conn)
        else:
            self._idle.append(conn)


def _busy(n: int) -> None:
    for _ in range(n):
        pass


def _fifo_request(fifo: _SyncFifo, autocommit: bool, busy: int = 0) -> SyncRequest:
    """A request through the bare FIFO; `busy` adds that many empty loop turns."""

    def req() -> tuple[float, float]:
        conn = fifo.get()
        try:
            _busy(busy)
            t1 = clock()
            conn.execute("SELECT 1").fetchone()
            if not autocommit:
                conn.commit()
        finally:
            fifo.put(conn)
        return t1, clock()

    return req


def _afifo_request(fifo: _AsyncFifo, autocommit: bool, busy: int = 0) -> AsyncRequest:
    async def req() -> tuple[float, float]:
        conn = await fifo.get()
        try:
            _busy(busy)
            t1 = clock()
            await (await conn.execute("SELECT 1")).fetchone()
            if not autocommit:
                await conn.commit()
        finally:
            fifo.put(conn)
        return t1, clock()

    return req


def _share_order(modes: list[str]) -> list[str]:
    """Each mode SHARE_ROUNDS times, every other round reversed (A B C C B A ...)."""
    return [m for r in range(SHARE_ROUNDS) for m in (modes if r % 2 == 0 else modes[::-1])]


def _share_metrics(ops: dict[str, int], seconds: dict[str, float]) -> Metrics:
    qps = {m: ops[m] / seconds[m] for m in ops}
    base = qps["baseline"]
    return {
        "share_qps": qps,
        "share": qps["pool"] / base if base else None,
        "fifo_share": qps["fifo"] / base if base else None,
    }


def _share_sync(dsn: str, pool: Any, workers: int, max_size: int, autocommit: bool) -> Metrics:
    n_base = min(workers, max_size)
    dedicated = [psycopg.connect(dsn, autocommit=autocommit) for _ in range(n_base)]
    fifo_conns = [psycopg.connect(dsn, autocommit=autocommit) for _ in range(max_size)]
    fifo = _SyncFifo(fifo_conns)
    try:
        reqs: dict[str, list[SyncRequest]] = {
            "pool": [_pool_request(pool)] * workers,
            "baseline": [_dedicated_request(c, autocommit) for c in dedicated],
            "fifo": [_fifo_request(fifo, autocommit)] * workers,
        }
        ops = dict.fromkeys(reqs, 0)
        seconds = dict.fromkeys(reqs, 0.0)
        for mode in _share_order(list(reqs)):
            m = run_threads(reqs[mode], 0.02, SHARE_SLICE)
            ops[mode] += m["ops"]
            seconds[mode] += SHARE_SLICE
    finally:
        for c in dedicated + fifo_conns:
            c.close()
    return _share_metrics(ops, seconds)


async def _share_async(
    dsn: str, pool: Any, workers: int, max_size: int, autocommit: bool
) -> Metrics:
    connect = psycopg.AsyncConnection.connect
    dedicated = [await connect(dsn, autocommit=autocommit) for _ in range(min(workers, max_size))]
    fifo_conns = [await connect(dsn, autocommit=autocommit) for _ in range(max_size)]
    fifo = _AsyncFifo(fifo_conns)
    try:
        reqs: dict[str, list[AsyncRequest]] = {
            "pool": [_apool_request(pool)] * workers,
            "baseline": [_adedicated_request(c, autocommit) for c in dedicated],
            "fifo": [_afifo_request(fifo, autocommit)] * workers,
        }
        ops = dict.fromkeys(reqs, 0)
        seconds = dict.fromkeys(reqs, 0.0)
        for mode in _share_order(list(reqs)):
            m = await run_tasks(reqs[mode], 0.02, SHARE_SLICE)
            ops[mode] += m["ops"]
            seconds[mode] += SHARE_SLICE
    finally:
        for c in dedicated + fifo_conns:
            await c.close()
    return _share_metrics(ops, seconds)


def _dedicated_request(conn: psycopg.Connection[Any], autocommit: bool) -> SyncRequest:
    def req() -> tuple[float, float]:
        t1 = clock()
        conn.execute("SELECT 1").fetchone()
        if not autocommit:
            conn.commit()
        return t1, clock()

    return req


def _adedicated_request(conn: psycopg.AsyncConnection[Any], autocommit: bool) -> AsyncRequest:
    async def req() -> tuple[float, float]:
        t1 = clock()
        await (await conn.execute("SELECT 1")).fetchone()
        if not autocommit:
            await conn.commit()
        return t1, clock()

    return req


def _baseline_sync(dsn: str, n: int, autocommit: bool, warmup: float, duration: float) -> Metrics:
    """The no-pool limit: n workers, each looping on its own dedicated connection."""
    conns = [psycopg.connect(dsn, autocommit=autocommit) for _ in range(n)]
    try:
        m = run_threads([_dedicated_request(c, autocommit) for c in conns], warmup, duration)
    finally:
        for c in conns:
            c.close()
    m["connections_opened"] = n
    return m


async def _baseline_async(
    dsn: str, n: int, autocommit: bool, warmup: float, duration: float
) -> Metrics:
    conns = [await psycopg.AsyncConnection.connect(dsn, autocommit=autocommit) for _ in range(n)]
    try:
        m = await run_tasks([_adedicated_request(c, autocommit) for c in conns], warmup, duration)
    finally:
        for c in conns:
            await c.close()
    m["connections_opened"] = n
    return m


# --------------------------------------------------------------------------------------
# churn: short max_lifetime / max_idle under steady load


def scenario_churn(dsn: str, p: Params) -> Metrics:
    """select1 on a pool whose connections expire quickly; the start is included."""
    q = dict(p)
    q.setdefault("warmup", 0.0)
    q.setdefault("min_size", 2)
    q.setdefault("max_size", 8)
    q.setdefault("workers", 8)
    q.setdefault("max_lifetime", 0.5)
    q.setdefault("max_idle", 0.5)
    return scenario_select1(dsn, q)


# --------------------------------------------------------------------------------------
# burst: empty pool, many clients arriving at once


def _all_at_once(n: int, fn: Callable[[int], None]) -> None:
    """Run fn(0..n-1) in n threads released together; re-raise the first error."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(n)

    def worker(i: int) -> None:
        try:
            barrier.wait()
            fn(i)
        except BaseException as ex:
            errors.append(ex)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=CHECKOUT_TIMEOUT + 30)
    if errors:
        raise errors[0]
    if any(t.is_alive() for t in threads):
        raise RuntimeError("burst threads did not finish in time")


def _one_burst_pool(
    dsn: str, max_size: int, workers: int, hold: float, num_workers: int = 3
) -> Metrics:
    from psycopg_pool import ConnectionPool

    pool = ConnectionPool(
        dsn,
        min_size=0,
        max_size=max_size,
        open=False,
        timeout=CHECKOUT_TIMEOUT,
        num_workers=num_workers,
    )
    pool.open()
    starts, got, ends = [0.0] * workers, [0.0] * workers, [0.0] * workers

    def client(i: int) -> None:
        starts[i] = clock()
        with pool.connection(timeout=CHECKOUT_TIMEOUT):
            got[i] = clock()
            time.sleep(hold)
        ends[i] = clock()

    try:
        _all_at_once(workers, client)
        opened = pool.get_stats().get("connections_num")
    finally:
        pool.close()
    return {
        "serve_s": max(ends) - min(starts),
        "wait_max_ms": max(g - s for g, s in zip(got, starts, strict=True)) * 1e3,
        "connections_opened": opened,
    }


def _one_burst_baseline(
    dsn: str, max_size: int, workers: int, hold: float, num_workers: int = 3
) -> Metrics:
    """max_size plain connects in parallel, each then serving workers/max_size holds."""
    per_conn = -(-workers // max_size)
    starts, ends = [0.0] * max_size, [0.0] * max_size

    def client(i: int) -> None:
        starts[i] = clock()
        with psycopg.connect(dsn, connect_timeout=int(CHECKOUT_TIMEOUT)):
            for _ in range(per_conn):
                time.sleep(hold)
            ends[i] = clock()

    _all_at_once(max_size, client)
    return {"serve_s": max(ends) - min(starts), "wait_max_ms": 0.0, "connections_opened": max_size}


def scenario_burst(dsn: str, p: Params) -> Metrics:
    max_size, workers = int(p.get("max_size", 32)), int(p.get("workers", 64))
    hold, reps = float(p.get("hold", 0.05)), int(p.get("reps", 3))
    one = _one_burst_baseline if p.get("mode") == "baseline" else _one_burst_pool
    runs: list[Metrics] = []
    for i in range(max(1, reps)):
        if i:
            time.sleep(0.2)  # let the previous burst's backends exit
        runs.append(one(dsn, max_size, workers, hold, int(p.get("num_workers", 3))))
    serve = [r["serve_s"] for r in runs]
    return {
        "serve_s": statistics.median(serve),
        "serve_s_min": min(serve),
        "serve_s_max": max(serve),
        "wait_max_ms": max(r["wait_max_ms"] for r in runs),
        "connections_opened": max(int(r["connections_opened"] or 0) for r in runs),
        "reps": len(runs),
    }


# --------------------------------------------------------------------------------------
# peers, for context only (not compared A/B): SQLAlchemy's QueuePool over psycopg,
# and asyncpg's Pool


def scenario_peer_sqlalchemy(dsn: str, p: Params) -> Metrics:
    from sqlalchemy.pool import QueuePool

    max_size = int(p["max_size"])
    autocommit = bool(p.get("autocommit", True))
    warmup, duration = float(p.get("warmup", 0.3)), float(p.get("duration", 1.0))

    def creator() -> Any:  # SQLAlchemy types it as a DBAPI connection, psycopg's is not
        return psycopg.connect(dsn, autocommit=autocommit)

    qp = QueuePool(
        creator,
        pool_size=max_size,
        max_overflow=0,
        timeout=CHECKOUT_TIMEOUT,
    )
    try:
        held = [qp.connect() for _ in range(max_size)]  # fill the pool up front
        for c in held:
            c.close()
        if p.get("what") == "overhead":

            def step() -> None:
                for _ in range(OVERHEAD_BATCH):
                    qp.connect().close()

            batches = _timed_batches(step, warmup, duration)
            return {
                "us_per_cycle": min(batches),
                "us_per_cycle_median": statistics.median(batches),
                "cycles": len(batches) * OVERHEAD_BATCH,
            }

        def req() -> tuple[float, float]:
            fairy = qp.connect()
            try:
                t1 = clock()
                cur = fairy.cursor()
                cur.execute("SELECT 1")
                cur.fetchone()
                if not autocommit:
                    fairy.commit()
            finally:
                fairy.close()
            return t1, clock()

        return run_threads([req] * int(p["workers"]), warmup, duration)
    finally:
        qp.dispose()


# asyncpg is a different driver (its own protocol code, not libpq): its numbers
# measure the driver with its pool, not a pool alone.


async def _no_reset(conn: Any) -> None:
    """Release without asyncpg's default reset query, a round trip per release
    (psycopg_pool runs none for an idle connection either)."""


def scenario_peer_asyncpg(dsn: str, p: Params) -> Metrics:
    import asyncpg
    from psycopg.conninfo import conninfo_to_dict

    size = int(p["max_size"])
    warmup, duration = float(p.get("warmup", 0.3)), float(p.get("duration", 1.0))
    params = conninfo_to_dict(dsn)
    connect_kwargs = {
        "host": params.get("host"),
        "port": int(params["port"]) if params.get("port") else None,
        "user": params.get("user"),
        "database": params.get("dbname"),
        "password": params.get("password"),
    }

    async def arun() -> Metrics:
        pool = await asyncpg.create_pool(
            min_size=size, max_size=size, reset=_no_reset, **connect_kwargs
        )
        try:
            if p.get("what") == "overhead":

                async def step() -> None:
                    for _ in range(OVERHEAD_BATCH):
                        async with pool.acquire():
                            pass

                batches = await _atimed_batches(step, warmup, duration)
                return {
                    "us_per_cycle": min(batches),
                    "us_per_cycle_median": statistics.median(batches),
                    "cycles": len(batches) * OVERHEAD_BATCH,
                }

            async def req() -> tuple[float, float]:
                async with pool.acquire(timeout=CHECKOUT_TIMEOUT) as conn:
                    t1 = clock()
                    await conn.fetchval("SELECT 1")
                return t1, clock()

            return await run_tasks([req] * int(p["workers"]), warmup, duration)
        finally:
            await pool.close()

    return asyncio.run(arun())


SCENARIOS: dict[str, Callable[[str, Params], Metrics]] = {
    "overhead": scenario_overhead,
    "select1": scenario_select1,
    "burst": scenario_burst,
    "churn": scenario_churn,
    "peer_sqlalchemy": scenario_peer_sqlalchemy,
    "peer_asyncpg": scenario_peer_asyncpg,
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dsn", default="")
    ap.add_argument("--scenario", choices=sorted(SCENARIOS))
    ap.add_argument("--params", default="{}", help="JSON object of scenario parameters")
    ap.add_argument("--info", action="store_true", help="print versions as JSON and exit")
    args = ap.parse_args(argv)

    if args.info:
        print(json.dumps({"ok": True, "env": env_info()}), flush=True)
        return 0
    if not args.scenario:
        ap.error("--scenario is required")
    params = json.loads(args.params)
    out: dict[str, Any] = {"scenario": args.scenario, "params": params}
    try:
        out["metrics"] = SCENARIOS[args.scenario](args.dsn, params)
        out["ok"] = True
    except Exception as ex:
        traceback.print_exc()
        out["ok"] = False
        out["error"] = f"{type(ex).__name__}: {ex}"
    print(json.dumps(out), flush=True)
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
