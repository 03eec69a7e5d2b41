"""The documentation is true: its examples run, its messages are the pool's, its links work.

- Every ```python block of the pages in `RUN_PAGES` runs, page by page in order in one
  namespace, against the suite's PostgreSQL: the examples say ``dbname=app user=app``,
  and this module creates that role and database and points libpq at the server with
  ``PGHOST``/``PGPORT``. A block preceded by ``<!-- no-run -->`` is skipped; a ```text
  block preceded by ``<!-- output -->`` is what the Python block before it prints.
- A ```text block preceded by ``<!-- message: NAME -->`` quotes what the pool prints in
  a situation: `SCENARIOS[NAME]` recreates it on a real server and the texts must match.
- In both comparisons ``...`` matches any text.
- Every relative link of these pages leads to an existing file, and heading if it
  names one.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from psycopg_pool import ConnectionPool, PoolTimeout
from psycopg_pool._embedded_pg import EmbeddedPostgres

from .integration.helpers import refused_conninfo, terminate_backends

ROOT = Path(__file__).resolve().parents[1]
RUN_PAGES = (
    "README.md",
    "docs/index.md",
    "docs/quickstart.md",
    "docs/configuration.md",
    "docs/differences.md",
    "docs/processes.md",
    "docs/sizing.md",
    "docs/troubleshooting.md",
    "docs/cli.md",
)
DOCS_PASSWORD = "app-docs"  # ignored by the suite's server (trust), needed by others


@dataclass
class Block:
    lang: str
    code: str
    line: int  # of the opening fence, 1-based
    marker: str  # the HTML comment just before it, without <!-- -->, or ""


def read_blocks(page: str) -> list[Block]:
    """The fenced blocks of a page, with the comment line that precedes each."""
    blocks = []
    lines = (ROOT / page).read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^(\s*)```(\w*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        indent, lang, start = m.group(1), m.group(2), i
        j = i + 1
        while j < len(lines) and lines[j].strip() != "```":
            j += 1
        body = [
            line[len(indent) :] if line.startswith(indent) else line for line in lines[i + 1 : j]
        ]
        k = start - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        prev = lines[k].strip() if k >= 0 else ""
        marker = prev[4:-3].strip() if prev.startswith("<!--") and prev.endswith("-->") else ""
        blocks.append(Block(lang, "\n".join(body) + "\n", start + 1, marker))
        i = j + 1
    return blocks


def same_text(expected: str, actual: str) -> bool:
    """`actual` matches `expected`, where ``...`` stands for any text."""
    norm_e = "\n".join(line.rstrip() for line in expected.strip("\n").splitlines())
    norm_a = "\n".join(line.rstrip() for line in actual.strip("\n").splitlines())
    pattern = ".*?".join(re.escape(part) for part in norm_e.split("..."))
    return re.fullmatch(pattern, norm_a, re.DOTALL) is not None


# ----------------------------------------------------------------------------------
# The examples


@pytest.fixture(scope="module")
def app_database(dsn: str) -> Iterator[dict[str, str]]:
    """Role and database ``app`` on the suite's server; the libpq variables to reach it."""
    params = conninfo_to_dict(dsn)
    try:
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute("DROP DATABASE IF EXISTS app WITH (FORCE)")
            admin.execute("DROP ROLE IF EXISTS app")
            admin.execute(f"CREATE ROLE app LOGIN PASSWORD '{DOCS_PASSWORD}'")
            admin.execute("CREATE DATABASE app OWNER app")
    except psycopg.Error as ex:
        pytest.skip(f"cannot create the docs' role and database: {ex}")
    env = {"PGHOST": str(params.get("host", "")), "PGPORT": str(params.get("port", ""))}
    env["PGPASSWORD"] = DOCS_PASSWORD
    try:
        yield env
    finally:
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute("DROP DATABASE IF EXISTS app WITH (FORCE)")
            admin.execute("DROP ROLE IF EXISTS app")


def runnable_pages() -> list[str]:
    return [
        p
        for p in RUN_PAGES
        if any(b.lang == "python" and b.marker != "no-run" for b in read_blocks(p))
    ]


@pytest.mark.parametrize("page", runnable_pages())
def test_examples_run(
    page: str, app_database: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("PGUSER", "PGDATABASE", "PGSERVICE", "PGPASSFILE", "DATABASE_URL"):
        monkeypatch.delenv(var, raising=False)
    for var, value in app_database.items():
        monkeypatch.setenv(var, value)
    namespace: dict[str, object] = {"__name__": "__docs__"}
    blocks = read_blocks(page)
    ran = 0
    for n, block in enumerate(blocks):
        if block.lang != "python" or block.marker == "no-run":
            continue
        where = f"{page}:{block.line}"
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                exec(compile(block.code, where, "exec"), namespace)
        except Exception as ex:
            raise AssertionError(f"the example at {where} fails: {ex!r}") from ex
        ran += 1
        following = blocks[n + 1] if n + 1 < len(blocks) else None
        if following is not None and following.marker == "output":
            assert same_text(following.code, out.getvalue()), (
                f"{where} prints:\n{out.getvalue()}\nbut {page}:{following.line} says:\n"
                f"{following.code}"
            )
    assert ran


# ----------------------------------------------------------------------------------
# The messages quoted in troubleshooting.md

MESSAGES_PAGE = "docs/troubleshooting.md"
LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


def describe(ex: BaseException) -> str:
    return f"{type(ex).__module__}.{type(ex).__qualname__}: {ex}"


@contextlib.contextmanager
def pool_log() -> Iterator[list[str]]:
    """The pool's log lines, formatted as logging.basicConfig(format=LOG_FORMAT) would."""
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = Keep(logging.WARNING)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logger = logging.getLogger("psycopg.pool")
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)


@pytest.fixture(scope="module")
def password_server() -> Iterator[EmbeddedPostgres]:
    with EmbeddedPostgres(
        password="right-one",
        hba_lines=["local all all trust", "host all all 0.0.0.0/0 scram-sha-256"],
    ) as server:
        yield server


def exhausted(dsn: str, server: Callable[[], EmbeddedPostgres]) -> str:
    out: list[str] = []
    with ConnectionPool(dsn, min_size=1, max_size=1, name="web") as pool:
        held = pool.getconn()

        def ask() -> None:
            try:
                with pool.connection(timeout=0.5):
                    pass
            except PoolTimeout as ex:
                out.append(describe(ex))

        t = threading.Thread(target=ask, name="request-2")
        t.start()
        t.join()
        pool.putconn(held)
    return "\n".join(out)


def connect_fails(dsn: str, server: Callable[[], EmbeddedPostgres]) -> str:
    with ConnectionPool(refused_conninfo(), name="web", timeout=1.0) as pool:
        with pytest.raises(PoolTimeout) as info:
            with pool.connection():
                pass
    return describe(info.value)


def _login_fails(conninfo: str) -> str:
    with pool_log() as log:
        with ConnectionPool(conninfo, min_size=1, name="web") as pool:
            with pytest.raises(PoolTimeout) as info:
                with pool.connection():
                    pass
    return "\n".join([log[0], describe(info.value)])


def no_password(dsn: str, server: Callable[[], EmbeddedPostgres]) -> str:
    return _login_fails(server().dsn)


def wrong_password(dsn: str, server: Callable[[], EmbeddedPostgres]) -> str:
    return _login_fails(server().dsn + " password=wrong-one").split("\n", 1)[1]


def closed_by_server(dsn: str, server: Callable[[], EmbeddedPostgres]) -> str:
    out = []
    with pool_log() as log:
        with ConnectionPool(dsn, min_size=1, name="web") as pool:
            with pool.connection() as conn:
                terminate_backends(dsn, conn.info.backend_pid)
                for _ in range(2):
                    try:
                        conn.execute("SELECT 1")
                    except psycopg.Error as ex:
                        out.append(describe(ex))
        out += log
    return "\n".join(out)


def used_after_close(dsn: str, server: Callable[[], EmbeddedPostgres]) -> str:
    with ConnectionPool(dsn, min_size=1, name="web") as pool:
        with pool.connection() as conn:
            pass
    with pytest.raises(psycopg.Error) as info:
        conn.execute("SELECT 1")
    return describe(info.value)


NO_LIBPQ = """
import sys, ctypes.util
sys.modules["psycopg_c"] = sys.modules["psycopg_binary"] = None  # no psycopg[c] nor [binary]
ctypes.util.find_library = lambda name: None  # and no libpq on the system
import psycopg_pool
"""


def no_pq_wrapper(dsn: str, server: Callable[[], EmbeddedPostgres]) -> str:
    res = subprocess.run(
        [sys.executable, "-c", NO_LIBPQ],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=60,
        check=False,
    )
    assert res.returncode == 1
    return res.stderr[res.stderr.index("ImportError:") :]


SCENARIOS: dict[str, Callable[[str, Callable[[], EmbeddedPostgres]], str]] = {
    "exhausted": exhausted,
    "connect-fails": connect_fails,
    "no-password": no_password,
    "wrong-password": wrong_password,
    "closed-by-server": closed_by_server,
    "used-after-close": used_after_close,
    "no-pq-wrapper": no_pq_wrapper,
}


def quoted_messages() -> list[Block]:
    return [b for b in read_blocks(MESSAGES_PAGE) if b.marker.startswith("message:")]


def test_every_quoted_message_has_a_scenario() -> None:
    names = [b.marker.split(":", 1)[1].strip() for b in quoted_messages()]
    assert sorted(names) == sorted(SCENARIOS)


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_quoted_message_is_what_the_pool_prints(
    name: str, dsn: str, request: pytest.FixtureRequest
) -> None:
    block = next(b for b in quoted_messages() if b.marker == f"message: {name}")

    def server() -> EmbeddedPostgres:
        srv: EmbeddedPostgres = request.getfixturevalue("password_server")
        return srv

    actual = SCENARIOS[name](dsn, server)
    assert same_text(block.code, actual), (
        f"{MESSAGES_PAGE}:{block.line} quotes:\n{block.code}\nthe pool prints:\n{actual}"
    )


# ----------------------------------------------------------------------------------
# Links

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def headings(page: Path) -> set[str]:
    """GitHub's anchors for the headings of a page."""
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.DOTALL)
    anchors = set()
    for line in text.splitlines():
        m = re.match(r"^#{1,6}\s+(.*)$", line)
        if m:
            title = m.group(1).strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


@pytest.mark.parametrize("page", RUN_PAGES)
def test_relative_links_lead_somewhere(page: str) -> None:
    path = ROOT / page
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.DOTALL)
    broken = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target):
            continue  # https:, mailto:, ...
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in headings(dest):
            broken.append(f"{target}: no such heading")
    assert not broken, f"{page}: {broken}"


def test_same_text() -> None:
    assert same_text("a ... c", "a bb c")
    assert same_text("x\n...\nz", "x\n1\n2\nz")
    assert not same_text("a ... c", "a bb d")
    assert not same_text("abc", "abcd")
