"""The MCP client side: the servers file, connections to the downstream servers, their catalog and calls."""
