"""Render the raw results of ``bench/run.py`` as BENCHMARKS.md (markdown)."""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from cases import BASE, OURS, PEER, UPSTREAM

Metrics = dict[str, Any]
Stat = tuple[float, float, float]  # median, min, max

# A waiter is counted as starved when its wait exceeds this many "rotations" (the time
# the pool needs to serve every worker once: workers / throughput), plus a small slack.
STARVED_ROTATIONS = 4.0
STARVED_SLACK_MS = 20.0
SHARE_SLICE_TEXT = "4 x 0.2 s"  # workload.SHARE_ROUNDS x workload.SHARE_SLICE


class Results:
    def __init__(self, data: dict[str, Any]):
        self.data = data
        self.cases: dict[str, dict[str, Any]] = {c["key"]: c for c in data["cases"]}
        self.by: dict[tuple[str, str], dict[int, Metrics]] = defaultdict(dict)
        self.errors: dict[tuple[str, str], list[str]] = defaultdict(list)
        for r in data["runs"]:
            if r["ok"]:
                self.by[r["key"], r["side"]][r["pair"]] = r["metrics"]
            else:
                self.errors[r["key"], r["side"]].append(str(r.get("error")))

    def values(self, key: str, side: str, metric: str) -> list[float]:
        return [
            float(m[metric])
            for _, m in sorted(self.by[key, side].items())
            if isinstance(m.get(metric), (int, float))
        ]

    def median(self, key: str, side: str, metric: str) -> float | None:
        v = self.values(key, side, metric)
        return statistics.median(v) if v else None

    def spread(self, key: str, side: str, metric: str) -> Stat | None:
        """A per-run metric over the pairs: median, min, max."""
        v = self.values(key, side, metric)
        return (statistics.median(v), min(v), max(v)) if v else None

    def ratio(
        self, key: str, side: str, den_key: str, den_side: str, metric: str, den_metric: str = ""
    ) -> Stat | None:
        """Per-pair ratio key/side over den_key/den_side: median, min, max."""
        num, den = self.by[key, side], self.by[den_key, den_side]
        out = []
        for pair, m in num.items():
            d = den.get(pair)
            if d is None:
                continue
            a, b = m.get(metric), d.get(den_metric or metric)
            if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b > 0:
                out.append(a / b)
        if not out:
            return None
        return statistics.median(out), min(out), max(out)

    def keys(self, section: str, sides: tuple[str, ...] = (OURS, UPSTREAM)) -> list[str]:
        return [
            k
            for k, c in self.cases.items()
            if c["section"] == section and tuple(c["sides"]) == sides
        ]


# --------------------------------------------------------------------------------------
# formatting


def fnum(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "-"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def fratio(s: Stat | None) -> str:
    if s is None:
        return "-"
    med, lo, hi = s
    if lo == hi:
        return f"{med:.2f}"
    return f"{med:.2f} [{lo:.2f}..{hi:.2f}]"


def pair_text(res: Results, key: str, metric: str, digits: int = 3) -> str:
    up, ours = res.median(key, UPSTREAM, metric), res.median(key, OURS, metric)
    return f"{fnum(up, digits)} / {fnum(ours, digits)}"


def table(header: str, rows: list[list[str]]) -> str:
    """A markdown table; `header` is the column titles joined by " | "."""
    n = len(header.split(" | "))
    lines = ["| " + header + " |", "|" + "---|" * n]
    lines.extend("| " + " | ".join(r) + " |" for r in rows)
    return "\n".join(lines)


def status(s: Stat | None, threshold: float, le: bool, pairs: int) -> str:
    """'met' when the whole min..max range satisfies the target, 'noise' when only
    the median does, 'not met' otherwise."""
    if s is None:
        return "no data"
    med, lo, hi = s
    ok: Callable[[float], bool] = (lambda x: x <= threshold) if le else (lambda x: x >= threshold)
    worst = hi if le else lo
    if ok(worst):
        return "met" if pairs > 1 else "met (1 pair)"
    if ok(med):
        return "within noise (median met, range crosses)"
    return "not met"


def combine(statuses: list[str]) -> str:
    if any(s == "no data" for s in statuses):
        return "no data"
    if any(s == "not met" for s in statuses):
        return "not met"
    if any(s.startswith("within noise") for s in statuses):
        return "within noise (median met, range crosses)"
    return statuses[0] if statuses else "no data"


# --------------------------------------------------------------------------------------
# starvation


def starved_pairs(res: Results, key: str, side: str) -> tuple[int, float]:
    """(pairs where a waiter starved, worst wait in rotations) for a select1 case."""
    workers = int(res.cases[key]["params"]["workers"])
    bad, worst = 0, 0.0
    for m in res.by[key, side].values():
        tput = float(m.get("throughput") or 0)
        if tput <= 0:
            continue
        rotation_ms = workers / tput * 1e3
        wmax = float(m.get("wait_max_ms") or 0)
        worst = max(worst, wmax / rotation_ms)
        if wmax > STARVED_ROTATIONS * rotation_ms + STARVED_SLACK_MS:
            bad += 1
    return bad, worst


# --------------------------------------------------------------------------------------
# sections


def targets_section(res: Results) -> str:
    pairs = int(res.data["pairs"])
    rows: list[list[str]] = []

    def add(target: str, measured: str, st: str) -> None:
        rows.append([target, measured, st])

    for key, thr, name in (
        ("overhead/sync/with", 0.35, "overhead, sync `with pool.connection()`"),
        ("overhead/sync/getconn", 0.45, "overhead, sync `getconn/putconn`"),
        ("overhead/async/with", 0.35, "overhead, async `async with pool.connection()`"),
        ("overhead/async/getconn", 0.45, "overhead, async `getconn/putconn`"),
    ):
        if key in res.cases:
            s = res.ratio(key, OURS, key, UPSTREAM, "us_per_cycle")
            add(f"{name}: ours ÷ upstream ≤ {thr}", fratio(s), status(s, thr, True, pairs))

    for key in res.keys("select1"):
        c = res.cases[key]
        p = c["params"]
        w, mx, base = int(p["workers"]), int(p["max_size"]), c["baseline"]
        tx = "autocommit" if p["autocommit"] else "transaction"
        kind = "threads" if p["kind"] == "sync" else "tasks"
        where = f"select1, {w} {kind} on max_size={mx}, {tx}"
        share = 0.9 if p["kind"] == "async" and w == 1024 and mx == 16 else None
        if p["kind"] == "sync" and w <= mx:
            share = 0.95
        if share is not None and res.values(key, OURS, "share"):
            # Measured in each run's own process, alternating with the baseline (see
            # the select1 section); the separate-run ratio is in the tables.
            s = res.spread(key, OURS, "share")
            u = res.spread(key, UPSTREAM, "share")
            f = res.spread(key, OURS, "fifo_share")
            measured = f"{fratio(s)} (upstream {fratio(u)}; bare FIFO {fratio(f)})"
            add(f"{where}: ours ÷ baseline ≥ {share}", measured, status(s, share, False, pairs))
        elif share is not None:
            s = res.ratio(key, OURS, base, BASE, "throughput")
            u = res.ratio(key, UPSTREAM, base, BASE, "throughput")
            measured = f"{fratio(s)} (upstream {fratio(u)})"
            if p["kind"] == "async":
                # One CPU-bound thread: the same share in client CPU per request
                # (baseline ÷ ours) says the gap is the pool's own work.
                cs = res.ratio(base, BASE, key, OURS, "cpu_us_per_op")
                cu = res.ratio(base, BASE, key, UPSTREAM, "cpu_us_per_op")
                measured += f"; in client CPU per request {fratio(cs)} (upstream {fratio(cu)})"
            add(f"{where}: ours ÷ baseline ≥ {share}", measured, status(s, share, False, pairs))
        if w >= 4 * mx:
            t = res.ratio(key, OURS, key, UPSTREAM, "throughput")
            q = res.ratio(key, OURS, key, UPSTREAM, "wait_p99_ms")
            starved, rot = starved_pairs(res, key, OURS)
            st = combine([status(t, 1.0, False, pairs), status(q, 1.0, True, pairs)])
            if starved:
                st = "not met (a waiter starved)"
            add(
                f"{where}: throughput ≥ upstream, p99 wait ≤ upstream, no waiter starved",
                f"q/s {fratio(t)}; p99 wait {fratio(q)}; worst wait {rot:.1f} rotations",
                st,
            )

    for key in res.keys("burst"):
        c = res.cases[key]
        if not c["proxy"]:
            continue
        s = res.ratio(key, OURS, c["baseline"], BASE, "serve_s")
        u = res.ratio(key, UPSTREAM, c["baseline"], BASE, "serve_s")
        opened = res.values(key, OURS, "connections_opened")
        mx = int(c["params"]["max_size"])
        st = status(s, 1.25, True, pairs)
        nw = int(c["params"].get("num_workers", mx))
        if st == "not met" and nw < mx:
            # API.md: a pool opens at most num_workers connections at once.
            st = f"not met: num_workers={nw} bounds the connects under way (API.md)"
        if opened and max(opened) > mx:
            st = f"not met (opened {max(opened):.0f} > {mx})"
        add(
            f"burst, {c['label']}: ours ≤ 1.25 x parallel plain connects;"
            f" connections opened ≤ {mx}",
            f"{fratio(s)} (upstream {fratio(u)}); opened {fnum(max(opened) if opened else None)}",
            st,
        )

    for key in res.keys("churn"):
        tput = res.ratio(key, OURS, key, UPSTREAM, "throughput")
        worst = res.ratio(key, OURS, key, UPSTREAM, "lat_max_ms")
        kind = res.cases[key]["params"]["kind"]
        add(
            f"churn, {kind}: throughput ≥ upstream, worst request ≤ upstream",
            f"q/s {fratio(tput)}; worst request {fratio(worst)}",
            combine([status(tput, 1.0, False, pairs), status(worst, 1.0, True, pairs)]),
        )
    if not rows:
        return ""
    return "## Targets (issue 5)\n\n" + table("target | measured | status", rows) + "\n"


def overhead_section(res: Results) -> str:
    keys = res.keys("overhead")
    if not keys:
        return ""
    rows = []
    for key in keys:
        c = res.cases[key]
        up_rt = res.values(key, UPSTREAM, "backends_with_activity")
        our_rt = res.values(key, OURS, "backends_with_activity")
        rows.append(
            [
                c["label"],
                fnum(res.median(key, UPSTREAM, "us_per_cycle")),
                fnum(res.median(key, OURS, "us_per_cycle")),
                fratio(res.ratio(key, OURS, key, UPSTREAM, "us_per_cycle")),
                pair_text(res, key, "us_per_cycle_median"),
                fnum(res.median(key, OURS, "floor_us"), 2),
                f"{fnum(max(up_rt) if up_rt else None)} / {fnum(max(our_rt) if our_rt else None)}",
            ]
        )
    return (
        "## overhead: checkout + return, no query\n\n"
        "Pool min_size = max_size = 4, one thread (or task) cycling for about"
        f" {res.cases[keys[0]]['params']['duration']} s per run, timed in batches of 2000"
        " cycles. µs per cycle is the best batch of the run (as `timeit` does: slower"
        " batches measure other processes, which share the 2 cores), median over the"
        " pairs; the median batch is shown too. *floor*: the best batch of a"
        " `threading.Lock` around a `deque.popleft()` plus one around an `append()`, in the"
        " same process. *backends active*: pool"
        " connections whose server backend changed state during the timed loop, read from"
        " `pg_stat_activity.state_change` before and after (0 = no statement reached the"
        " server, i.e. no round trip).\n\n"
        + table(
            "case | upstream µs/cycle | ours µs/cycle | ours ÷ upstream"
            " | median batch µs (up / ours) | floor µs | backends active (up / ours)",
            rows,
        )
        + "\n"
    )


def select1_section(res: Results) -> str:
    keys = res.keys("select1")
    if not keys:
        return ""
    out = [
        "## select1: `SELECT 1` through the pool\n\n"
        "min_size = max_size; every worker loops checkout, `SELECT 1`, return (a COMMIT"
        " too with *transaction*, made by the `with` block on exit). Throughput counts"
        " requests completed in the window; latency is request start to done, wait is"
        " request start to connection in hand (a request still queued when the window"
        " closes is included). *baseline*: the no-pool limit, min(workers, max_size)"
        " workers of the same kind each looping on its own dedicated connection (with"
        " `commit()` in *transaction* mode); its connection count equals the pool's, so"
        " *÷ baseline* is the share of the attainable throughput that the pool delivers."
        " Medians over the pairs; ratios per pair, median [min..max]. Cells with two"
        " numbers are upstream / ours. *client CPU*: the benchmark process's CPU time"
        " over the window per request completed in it (psycopg, the pool, the loop"
        " itself), baseline / upstream / ours. With asyncio the client is one CPU-bound"
        " thread and this tracks throughput; with threads it also moves with each run's"
        " GIL hand-offs and context switches.\n\n"
        "*In process* (the cases with a share target): separate runs land in different"
        " machine states (on 2 shared cores, thread runs of one case differ by up to 2x"
        " from one process to the next), so each of these runs also alternates, in its"
        " own process, the pool, the dedicated connections and a *bare FIFO* (a deque of"
        " max_size connections, a lock for threads, one future per waiter for tasks: the"
        f" least a pool must do) in {SHARE_SLICE_TEXT} slices, A B C C B A ..., and"
        " reports each one's throughput ÷ the dedicated connections'. The targets use"
        " these shares (median [min..max] over the runs).\n"
    ]
    header = (
        "workers | max_size | mode | baseline q/s | upstream q/s | ours q/s | ours ÷ upstream"
        " | ours ÷ baseline | upstream ÷ baseline | p50 ms | p99 ms | p99 wait ms | worst wait ms"
        " | client CPU µs/req | in process ÷ baseline (up / ours / bare FIFO)"
    )
    for kind, title in (("sync", "threads"), ("async", "asyncio tasks")):
        rows = []
        for key in keys:
            c = res.cases[key]
            p = c["params"]
            if p["kind"] != kind:
                continue
            base = c["baseline"]
            rows.append(
                [
                    str(p["workers"]),
                    str(p["max_size"]),
                    "autocommit" if p["autocommit"] else "transaction",
                    fnum(res.median(base, BASE, "throughput")),
                    fnum(res.median(key, UPSTREAM, "throughput")),
                    fnum(res.median(key, OURS, "throughput")),
                    fratio(res.ratio(key, OURS, key, UPSTREAM, "throughput")),
                    fratio(res.ratio(key, OURS, base, BASE, "throughput")),
                    fratio(res.ratio(key, UPSTREAM, base, BASE, "throughput")),
                    pair_text(res, key, "lat_p50_ms"),
                    pair_text(res, key, "lat_p99_ms"),
                    pair_text(res, key, "wait_p99_ms"),
                    pair_text(res, key, "wait_max_ms"),
                    f"{fnum(res.median(base, BASE, 'cpu_us_per_op'))} / "
                    + pair_text(res, key, "cpu_us_per_op"),
                    in_process(res, key),
                ]
            )
        if rows:
            out.append(f"\n### {title}\n\n" + table(header, rows) + "\n")
    return "".join(out)


def in_process(res: Results, key: str) -> str:
    if not res.values(key, OURS, "share"):
        return "-"
    return f"{pair_text(res, key, 'share', 2)} / {fnum(res.median(key, OURS, 'fifo_share'), 2)}"


def burst_section(res: Results) -> str:
    keys = res.keys("burst")
    if not keys:
        return ""
    p = res.cases[keys[0]]["params"]
    delay_ms = round(float(res.data.get("proxy_delay_s", 0.05)) * 1000)
    rows = []
    for key in keys:
        c = res.cases[key]
        base = c["baseline"]
        rows.append(
            [
                c["label"],
                fnum(res.median(base, BASE, "serve_s")),
                fnum(res.median(key, UPSTREAM, "serve_s")),
                fnum(res.median(key, OURS, "serve_s")),
                fratio(res.ratio(key, OURS, key, UPSTREAM, "serve_s")),
                fratio(res.ratio(key, OURS, base, BASE, "serve_s")),
                fratio(res.ratio(key, UPSTREAM, base, BASE, "serve_s")),
                pair_text(res, key, "connections_opened"),
                pair_text(res, key, "wait_max_ms"),
            ]
        )
    return (
        "## burst: cold pool, everyone at once\n\n"
        f"Pool min_size = 0, max_size = {p['max_size']}; {p['workers']} threads released"
        f" together, each holding its connection {round(float(p['hold']) * 1000)} ms;"
        " time from release to the last return (median of"
        f" {p['reps']} fresh pools per run). *proxy*: connections go through"
        f" `bench/proxy.py`, a loopback proxy that waits {delay_ms} ms before forwarding"
        f" each new connection. *baseline*: {p['max_size']} threads each opening a plain"
        f" `psycopg.connect()` in parallel (through the same path) and then holding it"
        f" {-(-int(p['workers']) // int(p['max_size']))} x {round(float(p['hold']) * 1000)}"
        " ms, the schedule of an ideal pool that opens everything at once. Connections"
        " opened come from `get_stats()['connections_num']` (the maximum over the"
        " pool's runs).\n\n"
        + table(
            "connect | baseline s | upstream s | ours s | ours ÷ upstream | ours ÷ baseline"
            " | upstream ÷ baseline | connections opened (up / ours) | worst wait ms (up / ours)",
            rows,
        )
        + "\n"
    )


def churn_section(res: Results) -> str:
    keys = res.keys("churn")
    if not keys:
        return ""
    p = res.cases[keys[0]]["params"]
    rows = []
    for key in keys:
        c = res.cases[key]
        rows.append(
            [
                c["label"],
                fnum(res.median(key, UPSTREAM, "throughput")),
                fnum(res.median(key, OURS, "throughput")),
                fratio(res.ratio(key, OURS, key, UPSTREAM, "throughput")),
                pair_text(res, key, "lat_p99_ms"),
                pair_text(res, key, "lat_max_ms"),
                fratio(res.ratio(key, OURS, key, UPSTREAM, "lat_max_ms")),
                pair_text(res, key, "wait_max_ms"),
                pair_text(res, key, "connections_opened"),
            ]
        )
    return (
        "## churn: short-lived connections under steady load\n\n"
        f"min_size = {p['min_size']}, max_size = {p['max_size']}, max_lifetime ="
        f" {p['max_lifetime']} s, max_idle = {p['max_idle']} s; {p['workers']} workers loop"
        f" `SELECT 1` (autocommit) for {p['duration']} s from the moment the pool opens."
        " Connections are replaced continuously; under steady load `max_idle` rarely"
        " fires. The worst request includes its query, so with threads it also catches"
        " a worker preempted mid-query; the worst wait is the part spent in the pool.\n\n"
        + table(
            "case | upstream q/s | ours q/s | ours ÷ upstream | p99 ms (up / ours)"
            " | worst request ms (up / ours) | worst request ours ÷ upstream"
            " | worst wait ms (up / ours) | connections opened (up / ours)",
            rows,
        )
        + "\n"
    )


def peers_section(res: Results) -> str:
    keys = res.keys("peers", (PEER,))
    if not keys:
        return ""
    env = res.data["env"][UPSTREAM]
    rows = []
    for key in keys:
        c = res.cases[key]
        metric = c["metric"]
        unit = "µs/cycle" if metric == "us_per_cycle" else "q/s"
        peer = f"{fnum(res.median(key, PEER, metric))} {unit}"
        extra = ""
        if metric == "throughput":
            extra = (
                f"; worst wait {fnum(res.median(key, PEER, 'wait_max_ms'))} ms,"
                f" idle workers {fnum(res.median(key, PEER, 'workers_idle'))}"
            )
        cmp_key = c["info"].get("compare")
        same = "-"
        if cmp_key in res.cases:
            same = pair_text(res, cmp_key, metric)
        rows.append([c["label"], peer + extra, same])
    return (
        "## Peers (context only, not compared A/B)\n\n"
        "Run with upstream's interpreter, once per pair. *idle workers*: workers that"
        " completed no request in the window (starved).\n\n"
        f"- SQLAlchemy {env.get('sqlalchemy', '(not installed)')} `QueuePool`"
        " (max_overflow=0) over the same psycopg. Its raw pool resets connections with a"
        " rollback on return (no round trip when idle).\n"
        f"- asyncpg {env.get('asyncpg', '(not installed)')} `Pool`: **a different driver**"
        " (its own implementation of the protocol, not libpq; `fetchval()` runs a"
        " prepared statement), so its rows measure the driver and its pool together. It"
        " runs with `reset=` a no-op: by default it sends a reset query (a round trip) on"
        " every release, which psycopg_pool does not do for an idle connection. Its release"
        " runs in a task of its own (`asyncio.shield`), which costs turns of the event"
        " loop: in a check by hand, no statement reached the server during its no-query"
        " cycles (the server's transaction counter stayed put).\n\n"
        + table("peer, case | peer result | psycopg_pool, same case (up / ours)", rows)
        + "\n"
    )


def header_section(res: Results) -> str:
    d = res.data
    m, srv = d["machine"], d.get("server", {})
    ours, up = d["env"][OURS], d["env"][UPSTREAM]
    lines = [
        "# Benchmarks: psycopg_pool (ours) vs upstream psycopg-pool",
        "",
        "Generated by `bench/run.py`; do not edit by hand. Lower is better for times,"
        " higher for throughput. Ratios are ours ÷ upstream (or ÷ baseline) computed"
        f" per interleaved pair (ours, upstream), (upstream, ours), … over {d['pairs']}"
        f" pair(s): median [min..max].",
        "",
        f"- Command: `{d['command']}`",
        f"- Date: {d['started']}, repo revision {d.get('git', '?')}, run time"
        f" {float(d.get('elapsed_s', 0)) / 60:.1f} min",
        f"- Machine: {m['cpu_model']}, nproc {m['nproc']}, {m['memory']} RAM, {m['os']},"
        f" load average {', '.join(str(x) for x in m['loadavg_at_start'])} at start,"
        f" {', '.join(str(x) for x in m.get('loadavg_at_end', ['?']))} at end",
        f"- PostgreSQL {srv.get('version', '?')} on the same machine"
        f" ({srv.get('source', '?')}), over TCP to {srv.get('host', '?')};"
        " client and server share the cores",
        "",
        table(
            "side | Python | psycopg | psycopg-pool | imported from",
            [
                [
                    name,
                    f"{e['python']} ({e['python_impl']})",
                    f"{e['psycopg']} ({e['psycopg_impl']}, libpq {e['libpq']})",
                    str(e.get("psycopg_pool", "?")),
                    f"`{e.get('psycopg_pool_file', '?')}`",
                ]
                for name, e in (("ours", ours), ("upstream", up))
            ],
        ),
        "",
    ]
    if d.get("notes"):
        lines += ["**Notes:**", ""] + [f"- {n}" for n in d["notes"]] + [""]
    failed = [r for r in d["runs"] if not r["ok"]]
    if failed:
        lines += [f"**{len(failed)} run(s) failed:**", ""]
        lines += [f"- {r['key']} ({r['side']}, pair {r['pair'] + 1}): {r['error']}" for r in failed]
        lines.append("")
    return "\n".join(lines)


def method_section(res: Results) -> str:
    return (
        "## Method\n\n"
        "- Every measurement is a fresh interpreter running `bench/workload.py`, which"
        " imports `psycopg_pool` from its own venv: ours from the repo's `.venv`,"
        " upstream's from `.venv-upstream`. Baselines (plain psycopg, no pool) run with"
        " our interpreter; peers with upstream's.\n"
        "- One PostgreSQL server serves the whole run. Each run is bounded in time (a"
        " deadline) and in count; nothing here asserts a timing.\n"
        f"- A waiter counts as starved when its wait exceeds {STARVED_ROTATIONS:g}"
        " rotations + "
        f"{STARVED_SLACK_MS:g} ms, a rotation being workers ÷ throughput (the time to"
        " serve every worker once with first-come first-served hand-off).\n"
        "- Target status: *met* when the whole min..max range of the ratio meets the"
        " target, *within noise* when only the median does, *not met* otherwise.\n"
        "- Client and server share this machine's cores, so absolute numbers are lower"
        " and noisier than on separate hosts; the interleaving and the per-pair ratios"
        " are there to cancel slow drifts.\n"
    )


def render(data: dict[str, Any]) -> str:
    res = Results(data)
    parts = [
        header_section(res),
        targets_section(res),
        overhead_section(res),
        select1_section(res),
        burst_section(res),
        churn_section(res),
        peers_section(res),
        method_section(res),
    ]
    return "\n".join(p for p in parts if p).rstrip() + "\n"
