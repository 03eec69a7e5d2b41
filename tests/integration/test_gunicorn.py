"""The pool under a real gunicorn: pre-forked workers, `preload_app`, gthread workers.

gunicorn imports the application in its master process when `preload_app` is set,
then forks the workers from it. Two ways are documented (docs/processes.md): a pool
opened at import (it must survive the fork: each worker opens its own connections and
leaves the master's alone) and the recipe, a pool opened in `post_fork` and closed in
`worker_exit`. Both are served here by real gunicorn processes, over a Unix socket.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from .helpers import server_pids, stop_process, wait_until

pytest.importorskip("gunicorn")
pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="gunicorn forks its workers")

MAX_SIZE = 2
THREADS = 4  # more request threads than connections: requests queue in the pool

APP = """
    import json
    import os

    from psycopg_pool import ConnectionPool

    NAME = os.environ["GAPP_NAME"]
    AT_IMPORT = os.environ["GAPP_OPEN"] == "import"

    pool = ConnectionPool(
        os.environ["GAPP_DSN"], min_size=1, max_size=int(os.environ["GAPP_MAX"]),
        open=AT_IMPORT, name=NAME, kwargs={"application_name": NAME},
    )
    if AT_IMPORT:
        # In the master: the connections every worker inherits.
        pool.wait(10)
        with pool.connection() as conn:
            with open(os.environ["GAPP_MASTER"], "w") as f:
                f.write(str(conn.info.backend_pid))


    def app(environ, start_response):
        with pool.connection(timeout=10) as conn:
            backend = conn.info.backend_pid
            # Held a moment: a worker's threads overlap and queue for the connections.
            conn.execute("SELECT pg_sleep(0.02)")
        stats = pool.get_stats()
        body = json.dumps({"pid": os.getpid(), "backend": backend, "stats": stats})
        start_response("200 OK", [("Content-Type", "application/json")])
        return [body.encode()]
"""

CONF = """
    import os

    bind = "unix:" + os.environ["GAPP_SOCKET"]
    workers = 2
    worker_class = "gthread"
    threads = {threads}
    preload_app = True
    graceful_timeout = 10
    accesslog = None

    if os.environ["GAPP_OPEN"] == "post_fork":

        def post_fork(server, worker):
            from gapp import pool

            pool.open()

        def worker_exit(server, worker):
            from gapp import pool

            pool.close()
"""


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=30)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(30)
        sock.connect(self.path)
        self.sock = sock


def get(path: str) -> dict[str, Any]:
    conn = UnixHTTPConnection(path)
    try:
        conn.request("GET", "/")
        resp = conn.getresponse()
        body = resp.read()
        assert resp.status == 200, body
        result: dict[str, Any] = json.loads(body)
        return result
    finally:
        conn.close()


def accepting(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(path)
        except OSError:
            return False
        return True


class Gunicorn:
    def __init__(self, tmp_path: Path, dsn: str, how: str) -> None:
        self.name = f"gunicorn-{how}"
        # Short: AF_UNIX paths are limited to about 100 bytes.
        self.socket = f"/tmp/psycopg-pool-{os.getpid()}-{how}.sock"
        self.master_backend_file = tmp_path / "master_backend"
        (tmp_path / "gapp.py").write_text(textwrap.dedent(APP))
        (tmp_path / "gconf.py").write_text(textwrap.dedent(CONF).format(threads=THREADS))
        self.log = tmp_path / "gunicorn.log"
        env = dict(os.environ)
        env.update(
            GAPP_DSN=dsn,
            GAPP_NAME=self.name,
            GAPP_OPEN=how,
            GAPP_MAX=str(MAX_SIZE),
            GAPP_SOCKET=self.socket,
            GAPP_MASTER=str(self.master_backend_file),
            PYTHONPATH=os.pathsep.join([str(tmp_path), str(Path(__file__).parents[2])]),
        )
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gunicorn", "-c", "gconf.py", "gapp:app"],
                cwd=tmp_path,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_until(
                lambda: self.proc.poll() is not None or accepting(self.socket),
                "gunicorn to listen",
                timeout=30,
            )
            assert self.proc.poll() is None, self.log.read_text()
        except BaseException:
            self.stop()
            raise

    def requests(self, n: int) -> list[dict[str, Any]]:
        with ThreadPoolExecutor(n) as ex:
            return list(ex.map(lambda _: get(self.socket), range(n)))

    def master_backend(self) -> int:
        return int(self.master_backend_file.read_text())

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> int | None:
        stop_process(self.proc)
        if os.path.exists(self.socket):
            os.unlink(self.socket)
        return self.proc.returncode


@pytest.fixture
def gunicorn(tmp_path: Path, dsn: str, request: pytest.FixtureRequest) -> Iterator[Gunicorn]:
    server = Gunicorn(tmp_path, dsn, request.param)
    try:
        yield server
    finally:
        server.stop()


def check_served(replies: list[dict[str, Any]]) -> dict[int, set[int]]:
    """Each worker used backends of its own, at most max_size of them: {worker: backends}."""
    by_worker: dict[int, set[int]] = {}
    for r in replies:
        by_worker.setdefault(r["pid"], set()).add(r["backend"])
        assert r["stats"]["pool_size"] <= MAX_SIZE
        assert r["stats"].get("connections_lost", 0) == 0
    for pid, backends in by_worker.items():
        assert len(backends) <= MAX_SIZE, (pid, backends)
        for other, theirs in by_worker.items():
            assert other == pid or not (backends & theirs), "two workers shared a backend"
    return by_worker


@pytest.mark.parametrize("gunicorn", ["import"], indirect=True)
def test_a_pool_opened_at_import_serves_every_worker_and_spares_the_master(
    gunicorn: Gunicorn, dsn: str
) -> None:
    master = gunicorn.master_backend()
    by_worker = check_served(gunicorn.requests(24))
    assert master not in set().union(*by_worker.values()), "a worker used the master's socket"
    sessions = server_pids(dsn, gunicorn.name)
    assert master in sessions
    # One worker less (TTOU): the worker that leaves ends its own sessions at exit, and
    # must not end the master's, whose socket it inherited.
    workers = sessions - {master}
    gunicorn.signal(signal.SIGTTOU)
    wait_until(
        lambda: not workers <= server_pids(dsn, gunicorn.name),
        "a worker's sessions to end",
        timeout=20,
    )
    assert master in server_pids(dsn, gunicorn.name)
    check_served(gunicorn.requests(8))
    assert gunicorn.stop() == 0, gunicorn.log.read_text()


@pytest.mark.parametrize("gunicorn", ["post_fork"], indirect=True)
def test_the_documented_post_fork_recipe(gunicorn: Gunicorn, dsn: str) -> None:
    check_served(gunicorn.requests(24))
    # Only the workers connect (the master holds nothing it does not use), each to
    # at most max_size.
    assert not gunicorn.master_backend_file.exists()
    assert 2 <= len(server_pids(dsn, gunicorn.name)) <= 2 * MAX_SIZE
    assert gunicorn.stop() == 0, gunicorn.log.read_text()
    wait_until(lambda: not server_pids(dsn, gunicorn.name), "the sessions to end")
