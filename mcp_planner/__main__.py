"""`python -m mcp_planner`: the same as the `mcp-planner` command."""

from .cli import main

if __name__ == "__main__":
    main()
