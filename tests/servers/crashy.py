"""A server that dies in the middle of a call (os._exit), to test reconnects."""

from __future__ import annotations

import os
import sys

from _common import startup
from mcp.server.mcpserver import MCPServer

mcp = MCPServer("crashy", log_level="WARNING")


@mcp.tool(structured_output=False)
def pid() -> str:
    """This process's pid (each restart has a new one)."""
    return str(os.getpid())


@mcp.tool(structured_output=False)
def die(message: str = "simulated crash") -> str:
    """Write `message` to stderr and exit at once, without answering."""
    print(f"fatal: {message}", file=sys.stderr, flush=True)
    os._exit(17)


if __name__ == "__main__":
    startup()
    mcp.run()
