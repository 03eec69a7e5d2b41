"""The benchmark plan: which measurements exist, with which parameters.

A `Case` is one measurement configuration. Compared cases run on both sides (ours
and upstream) in every pair; baseline cases (the no-pool limit) run once per pair on
our interpreter, with psycopg only; peer cases run once per pair on upstream's
interpreter (where SQLAlchemy and asyncpg are installed) and are reported for
context only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SECTIONS = ("overhead", "select1", "burst", "churn", "peers")

# Sides a run can be made on.
OURS, UPSTREAM, BASE, PEER = "ours", "upstream", "baseline", "peer"


@dataclass(frozen=True)
class Case:
    key: str
    section: str
    scenario: str
    params: dict[str, Any]
    label: str
    metric: str  # the primary metric in the worker's result
    higher_better: bool
    baseline: str | None = None  # key of the baseline case compared against
    proxy: bool = False  # connect through the delaying proxy
    sides: tuple[str, ...] = (OURS, UPSTREAM)
    info: dict[str, Any] = field(default_factory=dict)

    def run_seconds(self) -> float:
        """Rough wall time of one run, for the progress estimate."""
        p = self.params
        t = 0.6 + float(p.get("warmup", 0.0)) + float(p.get("duration", 0.0))
        if self.scenario == "burst":
            t += 0.6 * int(p.get("reps", 1))
        if self.scenario == "overhead":
            t += 0.3
        if p.get("share"):
            t += 12 * 0.25  # 3 modes x SHARE_ROUNDS slices, plus connecting
        return t


@dataclass(frozen=True)
class Settings:
    quick: bool = False
    duration: float | None = None  # override of every measurement's duration

    def dur(self, default: float, quick: float) -> float:
        if self.duration is not None:
            return self.duration
        return quick if self.quick else default


def _ac(autocommit: bool) -> str:
    return "autocommit" if autocommit else "transaction"


def overhead_cases(s: Settings) -> list[Case]:
    out = []
    for kind in ("sync", "async"):
        for mode in ("with", "getconn"):
            label = {
                ("sync", "with"): "sync `with pool.connection()`",
                ("sync", "getconn"): "sync `getconn()` + `putconn()`",
                ("async", "with"): "async `async with pool.connection()`",
                ("async", "getconn"): "async `await getconn()` + `await putconn()`",
            }[kind, mode]
            out.append(
                Case(
                    key=f"overhead/{kind}/{mode}",
                    section="overhead",
                    scenario="overhead",
                    params={
                        "kind": kind,
                        "mode": mode,
                        "size": 4,
                        "warmup": 0.1 if s.quick else 0.2,
                        "duration": s.dur(1.0, 0.3),
                    },
                    label=label,
                    metric="us_per_cycle",
                    higher_better=False,
                    info={"kind": kind, "mode": mode},
                )
            )
    return out


def _select1_baseline(kind: str, conns: int, autocommit: bool, s: Settings) -> Case:
    return Case(
        key=f"baseline/select1/{kind}/n{conns}/{_ac(autocommit)}",
        section="select1",
        scenario="select1",
        params={
            "kind": "sync" if kind == "threads" else "async",
            "mode": "baseline",
            "workers": conns,
            "max_size": conns,
            "autocommit": autocommit,
            "warmup": 0.1 if s.quick else 0.3,
            "duration": s.dur(1.0, 0.3),
        },
        label=f"{conns} dedicated connections",
        metric="throughput",
        higher_better=True,
        sides=(BASE,),
    )


def select1_cases(s: Settings) -> tuple[list[Case], dict[str, Case]]:
    if s.quick:
        grid = {
            "threads": [(4, 4), (64, 16)],
            "tasks": [(16, 16), (1024, 16)],
        }
        commits = [True]
    else:
        grid = {
            "threads": [(w, m) for m in (4, 16) for w in (4, 16, 64)],
            "tasks": [(w, m) for m in (4, 16) for w in (16, 256, 1024)],
        }
        commits = [True, False]
    cases: list[Case] = []
    baselines: dict[str, Case] = {}
    for kind, pairs in grid.items():
        for workers, max_size in pairs:
            # The cases with a share-of-baseline target (issue 5) also measure it in
            # process (see workload._share_sync).
            share = workers <= max_size if kind == "threads" else (workers, max_size) == (1024, 16)
            for autocommit in commits:
                base = _select1_baseline(kind, min(workers, max_size), autocommit, s)
                baselines[base.key] = base
                cases.append(
                    Case(
                        key=f"select1/{kind}/w{workers}/max{max_size}/{_ac(autocommit)}",
                        section="select1",
                        scenario="select1",
                        params={
                            "kind": "sync" if kind == "threads" else "async",
                            "workers": workers,
                            "max_size": max_size,
                            "autocommit": autocommit,
                            "warmup": 0.1 if s.quick else 0.3,
                            "duration": s.dur(1.0, 0.3),
                            "share": share,
                        },
                        label=f"{workers} {kind} on max_size={max_size}",
                        metric="throughput",
                        higher_better=True,
                        baseline=base.key,
                        info={
                            "kind": kind,
                            "workers": workers,
                            "max_size": max_size,
                            "autocommit": autocommit,
                        },
                    )
                )
    return cases, baselines


def burst_cases(s: Settings, delay: float) -> tuple[list[Case], dict[str, Case]]:
    cases: list[Case] = []
    baselines: dict[str, Case] = {}
    reps = 1 if s.quick else 3
    for proxy in (False, True):
        name = f"proxy{round(delay * 1000)}ms" if proxy else "direct"
        common = {"max_size": 32, "workers": 64, "hold": 0.05, "reps": reps}
        base = Case(
            key=f"baseline/burst/{name}",
            section="burst",
            scenario="burst",
            params={**common, "mode": "baseline"},
            label="32 parallel plain connects",
            metric="serve_s",
            higher_better=False,
            proxy=proxy,
            sides=(BASE,),
        )
        baselines[base.key] = base
        # num_workers bounds how many connections a pool opens at once: the default
        # (3), and enough for the burst (upstream grows one at a time either way).
        for nw in (3, 32):
            label = f"+{round(delay * 1000)} ms per connect (proxy)" if proxy else "direct"
            cases.append(
                Case(
                    key=f"burst/{name}/nw{nw}",
                    section="burst",
                    scenario="burst",
                    params={**common, "mode": "pool", "num_workers": nw},
                    label=f"{label}, num_workers={nw}",
                    metric="serve_s",
                    higher_better=False,
                    baseline=base.key,
                    proxy=proxy,
                    info={"proxy": proxy},
                )
            )
    return cases, baselines


def churn_cases(s: Settings) -> list[Case]:
    return [
        Case(
            key=f"churn/{kind}",
            section="churn",
            scenario="churn",
            params={
                "kind": kind,
                "min_size": 2,
                "max_size": 8,
                "workers": 8,
                "max_lifetime": 0.5,
                "max_idle": 0.5,
                "autocommit": True,
                "warmup": 0.0,
                "duration": s.dur(3.0, 1.0),
            },
            label=f"8 {'threads' if kind == 'sync' else 'tasks'}, min 2 / max 8",
            metric="throughput",
            higher_better=True,
            info={"kind": kind},
        )
        for kind in ("sync", "async")
    ]


PEER_NAMES = {"sqlalchemy": "SQLAlchemy QueuePool", "asyncpg": "asyncpg Pool"}


def _peer(
    peer: str, key: str, params: dict[str, Any], label: str, metric: str, compare: str
) -> Case:
    return Case(
        key=f"peers/{peer}/{key}",
        section="peers",
        scenario=f"peer_{peer}",
        params=params,
        label=f"{PEER_NAMES[peer]}: {label}",
        metric=metric,
        higher_better=metric == "throughput",
        sides=(PEER,),
        info={"compare": compare, "peer": peer},
    )


def peer_cases(s: Settings) -> list[Case]:
    common = {"warmup": 0.1 if s.quick else 0.3, "duration": s.dur(1.0, 0.3)}
    out = [
        _peer(
            "sqlalchemy",
            "overhead",
            {"what": "overhead", "max_size": 4, **common},
            "checkout + return, no query (pool_size=4)",
            "us_per_cycle",
            "overhead/sync/with",
        ),
        _peer(
            "asyncpg",
            "overhead",
            {"what": "overhead", "max_size": 4, **common},
            "`async with pool.acquire()`, no query (size 4)",
            "us_per_cycle",
            "overhead/async/with",
        ),
    ]
    for workers, size in [(64, 16)] if s.quick else [(64, 16), (16, 4)]:
        out.append(
            _peer(
                "sqlalchemy",
                f"threads/w{workers}/max{size}",
                {"workers": workers, "max_size": size, "autocommit": True, **common},
                f"SELECT 1, {workers} threads on pool_size={size}",
                "throughput",
                f"select1/threads/w{workers}/max{size}/autocommit",
            )
        )
    for workers, size in [(1024, 16)] if s.quick else [(16, 16), (1024, 16)]:
        out.append(
            _peer(
                "asyncpg",
                f"tasks/w{workers}/max{size}",
                {"workers": workers, "max_size": size, **common},
                f"SELECT 1, {workers} tasks on max_size={size}",
                "throughput",
                f"select1/tasks/w{workers}/max{size}/autocommit",
            )
        )
    return out


def plan(
    s: Settings, only: list[str] | None, peers: bool, proxy_delay: float
) -> tuple[list[Case], dict[str, Case]]:
    """All compared/peer cases selected by `only`, and the baselines they need."""
    sel1, base1 = select1_cases(s)
    burst, base2 = burst_cases(s, proxy_delay)
    cases = [*overhead_cases(s), *sel1, *burst, *churn_cases(s)]
    if peers:
        cases.extend(peer_cases(s))
    if only:
        cases = [c for c in cases if any(t == c.section or c.key.startswith(t) for t in only)]
    all_base = {**base1, **base2}
    baselines = {c.baseline: all_base[c.baseline] for c in cases if c.baseline}
    return cases, baselines
