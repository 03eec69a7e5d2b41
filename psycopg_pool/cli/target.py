"""Which database the commands talk to: the one given, or a throw-away one.

`database()` yields the conninfo to use: ``--dsn``, else ``$DATABASE_URL``, else a
PostgreSQL started for the occasion in a temporary folder (`EmbeddedPostgres`) and
removed afterwards. The server binaries are looked up on the machine, then in the
``pgserver`` package if it is installed (``pip install "psycopg-pool[embedded]"``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import time
from collections.abc import Iterator
from typing import TextIO


class NoServerError(RuntimeError):
    pass


def pgserver_bindir() -> str | None:
    """The server binaries shipped by the ``pgserver`` wheel, if it is installed."""
    try:
        spec = importlib.util.find_spec("pgserver")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        bindir = os.path.join(folder, "pginstall", "bin")
        if os.access(os.path.join(bindir, "initdb"), os.X_OK):
            return bindir
    return None


@contextlib.contextmanager
def database(dsn: str | None, log: TextIO = sys.stderr) -> Iterator[tuple[str, bool]]:
    """Yield (conninfo, embedded); see the module docstring."""
    if dsn:
        yield dsn, False
        return
    url = os.environ.get("DATABASE_URL")
    if url:
        yield url, False
        return
    from .._embedded_pg import EmbeddedPostgres, find_pg_bindir

    bindir = find_pg_bindir() or pgserver_bindir()
    if bindir is None:
        raise NoServerError(
            "no --dsn, no DATABASE_URL, and no PostgreSQL server binaries on this machine"
            " to start a throw-away one: give a DSN, install PostgreSQL (Debian/Ubuntu:"
            ' apt-get install postgresql), or pip install "psycopg-pool[embedded]"'
        )
    t0 = time.monotonic()
    log.write(f"no --dsn and no DATABASE_URL: starting a throw-away PostgreSQL ({bindir}) ...\n")
    log.flush()
    with EmbeddedPostgres(bindir=bindir) as server:
        log.write(f"started in {time.monotonic() - t0:.1f} s: {server.dsn}\n")
        log.flush()
        try:
            yield server.dsn, True
        finally:
            log.write("removing the throw-away PostgreSQL\n")
            log.flush()
