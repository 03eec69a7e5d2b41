"""Who holds a connection, as a timeout's message tells it (no database needed)."""

from __future__ import annotations

import weakref

from psycopg_pool._core.state import IN_USE, Slot
from psycopg_pool._explain import describe_owner


class Conn:
    """Stands for a lent connection: only its identity matters here."""


def test_a_connection_granted_but_not_picked_up_is_being_handed_over() -> None:
    # A grant is the hand-over: the slot is in use, its connection not lent yet.
    slot = Slot(0.0)
    slot.state = IN_USE
    slot.conn = Conn()
    assert describe_owner(slot) == "a client being handed it"


def test_a_lent_connection_is_found_where_it_is_held() -> None:
    slot = Slot(0.0)
    slot.state = IN_USE
    conn = Conn()  # held by this frame, in this thread
    slot.wref = weakref.ref(conn)  # lent: the slot only keeps a weak reference
    assert describe_owner(slot) == "thread 'MainThread'"
    del conn
    assert describe_owner(slot) == "an unknown client"
