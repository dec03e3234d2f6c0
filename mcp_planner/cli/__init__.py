"""The `mcp-planner` command line."""
