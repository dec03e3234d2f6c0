"""Shared fixtures. Append small, clearly named fixtures; keep this file short."""

from __future__ import annotations

import os

import pytest

#: Runner processes that tests start on demand (a submitted run) exit soon after their last run, instead
#: of the production default of 5 minutes. Subprocess environments built by tests carry this too.
RUNNER_IDLE_EXIT = {"MCP_PLANNER_RUNNER_IDLE_EXIT": "3"}
os.environ.update(RUNNER_IDLE_EXIT)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
