"""What the SQLite plan store (`sqlite`) and its run queue (`sqlite_queue`) share: transactions run on the
connection's thread, fixed-width timestamps and JSON text."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TypeVar

T = TypeVar("T")


def timestamp(value: datetime) -> str:
    """A fixed-width UTC ISO string, so text order is time order (pydantic drops zero microseconds)."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    elif value.utcoffset():
        value = value.astimezone(UTC)
    # What strftime("%Y-%m-%dT%H:%M:%S.%fZ") gives (glibc does not pad %Y), at less than half its cost:
    # several of these are written per commit on the executor's hot path.
    return "%d-%02d-%02dT%02d:%02d:%02d.%06dZ" % (  # noqa: UP031 (an f-string with format specs is slower)
        value.year,
        value.month,
        value.day,
        value.hour,
        value.minute,
        value.second,
        value.microsecond,
    )


def parse_timestamp(text: str) -> datetime:
    """What `timestamp` wrote (`fromisoformat` reads its `Z` since Python 3.11, 40x faster than strptime)."""
    return datetime.fromisoformat(text)


# -- functions run on the connection's thread -------------------------------------------------------------


def in_write(conn: sqlite3.Connection, body: Callable[[sqlite3.Connection], T]) -> T:
    """Run `body` in one IMMEDIATE transaction: committed whole, or rolled back whole."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = body(conn)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return result


def in_read(conn: sqlite3.Connection, body: Callable[[sqlite3.Connection], T]) -> T:
    """Run `body` in one read transaction: one consistent snapshot across its queries."""
    conn.execute("BEGIN")
    try:
        return body(conn)
    finally:
        if conn.in_transaction:
            conn.execute("COMMIT")
