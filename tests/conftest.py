"""Shared fixtures. Append small, clearly named fixtures; keep this file short."""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
