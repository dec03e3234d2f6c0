"""`python -m mcp_planner`: the same as the `mcp-planner` command."""

from mcp_planner.cli.main import main

if __name__ == "__main__":
    main()
