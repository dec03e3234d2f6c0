"""The MCP server side: the tools, resources and prompt, and the stdio and HTTP transports."""
