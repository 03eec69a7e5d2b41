"""A sync pool left open when the interpreter exits (no database needed).

Scripts often end without closing their pool. The interpreter then collects it during
its shutdown, when daemon threads no longer run: a pool that waited there for its
threads to end would hold the exit up (on Python 3.13.0, by the whole 5 s timeout,
with a warning for each thread) for nothing.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap


def run_script(body: str) -> subprocess.CompletedProcess[str]:
    script = textwrap.dedent(body)
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )


def test_an_idle_pool_left_open_lets_the_interpreter_exit_quietly() -> None:
    res = run_script(
        """
        import socket
        from psycopg_pool import ConnectionPool

        # Nobody listens there, and min_size=0 never connects: the threads only wait.
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        pool = ConnectionPool(
            f"host=127.0.0.1 port={port}", min_size=0, max_size=2, name="left-open"
        )
        assert pool.get_stats()["pool_size"] == 0
        print("end of script")
        """
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout == "end of script\n"
    assert res.stderr == ""


def test_a_pool_connecting_at_exit_does_not_hold_the_exit_up() -> None:
    res = run_script(
        """
        import socket
        import threading
        from psycopg_pool import ConnectionPool

        # A listener that accepts and never answers: the connection attempt that the
        # pool starts for min_size is still running when the script ends.
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        pool = ConnectionPool(
            f"host=127.0.0.1 port={port} connect_timeout=60", min_size=1, name="connecting"
        )
        conn, _ = listener.accept()  # the pool's attempt reached the server
        print("end of script")
        """
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout == "end of script\n"
    assert "couldn't stop" not in res.stderr
    assert res.stderr == ""
