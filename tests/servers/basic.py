"""A well-behaved test server: echo, structured output, sleep, a barrier, failing tools, big results."""

from __future__ import annotations

import base64
import os
import tempfile
from pathlib import Path
from typing import Any

import anyio
from _common import startup
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import EmbeddedResource, ImageContent, TextContent, TextResourceContents, ToolAnnotations

mcp = MCPServer("basic", log_level="WARNING")

# A 1x1 transparent PNG.
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNkYAAAAAYAAjCB0C8AAAAASUVORK5CYII="
)

_barriers: dict[str, tuple[int, anyio.Event]] = {}


@mcp.tool(structured_output=False, annotations=ToolAnnotations(read_only_hint=True))
def echo(text: str) -> str:
    """Return the text unchanged."""
    return text


@mcp.tool(annotations=ToolAnnotations(read_only_hint=True, idempotent_hint=True))
def echo_structured(text: str, number: int = 1) -> dict[str, Any]:
    """Return the arguments as structured content."""
    return {"text": text, "number": number, "items": [text] * number}


@mcp.tool(structured_output=False)
async def sleep(seconds: float) -> str:
    """Sleep, then say so."""
    await anyio.sleep(seconds)
    return f"slept {seconds}"


@mcp.tool(structured_output=False)
async def barrier(name: str, parties: int = 2) -> str:
    """Return only once `parties` calls with this name are in flight at the same time."""
    count, event = _barriers.get(name, (0, anyio.Event()))
    count += 1
    _barriers[name] = (count, event)
    if count >= parties:
        event.set()
    try:
        with anyio.fail_after(10):
            await event.wait()
    except TimeoutError:
        raise ToolError(f"barrier {name!r}: only {count} of {parties} calls arrived") from None
    return f"barrier {name} passed with {_barriers[name][0]} calls"


@mcp.tool(structured_output=False)
def flaky(key: str, failures: int = 2) -> str:
    """Fail the first `failures` calls for `key` (counted in a file), then succeed."""
    state = Path(os.environ.get("FLAKY_DIR", tempfile.gettempdir()), f"flaky-{key}")
    seen = int(state.read_text()) if state.exists() else 0
    state.write_text(str(seen + 1))
    if seen < failures:
        raise ToolError(f"flaky failure {seen + 1} of {failures} for {key!r}")
    return f"succeeded after {seen} failures"


@mcp.tool(structured_output=False)
def fail(message: str) -> str:
    """Always fail with the given message."""
    raise ToolError(message)


@mcp.tool(structured_output=False)
def big(size: int = 100_000) -> list[Any]:
    """A large text block, an image and an embedded resource."""
    return [
        TextContent(type="text", text="x" * size),
        ImageContent(type="image", data=base64.b64encode(PNG).decode(), mime_type="image/png"),
        EmbeddedResource(
            type="resource",
            resource=TextResourceContents(
                uri="file:///report.txt", text="the report", mime_type="text/plain"
            ),
        ),
    ]


if __name__ == "__main__":
    startup()
    mcp.run()
