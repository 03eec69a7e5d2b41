"""``psycopg-pool doctor`` against real servers misconfigured on purpose.

Each test starts (or reconfigures) a real PostgreSQL so that connecting fails, or
works badly, in one known way, and checks that doctor names it on the right line,
with a fix, that the exit status says so, and that no password is ever printed.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from psycopg_pool._embedded_pg import EmbeddedPostgres
from psycopg_pool.cli import main

from .helpers import refused_conninfo, wait_until

PASSWORD = "Dr-Secret-7731"  # distinctive: a test fails if it shows up anywhere
AUTH_HBA = [
    "local all all trust",
    "host all postgres 127.0.0.1/32 scram-sha-256",  # only postgres, with a password
]


@pytest.fixture(autouse=True)
def no_ambient_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("PGPASSWORD", "PGUSER", "PGHOST", "PGPORT", "PGDATABASE", "DATABASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PGPASSFILE", "/dev/null")  # no ~/.pgpass to supply a password


@pytest.fixture(scope="module")
def auth_server() -> Iterator[EmbeddedPostgres]:
    """A server asking for a password (SCRAM) over TCP, for postgres only."""
    with EmbeddedPostgres(password=PASSWORD, hba_lines=AUTH_HBA) as server:
        yield server


@pytest.fixture(scope="module")
def small_server() -> Iterator[EmbeddedPostgres]:
    """max_connections 6, 2 of them for superusers: 4 slots for the role ``app``."""
    with EmbeddedPostgres(
        max_connections=6, settings={"superuser_reserved_connections": "2"}
    ) as server:
        server.execute("CREATE ROLE app LOGIN")
        yield server


def doctor(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["doctor", *args])
    out = capsys.readouterr()
    assert out.err == ""  # the pool's own log lines are caught, not printed
    return code, out.out


def line(out: str, status: str, check: str) -> str:
    """The line of `check` with `status`; fails if there is none."""
    for text in out.splitlines():
        if text.startswith(f"{status:<5} {check} "):
            return text
    pytest.fail(f"no {status!r} line for {check!r} in:\n{out}")


def fix_after(out: str, first: str) -> str:
    lines = out.splitlines()
    following = lines[lines.index(first) + 1]
    assert following.strip().startswith("fix: "), following
    return following


def test_wrong_password(auth_server: EmbeddedPostgres, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = doctor(capsys, f"{auth_server.dsn} password=not-{PASSWORD}")
    assert code == 1
    found = line(out, "FAIL", "authentication")
    assert "wrong password for user 'postgres'" in found
    assert "password authentication failed" in found  # the server's own words
    assert "right password" in fix_after(out, found)
    assert line(out, "skip", "the rest")
    assert PASSWORD not in out
    assert "password=***" in out.splitlines()[0]


def test_no_password(auth_server: EmbeddedPostgres, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = doctor(capsys, auth_server.dsn)
    assert code == 1
    found = line(out, "FAIL", "authentication")
    assert "no password given, and the server asks for one" in found
    assert "PGPASSWORD" in fix_after(out, found)


def test_pg_hba_rejection(
    auth_server: EmbeddedPostgres, capsys: pytest.CaptureFixture[str]
) -> None:
    dsn = auth_server.dsn.replace("user=postgres", "user=intruder")
    code, out = doctor(capsys, f"{dsn} password={PASSWORD}")
    assert code == 1
    found = line(out, "FAIL", "authentication")
    assert "pg_hba.conf has no line letting user 'intruder' connect" in found
    assert "pg_reload_conf()" in fix_after(out, found)
    assert PASSWORD not in out


def test_right_password_as_url(
    auth_server: EmbeddedPostgres, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"postgresql://postgres:{PASSWORD}@{auth_server.host}:{auth_server.port}/postgres"
    code, out = doctor(capsys, url, "--min-size", "2")
    assert code == 0, out
    assert "postgresql://postgres:***@" in out.splitlines()[0]
    assert "logged in as 'postgres' with a password" in line(out, "ok", "authentication")
    assert "opened 2 connections" in line(out, "ok", "pool")
    for check in ("connect time", "TLS", "connection slots", "idle timeouts", "keepalives"):
        line(out, "ok", check)
    assert out.splitlines()[-1] == "no problem found."
    assert PASSWORD not in out


def test_password_from_the_environment_is_not_printed(
    auth_server: EmbeddedPostgres,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PGPASSWORD", f"not-{PASSWORD}")
    code, out = doctor(capsys, auth_server.dsn)
    assert code == 1
    assert "password from $PGPASSWORD" in line(out, "ok", "conninfo")
    assert "wrong password" in line(out, "FAIL", "authentication")
    assert PASSWORD not in out


def test_a_password_libpq_misreads_is_not_printed(capsys: pytest.CaptureFixture[str]) -> None:
    # Unquoted, with a space: libpq reads "Piece7" as a key and quotes it in its error.
    code, out = doctor(capsys, "host=127.0.0.1 password=Sec9ret Piece7")
    assert code == 1
    assert "cannot be parsed" in line(out, "FAIL", "conninfo")
    assert "Piece7" not in out and "Sec9ret" not in out
    # A "/" in a URL's password: libpq reads "Sec9" as the port, "Piece7@..." as the
    # database, and doctor shows what libpq read.
    code, out = doctor(capsys, "postgresql://app:Sec9/Piece7@127.0.0.1:1/appdb")
    assert code == 1
    assert "Piece7" not in out and "Sec9" not in out


def test_a_connect_timeout_of_zero_means_no_limit(
    dsn: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # As libpq reads it: 0 (or less) sets no limit, so --timeout bounds the TCP check.
    code, out = doctor(capsys, f"{dsn} connect_timeout=0")
    assert code == 0, out
    assert "accepts TCP" in line(out, "ok", "server reachable")
    monkeypatch.setenv("PGCONNECT_TIMEOUT", "-1")
    code, out = doctor(capsys, dsn)
    assert code == 0, out


def test_impossible_sizes_are_refused(dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", "--min-size", "10", "--max-size", "2", dsn]) == 2
    assert "--max-size 2 is less than --min-size 10" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["doctor", "--max-size", "-3", dsn])
    assert "must be 0 or more" in capsys.readouterr().err


def test_every_address_of_a_host_is_tried(
    dsn: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A name whose first address has no server ("localhost" resolving to ::1 first, a
    # server listening on 127.0.0.1 only): libpq goes on to the next, so must doctor.
    from psycopg_pool.cli import doctor as doctor_module

    port = int(psycopg.conninfo.conninfo_to_dict(dsn).get("port") or 5432)
    real = socket.getaddrinfo

    def getaddrinfo(host: str, *args: Any, **kwargs: Any) -> Any:
        if host != "two-addresses.test":
            return real(host, *args, **kwargs)
        return [  # the test server listens on 127.0.0.1 only: 127.0.0.2 refuses
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.2", port)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port)),
        ]

    monkeypatch.setattr(doctor_module.socket, "getaddrinfo", getaddrinfo)
    _, out = doctor(capsys, f"host=two-addresses.test port={port} dbname=postgres")
    assert "two-addresses.test resolves to 127.0.0.2, 127.0.0.1" in out
    found = line(out, "ok", "server reachable")
    assert f"127.0.0.1 port {port} accepts TCP" in found
    assert "before it, connection refused at 127.0.0.2" in found


def test_a_host_that_does_not_resolve_does_not_make_the_connection_remote(
    dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # libpq skips it and connects to the next host, this machine: no TLS warning.
    params = psycopg.conninfo.conninfo_to_dict(dsn)
    port, user = params.get("port") or 5432, params.get("user") or "postgres"
    _, out = doctor(capsys, f"host=no-such-host.invalid,127.0.0.1 port={port},{port} user={user}")
    assert "cannot resolve 'no-such-host.invalid'" in line(out, "FAIL", "host lookup")
    assert "fine for a connection to this machine" in line(out, "ok", "TLS")


def test_missing_database(dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    params = psycopg.conninfo.conninfo_to_dict(dsn)
    params["dbname"] = "no_such_db_here"
    code, out = doctor(capsys, psycopg.conninfo.make_conninfo(**params))
    assert code == 1
    found = line(out, "FAIL", "database")
    assert "database 'no_such_db_here' does not exist" in found
    fix = fix_after(out, found)
    assert "CREATE DATABASE no_such_db_here" in fix
    assert "databases on this server: " in fix and "postgres" in fix


def test_too_many_clients(
    small_server: EmbeddedPostgres, capsys: pytest.CaptureFixture[str]
) -> None:
    app = small_server.dsn.replace("user=postgres", "user=app")

    def settle(n: int) -> None:
        """Wait until the role has exactly `n` server processes (closed ones are gone)."""

        def count() -> bool:
            out = small_server.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app'"
            )
            return int(out) == n

        wait_until(count, f"{n} connections of app")

    held = [psycopg.connect(app) for _ in range(2)]
    try:
        settle(2)
        # 2 of the role's 4 slots are held: doctor's connection gets in, but a pool
        # of 4 cannot open.
        code, out = doctor(capsys, app)
        assert code == 1
        found = line(out, "FAIL", "connection slots")
        assert "too many clients: max_connections 6, 2 reserved for superusers;" in found
        assert "3 in use (app 3)" in found  # the held ones, and doctor's own
        assert "room for 2 more; the pool wants 4" in found
        assert "max_connections" in fix_after(out, found)
        pool = line(out, "FAIL", "pool")
        assert "of its 4 connections, then: too many clients" in pool
        assert "remaining connection slots are reserved" in pool

        # Every slot of the role taken: not even doctor gets in.
        settle(2)
        held += [psycopg.connect(app) for _ in range(2)]
        code, out = doctor(capsys, app)
        assert code == 1
        found = line(out, "FAIL", "connection slots")
        assert "too many clients: every connection slot" in found
        assert line(out, "skip", "the rest")

        # A smaller pool fits once slots are given back.
        for conn in held[1:]:
            conn.close()
        del held[1:]
        settle(1)
        code, out = doctor(capsys, app, "--min-size", "1", "--max-size", "2")
        assert code == 0, out
        assert "the pool wants 1 to 2" in line(out, "ok", "connection slots")
    finally:
        for conn in held:
            conn.close()


def test_unreachable_port(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = doctor(capsys, refused_conninfo() + f" password={PASSWORD}")
    assert code == 1
    found = line(out, "FAIL", "server reachable")
    assert "connection refused at 127.0.0.1 port" in found
    assert "nothing listens there" in found
    assert "listen_addresses" in fix_after(out, found)
    assert PASSWORD not in out


def test_tls_required_by_the_client_but_off_on_the_server(
    dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = doctor(capsys, f"{dsn} sslmode=require")
    assert code == 1
    found = line(out, "FAIL", "TLS")
    assert "sslmode asks for TLS, and the server has ssl off" in found


def test_idle_session_timeout_shorter_than_the_pool_keeps_connections(
    dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = doctor(capsys, f"{dsn} options='-c idle_session_timeout=60000'", "--min-size", "1")
    assert code == 1
    found = line(out, "WARN", "idle timeouts")
    assert "ends sessions idle for 1min (idle_session_timeout)" in found
    assert "ALTER ROLE" in fix_after(out, found)
    line(out, "ok", "pool")  # the pool itself works


def test_pgbouncer_detected(
    pg_server: EmbeddedPostgres | None, capsys: pytest.CaptureFixture[str]
) -> None:
    if pg_server is None:
        pytest.skip("needs the suite's own server behind a PgBouncer of ours")
    from .pgbouncer import PgBouncer

    with PgBouncer(pg_server.host, pg_server.port) as bouncer:
        code, out = doctor(capsys, bouncer.dsn, "--min-size", "2")
    assert code == 0, out
    found = line(out, "note", "PgBouncer")
    assert "PgBouncer 1." in found and "pool_mode=transaction" in found
    assert "prepare_threshold" in fix_after(out, found)
    assert bouncer.password not in out


def test_exit_status_of_the_command(auth_server: EmbeddedPostgres) -> None:
    """The console entry point, as a shell script would run it."""
    env = {"PATH": "/usr/bin:/bin", "PGPASSFILE": "/dev/null"}
    bad = subprocess.run(
        [sys.executable, "-m", "psycopg_pool", "doctor", auth_server.dsn],
        capture_output=True,
        text=True,
        env=env,
        stdin=subprocess.DEVNULL,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 1
    assert "FAIL  authentication" in bad.stdout
    good = subprocess.run(
        [sys.executable, "-m", "psycopg_pool", "doctor", "--min-size", "1"],
        capture_output=True,
        text=True,
        env={**env, "DATABASE_URL": f"{auth_server.dsn} password={PASSWORD}"},
        stdin=subprocess.DEVNULL,
        timeout=60,
        check=False,
    )
    assert good.returncode == 0, good.stdout
    assert PASSWORD not in good.stdout + good.stderr
