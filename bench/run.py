"""Benchmark our psycopg_pool against upstream psycopg-pool, interleaved, and write BENCHMARKS.md.

Each measurement runs in a fresh interpreter (``bench/workload.py``): our side with the
repo's ``.venv`` (where our package is installed, editable), upstream's side with
``.venv-upstream`` (psycopg-pool 3.3.3 from PyPI, created here if missing). Both
import ``psycopg_pool``; which one they get depends only on the venv. Every case runs
in pairs, alternating the order (ours, upstream), (upstream, ours), ... and the report
gives the median ratio ours / upstream with its min..max over the pairs.

    .venv/bin/python bench/run.py                # full run (3 pairs), ~7-9 min on 2 cores
    .venv/bin/python bench/run.py --quick        # smoke run, about a minute
    .venv/bin/python bench/run.py --only overhead,burst --pairs 5

Without ``--dsn`` (or ``DATABASE_URL``) a throw-away PostgreSQL is started for the run.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import importlib.util
import json
import os
import platform
import select
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

from cases import BASE, OURS, PEER, UPSTREAM, Case, Settings, plan
from report import render

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
WORKLOAD = BENCH / "workload.py"
PROXY = BENCH / "proxy.py"
UPSTREAM_VENV = REPO / ".venv-upstream"
UPSTREAM_PIN = "psycopg-pool==3.3.3"
OURS_PYTHON = REPO / ".venv" / "bin" / "python"
RAW_DIR = REPO / ".bench"
MAX_CONNECTIONS = 400
PROXY_DELAY = 0.05
RUN_TIMEOUT_SLACK = 150.0  # seconds allowed beyond a run's own duration


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def rel(path: str | Path) -> str:
    """A path relative to the repo when it lies inside it."""
    try:
        return str(Path(path).absolute().relative_to(REPO))
    except ValueError:
        return str(path)


def child_env() -> dict[str, str]:
    """Environment for the worker interpreters: nothing that could change sys.path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def last_json_line(text: str) -> dict[str, Any] | None:
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                return obj
    return None


def interpreter_info(python: str) -> dict[str, Any]:
    res = subprocess.run(
        [python, str(WORKLOAD), "--info"],
        capture_output=True,
        text=True,
        timeout=120,
        env=child_env(),
        cwd=BENCH,
    )
    obj = last_json_line(res.stdout)
    if res.returncode != 0 or obj is None:
        tail = "\n".join(res.stderr.strip().splitlines()[-3:])
        raise RuntimeError(f"{python} cannot run bench/workload.py (needs psycopg):\n{tail}")
    info: dict[str, Any] = obj["env"]
    return info


# --------------------------------------------------------------------------------------
# interpreters


# Peers' packages (also their import names), installed with upstream's interpreter.
PEER_PACKAGES = ("sqlalchemy", "asyncpg")


def pip_install(python: Path) -> list[str]:
    return [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]


def ensure_upstream_venv(venv: Path, psycopg_version: str | None, peers: bool) -> None:
    """Create `venv` with psycopg[binary] and psycopg-pool 3.3.3 from PyPI if missing."""
    python = venv / "bin" / "python"
    if not python.exists():
        log(f"creating {rel(venv)} with {UPSTREAM_PIN} ...")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        # Same psycopg as our side when possible, so only the pool differs.
        psycopg = f"psycopg[binary]=={psycopg_version}" if psycopg_version else "psycopg[binary]"
        pip = pip_install(python)
        if subprocess.run([*pip, psycopg, UPSTREAM_PIN]).returncode != 0:
            log(f"could not install {psycopg}; trying the latest psycopg[binary]")
            subprocess.run([*pip, "psycopg[binary]", UPSTREAM_PIN], check=True)
    if peers:
        for module in PEER_PACKAGES:
            probe = subprocess.run(
                [str(python), "-c", f"import {module}"], capture_output=True, env=child_env()
            )
            if probe.returncode != 0:
                log(f"installing {module} into {rel(venv)} for the peer measurements ...")
                subprocess.run([*pip_install(python), module])


def side_info(side: str, python: str) -> dict[str, Any] | None:
    """What `python` imports, or None (after saying why) when it cannot serve as `side`."""
    if not Path(python).exists():
        log(f"{side}: {python} does not exist")
        return None
    try:
        info = interpreter_info(python)
    except RuntimeError as ex:
        log(f"{side}: {ex}")
        return None
    if "psycopg_pool_error" in info:
        log(f"{side}: `import psycopg_pool` fails in {rel(python)}: {info['psycopg_pool_error']}")
        if side == OURS:
            log(f"      install our package there first: {rel(python)} -m pip install -e .")
        return None
    return info


# --------------------------------------------------------------------------------------
# server and proxy


def load_embedded_pg() -> ModuleType:
    """psycopg_pool/_embedded_pg.py loaded by path: it uses the standard library only,
    so it works even while the rest of the package is unfinished or not installed."""
    path = REPO / "psycopg_pool" / "_embedded_pg.py"
    if not path.exists():
        raise RuntimeError(f"{rel(path)} not found: pass --dsn or set DATABASE_URL")
    spec = importlib.util.spec_from_file_location("_bench_embedded_pg", path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@contextmanager
def database(dsn: str | None, bindir: str | None) -> Iterator[tuple[str, str]]:
    """Yield (dsn, description) of the server to use for the whole run."""
    if dsn:
        yield dsn, "given by --dsn/DATABASE_URL"
        return
    mod = load_embedded_pg()
    log(f"starting a throw-away PostgreSQL (max_connections={MAX_CONNECTIONS}) ...")
    with mod.EmbeddedPostgres(bindir=bindir, max_connections=MAX_CONNECTIONS) as pg:
        yield pg.dsn, f"throw-away server started by the runner (max_connections={MAX_CONNECTIONS})"


def server_facts(dsn: str) -> dict[str, Any]:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        version = conn.execute("SHOW server_version").fetchone()
        maxconn = conn.execute("SHOW max_connections").fetchone()
        host = conn.info.host
    return {
        "version": version[0] if version else "?",
        "max_connections": int(maxconn[0]) if maxconn else 0,
        "host": host,
    }


@contextmanager
def delay_proxy(dsn: str, delay: float) -> Iterator[str | None]:
    """Start bench/proxy.py in front of the server; yield the DSN through it (or None)."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    params = conninfo_to_dict(dsn)
    host = str(params.get("hostaddr") or params.get("host") or "")
    port = str(params.get("port") or "5432")
    cmd = [sys.executable, str(PROXY), "--delay", str(delay), "--lifetime", "7200"]
    if not host or host.startswith("/"):
        cmd += ["--target-unix", f"{host or '/var/run/postgresql'}/.s.PGSQL.{port}"]
    elif host in ("localhost", "::1") or host.startswith("127."):
        cmd += ["--target-host", host, "--target-port", port]
    else:
        log(f"not proxying to {host}: the delaying proxy forwards to loopback only")
        yield None
        return
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 15.0)
        line = proc.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError("the delaying proxy did not start")
        proxy_port = json.loads(line)["port"]
        kw: dict[str, Any] = {"host": "127.0.0.1", "port": str(proxy_port)}
        if "hostaddr" in params:
            kw["hostaddr"] = "127.0.0.1"
        yield make_conninfo(dsn, **kw)
    finally:
        if proc.stdin:
            proc.stdin.close()  # the proxy exits when its stdin closes
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------------------
# machine


def machine_facts() -> dict[str, Any]:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
    except OSError:
        pass
    return {
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "memory": mem,
        "os": f"{platform.system()} {platform.release()}",
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def _git(*args: str) -> str:
    res = subprocess.run(
        ["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10
    )
    return res.stdout.strip()


def git_revision() -> str:
    try:
        rev = _git("rev-parse", "--short", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "?"
    return f"{rev}{' (with uncommitted changes)' if dirty else ''}" if rev else "?"


# --------------------------------------------------------------------------------------
# running


UNITS = {"us_per_cycle": "µs/cycle", "throughput": "q/s", "serve_s": "s"}


def run_one(python: str, case: Case, dsn: str) -> dict[str, Any]:
    p = case.params
    limit = float(p.get("warmup", 0)) + float(p.get("duration", 0)) + RUN_TIMEOUT_SLACK
    cmd = [python, str(WORKLOAD), "--dsn", dsn, "--scenario", case.scenario]
    cmd += ["--params", json.dumps(p)]
    t0 = time.monotonic()
    try:
        res = subprocess.run(
            cmd, capture_output=True, text=True, timeout=limit, env=child_env(), cwd=BENCH
        )
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {limit:.0f} s", "wall_s": limit}
    wall = time.monotonic() - t0
    obj = last_json_line(res.stdout)
    if obj is None:
        tail = "\n".join(res.stderr.strip().splitlines()[-5:])
        return {"ok": False, "error": f"exit {res.returncode}, no result: {tail}", "wall_s": wall}
    out = {"ok": bool(obj.get("ok")), "wall_s": wall}
    if obj.get("ok"):
        out["metrics"] = obj["metrics"]
    else:
        out["error"] = obj.get("error", "?")
    return out


def describe(case: Case, run: dict[str, Any]) -> str:
    if not run["ok"]:
        return f"ERROR {run['error']}"
    value = run["metrics"].get(case.metric)
    unit = UNITS.get(case.metric, "")
    if isinstance(value, float):
        text = f"{value:,.0f}" if value >= 1000 else f"{value:.3g}"
    else:
        text = str(value)
    return f"{text} {unit}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Scenarios: overhead, select1, burst, churn, peers (context only).",
    )
    ap.add_argument(
        "--pairs", type=int, default=None, help="interleaved pairs (default 3; 1 with --quick)"
    )
    ap.add_argument("--quick", action="store_true", help="short smoke run: fewer cases, shorter")
    ap.add_argument("--only", default="", help="SCENARIO[,..] or case-key prefixes (see --list)")
    ap.add_argument("--list", action="store_true", help="list the cases that would run and exit")
    ap.add_argument(
        "--no-peers", action="store_true", help="skip the SQLAlchemy and asyncpg peer cases"
    )
    ap.add_argument("--duration", type=float, default=None, help="seconds per measurement")
    ap.add_argument(
        "--dsn",
        default=os.environ.get("DATABASE_URL") or None,
        help="server to use (default: $DATABASE_URL, else a throw-away one)",
    )
    ap.add_argument(
        "--bindir", default=None, help="PostgreSQL server binaries for the throw-away server"
    )
    ap.add_argument(
        "--ours-python",
        default=str(OURS_PYTHON),
        help="interpreter with our package (default .venv)",
    )
    ap.add_argument(
        "--upstream-python",
        default=None,
        help=f"interpreter with upstream (default .venv-upstream, created with {UPSTREAM_PIN})",
    )
    ap.add_argument(
        "--output", default=str(REPO / "BENCHMARKS.md"), help="report path (default BENCHMARKS.md)"
    )
    ap.add_argument(
        "--raw", default=None, help="raw JSON results path (default .bench/run-<time>.json)"
    )
    ap.add_argument(
        "--from-json", default=None, help="re-render the report from a raw JSON file and exit"
    )
    args = ap.parse_args(argv)  # fmt: skip

    if args.from_json:
        Path(args.output).write_text(render(json.loads(Path(args.from_json).read_text())))
        log(f"wrote {rel(args.output)}")
        return 0

    pairs = args.pairs if args.pairs is not None else (1 if args.quick else 3)
    if pairs < 1:
        ap.error("--pairs must be at least 1")
    only = [t.strip() for t in args.only.split(",") if t.strip()] or None
    settings = Settings(quick=args.quick, duration=args.duration)
    cases, baselines = plan(settings, only, peers=not args.no_peers, proxy_delay=PROXY_DELAY)
    if not cases:
        ap.error(f"--only {args.only!r} selects no case (see --list)")
    n_runs = pairs * (sum(len(c.sides) for c in cases) + len(baselines))
    est = pairs * (
        sum(c.run_seconds() * len(c.sides) for c in cases)
        + sum(b.run_seconds() for b in baselines.values())
    )
    if args.list:
        for c in [*cases, *baselines.values()]:
            print(f"{c.key:48} {'/'.join(c.sides):18} {json.dumps(c.params)}")
        print(f"{n_runs} runs, about {est / 60:.1f} min")
        return 0

    command = shlex.join([rel(sys.executable), rel(__file__), *sys.argv[1:]])
    started = time.monotonic()
    notes: list[str] = []

    # 1. our interpreter
    # absolute but not resolved: a venv's python is a symlink that must stay one
    ours_py = str(Path(args.ours_python).absolute())
    ours_info = side_info(OURS, ours_py)
    if ours_info is None:
        return 2

    # 2. upstream's interpreter
    peers = any(c.section == "peers" for c in cases)
    if args.upstream_python is None:
        ensure_upstream_venv(UPSTREAM_VENV, ours_info.get("psycopg"), peers)
        up_py = str(UPSTREAM_VENV / "bin" / "python")
    else:
        up_py = str(Path(args.upstream_python).absolute())
    up_info = side_info(UPSTREAM, up_py)
    if up_info is None:
        return 2
    for module in PEER_PACKAGES if peers else ():
        if module not in up_info:
            notes.append(f"{module} is not installed with the upstream interpreter: skipped.")
            cases = [c for c in cases if c.info.get("peer") != module]
    if up_info.get("psycopg_pool") != UPSTREAM_PIN.split("==")[1]:
        notes.append(f"upstream side runs psycopg-pool {up_info.get('psycopg_pool')}, not 3.3.3.")
    if ours_info.get("psycopg_pool_file") == up_info.get("psycopg_pool_file"):
        notes.append(
            "Both sides import the same psycopg_pool file: this run compares that"
            " implementation with itself (a check of the runner and of the noise)."
        )
    elif not str(ours_info.get("psycopg_pool_file", "")).startswith(str(REPO / "psycopg_pool")):
        notes.append(f"Our side imports psycopg_pool from {ours_info.get('psycopg_pool_file')}.")
    if ours_info.get("psycopg") != up_info.get("psycopg"):
        notes.append(
            f"psycopg differs between the sides ({ours_info.get('psycopg')} vs"
            f" {up_info.get('psycopg')}): not only the pool differs."
        )
    for n in notes:
        log(f"note: {n}")

    python_for = {OURS: ours_py, UPSTREAM: up_py, BASE: ours_py, PEER: up_py}
    runs: list[dict[str, Any]] = []
    data: dict[str, Any] = {
        "command": command,
        "started": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "git": git_revision(),
        "pairs": pairs,
        "quick": args.quick,
        "machine": machine_facts(),
        "env": {OURS: ours_info, UPSTREAM: up_info},
        "proxy_delay_s": PROXY_DELAY,
        "cases": [dataclasses.asdict(c) for c in [*cases, *baselines.values()]],
        "runs": runs,
        "notes": notes,
    }

    # 3. one server for the whole run, and the delaying proxy in front of it
    raw = Path(args.raw) if args.raw else RAW_DIR / f"run-{time.strftime('%Y%m%d-%H%M%S')}.json"
    raw.parent.mkdir(parents=True, exist_ok=True)
    need_proxy = any(c.proxy for c in [*cases, *baselines.values()])
    try:
        with database(args.dsn, args.bindir) as (dsn, server_desc):
            facts = server_facts(dsn)
            data["server"] = {**facts, "source": server_desc}
            if facts["max_connections"] < 80:
                log(f"warning: the server allows only {facts['max_connections']} connections")
            with delay_proxy(dsn, PROXY_DELAY) if need_proxy else _none() as proxy_dsn:
                log(f"{n_runs} runs in {pairs} pair(s), about {est / 60:.1f} min")
                # 4. interleaved pairs
                run_pairs(cases, baselines, pairs, python_for, dsn, proxy_dsn, runs, n_runs)
    except KeyboardInterrupt:
        data["elapsed_s"] = round(time.monotonic() - started, 1)
        data["notes"].append("Interrupted: partial results.")
        raw.write_text(json.dumps(data, indent=1))
        log(f"interrupted; partial results in {rel(raw)} (render: --from-json {rel(raw)})")
        return 130

    # 5. raw data and report
    data["elapsed_s"] = round(time.monotonic() - started, 1)
    data["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    raw.write_text(json.dumps(data, indent=1))
    Path(args.output).write_text(render(data))
    failed = sum(1 for r in runs if not r["ok"])
    log(
        f"wrote {rel(args.output)} and {rel(raw)} in {data['elapsed_s']:.0f} s;"
        f" {failed} failed run(s)"
    )
    return 1 if failed else 0


def run_pairs(
    cases: list[Case],
    baselines: dict[str, Case],
    pairs: int,
    python_for: dict[str, str],
    dsn: str,
    proxy_dsn: str | None,
    runs: list[dict[str, Any]],
    n_runs: int,
) -> None:
    """Run every case on both sides, order alternating per pair; append to `runs`."""
    started = time.monotonic()
    i = 0
    for pair in range(pairs):
        order = (OURS, UPSTREAM) if pair % 2 == 0 else (UPSTREAM, OURS)
        baselines_done: set[str] = set()
        for case in cases:
            todo: list[tuple[Case, str]] = []
            if case.sides == (PEER,):
                todo.append((case, PEER))
            else:
                todo.extend((case, side) for side in order)
            if case.baseline and case.baseline not in baselines_done:
                baselines_done.add(case.baseline)
                todo.append((baselines[case.baseline], BASE))
            for c, side in todo:
                i += 1
                target = proxy_dsn if c.proxy else dsn
                if target is None:
                    run: dict[str, Any] = {"ok": False, "error": "no proxy", "wall_s": 0.0}
                else:
                    run = run_one(python_for[side], c, target)
                run.update(key=c.key, side=side, pair=pair)
                runs.append(run)
                clock = int(time.monotonic() - started)
                log(
                    f"[{i:3}/{n_runs} {clock // 60}:{clock % 60:02}] pair {pair + 1}/{pairs}"
                    f" {c.key:44} {side:9} {describe(c, run)}"
                )


@contextmanager
def _none() -> Iterator[None]:
    yield None


if __name__ == "__main__":
    sys.exit(main())
