"""A server whose `hang` tool never returns; a cancelled call is written to `$HANG_RECORD`."""

from __future__ import annotations

import os

import anyio
from _common import startup
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

mcp = MCPServer("hang", log_level="WARNING")

_started: dict[str, anyio.Event] = {}
_cancelled: dict[str, anyio.Event] = {}


def _event(table: dict[str, anyio.Event], tag: str) -> anyio.Event:
    return table.setdefault(tag, anyio.Event())


def _record(line: str) -> None:
    path = os.environ.get("HANG_RECORD")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


@mcp.tool(structured_output=False)
async def hang(tag: str) -> str:
    """Never return; when the call is cancelled, record it."""
    _event(_started, tag).set()
    try:
        await anyio.sleep_forever()
    except anyio.get_cancelled_exc_class():
        _record(f"cancelled {tag}")
        _event(_cancelled, tag).set()
        raise
    return "unreachable"


@mcp.tool(structured_output=False)
async def wait_started(tag: str) -> str:
    """Return once a `hang` call with this tag is running."""
    with anyio.fail_after(10):
        await _event(_started, tag).wait()
    return "started"


@mcp.tool(structured_output=False)
async def wait_cancelled(tag: str) -> str:
    """Return once the `hang` call with this tag was cancelled by the client."""
    try:
        with anyio.fail_after(10):
            await _event(_cancelled, tag).wait()
    except TimeoutError:
        raise ToolError(f"hang {tag!r} was never cancelled") from None
    return "cancelled"


if __name__ == "__main__":
    startup()
    mcp.run()
