"""The ``psycopg-pool`` command as a user runs it: a real process, its real output.

Without a terminal the output must be plain lines (no escape sequence at all); on a
terminal (a pseudo-terminal here) the live block is redrawn in place. Either way the
run ends with the summary and the sizing advice. Durations are kept short: what is
checked is the shape of the output, never a number that depends on the machine.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import psycopg
import pytest

from .helpers import refused_conninfo

ROOT = Path(__file__).resolve().parents[2]
ESCAPE = re.compile(r"[\x1b\x9b]")  # ESC, or a C1 control sequence introducer
ESCAPE_SEQUENCE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
PROGRESS = re.compile(
    r"^\[ *\d+\.\d/[\d.]+ s\] [\d,]+ queries/s  p50 \S+ ms  p95 \S+ ms  p99 \S+ ms"
    r"  pool size \d+/\d+ idle \d+ waiting \d+  errors \d+$"
)


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env.update(extra)
    return env


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "psycopg_pool", *args],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        env=env if env is not None else cli_env(),
        timeout=120,
        check=False,
    )


ADVICE_TOPICS = ("busy connections", "waiting clients", "max_size", "min_size", "server budget")


def advice_topics(out: str) -> list[str]:
    """The topics of the advice lines, in order (each line starts with its topic)."""
    after = out.split("SIZING ADVICE", 1)[1].splitlines()[1:]
    lines = [line.strip() for line in after if line.startswith("  ")]
    return [next((t for t in ADVICE_TOPICS if line.startswith(t)), line) for line in lines]


def test_bench_without_a_terminal_prints_plain_lines(dsn: str) -> None:
    res = run_cli(
        "bench",
        "--dsn",
        dsn,
        "--duration",
        "0.8",
        "--workers",
        "6",
        "--min-size",
        "2",
        "--max-size",
        "3",
        "--processes",
        "4",
    )
    assert res.returncode == 0, res.stderr
    assert not ESCAPE.search(res.stdout + res.stderr)
    lines = res.stdout.splitlines()
    progress = [line for line in lines if line.startswith("[")]
    assert progress, res.stdout  # at least the final state
    for line in progress:
        assert PROGRESS.match(line), line
    assert any(line.startswith("SUMMARY: ") for line in lines)
    assert "threads, 6 workers, min_size 2, max_size 3, query: SELECT 1" in res.stdout
    for label in ("waiting for a connection", "holding it (query, commit)", "total"):
        assert any(line.strip().startswith(label) for line in lines), label
    assert advice_topics(res.stdout) == list(ADVICE_TOPICS)
    budget = next(line for line in lines if line.strip().startswith("server budget"))
    assert "4 processes x max_size" in budget
    assert "max_connections" in budget
    assert "Little's law" in res.stdout


def test_bench_json_asyncio(dsn: str) -> None:
    res = run_cli(
        "bench",
        "--dsn",
        dsn,
        "--mode",
        "asyncio",
        "--workers",
        "8",
        "--max-size",
        "4",
        "--duration",
        "0.5",
        "--target-wait",
        "20",
        "--json",
    )
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)  # one JSON object and nothing else
    assert data["config"]["mode"] == "asyncio"
    assert data["config"]["max_size"] == 4
    assert data["queries"] > 0
    assert data["errors"] == {}
    for key in ("wait_ms", "use_ms", "latency_ms"):
        assert set(data[key]) == {"p50", "p95", "p99", "max", "mean"}
        assert data[key]["p50"] <= data[key]["p99"] <= data[key]["max"]
    assert data["server"]["max_connections"] > 0
    advice = data["advice"]
    assert advice["target_wait_ms"] == 20
    assert advice["busy_connections"] > 0
    assert advice["recommended_max_size"] >= max(1, int(advice["busy_connections"]))
    assert advice["budget"]["connections"] == advice["recommended_max_size"]
    assert advice["budget"]["fits"] is True
    assert [line["topic"] for line in advice["lines"]] == list(ADVICE_TOPICS)
    assert data["pool"]["stats"]["pool_max"] == 4


def read_to_the_end(controller: int) -> bytes:
    """What a pseudo-terminal's process writes until it closes its end; closes ours."""
    chunks = []
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # EIO: the process closed its end
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(controller)
    return b"".join(chunks)


def test_bench_on_a_terminal_redraws_in_place(dsn: str) -> None:
    """On a (pseudo-)terminal: the block is redrawn with cursor moves, then the summary."""
    script = Path(sys.executable).parent / "psycopg-pool"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "psycopg_pool"]
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(
        [*cmd, "bench", "--dsn", dsn, "--duration", "0.6", "--workers", "4"],
        stdin=subprocess.DEVNULL,
        stdout=terminal,
        stderr=subprocess.PIPE,
        env=cli_env(TERM="xterm"),
    )
    os.close(terminal)
    out_bytes = read_to_the_end(controller)
    assert proc.wait(timeout=60) == 0, proc.stderr.read() if proc.stderr else ""
    if proc.stderr:
        proc.stderr.close()
    out = out_bytes.decode()
    assert "\x1b[?25l" in out  # cursor hidden while drawing ...
    assert "\x1b[?25h" in out  # ... and given back
    assert "\x1b[2K" in out
    assert "throughput" in out and "latency" in out and "pool        size" in out
    summary = out[out.index("\x1b[?25h") :]
    assert "SUMMARY: " in summary and "SIZING ADVICE" in summary
    assert not ESCAPE.search(summary.replace("\x1b[?25h", "", 1))


def test_demo_script_runs_the_bench_on_a_throwaway_server() -> None:
    """README's demo command, with a shorter run: no DSN, so a server of its own."""
    res = subprocess.run(
        ["bash", str(ROOT / "scripts" / "demo.sh"), "--duration", "0.5", "--workers", "4"],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        env=cli_env(),
        timeout=300,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    assert "starting a throw-away PostgreSQL" in res.stderr
    assert "removing the throw-away PostgreSQL" in res.stderr
    match = re.search(r"started in [\d.]+ s: (host=.*)", res.stderr)
    assert match is not None, res.stderr
    assert "SUMMARY: " in res.stdout and "SIZING ADVICE" in res.stdout
    assert not ESCAPE.search(res.stdout + res.stderr)
    with pytest.raises(psycopg.OperationalError):  # gone with the command
        psycopg.connect(match.group(1), connect_timeout=2).close()


def test_bench_query_error_is_reported(dsn: str) -> None:
    res = run_cli("bench", "--dsn", dsn, "--duration", "0.2", "--query", "SELEC 1")
    assert res.returncode == 1
    assert "the query fails: SyntaxError" in res.stderr
    assert "Traceback" not in res.stderr
    assert res.stdout == ""


def test_bench_unreachable_server_masks_the_password() -> None:
    secret = "Hunter2-not-printed"
    conninfo = refused_conninfo() + f" password={secret}"
    res = run_cli("bench", "--dsn", conninfo, "--duration", "0.2", "--timeout", "0.5")
    assert res.returncode == 1
    assert "psycopg-pool bench: the pool could not open its connections" in res.stderr
    assert "Connection refused" in res.stderr or "connection refused" in res.stderr
    assert secret not in res.stdout + res.stderr
    assert "Traceback" not in res.stderr


def test_usage_errors() -> None:
    res = run_cli("bench", "--workers", "0")
    assert res.returncode == 2
    assert "--workers" in res.stderr
    res = run_cli("doctor", env=cli_env())
    assert res.returncode == 2
    assert "give a DSN" in res.stderr


@pytest.mark.parametrize("command", ["doctor", "bench"])
def test_a_reader_that_stops_early_ends_the_command_quietly(dsn: str, command: str) -> None:
    # `psycopg-pool ... | head -1`: the pipe closes under the command's feet.
    args = [dsn] if command == "doctor" else ["--dsn", dsn, "--duration", "2", "--workers", "2"]
    cmd = [sys.executable, "-m", "psycopg_pool", command, *args]
    writer = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=cli_env()
    )
    assert writer.stdout is not None and writer.stderr is not None
    first = writer.stdout.readline()
    writer.stdout.close()  # the reader is gone
    err = writer.stderr.read().decode()
    writer.stderr.close()
    assert writer.wait(timeout=60) in (0, 1)
    assert first.startswith(b"psycopg-pool doctor:" if command == "doctor" else b"[")
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


@pytest.mark.parametrize("command", ["doctor", "bench"])
@pytest.mark.parametrize("value", ["nan", "inf", "0", "-1", "1e10"])
def test_a_timeout_no_wait_can_take_is_refused_naming_it(command: str, value: str) -> None:
    res = run_cli(command, "--timeout", value, *(["host=127.0.0.1"] if command == "doctor" else []))
    assert res.returncode == 2
    assert "argument --timeout: must be a positive number of seconds" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("mode", ["threads", "asyncio"])
def test_ctrl_c_twice_stops_a_run_of_slow_queries_and_gives_the_cursor_back(
    dsn: str, mode: str
) -> None:
    # The first Ctrl-C lets the workers finish their query; the second stops waiting
    # for them. Either way the terminal gets its cursor back.
    # bench runs its query once before the run to check it: that one must be quick.
    seq = f"cli_ctrl_c_{mode}_{os.getpid()}"
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(f"CREATE SEQUENCE {seq}")
    query = f"SELECT pg_sleep(CASE WHEN nextval('{seq}') = 1 THEN 0 ELSE 30 END)"
    args = ["--dsn", dsn, "--mode", mode, "--workers", "2", "--duration", "60", "--query", query]
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "psycopg_pool", "bench", *args],
        stdin=subprocess.DEVNULL,
        stdout=terminal,
        stderr=subprocess.PIPE,
        env=cli_env(TERM="xterm"),
    )
    os.close(terminal)
    out = b""
    while b"\x1b[?25l" not in out:  # the live display is up: the run has started
        out += os.read(controller, 65536)
    ended = None
    for _ in range(5):  # each Ctrl-C, then up to 2 s for the process to end
        os.kill(proc.pid, signal.SIGINT)
        try:
            ended = proc.wait(timeout=2.0)
            break
        except subprocess.TimeoutExpired:
            continue
    if ended is None:
        proc.kill()
        proc.wait()
    out += read_to_the_end(controller)
    err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.stderr:
        proc.stderr.close()
    with psycopg.connect(dsn, autocommit=True) as admin:
        # The queries of threads stopped that way run on in the server (they hold the
        # sequence): cancel them, then drop it.
        sql = "SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE query = %s"
        admin.execute(sql, [query])
        admin.execute(f"DROP SEQUENCE {seq}")
    assert ended == 130, (ended, err)  # long before the queries' 30 s
    assert "interrupted" in err and "Traceback" not in err, err
    assert out.rfind(b"\x1b[?25h") > out.rfind(b"\x1b[?25l")  # the cursor is back


def test_slow_queries_get_readable_numbers_in_the_advice() -> None:
    # 2 connections each busy 20 s on one query: 0.1 queries/s, not "0 queries/s x
    # 2e+04 ms".
    from psycopg_pool.cli.measure import Histogram
    from psycopg_pool.cli.sizing import ServerInfo, advise

    use, wait = Histogram(), Histogram()
    for _ in range(2):
        use.add(20.0)
        wait.add(0.001)
    adv = advise(
        max_size=2,
        min_size=2,
        ops=2,
        elapsed=20.0,
        wait=wait,
        use=use,
        target=0.05,
        processes=1,
        server=ServerInfo(),
        connect_ms=None,
        sampled_busy=None,
    )
    busy = dict(adv.lines)["busy connections"]
    assert busy.startswith("Little's law: 0.1 queries/s x 20,"), busy
    assert "e+" not in " ".join(text for _, text in adv.lines)


def test_the_live_block_fits_a_narrow_terminal(dsn: str) -> None:
    # A line wider than the terminal would wrap, and each redraw leave a copy behind.
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 40, 0, 0))
    query = "SELECT 1 AS a_rather_long_column_alias_to_widen_the_header_line"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "psycopg_pool",
            "bench",
            "--dsn",
            dsn,
            "--duration",
            "1",
            "--workers",
            "2",
            "--query",
            query,
        ],
        stdin=subprocess.DEVNULL,
        stdout=terminal,
        stderr=subprocess.PIPE,
        env=cli_env(TERM="xterm"),
    )
    os.close(terminal)
    out = read_to_the_end(controller).decode()
    assert proc.wait(timeout=60) == 0
    if proc.stderr:
        proc.stderr.close()
    drawn = [line for line in out.split("\n") if line.startswith("\x1b[2K")]
    assert len(drawn) > 5  # redrawn at least once
    widths = [len(ESCAPE_SEQUENCE.sub("", line).rstrip("\r")) for line in drawn]
    assert max(widths) < 40, [line for line in drawn if len(line) >= 40]


def test_bench_against_a_silent_server_gives_up_after_its_timeout(dsn: str) -> None:
    # Its first connection (to read the server's connection slots) waited 10 s whatever
    # --timeout said.
    from .faults import FaultProxy

    port = int(psycopg.conninfo.conninfo_to_dict(dsn).get("port") or 5432)
    with FaultProxy(port) as proxy:
        proxy.blackhole()
        t0 = time.monotonic()
        res = run_cli("bench", "--dsn", proxy.conninfo(dsn), "--timeout", "1", "--duration", "1")
        elapsed = time.monotonic() - t0
        proxy.resume()
    assert res.returncode == 1
    assert "the pool could not open its connections" in res.stderr
    # About 8 s: the first connection 2 x 1 s (libpq tries TLS, then without), the pool
    # 1 s, and up to 5 s for its close() to stop the attempts under way. It was 10 s more.
    assert elapsed < 12.0


@pytest.mark.parametrize("value", ["nan", "inf", "0", "-2"])
def test_a_target_wait_that_is_not_a_positive_number_is_refused(value: str) -> None:
    res = run_cli("bench", "--target-wait", value)
    assert res.returncode == 2
    assert "argument --target-wait: must be a positive number, got" in res.stderr
