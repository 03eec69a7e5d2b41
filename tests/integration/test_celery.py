"""The sync pool in a real Celery worker (the default prefork pool), as docs/processes.md says.

Celery forks its worker processes from the main one: a pool must never let two
processes talk over the same server connection, whether it is opened in each worker
process (the documented recipe) or, by mistake, at import in the main process. Celery
also raises SoftTimeLimitExceeded from a signal handler, in the middle of whatever the
task is waiting on (a query, here): the pool must get its connection back, or replace
it, and serve the worker's next tasks.

The worker runs in a subprocess, with kombu's filesystem transport as its broker and
the filesystem result backend (no broker server needed); the tests send tasks by
name from a client app with the same configuration, so the tasks module (and its
pool) is never imported in the test process.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest

from .helpers import stop_process, terminate_backends, wait_until

celery = pytest.importorskip("celery")

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the prefork pool needs fork()")

ROOT = Path(__file__).parents[2]
TASKS_MODULE = "celery_tasks"

# Tasks every worker has. `pool` is defined by the test's own part of the module.
COMMON_TASKS = """
    @app.task(name="ping")
    def ping():
        return os.getpid()


    @app.task(name="whoami")
    def whoami():
        with pool.connection() as conn:
            backend = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
            return [os.getpid(), backend]


    @app.task(name="meet")
    def meet(n):
        # Holds its connection until n worker processes hold one at once: then each
        # process has used the pool, with connections open side by side.
        with pool.connection() as conn:
            backend = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
            (MEET / str(os.getpid())).touch()
            deadline = time.monotonic() + 20
            while len(list(MEET.iterdir())) < n:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"only {len(list(MEET.iterdir()))} of {n} processes met")
                time.sleep(0.01)
            return [os.getpid(), backend]
"""


class Worker:
    """A running `celery worker` subprocess and a client app to send it tasks."""

    def __init__(self, proc: subprocess.Popen[bytes], client: Any, log: Path) -> None:
        self.proc = proc
        self.client = client
        self.log = log

    def send(self, name: str, *args: Any) -> Any:
        return self.client.send_task(name, args=args)

    def call(self, name: str, *args: Any, timeout: float = 30.0) -> Any:
        """Run a task, which must succeed; its value."""
        return self.succeeded([self.send(name, *args)], timeout)[0]

    def get(self, result: Any, timeout: float = 30.0) -> Any:
        """The task's value, or the exception it raised (see `result.state`)."""
        return result.get(timeout=timeout, interval=0.02, propagate=False)

    def succeeded(self, results: list[Any], timeout: float = 30.0) -> list[Any]:
        """The values of these tasks, which must all have succeeded."""
        values = [self.get(r, timeout) for r in results]
        for r in results:
            assert r.state == "SUCCESS", f"{r.state}: {r.traceback}"
        return values

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        """Warm shutdown (SIGTERM): running tasks end, then the worker processes exit."""
        if not stop_process(self.proc):
            pytest.fail(f"the worker did not stop on SIGTERM\n{self.log_text()}")


def publish_atomically(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make kombu's filesystem transport, in this process, publish whole messages only.

    It creates each message file in the queue folder, then writes it: a worker that
    polls the folder in between reads an empty message and dies ("Unrecoverable
    error: JSONDecodeError"). Here the message is written under a name the worker
    ignores, then renamed (atomic) to the name kombu would give it.
    """
    filesystem = importlib.import_module("kombu.transport.filesystem")
    dumps = importlib.import_module("kombu.utils.json").dumps

    def put(channel: Any, queue: str, payload: Any, **kwargs: Any) -> None:
        # Named as kombu names them: sorted by time, the worker takes the oldest first.
        name = f"{round(time.monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        final = Path(channel.data_folder_out, name)
        partial = final.with_name(f"{name}.partial")
        partial.write_text(dumps(payload))
        partial.rename(final)

    monkeypatch.setattr(filesystem.Channel, "_put", put)


@contextmanager
def celery_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pool_code: str, concurrency: int
) -> Iterator[Worker]:
    """Write the tasks module (`pool_code`, then COMMON_TASKS), start a worker on it.

    Yields once the worker has answered a ping; stops it (SIGTERM, SIGKILL if it
    hangs) on the way out.
    """
    publish_atomically(monkeypatch)
    queue = tmp_path / "queue"
    processed = tmp_path / "processed"
    results = tmp_path / "results"
    for d in (queue, processed, results, tmp_path / "meet"):
        d.mkdir()
    # Every path absolute and in tmp_path: kombu's defaults are relative to the
    # current directory, or /tmp.
    config = {
        "broker_url": "filesystem://",
        "broker_transport_options": {
            "data_folder_in": str(queue),
            "data_folder_out": str(queue),
            "processed_folder": str(processed),
            "store_processed": True,
            "control_folder": str(tmp_path / "control"),
            "polling_interval": 0.02,  # the default 1 s would make every test slow
        },
        "result_backend": "file://" + str(results),
        "broker_connection_retry_on_startup": True,
        "worker_prefetch_multiplier": 1,  # no task reserved behind a busy process
    }
    source = "\n".join(
        [
            "import json, os, time",
            "from pathlib import Path",
            "from celery import Celery, signals",
            "from psycopg_pool import ConnectionPool",
            "HERE = Path(__file__).parent",
            'MEET = HERE / "meet"',
            f"app = Celery({TASKS_MODULE!r})",
            f"app.conf.update({config!r})",
            textwrap.dedent(pool_code),
            textwrap.dedent(COMMON_TASKS),
        ]
    )
    (tmp_path / f"{TASKS_MODULE}.py").write_text(source)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(tmp_path), str(ROOT), *filter(None, [env.get("PYTHONPATH")])]
    )
    log = tmp_path / "worker.log"
    cmd = [
        sys.executable, "-m", "celery", "-A", TASKS_MODULE, "worker",
        # -O fair: a task goes to an idle worker process (what `meet` relies on).
        "--pool", "prefork", "--concurrency", str(concurrency), "-O", "fair",
        "--loglevel", "INFO", "--without-heartbeat", "--without-gossip", "--without-mingle",
    ]  # fmt: skip
    client = celery.Celery("client")
    client.conf.update(config)
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    worker = Worker(proc, client, log)
    try:
        worker.call("ping", timeout=60)
        yield worker
    except BaseException:
        print(worker.log_text())  # pytest shows it with the failure
        raise
    finally:
        try:
            worker.stop()
        finally:
            client.close()


def sessions(dsn: str, application_name: str) -> list[tuple[int, str, str]]:
    """(pid, state, query) of the server sessions opened with this application_name."""
    with psycopg.connect(dsn, autocommit=True) as admin:
        cur = admin.execute(
            "SELECT pid, state, query FROM pg_stat_activity WHERE application_name = %s",
            [application_name],
        )
        return [(int(pid), str(state), str(query)) for pid, state, query in cur]


def backends_by_process(pairs: list[list[int]]) -> dict[int, set[int]]:
    """{worker process pid: the backend pids its tasks used}, from whoami/meet results."""
    used: dict[int, set[int]] = {}
    for pid, backend in pairs:
        used.setdefault(pid, set()).add(backend)
    return used


def recipe(dsn: str, app_name: str) -> str:
    """The documented recipe: a pool built at import (in the main process, before the
    fork) but opened in each worker process, and closed there when it exits."""
    return f"""
        pool = ConnectionPool(
            {dsn!r}, min_size=1, max_size=1, open=False, name={app_name!r},
            kwargs={{"application_name": {app_name!r}}},
        )

        @signals.worker_process_init.connect
        def open_pool(**kwargs):
            pool.open()

        @signals.worker_process_shutdown.connect
        def close_pool(**kwargs):
            pool.close()
            (HERE / f"closed-{{os.getpid()}}").write_text(json.dumps(pool.closed))
    """


def test_documented_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dsn: str) -> None:
    app_name = "celery-recipe"
    pool_code = recipe(dsn, app_name)
    with celery_worker(tmp_path, monkeypatch, pool_code, concurrency=2) as worker:
        pairs = worker.succeeded([worker.send("meet", 2) for _ in range(2)])
        pairs += worker.succeeded([worker.send("whoami") for _ in range(20)])
    used = backends_by_process(pairs)
    assert len(used) == 2, f"the 2 worker processes did not both run tasks: {used}"
    for pid, backends in used.items():
        # max_size=1: one connection per process, for all its tasks.
        assert len(backends) == 1, f"worker process {pid} used backends {backends}"
        for other, theirs in used.items():
            if other != pid:
                assert not (backends & theirs), f"processes {pid} and {other} shared a backend"
    # worker_process_shutdown ran in each worker process, and closed its pool there.
    assert {int(p.name.split("-")[1]) for p in tmp_path.glob("closed-*")} >= set(used)
    assert all(p.read_text() == "true" for p in tmp_path.glob("closed-*"))
    # The server sees the sockets close a moment later.
    wait_until(lambda: not sessions(dsn, app_name), f"the {app_name} sessions to end")


def test_pool_opened_in_the_main_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dsn: str
) -> None:
    # The mistake the recipe avoids: a pool opened at import, in the worker's main
    # process, before it forks the worker processes. These inherit the pool with the
    # main process's connection in it: they must open their own instead, and leave
    # the main process's one alone (not use it, not close it for it).
    app_name = "celery-preopened"
    pool_code = f"""
        pool = ConnectionPool(
            {dsn!r}, min_size=1, max_size=1, open=True, name="celery-preopened",
            kwargs={{"application_name": {app_name!r}}},
        )
        pool.wait(timeout=10)
        with pool.connection() as conn:
            _backend = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        (HERE / "parent.json").write_text(json.dumps([os.getpid(), _backend]))
    """
    with celery_worker(tmp_path, monkeypatch, pool_code, concurrency=2) as worker:
        main_pid, main_backend = json.loads((tmp_path / "parent.json").read_text())
        assert main_pid == worker.proc.pid
        pairs = worker.succeeded([worker.send("meet", 2) for _ in range(2)])
        pairs += worker.succeeded([worker.send("whoami") for _ in range(20)])
        # The main process's connection is still there: no worker process closed it.
        live = {pid for pid, _, _ in sessions(dsn, app_name)}
        assert main_backend in live
    used = backends_by_process(pairs)
    assert len(used) == 2, f"the 2 worker processes did not both run tasks: {used}"
    assert main_pid not in used
    for pid, backends in used.items():
        assert main_backend not in backends, f"worker process {pid} used the main one's backend"
        assert len(backends) == 1, f"worker process {pid} used backends {backends}"
        for other, theirs in used.items():
            if other != pid:
                assert not (backends & theirs), f"processes {pid} and {other} shared a backend"
    wait_until(lambda: not sessions(dsn, app_name), f"the {app_name} sessions to end")


def test_soft_time_limit_in_the_middle_of_a_query(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dsn: str
) -> None:
    # SoftTimeLimitExceeded comes out of a signal handler while psycopg waits for
    # pg_sleep's result: the connection goes back to the pool still running its
    # query (psycopg cancels it only on KeyboardInterrupt). The worker process's next
    # tasks must get a usable connection, the pool must not count it lost nor grow,
    # and the server must stop the query: the pool cancels it as it closes the
    # connection, else it would run (with its locks) until it ends.
    app_name = "celery-soft-limit"
    sleeper_file = tmp_path / "sleeper.json"
    pool_code = (
        recipe(dsn, app_name)
        + """
        from psycopg.pq import TransactionStatus

        # The hard limit only bounds a broken test: it would replace the worker
        # process, which the test would see.
        @app.task(name="sleeper", soft_time_limit=1, time_limit=20)
        def sleeper():
            with pool.connection() as conn:
                backend = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
                (HERE / "sleeper.json").write_text(json.dumps([os.getpid(), backend]))
                conn.execute("SELECT pg_sleep(30)")

        @app.task(name="probe")
        def probe():
            with pool.connection() as conn:
                status = TransactionStatus(conn.info.transaction_status).name
                one = conn.execute("SELECT 1").fetchone()[0]
                backend = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
            return {
                "pid": os.getpid(), "backend": backend, "status": status, "one": one,
                "stats": pool.get_stats(),
            }
    """
    )
    try:
        with celery_worker(tmp_path, monkeypatch, pool_code, concurrency=1) as worker:
            before = worker.call("probe")
            slept = worker.send("sleeper")
            worker.get(slept)
            assert slept.state == "FAILURE"
            assert type(slept.result).__name__ == "SoftTimeLimitExceeded", slept.traceback
            sleeper_pid, sleeper_backend = json.loads(sleeper_file.read_text())
            after = [worker.call("probe", timeout=10) for _ in range(3)]
            wait_until(
                lambda: (
                    not any(
                        state == "active" and "pg_sleep" in query
                        for _, state, query in sessions(dsn, app_name)
                    )
                ),
                "the server to stop the interrupted query",
            )
        for probe in [before, *after]:
            # The same worker process: the soft limit, not the hard one, ended the task.
            assert probe["pid"] == sleeper_pid
            assert probe["status"] == "IDLE"
            assert probe["one"] == 1
        stats = after[-1]["stats"]
        assert stats["pool_size"] == 1
        assert stats["pool_max"] == 1
        assert stats["requests_waiting"] == 0
        assert stats.get("connections_lost", 0) == 0
        assert stats["requests_num"] == 5  # 4 probes and the sleeper: none failed to get one
        assert all(probe["backend"] != sleeper_backend for probe in after)  # closed
        wait_until(lambda: not sessions(dsn, app_name), f"the {app_name} sessions to end")
    finally:
        # On a failure, the query must not outlive the test by half a minute.
        if sleeper_file.exists():
            terminate_backends(dsn, json.loads(sleeper_file.read_text())[1])
