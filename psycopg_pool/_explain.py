"""Words for failures: why no connection could be had, without leaking secrets.

Upstream's `PoolTimeout` says only how long the client waited. Ours keeps that
prefix (code may match on it) and adds the reason the pool can see: connecting
fails (and how), the check callback keeps rejecting connections, or every
connection is in use (and by whom, for how long). Every text that may carry a
server or conninfo message goes through `mask()` first.
"""

from __future__ import annotations

import gc
import inspect
import os
import re
import sys
import threading
import traceback
import types
from collections.abc import Iterable
from typing import Any
from urllib.parse import unquote

from ._core.state import CHECKING, CONNECTING, IDLE, IN_USE, STUCK_AFTER, PoolCore, Slot

_SECRET_KV = re.compile(
    r"""(?ix)
    \b(password|passwd|pwd|sslpassword|passfile)(\s*=\s*)
    ('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|[^\s'"]+)
    """
)
# Up to the last "@" of the URL: a password may hold an unescaped "@" or "/" too (a
# generated one often does), which libpq then misreads.
_SECRET_URL = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^:/@\s]*):(\S*)@")


def mask(text: str) -> str:
    """Hide passwords in conninfo strings, URLs and key=value lists."""
    text = _SECRET_KV.sub(lambda m: f"{m.group(1)}{m.group(2)}***", text)
    return _SECRET_URL.sub(r"\1:***@", text)


def error_text(ex: BaseException) -> str:
    """One line naming an exception, with secrets masked."""
    msg = " ".join(str(ex).split())
    return mask(f"{type(ex).__name__}: {msg}" if msg else type(ex).__name__)


# What of a conninfo string may be a password, even where libpq reads it otherwise: an
# unquoted one with a space (`password=sec ret`: "ret" becomes a key of its own) or a
# URL's with an unescaped "@" (`//user:p@ss@host`: the host becomes "ss@host"). libpq's
# errors quote such pieces, so masking `password=...` alone would show them.
_KV_PASSWORD = re.compile(r"(?is)\bpassword\s*=\s*(.*?)(?=\s+[a-z_]\w*\s*=|\s*$)")
_URL_NETLOC = re.compile(r"(?i)^\s*[a-z][a-z0-9+.-]*://(\S*)")
_URL_PASSWORD = re.compile(r"(?i)[?&]password=([^&#]*)")
_PIECES = re.compile(r"[\s@:/'\"]+")
_QUOTED = re.compile(r"\"([^\"]*)\"|'([^']*)'")


def password_pieces(conninfo: str) -> list[str]:
    """The text that may hold a password in `conninfo`, whole and in pieces."""
    url = _URL_NETLOC.match(conninfo)
    if url:
        rest = url.group(1)  # the user info ends at the last "@" (see _SECRET_URL)
        userinfo = rest[: rest.rfind("@")] if "@" in rest else ""
        found = _URL_PASSWORD.findall(conninfo)
        if ":" in userinfo:
            found.append(userinfo[userinfo.index(":") + 1 :])
    else:
        found = [m.group(1) for m in _KV_PASSWORD.finditer(conninfo)]
    found += [unquote(secret) for secret in found if "%" in secret]
    pieces = [p for secret in found for p in _PIECES.split(secret) if p]
    return list(dict.fromkeys([s for s in found if s] + pieces))


def mask_pieces(text: str, pieces: list[str]) -> str:
    """`text` without the `password_pieces()` of a conninfo: a quoted word made of any
    of them (libpq quotes what it cannot read), or one of four characters or more."""
    if not pieces:
        return text
    known = set(pieces)

    def quoted(m: re.Match[str]) -> str:
        inner = m.group(1) if m.group(1) is not None else m.group(2)
        if any(p in known for p in _PIECES.split(inner)):
            return m.group(0)[0] + "***" + m.group(0)[0]
        return m.group(0)

    text = _QUOTED.sub(quoted, text)
    for p in sorted(known, key=len, reverse=True):
        if len(p) >= 4:
            text = text.replace(p, "***")
    return text


def without_password(ex: BaseException, conninfo: object) -> BaseException:
    """`ex`, from an attempt to connect with `conninfo`, or a copy of it whose message
    shows no piece of the password (`password_pieces()`)."""
    if not isinstance(conninfo, str):
        return ex
    text = str(ex)
    masked = mask_pieces(text, password_pieces(conninfo))
    if masked == text:
        return ex
    try:
        copy = type(ex)(masked)
    except Exception:
        copy = RuntimeError(masked)
    return copy


def timeout_message(
    name: str, timeout: float, core: PoolCore, now: float, check_error: BaseException | None
) -> str:
    """The `PoolTimeout` message: upstream's prefix, then why, then a snapshot."""
    head = f"couldn't get a connection after {timeout:.2f} sec"
    return mask(f"{head}: {reason(core, now, check_error)} {state_line(name, core)}")


def wait_timeout_message(name: str, timeout: float, core: PoolCore, now: float) -> str:
    """The message of `wait()` timing out: upstream's text, then why if we know."""
    head = f"pool initialization incomplete after {timeout} sec"
    if core.backoff.failing or core.fatal:
        return mask(f"{head}: {reason(core, now, None)} {state_line(name, core)}")
    return mask(f"{head}: {state_line(name, core)}")


def init_failure_message(name: str, core: PoolCore, now: float) -> str:
    """The message of `wait()` failing before its timeout: connecting fails for good."""
    return mask(f"pool initialization failed: {reason(core, now, None)} {state_line(name, core)}")


def reason(core: PoolCore, now: float, check_error: BaseException | None) -> str:
    if core.backoff.failing or core.fatal:
        since = core.backoff.started_at
        when = f" in the last {now - since:.1f} sec" if since is not None else ""
        n = core.fail_count
        attempts = f"{n} attempt{'s' if n != 1 else ''} failed{when}" if n else "it failed"
        return (
            f"connecting to the server fails ({attempts});"
            f" last error: {describe_cause(core.last_error)}"
        )
    if check_error is not None:
        return f"the check callback rejected the connections: {error_text(check_error)}"
    busy = [s for s in core.live if s.state == IN_USE]
    if core.max_size and len(core.live) >= core.max_size and busy:
        # Who holds them is found later, outside the pool's lock (see fill_holders()).
        return (
            f"the pool is exhausted: {len(busy)} of {core.max_size} connections in use,"
            f" {core.n_waiting} other clients waiting; held longest by {HOLDERS}"
        )
    if core.n_connecting or core.n_abandoned:
        hung = (
            f" ({core.n_abandoned} more given up after hanging {STUCK_AFTER:g} sec:"
            " is the network to the server silent?)"
            if core.n_abandoned
            else ""
        )
        return f"waiting for {core.n_connecting} connection attempts still in progress{hung}"
    return "no connection became available in time"


def describe_cause(cause: object) -> str:
    if isinstance(cause, BaseException):
        return error_text(cause)
    return "unknown"


def state_line(name: str, core: PoolCore) -> str:
    counts = core.counts()
    return (
        f"[pool {name!r}: size {len(core.live)}/{core.max_size or 'unlimited'},"
        f" idle {counts[IDLE]}, in use {counts[IN_USE]}, connecting {counts[CONNECTING]},"
        f" checking {counts[CHECKING]}, waiting {core.n_waiting}]"
    )


HOLDERS = "\x00holders\x00"

# Who holds a lent connection does not change until it comes back: remember the
# answer per lending, so that a storm of timeouts does not search every frame of
# every thread and task again each time.
_owners: dict[tuple[int, float], str] = {}


def oldest_holders(core: PoolCore, n: int = 3) -> list[tuple[Slot, float]]:
    """The `n` slots lent the longest ago, with when: to be read under the lock."""
    busy = sorted((s.taken_at, s.id, s) for s in core.live if s.state == IN_USE)
    return [(s, taken) for taken, _, s in busy[:n]]


def fill_holders(msg: str, holders: list[tuple[Slot, float]], now: float) -> str:
    """Put who holds the connections into a message made by timeout_message()."""
    if HOLDERS not in msg:
        return msg
    parts = []
    for slot, taken_at in holders:
        key = (slot.id, taken_at)
        who = _owners.get(key)
        if who is None:
            if len(_owners) > 1000:
                _owners.clear()
            who = _owners[key] = describe_owner(slot)
        text = f"{who} for {now - taken_at:.1f} sec"
        if slot.trace:
            text += f" (taken at {where(slot.trace)})"
        parts.append(text)
    return msg.replace(HOLDERS, mask("; ".join(parts)) or "unknown clients")


def describe_owner(slot: Slot) -> str:
    """Which thread or task holds the slot's connection, found from their frames.

    Only used to explain a failure, so the hot path never pays for recording who
    holds what (asking for the current task alone costs more than the rest of a
    checkout on Python < 3.12).
    """
    if slot.conn is not None:
        # Not lent: granted to a client not woken yet (or one giving it back).
        return "a client being handed it"
    conn = slot.wref() if slot.wref is not None else None
    if conn is not None:
        found = (
            _find_thread_holding(conn) or _find_task_holding(conn) or _find_generator_holding(conn)
        )
        if found:
            return found
    return "an unknown client"


def _find_thread_holding(conn: Any) -> str | None:
    names = {t.ident: t.name for t in threading.enumerate()}
    for ident, top in sys._current_frames().items():
        frames = []
        frame: Any = top
        while frame is not None:
            frames.append(frame)
            frame = frame.f_back
        if _frames_hold(frames, conn):
            return f"thread {names.get(ident, ident)!r}"
    return None


def _find_task_holding(conn: Any) -> str | None:
    try:
        import asyncio

        tasks = asyncio.all_tasks()
    except RuntimeError:
        return None
    for task in tasks:
        if _frames_hold(_coro_frames(task.get_coro()), conn):
            return f"task {task.get_name()!r}"
    return None


_GENERATOR_FLAGS = inspect.CO_GENERATOR | inspect.CO_ASYNC_GENERATOR | inspect.CO_COROUTINE


def _find_generator_holding(conn: Any) -> str | None:
    """A suspended generator that no thread or task runs: likely abandoned (the body
    of a streaming response whose client went away), and its connection with it.

    Its frame refers to the connection: found among the connection's referrers (the
    generator itself, or its frame before Python 3.11).
    """
    for ref in gc.get_referrers(conn):
        frame = ref if isinstance(ref, types.FrameType) else None
        for attr in ("ag_frame", "gi_frame", "cr_frame"):
            frame = frame or getattr(ref, attr, None)
        if frame is None or not isinstance(frame, types.FrameType):
            continue
        code = frame.f_code
        if not code.co_flags & _GENERATOR_FLAGS or code.co_filename.startswith(_PACKAGE_DIR):
            continue
        return f"a suspended generator {code.co_name}() at {code.co_filename}:{frame.f_lineno}" + (
            " (abandoned?)"
        )
    return None


def _coro_frames(coro: Any) -> Iterable[Any]:
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is not None:
            yield frame
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)


# The package's own frames are not holders: the thread or task explaining a timeout
# has the connection in a local of describe_owner(), and would name itself.
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _frames_hold(frames: Iterable[Any], conn: Any) -> bool:
    for frame in frames:
        if frame.f_code.co_filename.startswith(_PACKAGE_DIR):
            continue
        try:
            if any(v is conn for v in frame.f_locals.values()):
                return True
        except Exception:
            continue
    return False


def where(trace: traceback.StackSummary) -> str:
    """The innermost frame of a stack outside this package, as file:line in function."""
    for fs in reversed(trace):
        if "/psycopg_pool/" not in fs.filename and "/contextlib.py" not in fs.filename:
            return f"{fs.filename}:{fs.lineno} in {fs.name}"
    return "an unknown place"


def capture_stack() -> traceback.StackSummary:
    return traceback.extract_stack(sys._getframe(2), limit=12)


def format_stack(trace: traceback.StackSummary) -> str:
    frames = [fs for fs in trace if "/psycopg_pool/" not in fs.filename]
    return "".join(traceback.format_list(frames)).rstrip()


def where_taken(slot: Any, sep: str = ";") -> str:
    """The tail of a warning about a lent connection: where it was taken, if tracked
    (`leak_timeout`), else nothing."""
    return f"{sep} taken at:\n{format_stack(slot.trace)}" if slot.trace else ""
