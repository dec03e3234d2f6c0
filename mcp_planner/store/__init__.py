"""Where plans live: the store protocol (`base`), an in-memory store (`memory`), SQLite (`sqlite`, whose run
queue is `sqlite_queue`; `sqlite_common` holds what the two share) and PostgreSQL (`postgres`, an optional
extra).

A database is named by one string, its location: a SQLite file's path, or a `postgresql://` URL.
`open_store` opens either; the rest of the planner never asks which.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mcp_planner.store.base import QueueStore

#: The URL schemes of a PostgreSQL database (libpq's).
POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def is_postgres(location: str | os.PathLike[str]) -> bool:
    """Whether `location` names a PostgreSQL database rather than a SQLite file."""
    return isinstance(location, str) and location.startswith(POSTGRES_SCHEMES)


def default_location() -> Path:
    """`$XDG_DATA_HOME/mcp-planner/plans.db`, by default `~/.local/share/mcp-planner/plans.db`."""
    xdg = os.environ.get("XDG_DATA_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".local" / "share"  # XDG: ignore relative
    return base / "mcp-planner" / "plans.db"


def files_dir(location: str | os.PathLike[str]) -> Path:
    """Where files that belong with a database go (a runner's log): beside a SQLite file; for a PostgreSQL
    database, this user's data directory (`default_location`'s)."""
    if is_postgres(location):
        return default_location().parent
    return Path(os.path.expanduser(os.fspath(location))).parent


@asynccontextmanager
async def open_store(location: str | os.PathLike[str]) -> AsyncIterator[QueueStore]:
    """The store at `location` (created and migrated as needed) for an `async with` block.

    Raises:
        StoreError: the database cannot be opened, or PostgreSQL's extra is not installed.
    """
    if is_postgres(location):
        from mcp_planner.store.postgres import PostgresStore

        async with PostgresStore.open(str(location)) as pg:
            yield pg
    else:
        from mcp_planner.store.sqlite import PlanStore

        async with PlanStore.open(location) as sqlite:
            yield sqlite
