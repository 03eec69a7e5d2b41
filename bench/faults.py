"""Run the fault scenarios against our pool and upstream psycopg-pool; write FAULTS.md.

The scenarios are those of the test suite (`tests/integration/faults.py`, which the
tests in `test_faults.py` assert on). Here each one runs as a program, once with our
interpreter (`.venv`, our package) and once with upstream's (`.venv-upstream`,
psycopg-pool 3.3.3), each against throw-away PostgreSQL clusters of its own; the
program prints its report as JSON and this script tabulates the reports. Nothing
here asserts anything: it measures.

    .venv/bin/python bench/faults.py                  # every scenario, both pools
    .venv/bin/python bench/faults.py --only leak,auth
    .venv/bin/python bench/faults.py --from-json .bench/faults-<time>.json

Takes about five minutes: upstream waits out its timeouts.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PROGRAM = REPO / "tests" / "integration" / "faults.py"
RAW_DIR = REPO / ".bench"
SIDES = {
    "ours": REPO / ".venv" / "bin" / "python",
    "upstream": REPO / ".venv-upstream" / "bin" / "python",
}
RUN_TIMEOUT = 300.0

Report = dict[str, Any]
Cells = tuple[str, str, str, str, str]  # errors, time to recover, lost, hangs, notes


@dataclass
class Run:
    scenario: str
    variant: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class Section:
    scenario: str
    title: str
    what: str
    runs: list[Run]


SECTIONS = [
    Section(
        "auth",
        "Wrong password / no password / missing database / a password libpq misreads",
        "The server asks for a password (scram-sha-256). For each of the four mistakes (the"
        " last: a password with a space, unquoted, so libpq quotes its second word in its"
        " error as an unknown key),"
        " five calls, each on a pool of its own (min_size 1, timeout 5 s), all at once:"
        " `getconn()` right after `open()`, `getconn()` once the first attempt has failed,"
        " `wait()` right after `open()`, `wait()` once the first attempt has failed, and"
        " `open(wait=True)`. Expected: `PoolTimeout` within one connect attempt, with the"
        " server's message, the psycopg error as `__cause__`, and no password anywhere.",
        [Run("auth", "4 mistakes x 5 calls", {"timeout": 5.0})],
    ),
    Section(
        "refused",
        "Connection refused at open, server up 3 s later",
        "The server is stopped; the pool opens (min_size 4, reconnect_timeout 1 s) and two"
        " clients ask for a connection (timeout 20 s). After 3 s, right after the pool's"
        " next failed attempt, the server starts. Nobody asks for anything afterwards.",
        [Run("refused", "min_size 4, 2 clients", {"outage": 3.0})],
    ),
    Section(
        "restart_idle",
        "Server restart, idle pool",
        "4 idle connections (no request for 1 s), `pg_ctl restart -m fast`, then 8"
        " requests one after the other (`SELECT 1`, timeout 10 s).",
        [
            Run("restart_idle", "threads, no check"),
            Run("restart_idle", "threads, check=check_connection", {"check": True}),
            Run("restart_idle", "asyncio, no check", {"use_async": True}),
        ],
    ),
    Section(
        "restart_busy",
        "Server restart, 8 busy clients",
        "8 clients run `SELECT pg_sleep(0.002)` with 5 ms pauses on a pool of 4 to 8;"
        " `pg_ctl restart -m fast`. An error counts as expected when its connection was"
        " in use at some moment of the shutdown; any other error is a dead connection the"
        " pool lent out. Full service: every client has succeeded again.",
        [
            Run("restart_busy", "8 threads"),
            Run("restart_busy", "8 asyncio tasks", {"use_async": True}),
        ],
    ),
    Section(
        "terminate",
        "`pg_terminate_backend` every 100 ms, mostly idle pool",
        "8 connections, 2 clients each running `SELECT 1` every 20 ms; every 100 ms for"
        " 10 s a random backend of the pool is terminated. Afterwards `check()`, then the"
        " pool must have 8 live connections.",
        [
            Run("terminate", "no check", {"duration": 10.0}),
            Run("terminate", "check=check_connection", {"duration": 10.0, "check": True}),
        ],
    ),
    Section(
        "blackhole",
        "Black hole: the network silently stops forwarding, then heals",
        "The pool (2 to 4 connections, timeout 1 s) reaches the server through a loopback"
        " proxy that stops forwarding (sockets stay open). 4 clients call `getconn()` at"
        " once and keep what they get. The network then heals: the same connections work"
        " again, or (stranded) only new connections get through. Then 3 requests, one by"
        " one, timeout 5 s. A hang is a call still running 1 s after its deadline. Through"
        " a loopback proxy the kernel acknowledges every packet, so TCP keepalives and"
        " `tcp_user_timeout` never fire here: without a `check`, a request on a stranded"
        " connection waits for the query forever, in both pools.",
        [
            Run("blackhole", "no check, heals", {}),
            Run("blackhole", "check, heals", {"check": True}),
            Run("blackhole", "no check, old connections stranded", {"heal": "strand"}),
            Run("blackhole", "check, old connections stranded", {"check": True, "heal": "strand"}),
        ],
    ),
    Section(
        "max_connections",
        "Server `max_connections` below `max_size`",
        "A server with max_connections 6 (none reserved), one slot held by an admin"
        " connection: the pool (min_size 2, max_size 8) can get 5. 8 clients make 40"
        " requests each. `pool_size` is sampled against the live backends every 20 ms."
        " Then a pool with min_size 8 calls `wait(2)`.",
        [Run("max_connections", "max_connections 6, max_size 8")],
    ),
    Section(
        "leak",
        "Leak: 4 x `getconn` without `putconn`, then the references are dropped",
        "Threads leaker-0..3 each take a connection of a max_size 4 pool and keep it; a"
        " `getconn(0.5)` times out. Then the leakers end without returning anything and"
        " the garbage collector runs; one request (timeout 5 s) follows.",
        [
            Run("leak", "leak_timeout off"),
            Run("leak", "leak_timeout=0.3 (ours only)", {"leak_timeout": 0.3}),
        ],
    ),
    Section(
        "cancel_storm",
        "asyncio cancel storm, with a second cancel during the clean-up",
        "16 loops for 2 s on a pool of 4: start a task using a connection (two queries),"
        " cancel it at a random moment in the first 12 ms, cancel it again 0 to 3 event"
        " loop rounds later, wait for it (bounded). When the second cancellation"
        " interrupts psycopg's own cancellation of the running query, psycopg closes the"
        ' connection ("query cancellation interrupted"): the pool must replace it.',
        [Run("cancel_storm", "16 loops, 2 s", {"duration": 2.0})],
    ),
]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def run_program(python: Path, run: Run) -> Report:
    cmd = [str(python), "-P", str(PROGRAM), run.scenario, "--params", json.dumps(run.params)]
    t0 = time.monotonic()
    try:
        res = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
            env=child_env(),
            cwd=REPO,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return {"failed": f"the program ran over {RUN_TIMEOUT:.0f} s"}
    for line in reversed(res.stdout.splitlines()):
        if line.startswith("{"):
            report: Report = json.loads(line)
            report["wall_s"] = round(time.monotonic() - t0, 1)
            return report
    tail = " | ".join(res.stderr.strip().splitlines()[-3:])
    return {"failed": f"exit code {res.returncode}: {tail}"}


# ----------------------------------------------------------------------
# Cells of each scenario's table


def s(value: Any) -> str:
    return "-" if value is None else f"{value:g} s" if isinstance(value, float) else str(value)


def yes(flag: Any) -> str:
    return "yes" if flag else "**no**"


def lost(r: Report) -> str:
    if r.get("lost") is None:
        return "-"
    if r["lost"] == 0 and r.get("settled", True):
        return "0"
    return f"**{r['lost']}** (pool_size {r['pool_size']}, live {r['live']})"


def hangs(r: Report) -> str:
    n = r.get("hangs", 0)
    return "0" if not n else f"**{n}**"


def auth_cells(r: Report) -> Cells:
    calls = [c for case in r["cases"].values() for c in case.values()]
    n = len(calls)
    raised = sum(c["type"] == "PoolTimeout" for c in calls)
    why = sum(c["says_why"] for c in calls)
    cause = sum(c["cause_says_why"] for c in calls)
    slowest: dict[str, float] = {}
    for case in r["cases"].values():
        for what, c in case.items():
            slowest[what] = max(slowest.get(what, 0.0), c["elapsed"] or 0.0)
    names = {
        "getconn": "getconn",
        "getconn_later": "getconn (later)",
        "wait": "wait",
        "wait_later": "wait (later)",
        "open_wait": "open(wait)",
    }
    timing = ", ".join(f"{names.get(k, k)} {v:.2f} s" for k, v in slowest.items())
    attempts = [c["attempts"] for c in calls]
    return (
        f"{raised}/{n} raise PoolTimeout; server's message in it: {why}/{n};"
        f" as `__cause__`: {cause}/{n}",
        f"raised after (slowest of {len(r['cases'])}): {timing}; timeout {r['timeout']:g} s",
        "0 (none opened)",
        str(sum(c["hung"] for c in calls)),
        f"attempts made by the time of the error: {min(attempts)}-{max(attempts)};"
        f" password shown: {len(r['secret_leaks'])} times",
    )


def refused_cells(r: Report) -> Cells:
    refill = (
        f"back to min_size {r['refilled_after_up']:g} s after"
        if r["refilled"]
        else "**still below min_size** 5 s after"
    )
    return (
        f"{r['errors']} of {len(r['clients'])} waiting clients failed",
        f"clients served {s(r['last_served_after_up'])} after the server was up; {refill}",
        lost(r),
        hangs(r),
        f"reconnect_failed called {r['reconnect_failed_calls']}x",
    )


def first_errors(r: Report, key: str = "requests") -> str:
    errs = sorted({c["error"] for c in r.get(key, []) if c.get("error")})
    return "; ".join(e[:90] for e in errs[:2])


def restart_idle_cells(r: Report) -> Cells:
    return (
        f"{r['errors']} of {len(r['requests'])} requests failed",
        f"8 requests served in {s(r['all_served_after'])} (slowest {s(r['slowest'])})",
        lost(r),
        hangs(r),
        first_errors(r),
    )


def restart_busy_cells(r: Report) -> Cells:
    other = r["errors_other"]
    return (
        f"{r['errors']}: {r['errors_in_use_at_restart']} on connections in use at the"
        f" restart, {'**' + str(other) + '**' if other else 0} on others",
        f"first client served {s(r['first_served_after_up'])}, every client"
        f" {s(r['full_service_after_up'])} after the server was up",
        lost(r),
        hangs(r),
        f"{r['requests']} requests; {r['in_use_at_restart']} connections in use at the restart",
    )


def terminate_cells(r: Report) -> Cells:
    b = r["before_check"]
    return (
        f"{r['errors']} for {r['kills']} kills: **{r['errors_per_kill']:g} per kill**",
        "-",
        lost(r),
        hangs(r),
        f"{r['requests']} requests, latency p50 {r['latency_p50_ms']:g} ms,"
        f" p99 {r['latency_p99_ms']:g} ms; before `check()`: pool_size {b['pool_size']},"
        f" live {b['live']}",
    )


def blackhole_cells(r: Report) -> Cells:
    after_failed = len(r["after"]) - r["after_ok"]
    recovered = r["recovered_after_heal"]
    return (
        f"during: {r['during_got_connection']} lent, {r['during_timed_out']} PoolTimeout;"
        f" after: {'**' + str(after_failed) + '**' if after_failed else 0} of"
        f" {len(r['after'])} failed",
        (
            f"first success {recovered:g} s after the network healed"
            if recovered is not None
            else "**no success**"
        )
        + f" ({r['after_ok']}/{len(r['after'])})",
        lost(r) if r["heal"] == "resume" else "-",
        hangs(r),
        f"slowest getconn during the black hole: {s(r['during_slowest'])} (timeout 1 s)",
    )


def max_connections_cells(r: Report) -> Cells:
    wait = r["wait_message"] or "(no error)"
    return (
        f"{r['errors']} in {r['stats'].get('requests_num', '?')} requests",
        "-",
        lost(r),
        hangs(r),
        f"pool_size above live in {r['samples_pool_size_above_live']} of {r['samples']}"
        f" samples (max pool_size {r['max_pool_size_seen']}, max live {r['max_live_seen']});"
        f" pool_size - pool_connecting above live in {r['samples_real_above_live']}"
        " (upstream has no pool_connecting);"
        f' `wait()` names "too many clients": {yes(r["wait_says_too_many"])}'
        f' ("{wait[:80]}")',
    )


def leak_cells(r: Report) -> Cells:
    held = r.get("held_warning_after")
    held_text = (
        f"; held-too-long WARNING after {held:g} s"
        if held is not None
        else (
            "; **no held-too-long WARNING** within leak_timeout + 2 s"
            if r["leak_timeout"] and r["pool"] == "ours"
            else ""
        )
    )
    return (
        f"timeout names the pool: {yes(r['names_pool'])}, 4 of 4 in use:"
        f" {yes(r['says_all_in_use'])}, oldest holder: {yes(r['names_holder'])}"
        + (f", where taken: {yes(r['names_where'])}" if r["leak_timeout"] else ""),
        "slots back once collected: "
        + ("yes" if r["served_after_drop"]["ok"] else "**never** (next request: PoolTimeout)"),
        lost(r),
        hangs(r),
        f"{r['collected_warnings']} WARNING on collection"
        + (
            f" (where taken: {yes(r['collected_warning_names_where'])})"
            if r["leak_timeout"]
            else ""
        )
        + held_text,
    )


def cancel_storm_cells(r: Report) -> Cells:
    return (
        f"{r['errors']} (besides the cancellations) in {r['runs']} runs"
        f" ({r['cancelled']} cancelled, {r['completed']} completed)",
        "-",
        lost(r),
        hangs(r),
        f"{r['reconnects']} reconnects, {r['warnings_psycopg']} of them after psycopg closed"
        f' the connection ("query cancellation interrupted"); {r["warnings_pool"]} pool'
        " WARNING lines",
    )


CELLS: dict[str, Callable[[Report], Cells]] = {
    "auth": auth_cells,
    "refused": refused_cells,
    "restart_idle": restart_idle_cells,
    "restart_busy": restart_busy_cells,
    "terminate": terminate_cells,
    "blackhole": blackhole_cells,
    "max_connections": max_connections_cells,
    "leak": leak_cells,
    "cancel_storm": cancel_storm_cells,
}


EXAMPLES = {
    "auth": "The `getconn()` messages (wrong password):",
    "leak": "The timeout messages (leak_timeout off):",
}


def examples(section: Section, results: dict[str, dict[str, Report]]) -> list[str]:
    """Messages worth reading in full under a table."""
    if section.scenario not in EXAMPLES:
        return []
    lines = ["", EXAMPLES[section.scenario], ""]
    for side in SIDES:
        r = results.get(section.runs[0].variant, {}).get(side)
        if not r or "failed" in r:
            continue
        msg = None
        if section.scenario == "auth":
            msg = r["cases"]["wrong_password"]["getconn"]["message"]
        elif section.scenario == "leak":
            msg = r["message"]
        if msg:
            lines.append(f"- {side}: `{msg[:600]}`")
    return lines if len(lines) > 3 else []


# ----------------------------------------------------------------------
# The report


def render(data: dict[str, Any]) -> str:
    out = [
        "# Fault injection: our pool vs upstream psycopg-pool 3.3.3",
        "",
        "Measured by `bench/faults.py`, which runs the scenarios of the test suite"
        " (`tests/integration/faults.py`; the assertions are in `test_faults.py`) as"
        " programs, once with our pool and once with upstream's, each against throw-away"
        " PostgreSQL servers of its own. One run per scenario and pool: timings are from"
        " one machine and vary from run to run; the counts are what matters.",
        "",
        f"- Command: `{data['command']}`",
        f"- Date: {data['date']}; machine: {data['machine']}",
        f"- Pools: {data['versions']}; ours at {data.get('revision', '?')}",
        "",
        "Columns: *errors the user saw* (exceptions raised to the clients), *time to"
        " recover*, *connections lost* (the pool's `pool_size` against the live server"
        " backends with its `application_name`, once the fault is over), *hangs* (calls"
        " still running 1 s after their own deadline).",
    ]
    for section in SECTIONS:
        if section.scenario not in data["results"]:
            continue
        results = data["results"][section.scenario]
        out += ["", f"## {section.title}", "", section.what, ""]
        out += [
            "| variant | pool | errors the user saw | time to recover | connections lost"
            " | hangs | notes |",
            "|---|---|---|---|---|---|---|",
        ]
        for run in section.runs:
            for side in SIDES:
                r = results.get(run.variant, {}).get(side)
                if r is None:
                    continue
                if "failed" in r:
                    cells: Cells = (f"run failed: {r['failed']}", "", "", "", "")
                else:
                    cells = CELLS[section.scenario](r)
                row = [run.variant, side, *(c.replace("|", "\\|") for c in cells)]
                out.append("| " + " | ".join(row) + " |")
        out += examples(section, results)
    out.append("")
    return "\n".join(out)


def versions() -> str:
    parts = []
    for side, python in SIDES.items():
        res = subprocess.run(
            [
                str(python),
                "-P",
                "-c",
                "import psycopg, psycopg_pool;print(psycopg_pool.__version__, psycopg.__version__)",
            ],
            capture_output=True,
            text=True,
            env=child_env(),
            cwd="/",
        )
        pool, _, pg = res.stdout.strip().partition(" ")
        parts.append(f"{side} psycopg_pool {pool or '?'} (psycopg {pg or '?'})")
    return "; ".join(parts)


def git(*args: str) -> str:
    res = subprocess.run(["git", *args], capture_output=True, text=True, cwd=REPO)
    return res.stdout.strip()


def revision() -> str:
    """The last commit of our pool's code, and whether it had local changes then."""
    head = git("log", "-1", "--format=%h", "--", "psycopg_pool") or "?"
    dirty = git("status", "--porcelain", "--", "psycopg_pool")
    if not dirty:
        return head
    changes = git("diff", "HEAD", "--", "psycopg_pool")
    return (
        f"{head} with uncommitted changes in psycopg_pool/ (diff hash {hash(changes) & 0xFFFF:04x})"
    )


def machine() -> str:
    return (
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs,"
        f" Python {platform.python_version()}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated scenarios: " + ", ".join(CELLS))
    ap.add_argument("--output", default=str(REPO / "FAULTS.md"))
    ap.add_argument("--from-json", default=None, help="render this raw file, run nothing")
    args = ap.parse_args(argv)

    if args.from_json:
        data = json.loads(Path(args.from_json).read_text())
    else:
        only = {x for x in args.only.split(",") if x}
        unknown = only - set(CELLS)
        if unknown:
            ap.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
        for side, python in SIDES.items():
            if not python.exists():
                ap.error(f"{side}: {python} not found (see bench/README.md for the venvs)")
        argv_used = sys.argv[1:] if argv is None else argv
        data = {
            "command": shlex.join([".venv/bin/python", "bench/faults.py", *argv_used]),
            "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "machine": machine(),
            "versions": versions(),
            "revision": revision(),
            "results": {},
        }
        for section in SECTIONS:
            if only and section.scenario not in only:
                continue
            for run in section.runs:
                for side, python in SIDES.items():
                    log(f"{section.scenario} / {run.variant} / {side} ...")
                    report = run_program(python, run)
                    if "failed" in report:
                        log(f"  failed: {report['failed']}")
                    data["results"].setdefault(section.scenario, {}).setdefault(run.variant, {})[
                        side
                    ] = report
        if revision() != data["revision"]:
            data["revision"] += f" (then {revision()} by the end of the run: mixed results)"
            log(f"our pool changed during the run: {data['revision']}")
        RAW_DIR.mkdir(exist_ok=True)
        raw = RAW_DIR / f"faults-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
        raw.write_text(json.dumps(data, indent=1))
        log(f"raw reports: {raw.relative_to(REPO)}")
    Path(args.output).write_text(render(data))
    log(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
