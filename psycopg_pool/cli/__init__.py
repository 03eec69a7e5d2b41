"""The ``psycopg-pool`` command: ``bench`` and ``doctor``.

    psycopg-pool bench [--dsn DSN] [--mode threads|asyncio] [--workers N] ...
    psycopg-pool doctor [DSN]

Also ``python -m psycopg_pool``. Standard library only, beyond psycopg itself.
"""

from __future__ import annotations

import argparse
import os
import sys

from . import bench, doctor


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="psycopg-pool",
        description="Tools for psycopg_pool: load-test a pool configuration, diagnose a DSN.",
    )
    from .. import __version__

    p.add_argument("--version", action="version", version=f"psycopg-pool {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    bench.add_parser(sub)
    doctor.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Whoever read the output stopped (`| head`): end quietly, as `ls | head` does.
        # Python flushes stdout once more at exit: point it somewhere that takes it.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 1
    return code
