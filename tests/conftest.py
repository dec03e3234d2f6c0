"""Shared fixtures. Append small, clearly named fixtures; keep this file short."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

#: Runner processes that tests start on demand (a submitted run) exit soon after their last run, instead
#: of the production default of 5 minutes. Subprocess environments built by tests carry this too.
RUNNER_IDLE_EXIT = {"MCP_PLANNER_RUNNER_IDLE_EXIT": "3"}
os.environ.update(RUNNER_IDLE_EXIT)
#: The user's data directory (the default database; runner logs of PostgreSQL databases) is a temporary one.
os.environ["XDG_DATA_HOME"] = tempfile.mkdtemp(prefix="mcp-planner-test-data-")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# -- the database backends: store, executor, runner and server tests run on each ---------------------------

#: A PostgreSQL server for the tests (`postgresql://user@host:port/db`); CI starts one (`pg_cluster.py`).
#: Unset: the tests start their own if this machine has PostgreSQL's server binaries, else skip its cases.
PG_ENV = "MCP_PLANNER_TEST_PG"


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """A PostgreSQL server's URL: `$MCP_PLANNER_TEST_PG`, else one started for this test process."""
    if url := os.environ.get(PG_ENV):
        yield url
        return
    import pg_cluster

    # Not under pytest's temporary directory: as root the server runs as `postgres`, which cannot enter it.
    directory = Path(tempfile.mkdtemp(prefix="mcp-planner-pg-"))
    try:
        url = pg_cluster.start(directory)
    except pg_cluster.ClusterError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI must test PostgreSQL, which cannot start here: {exc}")
        pytest.skip(f"PostgreSQL cannot start here ({exc}); set {PG_ENV} to a server's URL")
    try:
        yield url
    finally:
        pg_cluster.stop(directory)


@pytest.fixture
def pg_db(pg_server: str) -> Iterator[str]:
    """The URL of a new, empty PostgreSQL database, dropped after the test."""
    import pg_cluster

    url = pg_cluster.create_database(pg_server)
    try:
        yield url
    finally:
        pg_cluster.drop_database(pg_server, url)


BACKENDS = ["sqlite", "postgres"]


def new_database(request: pytest.FixtureRequest, backend: str) -> str:
    """A new database on `backend` for the test of `request`: a SQLite file or a PostgreSQL URL (`pg_db`)."""
    if backend == "sqlite":
        return str(request.getfixturevalue("tmp_path") / "plans.db")
    return str(request.getfixturevalue("pg_db"))


@pytest.fixture(params=BACKENDS)
def db(request: pytest.FixtureRequest) -> str:
    """A new database on each backend (the test runs once per backend)."""
    return new_database(request, request.param)
