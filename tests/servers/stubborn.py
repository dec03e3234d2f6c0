"""A server that ignores SIGTERM and starts a child that ignores it too, like a careless `npx` wrapper.

Writes "<own pid> <child pid>" to `$PIDS_FILE` (atomically) before serving.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from mcp.server.mcpserver import MCPServer

mcp = MCPServer("stubborn", log_level="WARNING")

CHILD = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nwhile True: time.sleep(60)"


@mcp.tool(structured_output=False)
def ping() -> str:
    """Answer pong."""
    return "pong"


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL
    )
    path = os.environ["PIDS_FILE"]
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(f"{os.getpid()} {child.pid}")
    os.replace(path + ".tmp", path)
    mcp.run()
