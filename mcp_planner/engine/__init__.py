"""The engine: the executor, the run coordinator, one step's attempts, and the tool protocol it calls.

It talks to a tool protocol and a store protocol; it never imports mcp, aiosqlite or rich."""
