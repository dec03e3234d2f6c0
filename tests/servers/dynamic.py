"""A server that adds and removes tools at run time and says so (tools/list_changed)."""

from __future__ import annotations

from _common import startup
from mcp.server.mcpserver import Context, MCPServer

mcp = MCPServer("dynamic", log_level="WARNING")


async def _announce(ctx: Context) -> None:
    # 2026-07-28 clients hear it on their subscriptions/listen stream, older ones as a notification.
    await ctx.notify_tools_changed()
    await ctx.request_context.session.send_tool_list_changed()


@mcp.tool(structured_output=False)
async def add_tool(name: str, ctx: Context) -> str:
    """Add a tool called `name` that returns its own name."""

    def added() -> str:
        return name

    mcp.add_tool(added, name=name, description=f"added at run time: {name}", structured_output=False)
    await _announce(ctx)
    return f"added {name}"


@mcp.tool(structured_output=False)
async def remove_tool(name: str, ctx: Context) -> str:
    """Remove the tool called `name`."""
    mcp.remove_tool(name)
    await _announce(ctx)
    return f"removed {name}"


if __name__ == "__main__":
    startup()
    mcp.run()
