"""Who holds a connection, as a timeout's message tells it, and what a message must
not show of a password (no database needed)."""

from __future__ import annotations

import weakref

import psycopg
import pytest

from psycopg_pool._core.state import IN_USE, Slot
from psycopg_pool._explain import (
    describe_owner,
    mask,
    mask_pieces,
    password_pieces,
    without_password,
)


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


# A password libpq misreads: unquoted with a space (the rest becomes a key of its own),
# or unescaped "@" in a URL (the rest becomes the host). libpq's errors quote the pieces.


@pytest.mark.parametrize(
    ("conninfo", "message", "secret"),
    [
        (
            "host=db password=Sec9ret Piece7 dbname=app",
            'missing "=" after "Piece7" in connection info string',
            "Piece7",
        ),
        (
            "postgresql://app:Sec9ret@Piece7@db:5432/app",
            "failed to resolve host 'Piece7@db': [Errno -2] Name or service not known",
            "Piece7",
        ),
        (
            "postgresql://app@db/app?password=Sec9ret&sslmode=require",
            'server said: password "Sec9ret" rejected',
            "Sec9ret",
        ),
    ],
)
def test_pieces_of_a_misread_password_are_masked(conninfo: str, message: str, secret: str) -> None:
    masked = mask_pieces(message, password_pieces(conninfo))
    assert secret not in masked
    assert "***" in masked


def test_a_message_without_password_pieces_is_left_alone() -> None:
    conninfo = "host=db password=Sec9ret sslmode=bogus"
    message = 'invalid sslmode value: "bogus"'
    assert mask_pieces(message, password_pieces(conninfo)) == message
    assert password_pieces("host=db dbname=app") == []


def test_a_connect_error_showing_a_piece_is_replaced_by_a_masked_copy() -> None:
    conninfo = "host=db password=Sec9ret Piece7"
    ex = psycopg.ProgrammingError('missing "=" after "Piece7" in connection info string')
    clean = without_password(ex, conninfo)
    assert type(clean) is psycopg.ProgrammingError
    assert str(clean) == 'missing "=" after "***" in connection info string'
    other = psycopg.OperationalError("connection refused")
    assert without_password(other, conninfo) is other  # nothing to hide: the original


def test_a_url_password_with_an_unescaped_at_or_slash_is_masked_whole() -> None:
    text = "dsn postgresql://app:Sec9ret@Piece7@db:5432/app and postgres://a:b@c/d"
    assert mask(text) == "dsn postgresql://app:***@db:5432/app and postgres://a:***@c/d"
    # A generated (base64) password may hold a "/": libpq then reads a host and a
    # database out of it.
    url = "postgresql://app:s3cr/3tPW@db:5432/app"
    assert mask(f"dsn {url}") == "dsn postgresql://app:***@db:5432/app"
    shown = "dbname=3tPW@db:5432/app host=app port=s3cr"  # how libpq parses it
    masked = mask_pieces(shown, password_pieces(url))
    assert "3tPW" not in masked and "s3cr" not in masked
