"""The commands the pool core asks its shell to carry out.

The core never does I/O: each input it is given may append some of these to its
outbox, and the shell executes them once it has left the core's lock. They are
tiny slotted classes rather than frozen dataclasses because a few of them are
built on busy paths (a hand-off to a waiter, a close of an expired connection)
and a frozen dataclass costs several times more to construct.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .state import Slot, Ticket


class Command:
    __slots__ = ()


class Connect(Command):
    """Open a new connection for `slot` (in the background).

    `extra`: attempts given up as hung may still hold the shell's workers, so this
    one needs a worker of its own rather than a place in their queue.
    """

    __slots__ = ("extra", "slot")

    def __init__(self, slot: Slot, extra: bool = False) -> None:
        self.slot = slot
        self.extra = extra

    def __repr__(self) -> str:
        return f"Connect({self.slot!r}{', extra' if self.extra else ''})"


class Close(Command):
    """Close the connection of `slot`; the core has already forgotten it."""

    __slots__ = ("slot",)

    def __init__(self, slot: Slot) -> None:
        self.slot = slot

    def __repr__(self) -> str:
        return f"Close({self.slot!r})"


class Wake(Command):
    """Wake the client waiting on `ticket`: its outcome is already written in it."""

    __slots__ = ("ticket",)

    def __init__(self, ticket: Ticket) -> None:
        self.ticket = ticket

    def __repr__(self) -> str:
        return f"Wake({self.ticket!r})"


class LeakSuspected(Command):
    """`slot` has been out longer than `leak_timeout`: warn, with where it was taken."""

    __slots__ = ("slot",)

    def __init__(self, slot: Slot) -> None:
        self.slot = slot

    def __repr__(self) -> str:
        return f"LeakSuspected({self.slot!r})"


class ReconnectFailed(Command):
    """Tell the user (`reconnect_failed` callback) that connecting keeps failing."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "ReconnectFailed()"


class Rearm(Command):
    """The housekeeping deadline moved earlier: wake the housekeeper to re-read it."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "Rearm()"


class Collect(Command):
    """Run the garbage collector: clients wait while only garbage may hold connections.

    A connection held by an object nobody can reach any more (an abandoned generator,
    a reference cycle) comes back when the collector frees that object.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return "Collect()"


class Log(Command):
    """A log record; formatted by the shell only if its level is enabled."""

    __slots__ = ("args", "level", "msg")

    def __init__(self, level: int, msg: str, *args: Any) -> None:
        self.level = level
        self.msg = msg
        self.args = args

    def __repr__(self) -> str:
        return f"Log({self.level}, {self.msg!r}, {self.args!r})"
