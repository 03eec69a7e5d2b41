"""``psycopg-pool bench``: load-test a pool configuration, then advise on its size.

Workers (threads, or asyncio tasks) run the query in a loop through one pool for
a fixed time, each as fast as it can (a closed loop). Every operation records how
long the worker waited for a connection and how long it held it. A monitor thread
samples the pool's gauges and refreshes the display; at the end come a summary
table and sizing advice (see `sizing`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

import psycopg

from .._explain import error_text, mask, mask_pieces, password_pieces, without_password
from ..errors import PoolTimeout
from ..pool import ConnectionPool
from ..pool_async import AsyncConnectionPool
from . import argtypes
from . import display as d
from .measure import Histogram, Recent, WorkerRecord
from .sizing import Advice, ServerInfo, advise
from .target import NoServerError, database

APP_NAME = "psycopg-pool bench"
SAMPLE_EVERY = 0.1  # seconds between two looks at the pool's gauges


def add_parser(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "bench",
        help="load-test a pool configuration and get sizing advice",
        description=(
            "Run QUERY in a loop from WORKERS threads or asyncio tasks sharing one pool for"
            " DURATION seconds; show throughput, latency and the pool's gauges live, then a"
            " summary and sizing advice computed from the measurements. Without --dsn or"
            " $DATABASE_URL a throw-away PostgreSQL is started and removed afterwards."
        ),
    )
    p.add_argument(
        "--dsn", help="conninfo or URL (default: $DATABASE_URL, else a throw-away server)"
    )
    p.add_argument(
        "--mode",
        choices=("threads", "asyncio"),
        default="threads",
        help="workers are threads (default) or asyncio tasks",
    )
    p.add_argument(
        "--workers", type=argtypes.positive_int, default=16, help="concurrent clients (16)"
    )
    p.add_argument("--min-size", type=argtypes.natural, default=4, help="pool min_size (4)")
    p.add_argument(
        "--max-size", type=argtypes.positive_int, help="pool max_size (default: min_size)"
    )
    p.add_argument("--query", default="SELECT 1", help="what each operation runs (SELECT 1)")
    p.add_argument("--duration", type=argtypes.seconds, default=10.0, help="seconds (10)")
    p.add_argument(
        "--processes",
        type=argtypes.positive_int,
        default=1,
        help="how many processes will run this pool in production, for the advice (1)",
    )
    p.add_argument(
        "--target-wait",
        type=argtypes.positive_number,
        default=5.0,
        metavar="MS",
        help="the wait for a connection that 95%% of requests should stay under (5 ms)",
    )
    p.add_argument(
        "--timeout", type=argtypes.seconds, default=10.0, help="pool timeout, seconds (10)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object, nothing else")
    p.set_defaults(func=run)


class BenchError(Exception):
    """The benchmark cannot run (no server, the pool cannot fill, the query fails)."""


class Run:
    """The state of one benchmark run, shared by the workers and the monitor."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.workers = args.workers
        self.min_size: int = args.min_size
        self.max_size: int = args.max_size if args.max_size is not None else max(1, args.min_size)
        self.records = [WorkerRecord() for _ in range(self.workers)]
        self.recent = Recent()
        self.stop = threading.Event()  # Ctrl-C, or the end of the duration
        self.started = 0.0
        self.deadline = 0.0
        self.ended = 0.0
        self.fill_seconds = 0.0
        self.stats_fn: Callable[[], dict[str, int]] | None = None
        self.final_stats: dict[str, int] = {}
        self.fill_stats: dict[str, int] = {}
        self.interrupted = False
        # Gauges sampled by the monitor.
        self.samples = 0
        self.busy_sum = 0.0
        self.peak_size = 0
        self.peak_waiting = 0

    def go(self, fill_stats: dict[str, int], stats_fn: Callable[[], dict[str, int]]) -> Monitor:
        """The pool is ready: start the clock and the monitor."""
        self.fill_stats = fill_stats
        self.stats_fn = stats_fn
        monitor = Monitor(self)
        self.started = time.perf_counter()
        self.deadline = self.started + self.args.duration
        monitor.start()
        return monitor

    def done(self, monitor: Monitor) -> None:
        """Every worker has stopped."""
        self.ended = time.perf_counter()
        monitor.finish()
        if self.stats_fn is not None:
            self.final_stats = self.stats_fn()

    def record(self, rec: WorkerRecord, t0: float, t1: float, t2: float) -> None:
        """One operation: asked for a connection at t0, got it at t1, gave it back at t2."""
        rec.add(t1 - t0, t2 - t1)
        self.recent.append(t2 - t0)

    def keep_going(self) -> bool:
        return not self.stop.is_set() and time.perf_counter() < self.deadline

    def ops(self) -> int:
        return sum(r.ops for r in self.records)

    def errors(self) -> int:
        return sum(sum(r.errors.values()) for r in self.records)

    def sample(self) -> dict[str, int]:
        stats = self.stats_fn() if self.stats_fn is not None else {}
        size = stats.get("pool_size", 0)
        self.samples += 1
        self.busy_sum += size - stats.get("pool_available", 0)
        self.peak_size = max(self.peak_size, size)
        self.peak_waiting = max(self.peak_waiting, stats.get("requests_waiting", 0))
        return stats


# ----------------------------------------------------------------------------------
# Workers


def _error_kind(ex: BaseException) -> str:
    return "PoolTimeout" if isinstance(ex, PoolTimeout) else type(ex).__name__


def pool_options(run: Run) -> dict[str, Any]:
    return {
        "min_size": run.min_size,
        "max_size": run.max_size,
        "open": False,
        "name": "bench",
        "timeout": run.args.timeout,
        "kwargs": {"application_name": APP_NAME},
    }


def open_failed(ex: PoolTimeout) -> BenchError:
    return BenchError(f"the pool could not open its connections: {mask(str(ex))}")


def query_failed(ex: psycopg.Error) -> BenchError:
    return BenchError(f"the query fails: {error_text(ex)}")


def run_threads(run: Run, dsn: str) -> None:
    pool: ConnectionPool[Any] = ConnectionPool(dsn, **pool_options(run))
    t0 = time.perf_counter()
    try:
        pool.open(wait=True, timeout=run.args.timeout)
    except PoolTimeout as ex:
        raise open_failed(ex) from None
    run.fill_seconds = time.perf_counter() - t0
    try:
        query = run.args.query
        try:
            with pool.connection() as conn:
                _consume(conn.execute(query))
        except psycopg.Error as ex:
            raise query_failed(ex) from None

        def work(rec: WorkerRecord) -> None:
            clock = time.perf_counter
            while run.keep_going():
                t0 = clock()
                try:
                    with pool.connection() as conn:
                        t1 = clock()
                        _consume(conn.execute(query))
                    t2 = clock()
                except Exception as ex:
                    rec.error(_error_kind(ex), error_text(ex))
                    continue
                run.record(rec, t0, t1, t2)

        threads = [
            threading.Thread(target=work, args=(rec,), name=f"bench-worker-{i}", daemon=True)
            for i, rec in enumerate(run.records)
        ]
        monitor = run.go(pool.pop_stats(), pool.get_stats)
        for t in threads:
            t.start()
        try:
            try:
                for t in threads:
                    while t.is_alive():
                        t.join(0.2)
            except KeyboardInterrupt:
                # The workers finish their query and stop; a second Ctrl-C stops waiting.
                _interrupt(run)
                for t in threads:
                    t.join()
        finally:
            run.done(monitor)  # even then: the display gives the cursor back
    finally:
        pool.close()


def run_asyncio(run: Run, dsn: str) -> None:
    asyncio.run(_run_asyncio(run, dsn))


async def _run_asyncio(run: Run, dsn: str) -> None:
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(dsn, **pool_options(run))
    t0 = time.perf_counter()
    try:
        await pool.open(wait=True, timeout=run.args.timeout)
    except PoolTimeout as ex:
        raise open_failed(ex) from None
    run.fill_seconds = time.perf_counter() - t0
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGINT, _interrupt_tasks, run)
    except (NotImplementedError, RuntimeError, ValueError):
        pass  # not the main thread, or no signals here: Ctrl-C ends the run abruptly
    try:
        query = run.args.query
        try:
            async with pool.connection() as conn:
                await _aconsume(await conn.execute(query))
        except psycopg.Error as ex:
            raise query_failed(ex) from None

        async def work(rec: WorkerRecord) -> None:
            clock = time.perf_counter
            while run.keep_going():
                t0 = clock()
                try:
                    async with pool.connection() as conn:
                        t1 = clock()
                        await _aconsume(await conn.execute(query))
                    t2 = clock()
                except Exception as ex:
                    rec.error(_error_kind(ex), error_text(ex))
                    continue
                run.record(rec, t0, t1, t2)

        monitor = run.go(pool.pop_stats(), pool.get_stats)
        try:
            await asyncio.gather(*(work(rec) for rec in run.records))
        finally:
            run.done(monitor)  # even on a second Ctrl-C: the display gives the cursor back
    finally:
        try:
            loop.remove_signal_handler(signal.SIGINT)
        except (NotImplementedError, RuntimeError, ValueError):
            pass
        await pool.close()


def _interrupt(run: Run) -> None:
    run.interrupted = True
    run.stop.set()


def _interrupt_tasks(run: Run) -> None:
    """Ctrl-C with asyncio: the first lets the tasks finish their query, the second
    stops the run at once (the loop lets a KeyboardInterrupt from a callback through)."""
    if run.interrupted:
        raise KeyboardInterrupt
    _interrupt(run)


def _consume(cur: psycopg.Cursor[Any]) -> None:
    if cur.pgresult is not None and cur.pgresult.ntuples:
        cur.fetchall()


async def _aconsume(cur: psycopg.AsyncCursor[Any]) -> None:
    if cur.pgresult is not None and cur.pgresult.ntuples:
        await cur.fetchall()


# ----------------------------------------------------------------------------------
# The live display


class Monitor:
    """A thread that samples the pool's gauges and refreshes the live display."""

    def __init__(self, run: Run) -> None:
        self.run = run
        args = run.args
        out: TextIO = sys.stdout
        self.display: d.LiveDisplay | None = None
        if not args.json:
            terminal = d.is_terminal(out)
            self.display = d.LiveDisplay(out, terminal)
        self.every = 0.25 if self.display is not None and self.display.terminal else 1.0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bench-monitor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def finish(self) -> None:
        self._done.set()
        self._thread.join()
        if self.display is not None:
            self.display.close()

    def _loop(self) -> None:
        run = self.run
        last_show = last_ops_t = run.started
        last_ops = 0
        while not self._done.wait(SAMPLE_EVERY):
            stats = run.sample()
            now = time.perf_counter()
            if self.display is None or now - last_show < self.every - SAMPLE_EVERY / 2:
                continue
            ops = run.ops()
            rate = (ops - last_ops) / max(1e-9, now - last_ops_t)
            last_ops, last_ops_t, last_show = ops, now, now
            self._show(now - run.started, rate, ops, run.recent.drain(), stats)
        now = time.perf_counter()
        if self.display is not None and now - last_show > self.every / 2:  # the final state
            ops = run.ops()
            elapsed = max(1e-9, run.ended - run.started)
            stats = run.stats_fn() if run.stats_fn is not None else {}
            self._show(elapsed, ops / elapsed, ops, run.recent.drain(), stats)

    def _show(
        self, elapsed: float, rate: float, ops: int, window: Histogram, stats: dict[str, int]
    ) -> None:
        assert self.display is not None
        run = self.run
        args = run.args
        total = args.duration
        elapsed = min(elapsed, total)
        q = {k: d.fmt_ms(window.quantile(v)) for k, v in _LIVE_QUANTILES}
        size = stats.get("pool_size", 0)
        idle = stats.get("pool_available", 0)
        waiting = stats.get("requests_waiting", 0)
        errors = run.errors()
        block = [
            f"bench: {args.mode}, {run.workers} workers, pool {run.min_size}..{run.max_size},"
            f" {_short(args.query)}",
            f"{d.progress_bar(elapsed, total)} {elapsed:5.1f} / {total:g} s",
            f"throughput  {d.fmt_int(rate):>9} queries/s   ({d.fmt_int(ops)} done,"
            f" {d.fmt_int(errors)} errors)",
            f"latency     p50 {q['p50']} ms   p95 {q['p95']} ms   p99 {q['p99']} ms",
            f"pool        size {size}/{run.max_size}   idle {idle}   waiting {waiting}",
        ]
        line = (
            f"[{elapsed:5.1f}/{total:g} s] {d.fmt_int(rate)} queries/s"
            f"  p50 {q['p50']} ms  p95 {q['p95']} ms  p99 {q['p99']} ms"
            f"  pool size {size}/{run.max_size} idle {idle} waiting {waiting}"
            f"  errors {errors}"
        )
        self.display.update(block, line)


_LIVE_QUANTILES = (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))


def _short(query: str, width: int = 40) -> str:
    q = " ".join(query.split())
    return q if len(q) <= width else q[: width - 3] + "..."


# ----------------------------------------------------------------------------------
# Server facts, results, advice


def server_info(dsn: str, timeout: float) -> ServerInfo:
    """Read the connection slots of the server (before the pool opens), waiting for it
    as the DSN says, or as --timeout does if it says nothing."""
    info = ServerInfo()
    kwargs: dict[str, Any] = {}
    if "connect_timeout" not in dsn and not os.environ.get("PGCONNECT_TIMEOUT"):
        kwargs["connect_timeout"] = max(1, math.ceil(timeout))  # libpq takes whole seconds
    try:
        with psycopg.connect(dsn, autocommit=True, **kwargs) as conn:
            row = conn.execute(
                "SELECT current_setting('server_version'),"
                " current_setting('max_connections')::int,"
                " current_setting('superuser_reserved_connections')::int,"
                " coalesce(current_setting('reserved_connections', true)::int, 0),"
                " (SELECT count(*) FROM pg_stat_activity"
                "   WHERE backend_type = 'client backend' AND pid <> pg_backend_pid())::int"
            ).fetchone()
    except psycopg.Error as ex:
        info.error = error_text(without_password(ex, dsn))
        return info
    assert row is not None
    info.version, info.max_connections, su, res, info.others = row
    info.reserved = su + res
    return info


def results(run: Run, server: ServerInfo) -> dict[str, Any]:
    args = run.args
    wait = Histogram.merged([r.wait for r in run.records])
    use = Histogram.merged([r.use for r in run.records])
    latency = Histogram.merged([r.latency for r in run.records])
    elapsed = max(1e-9, run.ended - run.started)
    ops = latency.n
    errors: dict[str, dict[str, Any]] = {}
    for rec in run.records:
        for kind, n in rec.errors.items():
            e = errors.setdefault(kind, {"count": 0, "first": rec.first_errors[kind]})
            e["count"] += n
    stats = dict(run.final_stats)
    for key in ("connections_num", "connections_ms", "connections_errors"):
        if key in run.fill_stats:
            stats[key] = stats.get(key, 0) + run.fill_stats[key]
    nconn = stats.get("connections_num", 0)
    connect_ms = stats.get("connections_ms", 0) / nconn if nconn else None
    sampled_busy = run.busy_sum / run.samples if run.samples else None
    advice = advise(
        max_size=run.max_size,
        min_size=run.min_size,
        ops=ops,
        elapsed=elapsed,
        wait=wait,
        use=use,
        target=args.target_wait / 1000.0,
        processes=args.processes,
        server=server,
        connect_ms=connect_ms,
        sampled_busy=sampled_busy,
    )
    return {
        "config": {
            "mode": args.mode,
            "workers": run.workers,
            "min_size": run.min_size,
            "max_size": run.max_size,
            "query": args.query,
            "duration_s": args.duration,
            "processes": args.processes,
            "target_wait_ms": args.target_wait,
            "timeout_s": args.timeout,
        },
        "server": {
            "version": server.version,
            "max_connections": server.max_connections,
            "reserved_connections": server.reserved,
            "other_connections": server.others,
            "error": server.error,
        },
        "interrupted": run.interrupted,
        "elapsed_s": round(elapsed, 3),
        "queries": ops,
        "errors": errors,
        "throughput_qps": round(ops / elapsed, 1),
        "wait_ms": wait.summary(),
        "use_ms": use.summary(),
        "latency_ms": latency.summary(),
        "pool": {
            "fill_ms": round(run.fill_seconds * 1000, 1),
            "connect_ms": None if connect_ms is None else round(connect_ms, 2),
            "peak_size": run.peak_size,
            "peak_waiting": run.peak_waiting,
            "mean_busy": None if sampled_busy is None else round(sampled_busy, 2),
            "stats": stats,
        },
        "advice": advice,
    }


def summary_lines(res: dict[str, Any]) -> list[str]:
    cfg = res["config"]
    lines = [
        "",
        f"SUMMARY: {d.fmt_int(res['queries'])} queries in {res['elapsed_s']:.2f} s ="
        f" {d.fmt_rate(res['throughput_qps'])} queries/s,"
        f" {d.fmt_int(sum(e['count'] for e in res['errors'].values()))} errors"
        + (" (interrupted)" if res["interrupted"] else ""),
        f"  {cfg['mode']}, {cfg['workers']} workers, min_size {cfg['min_size']},"
        f" max_size {cfg['max_size']}, query: {_short(cfg['query'], 60)}",
        "",
    ]

    def row(label: str, s: dict[str, float | None]) -> list[str]:
        cells = [label]
        for k in _COLS:
            ms = s[k]
            cells.append(d.fmt_ms(None if ms is None else ms / 1000.0))
        return cells

    lines += [
        "  " + x
        for x in d.table(
            [
                row("waiting for a connection", res["wait_ms"]),
                row("holding it (query, commit)", res["use_ms"]),
                row("total, as callers see it", res["latency_ms"]),
            ],
            header=["milliseconds", *_COLS],
        )
    ]
    pool = res["pool"]
    stats = pool["stats"]
    opened = stats.get("connections_num", 0)
    each = f" ({pool['connect_ms']:.3g} ms each)" if pool["connect_ms"] is not None else ""
    lines += [
        "",
        f"  pool: filled to min_size in {pool['fill_ms']:.0f} ms; {opened} connections"
        f" opened{each}, {stats.get('connections_errors', 0)} failed;"
        f" peak size {pool['peak_size']}, peak waiting {pool['peak_waiting']};"
        f" {d.fmt_int(stats.get('requests_queued', 0))} requests had to queue",
    ]
    for kind, e in res["errors"].items():
        lines.append(f"  errors: {d.fmt_int(e['count'])} x {kind}, the first: {e['first']}")
    advice: Advice = res["advice"]
    server = res["server"]
    where = f"PostgreSQL {server['version']}" if server["version"] else "the server"
    lines += [
        "",
        f"SIZING ADVICE (target: 95% of waits under {advice.target_wait_ms:g} ms;"
        f" {advice.processes} process{'es' if advice.processes != 1 else ''}; {where})",
    ]
    width = max((len(t) for t, _ in advice.lines), default=0)
    lines += [f"  {topic.ljust(width)}  {text}" for topic, text in advice.lines]
    return lines


_COLS = ("p50", "p95", "p99", "max", "mean")


def to_json(res: dict[str, Any]) -> str:
    out = dict(res)
    out["advice"] = res["advice"].to_json()
    return json.dumps(out, indent=2)


def run(args: argparse.Namespace) -> int:
    out = sys.stdout
    if args.max_size is not None and args.max_size < args.min_size:
        print("psycopg-pool bench: --max-size must be at least --min-size", file=sys.stderr)
        return 2
    bench = Run(args)
    runner = run_threads if args.mode == "threads" else run_asyncio
    try:
        with database(args.dsn) as (dsn, _embedded):
            server = server_info(dsn, args.timeout)
            runner(bench, dsn)
            res = results(bench, server)
    except (BenchError, NoServerError) as ex:
        text = mask_pieces(mask(str(ex)), password_pieces(args.dsn or ""))
        print(f"psycopg-pool bench: {text}", file=sys.stderr)
        return 1
    if args.json:
        out.write(to_json(res) + "\n")
    else:
        out.write("\n".join(summary_lines(res)) + "\n")
    out.flush()
    return 0 if res["queries"] else 1
