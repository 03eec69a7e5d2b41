"""A real PgBouncer for the integration tests, in front of a PostgreSQL server.

`PgBouncer` writes a config and an auth file into a temporary folder, starts the
Debian ``pgbouncer`` binary in the foreground on a free loopback port (as the
``postgres`` account when we are root, like the server) and stops it at the end.
It serves one database, ``postgres``, in ``pool_mode = transaction`` (unless told
otherwise), and its admin console as ``pgbouncer``. Clients log in with SCRAM as
``postgres`` / `PgBouncer.password`; PgBouncer itself logs in to the server as
``postgres`` with whatever the server's pg_hba.conf asks (trust, for EmbeddedPostgres).
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from types import TracebackType
from typing import Any

import psycopg

HOST = "127.0.0.1"
USER = "postgres"
DEFAULT_PASSWORD = "bouncer-secret"
SERVER_ACCOUNT = "postgres"


def find_pgbouncer() -> str:
    """The pgbouncer binary; RuntimeError if it is not installed."""
    path = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if not os.access(path, os.X_OK):
        raise RuntimeError(
            "the pgbouncer binary is not installed: run scripts/bootstrap.sh"
            " (as root it runs apt-get install pgbouncer)"
        )
    return path


def pgbouncer_version() -> tuple[int, ...]:
    """The installed PgBouncer's version, e.g. (1, 18, 0)."""
    out = subprocess.run(
        [find_pgbouncer(), "--version"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    ).stdout
    match = re.search(r"PgBouncer (\d+)\.(\d+)(?:\.(\d+))?", out)
    if match is None:
        raise RuntimeError(f"cannot read the pgbouncer version from {out!r}")
    return tuple(int(part or 0) for part in match.groups())


def supports_prepared_statements() -> bool:
    """True if PgBouncer can track prepared statements (`max_prepared_statements`, 1.21+)."""
    return pgbouncer_version() >= (1, 21)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _account() -> pwd.struct_passwd | None:
    """Whom to run PgBouncer as: None for ourselves (it refuses to run as root)."""
    return pwd.getpwnam(SERVER_ACCOUNT) if os.geteuid() == 0 else None


class PgBouncer:
    """A PgBouncer process in front of the server at `server_host`:`server_port`.

    `settings` are added to (or override) the ``[pgbouncer]`` section; the defaults
    are ``pool_mode = transaction`` and ``default_pool_size = pool_size``. Where
    PgBouncer knows ``max_prepared_statements`` (1.21+) it is 0 unless given, so that
    every version behaves like 1.18 by default: prepared statements are not tracked.
    """

    def __init__(
        self,
        server_host: str,
        server_port: int,
        *,
        pool_size: int = 3,
        settings: dict[str, str] | None = None,
        password: str = DEFAULT_PASSWORD,
    ) -> None:
        self.binary = find_pgbouncer()
        self.version = pgbouncer_version()
        self.server_host = server_host
        self.server_port = server_port
        self.pool_size = pool_size
        self.password = password
        self.port = _free_port()
        self.settings = {
            "pool_mode": "transaction",
            "default_pool_size": str(pool_size),
            "min_pool_size": "0",
            "reserve_pool_size": "0",
            "max_client_conn": "200",
            "auth_type": "scram-sha-256",
            "admin_users": USER,
            "log_connections": "0",
            "log_disconnections": "0",
            "server_login_retry": "1",
        }
        if self.version >= (1, 21):
            self.settings["max_prepared_statements"] = "0"
        self.settings.update(settings or {})
        self._account = _account()
        self._dir = tempfile.mkdtemp(prefix="pgbouncer-")
        self._proc: subprocess.Popen[bytes] | None = None

    # -- where to connect ---------------------------------------------------------

    @property
    def dsn(self) -> str:
        """Conninfo of the pooled ``postgres`` database, through PgBouncer."""
        return (
            f"host={HOST} port={self.port} user={USER} password={self.password}"
            " dbname=postgres connect_timeout=5"
        )

    @property
    def admin_dsn(self) -> str:
        """Conninfo of PgBouncer's admin console (SHOW POOLS, SHOW SERVERS, ...)."""
        return (
            f"host={HOST} port={self.port} user={USER} password={self.password}"
            " dbname=pgbouncer connect_timeout=5"
        )

    @property
    def log_path(self) -> str:
        return os.path.join(self._dir, "pgbouncer.log")

    def log_tail(self, lines: int = 30) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return "\n".join(f.read().splitlines()[-lines:])
        except OSError:
            return ""

    # -- lifecycle ----------------------------------------------------------------

    def start(self, timeout: float = 15.0) -> None:
        """Start PgBouncer and return once its admin console answers."""
        for attempt in range(3):
            self._write_files()
            self._spawn()
            try:
                self._wait_ready(timeout)
                return
            except RuntimeError:
                self.stop()
                if attempt < 2 and "Address already in use" in self.log_tail():
                    self.port = _free_port()  # someone took the port: pick another
                    continue
                raise

    def stop(self) -> None:
        """Shut PgBouncer down (SIGTERM, then SIGKILL) and wait for it."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> PgBouncer:
        try:
            self.start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.cleanup()

    # -- admin console --------------------------------------------------------------

    def show(self, what: str) -> list[dict[str, Any]]:
        """``SHOW <what>`` on the admin console, as dicts (e.g. ``show("SERVERS")``)."""
        # The console speaks the simple query protocol only: psycopg uses it for a
        # query without parameters.
        with psycopg.connect(self.admin_dsn, autocommit=True) as admin:
            cur = admin.execute(f"SHOW {what}")
            names = [col.name for col in cur.description or ()]
            return [dict(zip(names, row, strict=True)) for row in cur]

    def server_connections(self, database: str = "postgres") -> int:
        """How many server connections PgBouncer holds for `database` right now."""
        return sum(1 for row in self.show("SERVERS") if row["database"] == database)

    # -- internals ----------------------------------------------------------------

    def _write_files(self) -> None:
        settings = {
            **self.settings,
            "listen_addr": HOST,
            "listen_port": str(self.port),
            "unix_socket_dir": "",
            "auth_file": os.path.join(self._dir, "userlist.txt"),
            "logfile": self.log_path,
        }
        ini = [
            "[databases]",
            f"postgres = host={self.server_host} port={self.server_port} dbname=postgres",
            "",
            "[pgbouncer]",
            *(f"{key} = {value}" for key, value in settings.items()),
        ]
        self._write("pgbouncer.ini", "\n".join(ini) + "\n")
        self._write("userlist.txt", f'"{USER}" "{self.password}"\n')
        if self._account is not None:
            os.chown(self._dir, self._account.pw_uid, self._account.pw_gid)

    def _write(self, name: str, text: str) -> None:
        path = os.path.join(self._dir, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(path, 0o600)
        if self._account is not None:
            os.chown(path, self._account.pw_uid, self._account.pw_gid)

    def _spawn(self) -> None:
        acct = self._account
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        self._proc = subprocess.Popen(
            [self.binary, os.path.join(self._dir, "pgbouncer.ini")],
            cwd=self._dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            user=acct.pw_uid if acct is not None else None,
            group=acct.pw_gid if acct is not None else None,
            extra_groups=[] if acct is not None else None,
        )

    def _wait_ready(self, timeout: float) -> None:
        # Nothing to wait on but the port: poll the admin console until it answers.
        deadline = time.monotonic() + timeout
        while True:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                raise RuntimeError(f"pgbouncer exited at start:\n{self.log_tail()}")
            try:
                with psycopg.connect(self.admin_dsn, autocommit=True, connect_timeout=2):
                    return
            except psycopg.OperationalError as ex:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"pgbouncer did not answer in {timeout} s: {ex}\n{self.log_tail()}"
                    ) from None
            time.sleep(0.02)
