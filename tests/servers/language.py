"""A test server for the plan language: a list to fan out over, a tool that fails for some items, and one
that reports its errors as normal text (what `fail_if` is for)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from _common import startup
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import ToolAnnotations

mcp = MCPServer("language", log_level="WARNING")

READ_ONLY = ToolAnnotations(read_only_hint=True, idempotent_hint=True)


@mcp.tool(annotations=READ_ONLY)
def names(count: int = 3, prefix: str = "n") -> dict[str, Any]:
    """`{"names": [<prefix>0, <prefix>1, ...]}`, `count` of them."""
    return {"names": [f"{prefix}{i}" for i in range(count)]}


@mcp.tool(structured_output=False, annotations=READ_ONLY)
def shout(text: str) -> str:
    """The text in capitals; a text starting with "bad" is refused (an error result)."""
    if text.startswith("bad"):
        raise ToolError(f"cannot shout {text!r}")
    return text.upper()


@mcp.tool(structured_output=False)
def status(key: str, errors: int = 2) -> str:
    """Say "ERROR: <key> not ready" as normal text (not an error result) for the first `errors` calls for
    `key` (counted in a file under `$STATE_DIR`), then "OK: <key> ready"."""
    state = Path(os.environ.get("STATE_DIR", tempfile.gettempdir()), f"status-{key}")
    seen = int(state.read_text()) if state.exists() else 0
    state.write_text(str(seen + 1))
    return f"ERROR: {key} not ready" if seen < errors else f"OK: {key} ready"


if __name__ == "__main__":
    startup()
    mcp.run()
