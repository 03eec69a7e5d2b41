"""The overhead cases counted in instructions, not timed: ours and upstream under callgrind.

On a shared 2-core machine the timed overhead rows of BENCHMARKS.md swing by 2x from
one run to the next. Instructions executed do not: the same loop counts the same
(to within about 0.5 % here) whatever else the machine does. This runs each overhead
case under `valgrind --tool=callgrind` for 0 and N cycles after a warm-up, on both
sides, and reports (count(N) - count(0)) / N, which leaves out start-up and
connecting. The server runs outside valgrind.

Instructions are not time: a lock hand-off or a cache miss costs more than its
instructions say. The timed rows stay the targets; these tell a change in the code
from a change in the machine.

    .venv/bin/python bench/instructions.py               # ~5 min; needs valgrind
    .venv/bin/python bench/instructions.py --cycles 20000 --dsn "host=..."
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from run import OURS_PYTHON, UPSTREAM_VENV, child_env, database, log

CASES = {
    "sync `with pool.connection()`": "sync-with",
    "sync `getconn()` + `putconn()`": "sync-getput",
    "async `async with pool.connection()`": "async-with",
    "async `await getconn()` + `await putconn()`": "async-getput",
}

# Run by each side's interpreter: `python -c LOOP dsn case cycles`.
LOOP = """
import asyncio, sys
from psycopg_pool import AsyncConnectionPool, ConnectionPool

dsn, case, cycles = sys.argv[1], sys.argv[2], int(sys.argv[3])

def sync_run(n):
    with ConnectionPool(dsn, min_size=4, max_size=4, open=True) as pool:
        pool.wait()
        for _ in range(1000 + n):  # a warm-up, then the counted cycles
            if case == "sync-with":
                with pool.connection():
                    pass
            else:
                pool.putconn(pool.getconn())

async def async_run(n):
    async with AsyncConnectionPool(dsn, min_size=4, max_size=4, open=False) as pool:
        await pool.wait()
        for _ in range(1000 + n):
            if case == "async-with":
                async with pool.connection():
                    pass
            else:
                await pool.putconn(await pool.getconn())

import psycopg_pool
print(psycopg_pool.__file__)
if case.startswith("sync"):
    sync_run(cycles)
else:
    asyncio.run(async_run(cycles))
"""


def count(python: str, dsn: str, case: str, cycles: int) -> int:
    """Instructions the interpreter executes for the whole LOOP program."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp, "callgrind.out")
        done = subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
             python, "-c", LOOP, dsn, case, str(cycles)],
            # Not run from the repo: `-c` puts the current folder first on sys.path,
            # and both sides would import this repo's psycopg_pool.
            capture_output=True, text=True, env=child_env(), timeout=900, cwd=tmp,
        )  # fmt: skip
    found = re.search(r"Collected : (\d+)", done.stderr)
    if done.returncode != 0 or not found:
        raise RuntimeError(f"callgrind run failed ({case}, {python}):\n{done.stderr[-3000:]}")
    if cycles == 0:
        log(f"  {python}: {done.stdout.strip()}")
    return int(found.group(1))


def per_cycle(python: str, dsn: str, case: str, cycles: int) -> float:
    return (count(python, dsn, case, cycles) - count(python, dsn, case, 0)) / cycles


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cycles", type=int, default=10000, help="counted cycles per case")
    parser.add_argument("--dsn", help="server to use (default: a throw-away one)")
    parser.add_argument("--bindir", help="PostgreSQL server binaries for the throw-away server")
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 2
    upstream = UPSTREAM_VENV / "bin" / "python"
    if not upstream.exists():
        print(f"{upstream} is missing: run bench/run.py once to create it", file=sys.stderr)
        return 2
    rows = []
    with database(args.dsn, args.bindir) as (dsn, _):
        for label, case in CASES.items():
            log(f"{case}: upstream ...")
            up = per_cycle(str(upstream), dsn, case, args.cycles)
            log(f"{case}: ours ...")
            ours = per_cycle(str(OURS_PYTHON), dsn, case, args.cycles)
            rows.append(f"| {label} | {up:,.0f} | {ours:,.0f} | {ours / up:.2f} |")
    print("| case | upstream instructions/cycle | ours instructions/cycle | ours ÷ upstream |")
    print("|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
