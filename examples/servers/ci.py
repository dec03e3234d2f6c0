"""Example downstream server: a simulated CI pipeline (checkout, lint, test, build, deploy).

    python examples/servers/ci.py

Nothing is really built: each tool waits `$CI_DELAY` seconds (default 0.2) and returns structured
content, so plans can pass values along (`{{ steps.build.result.version }}`). `flaky` fails its first N
calls per key (counted in `$CI_STATE_DIR`, default `<tmp>/mcp-planner-ci-<uid>`, one per user) to show
retries; `sleep` shows parallel steps.
"""

from __future__ import annotations

import getpass
import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Literal

import anyio
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import ToolAnnotations

mcp = MCPServer(
    "ci", instructions="A simulated CI pipeline: checkout, lint, test, build, deploy.", log_level="WARNING"
)

READ_ONLY = ToolAnnotations(read_only_hint=True, idempotent_hint=True, open_world_hint=False)
IDEMPOTENT = ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=True)


def _delay() -> float:
    try:
        return max(0.0, float(os.environ.get("CI_DELAY") or 0.2))
    except ValueError:
        return 0.2


def _state_dir() -> Path:
    # Per user: a directory another user created first is not ours to write, and its counts would hide
    # the retries this server exists to show.
    default = Path(tempfile.gettempdir(), f"mcp-planner-ci-{_user_id()}")
    path = Path(os.environ.get("CI_STATE_DIR") or default)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def _user_id() -> str:
    return str(os.getuid()) if hasattr(os, "getuid") else getpass.getuser()


def _digest(*parts: str) -> str:
    return hashlib.sha256("/".join(parts).encode()).hexdigest()


@mcp.tool(annotations=IDEMPOTENT)
async def checkout(repo: str, ref: str = "main") -> dict[str, Any]:
    """Check out `ref` of `repo`; returns the commit id."""
    await anyio.sleep(_delay())
    return {"repo": repo, "ref": ref, "commit": _digest(repo, ref)[:12]}


@mcp.tool(annotations=READ_ONLY)
async def lint(commit: str = "HEAD") -> dict[str, Any]:
    """Lint the checked-out code."""
    await anyio.sleep(_delay())
    return {"commit": commit, "passed": True, "warnings": 0, "files_checked": 42}


@mcp.tool(annotations=READ_ONLY)
async def test(suite: Literal["unit", "integration", "e2e"] = "unit", commit: str = "HEAD") -> dict[str, Any]:
    """Run one test suite: unit, integration or e2e."""
    await anyio.sleep(_delay())
    counts = {"unit": 128, "integration": 34, "e2e": 9}
    return {"suite": suite, "commit": commit, "passed": counts[suite], "failed": 0}


@mcp.tool(annotations=IDEMPOTENT)
async def build(version: str = "1.4.2", commit: str = "HEAD") -> dict[str, Any]:
    """Build a release artifact; returns its version, path and checksum."""
    await anyio.sleep(_delay())
    artifact = f"dist/app-{version}.tar.gz"
    return {"version": version, "commit": commit, "artifact": artifact, "sha256": _digest(artifact, commit)}


@mcp.tool(annotations=ToolAnnotations(destructive_hint=True, idempotent_hint=True, open_world_hint=True))
async def deploy(artifact: str, environment: Literal["staging", "production"] = "staging") -> dict[str, Any]:
    """Deploy an artifact to staging or production, replacing what runs there."""
    await anyio.sleep(_delay())
    if not artifact.startswith("dist/"):
        raise ToolError(f"unknown artifact {artifact!r}: deploy what build returned")
    return {
        "environment": environment,
        "artifact": artifact,
        "url": f"https://{environment}.example.test/",
        "deployment_id": _digest(artifact, environment)[:8],
    }


@mcp.tool(annotations=IDEMPOTENT)
def flaky(key: str, failures: int = 2) -> dict[str, Any]:
    """Fail the first `failures` calls for `key`, then succeed (to show retries)."""
    state = _state_dir() / f"flaky-{_digest(key)[:16]}"
    seen = int(state.read_text()) if state.exists() else 0
    state.write_text(str(seen + 1))
    if seen < failures:
        raise ToolError(f"transient failure {seen + 1} of {failures} for {key!r}; try again")
    return {"key": key, "attempts": seen + 1}


@mcp.tool(annotations=READ_ONLY)
async def sleep(seconds: float) -> dict[str, Any]:
    """Wait `seconds` (to show steps running in parallel)."""
    await anyio.sleep(max(0.0, min(seconds, 600.0)))
    return {"slept": seconds}


if __name__ == "__main__":
    logging.getLogger().setLevel(logging.WARNING)
    mcp.run()
